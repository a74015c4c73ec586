"""Robust training losses: options, state guarantees, maths, and that robust training helps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import digits_tensors
from torch import nn

from lightning_hessian.attacks import (
    ADVERSARIAL_TRAINING_METHODS,
    AdversarialTraining,
    AttackSpec,
    evaluate_attack,
    fgsm,
)
from lightning_hessian.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
    ).train()


def _batch(n: int = 32):
    generator = torch.Generator().manual_seed(5)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_options_are_validated_with_the_valid_names():
    with pytest.raises(
        ValueError, match="valid methods: none, fgsm, fgsm_rs, pgd, trades, gaussian_noise, uniform_noise"
    ):
        AdversarialTraining(method="madry")
    for bad in (
        dict(epsilon=-0.1),
        dict(steps=0),
        dict(step_size=0.0),
        dict(ratio=0.0),
        dict(ratio=1.5),
        dict(beta=-1.0),
    ):
        with pytest.raises(ValueError):
            AdversarialTraining(method="pgd", **bad)
    for bad_size in (0, -256, 2.5, True):
        with pytest.raises(
            UserInputError, match=rf"attack_batch_size must be a whole number >= 1 or null .* {bad_size!r}"
        ):
            AdversarialTraining(method="pgd", attack_batch_size=bad_size)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):  # frozen
        AdversarialTraining().method = "pgd"  # type: ignore[misc]
    assert AdversarialTraining(method="pgd", epsilon=0.1, steps=4).effective_step_size == pytest.approx(2.5 * 0.1 / 4)
    assert AdversarialTraining(method="fgsm_rs", epsilon=0.1).effective_step_size == pytest.approx(0.125)


@pytest.mark.parametrize("method", [m for m in ADVERSARIAL_TRAINING_METHODS if m != "none"])
def test_epsilon_wider_than_the_pixel_range_is_refused(method):
    """epsilon=8 meant 8/255: every input would be replaced by clipped noise (training reaches chance
    accuracy). The same rule as AttackSpec.check_bounds for the evaluation attacks."""
    with pytest.raises(UserInputError, match=r"epsilon 8 is larger than the input range width 1 .* 8/255 = 0.0314"):
        AdversarialTraining(method=method, epsilon=8)
    with pytest.raises(ValueError, match=r"epsilon 8\.0 is larger than the input range width"):
        AttackSpec(name="linf_pgd", epsilons=[8]).check_bounds((0.0, 1.0))
    AdversarialTraining(method=method, epsilon=1.0)  # the whole range: allowed, if extreme
    AdversarialTraining(method="none", epsilon=8)  # not used without a method


@pytest.mark.parametrize("method", ADVERSARIAL_TRAINING_METHODS)
def test_state_guarantees_and_perturbation_bounds(method):
    model = _bn_model()
    model[4].eval()  # a submodule in its own mode must keep it
    x, y = _batch()
    training = AdversarialTraining(method=method, epsilon=0.1, steps=3)
    stats = [b.clone() for b in model.buffers()]
    x_adv = training.perturb(model, x, y)
    # generated in eval mode: BatchNorm statistics untouched; modes restored; no parameter .grad
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))
    assert model.training and model[2].training and not model[4].training
    assert all(p.grad is None for p in model.parameters())
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    if method not in ("none", "gaussian_noise"):
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    if method != "none":
        assert not torch.equal(x_adv, x)
    loss, logits, targets = training.training_loss(model, x, y)
    assert logits.shape == (32, 10) and torch.equal(targets, y) and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fgsm_training_uses_the_native_fgsm_in_eval_mode():
    model = _bn_model()
    x, y = _batch()
    x_adv = AdversarialTraining(method="fgsm", epsilon=0.05).perturb(model, x, y)
    assert torch.equal(x_adv, fgsm(model.eval(), x, y, 0.05))


def test_ratio_replaces_the_first_fraction_of_the_batch():
    model = _bn_model().eval()  # deterministic forward to compare losses
    x, y = _batch(30)
    training = AdversarialTraining(method="fgsm", epsilon=0.05, ratio=0.4)
    assert training.num_perturbed(30) == 12
    loss, _, _ = training.training_loss(model, x, y)
    expected_input = torch.cat([fgsm(model, x[:12], y[:12], 0.05), x[12:]])
    torch.testing.assert_close(loss, F.cross_entropy(model(expected_input), y))


def test_trades_loss():
    model = _bn_model().eval()
    x, y = _batch()
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(AdversarialTraining(method="trades", beta=0.0).training_loss(model, x, y).loss, clean)
    torch.manual_seed(0)
    trades = AdversarialTraining(method="trades", epsilon=0.1, steps=5, beta=6.0)
    loss, logits, _ = trades.training_loss(model, x, y)
    torch.testing.assert_close(logits, model(x))  # the clean logits
    torch.manual_seed(0)
    x_adv = trades.perturb(model, x, y)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
    torch.testing.assert_close(loss, clean + 6.0 * kl)
    # the inner maximisation increased the KL over the small random start
    start_kl = F.kl_div(F.log_softmax(model(x + 0.001), 1), F.softmax(model(x), 1), reduction="batchmean")
    assert kl > 10 * start_kl


@pytest.mark.parametrize("method", ["fgsm_rs", "pgd", "trades"])
def test_bf16_autocast(method):
    model = _bn_model()
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits, _ = AdversarialTraining(method=method, epsilon=0.1, steps=2).training_loss(model, x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def _train_digits(training: AdversarialTraining) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = digits_tensors()
    x = x.flatten(1)  # 64 features
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        order = torch.randperm(1300, generator=generator)
        for start in range(0, 1300, 100):
            index = order[start : start + 100]
            optimizer.zero_grad()
            training.training_loss(model, x[index], y[index]).loss.backward()
            optimizer.step()
    return model.eval(), x[1300:], y[1300:]


def test_robust_training_raises_robust_accuracy_on_digits():
    epsilon = 0.1
    spec = AttackSpec("linf_pgd", [epsilon], steps=10)
    results = {}
    for method in ("none", "pgd"):
        model, x, y = _train_digits(AdversarialTraining(method=method, epsilon=epsilon, steps=3))
        outcome = evaluate_attack(model, x, y, spec, generator=torch.Generator().manual_seed(0))
        results[method] = (outcome.clean_correct.float().mean().item(), outcome.robust_correct.float().mean().item())
    print(f"digits, (clean, PGD-10 robust at {epsilon}) accuracy by training method: {results}")  # README numbers
    (clean_std, robust_std), (clean_adv, robust_adv) = results["none"], results["pgd"]
    assert clean_std > 0.9 and clean_adv > 0.8  # both models learned the task
    assert robust_adv > robust_std + 0.2, results


@pytest.mark.parametrize("method", ["fgsm", "fgsm_rs", "pgd", "trades"])
def test_attack_batch_size_slices_the_attack_and_keeps_the_perturbations(method):
    """attack_batch_size is a speed knob: the attack's passes run on slices of 7 samples (the last
    one shorter), and the perturbation is the one of the whole batch at once (float64, so that
    rounding cannot flip the sign of a gradient entry)."""
    model = _bn_model().double()
    x, y = _batch()
    x = x.double()
    whole = AdversarialTraining(method=method, epsilon=0.1, steps=3)
    sliced = AdversarialTraining(method=method, epsilon=0.1, steps=3, attack_batch_size=7)
    seen: list[int] = []
    hook = model[1].register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    torch.manual_seed(3)
    expected = whole.perturb(model, x, y)
    assert set(seen) == {32}
    seen.clear()
    torch.manual_seed(3)
    actual = sliced.perturb(model, x, y)
    hook.remove()
    assert seen and set(seen) == {7, 4} and sum(seen) % 32 == 0
    torch.testing.assert_close(actual, expected)
    assert model.training and model[2].training  # modes restored, as without slices
