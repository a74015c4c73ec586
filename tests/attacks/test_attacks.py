"""Native FGSM/PGD against foolbox 3.3.4, the foolbox adapter's traps, and attack specs."""

from __future__ import annotations

import math

import foolbox as fb
import pytest
import torch
from helpers import digits_tensors
from torch import nn

from lightning_hessian.attacks import (
    AttackSpec,
    evaluate_attack,
    fgsm,
    forward_in_micro_batches,
    input_gradient,
    pgd,
    run_foolbox_attack,
)
from lightning_hessian.attacks.evaluation import check_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def digits_model():
    """A seeded MLP trained on sklearn's digits (pixel space [0, 1]) and 400 held-out samples."""
    x, y = digits_tensors()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1300]), y[:1300]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), x[1300:1700], y[1300:1700]


def test_fgsm_equals_foolbox_bit_for_bit():
    model = _conv_model()
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2))
    epsilons = [0.0, 0.01, 8 / 255, 0.1, 0.3]
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    _, clipped, success = fb.attacks.FGSM()(fmodel, x, y, epsilons=epsilons)
    for eps, theirs in zip(epsilons, clipped, strict=True):
        assert torch.equal(fgsm(model, x, y, eps), theirs), eps
    # the callback's batched path (all epsilons stacked, per-sample epsilon tensors) agrees too
    outcome = evaluate_attack(model, x, y, AttackSpec("fgsm", epsilons), backend="native", batch_size=50)
    clean = model(x).argmax(1) == y
    assert torch.equal(outcome.robust_correct, clean & ~success)


@pytest.mark.parametrize(
    "norm, cls, eps, step", [("linf", fb.attacks.LinfPGD, 0.05, 0.01), ("l2", fb.attacks.L2PGD, 0.8, 0.2)]
)
def test_pgd_without_random_start_equals_foolbox(norm, cls, eps, step):
    model = _conv_model()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(4))
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    raw, _, _ = cls(abs_stepsize=step, steps=5, random_start=False)(fmodel, x, y, epsilons=[eps])
    ours = pgd(model, x, y, eps, steps=5, step_size=step, norm=norm, random_init=False)
    torch.testing.assert_close(ours, raw[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, epsilons", [("linf_pgd", [0.05, 0.1]), ("l2_pgd", [0.3, 0.6])])
def test_native_pgd_matches_foolbox_within_sampling_error(digits_model, name, epsilons):
    model, x, y = digits_model
    spec = AttackSpec(name, epsilons, steps=10)
    torch.manual_seed(0)
    native = evaluate_attack(model, x, y, spec, backend="native", generator=torch.Generator().manual_seed(0))
    foolbox = evaluate_attack(model, x, y, spec, backend="foolbox")
    n = x.shape[0]
    for k in range(len(epsilons)):
        p_native = native.robust_correct[k].float().mean().item()
        p_foolbox = foolbox.robust_correct[k].float().mean().item()
        p = (p_native + p_foolbox) / 2
        # two estimates on the same samples, differing only by the random start
        assert abs(p_native - p_foolbox) <= 3 * math.sqrt(2 * p * (1 - p) / n) + 1 / n, (k, p_native, p_foolbox)
        assert 0.05 < p < 0.95  # the epsilons are in the interesting range: the test can fail


def test_pgd_is_at_least_as_strong_as_fgsm(digits_model):
    model, x, y = digits_model
    epsilons = [0.02, 0.05, 0.1, 0.15]
    fgsm_acc = evaluate_attack(model, x, y, AttackSpec("fgsm", epsilons)).robust_correct.float().mean(1)
    pgd_acc = (
        evaluate_attack(
            model, x, y, AttackSpec("linf_pgd", epsilons, steps=10), generator=torch.Generator().manual_seed(0)
        )
        .robust_correct.float()
        .mean(1)
    )
    assert (pgd_acc <= fgsm_acc).all(), (pgd_acc, fgsm_acc)
    assert (pgd_acc < fgsm_acc).any()  # strictly stronger somewhere on this model


@pytest.mark.parametrize("name", ["fgsm", "linf_pgd", "l2_pgd", "l2_deepfool"])
def test_epsilon_zero_gives_clean_accuracy(digits_model, name):
    model, x, y = digits_model
    for backend in ("native", "foolbox"):
        outcome = evaluate_attack(model, x, y, AttackSpec(name, [0.0, 0.1]), backend=backend)
        assert torch.equal(outcome.robust_correct[0], outcome.clean_correct)
        assert outcome.robust_correct[1].sum() < outcome.clean_correct.sum()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_native_pgd_at_epsilon_zero_returns_the_input(digits_model, norm):
    # why the native evaluation may skip epsilon 0: the attack cannot move the input there
    model, x, y = digits_model
    per_sample = torch.tensor([0.0, 0.1]).repeat_interleave(len(x) // 2)
    x_adv = pgd(model, x, y, per_sample, steps=3, step_size=per_sample / 2, norm=norm, random_init=True)
    half = len(x) // 2
    assert torch.equal(x_adv[:half], x[:half])
    assert not torch.equal(x_adv[half:], x[half:])


def test_minimal_attacks_give_norms_consistent_with_robust_accuracy(digits_model):
    model, x, y = digits_model
    x, y = x[:120], y[:120]
    outcome = run_foolbox_attack(model, x, y, AttackSpec("l2_deepfool", [0.3, 0.6, 1.0]))
    norms = outcome.norms
    assert torch.all(norms[~outcome.clean_correct] == 0)
    assert torch.all(norms[outcome.clean_correct] > 0)
    # robust at epsilon <=> the smallest adversarial found is larger than epsilon (up to clipping ties)
    for k, eps in enumerate([0.3, 0.6, 1.0]):
        assert torch.equal(outcome.robust_correct[k], outcome.clean_correct & (norms > eps))


def test_foolbox_adapter_leaves_model_untouched_under_inference_mode():
    model = _conv_model().train()
    model[4].weight.grad = torch.full_like(model[4].weight, 0.5)
    grad_before = model[4].weight.grad
    model[0].weight.requires_grad_(False)
    buffers = [b.clone() for b in model.buffers()]
    with torch.inference_mode():
        x = torch.rand(16, 1, 8, 8)
        y = torch.randint(0, 10, (16,))
        outcome = run_foolbox_attack(model, x, y, AttackSpec("linf_pgd", [0.05], steps=3))
    assert outcome.robust_correct.shape == (1, 16)
    assert model.training and all(m.training for m in model.modules())
    assert model[4].weight.grad is grad_before and torch.all(grad_before == 0.5)
    assert model[0].weight.grad is None and model[1].weight.grad is None
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))  # eval mode: BN stats kept


def test_inputs_outside_bounds_are_a_clear_error():
    model = _conv_model()
    x = torch.randn(4, 1, 8, 8)  # normalised data, not pixel space
    with pytest.raises(ValueError, match="outside the bounds"):
        evaluate_attack(model, x, torch.zeros(4, dtype=torch.long), AttackSpec("fgsm", [0.1]), backend="foolbox")


def test_attack_spec_validation():
    with pytest.raises(ValueError, match="valid attacks: fgsm, linf_pgd, l2_pgd, linf_deepfool, l2_deepfool, l2_cw"):
        AttackSpec("pgd", [0.1])
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        AttackSpec("fgsm", [0.1, -0.1])
    with pytest.raises(ValueError, match="at least one epsilon"):
        AttackSpec("fgsm", [])
    with pytest.raises(ValueError, match="larger than the input range"):
        AttackSpec("linf_pgd", [8.0]).check_bounds((0.0, 1.0))
    AttackSpec("l2_pgd", [8.0]).check_bounds((0.0, 1.0), (1, 8, 8))  # L2 diameter is 8
    with pytest.raises(ValueError, match="L2 diameter"):
        AttackSpec("l2_pgd", [8.1]).check_bounds((0.0, 1.0), (1, 8, 8))
    spec = AttackSpec("linf_pgd", [0.1], steps=4)
    assert spec.epsilons == (0.1,) and spec.pgd_step_size(0.1) == pytest.approx(2.5 * 0.1 / 4)


def test_check_logits_rejects_probabilities():
    logits = torch.randn(8, 10)
    check_logits(logits, "l2_cw")
    check_logits(torch.log_softmax(logits, 1), "l2_cw")  # log-probabilities keep logit differences
    with pytest.raises(ValueError, match="l2_cw needs logits"):
        check_logits(torch.softmax(logits, 1), "l2_cw")


def test_input_gradient_in_micro_batches_is_the_whole_batch_gradient():
    """The objective sees the logits of the whole batch (here one that couples the samples), so
    slicing the forward pass changes nothing but speed, in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    model = model.double().eval()
    x = torch.rand(20, 1, 8, 8, dtype=torch.float64)

    def coupled(logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits.flatten(), 0) * logits[0].sum()

    expected = input_gradient(model, x, coupled)
    for size in (1, 3, 20, 64):
        torch.testing.assert_close(input_gradient(model, x, coupled, micro_batch_size=size), expected)


def test_micro_batches_are_refused_for_batch_norm_in_training_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)).train()
    x = torch.rand(8, 1, 8, 8)
    with pytest.raises(ValueError, match=r"training mode \(2\); use eval_mode\(model\) or micro_batch_size=None"):
        forward_in_micro_batches(model, x, 4)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1 or None, got 0"):
        forward_in_micro_batches(model.eval(), x, 0)
    # one forward (no slices) is the model's own call, in any mode
    model.train()
    assert forward_in_micro_batches(model, x, 8).shape == (8, 10)
