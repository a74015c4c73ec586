"""Tests of the large-batch optimisers ``lars`` and ``lamb`` (``pytorch-optimizer``): selection from
the CLI, the parameter groups, their argument checks, the schedules, and single steps against the
update rules computed by hand."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import INPUT_SHAPES, QUICKSTART, QUIET_CLI, QUIET_TRAINER
from torch import nn

from lightning_hessian.cli import HessianCLI, main
from lightning_hessian.data import Digits
from lightning_hessian.errors import UserInputError
from lightning_hessian.models import OPTIMIZERS, ImageClassifier, build_optimizer, lr_multiplier, parameter_groups
from lightning_hessian.models.optim import DEFAULT_TRUST_COEFFICIENT, LAMB_BETA2, LAMB_EPS

pytestmark = pytest.mark.usefixtures("one_thread", "clean_argv")

SHAPES = {arch: INPUT_SHAPES[arch] for arch in ("mlp", "c1", "resnet20")}


def _tiny_network() -> nn.Module:
    """Linear (weight matrix + bias), BatchNorm (1-D scale and shift), Linear; float64 so that the
    comparisons with the hand-computed updates are tight. BatchNorm after the activation: a bias
    right before BatchNorm has a zero gradient (rounding noise, which LAMB's ``m / (sqrt(v) + eps)``
    would amplify)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator)


def _backward(network: nn.Module, step: int) -> None:
    network.zero_grad(set_to_none=True)
    x, y = _batch(step)
    F.cross_entropy(network(x), y).backward()


def test_lars_and_lamb_are_listed() -> None:
    assert OPTIMIZERS == ("sgd", "adam", "lars", "lamb")
    assert DEFAULT_TRUST_COEFFICIENT == 1e-3
    assert ImageClassifier(arch="mlp", input_shape=(1, 8, 8)).hparams.trust_coefficient == 1e-3


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_cli_selects_and_trains_with_the_optimizer(in_tmp_dir: Path, optimizer: str) -> None:
    """`hessian-train fit --config configs/quickstart.yaml --model.optimizer <name>` builds the library's
    optimiser over the two groups and trains: finite loss, every group's weights move."""
    overrides = ["--model.trust_coefficient=0.002"] if optimizer == "lars" else []
    cli = HessianCLI(
        args=[
            "--config", str(QUICKSTART), *QUIET_CLI, f"--model.optimizer={optimizer}", *overrides,
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
        ],
        run=False,
    )  # fmt: skip
    model = cli.model
    assert model.hparams.optimizer == optimizer
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    (trained_with,) = cli.trainer.optimizers
    assert type(trained_with).__name__ == {"lars": "LARS", "lamb": "Lamb"}[optimizer]
    assert type(trained_with).__module__.startswith("pytorch_optimizer.")
    assert [group["name"] for group in trained_with.param_groups] == ["decay", "no_decay"]
    if optimizer == "lars":
        assert trained_with.param_groups[0]["trust_coefficient"] == 0.002
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        assert not torch.equal(param, before[name]), f"{name} did not move"


def test_cli_refuses_nesterov_with_lamb_in_one_line(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(QUICKSTART), *QUIET_CLI, "--model.optimizer=lamb", "--model.nesterov=true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    # as every bad model setting: the parser's one-line "error: ..." (see cli/test_train.py), no traceback
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "nesterov=True does not apply to optimizer 'lamb'" in errors[0]
    assert "Traceback" not in err
    assert not (in_tmp_dir / "runs").exists()


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_biases_and_batch_norm_are_in_the_no_decay_no_adaptation_group(arch: str) -> None:
    model = ImageClassifier(arch=arch, input_shape=SHAPES[arch], batch_norm=True)
    groups = parameter_groups(model, weight_decay=5e-4)
    decay, no_decay = groups
    assert (decay["name"], decay["weight_decay"], decay["adapt"]) == ("decay", 5e-4, True)
    assert (no_decay["name"], no_decay["weight_decay"], no_decay["adapt"]) == ("no_decay", 0.0, False)
    in_decay = {id(p) for p in decay["params"]}
    in_no_decay = {id(p) for p in no_decay["params"]}
    assert in_decay.isdisjoint(in_no_decay) and in_decay | in_no_decay == {id(p) for p in model.parameters()}
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert batch_norms
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert {id(module.weight), id(module.bias)} <= in_no_decay
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert id(module.weight) in in_decay
            if module.bias is not None:
                assert id(module.bias) in in_no_decay
    # the optimisers are built over exactly these groups; lamb turns adaptation off with its `adam` flag
    lars = build_optimizer("lars", model, lr=1.0, weight_decay=5e-4)
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in lars.param_groups] == [
        ("decay", 5e-4, len(in_decay)), ("no_decay", 0.0, len(in_no_decay)),
    ]  # fmt: skip
    lamb = build_optimizer("lamb", model, lr=1e-3, weight_decay=5e-4)
    assert [(g["name"], g["adam"], g["weight_decouple"]) for g in lamb.param_groups] == [
        ("decay", False, False), ("no_decay", True, False),
    ]  # fmt: skip
    # sgd and adam keep one group that decays everything, as before
    (sgd_group,) = build_optimizer("sgd", model, lr=0.1, weight_decay=5e-4).param_groups
    assert len(sgd_group["params"]) == len(in_decay) + len(in_no_decay) and sgd_group["weight_decay"] == 5e-4


def test_frozen_parameters_and_empty_groups_are_left_out() -> None:
    network = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2))
    network[1].requires_grad_(False)
    (only,) = parameter_groups(network, weight_decay=0.1)
    assert only["name"] == "decay" and only["params"] == [network[0].weight]


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_steps_equal_the_formula_computed_by_hand(nesterov: bool) -> None:
    """Three steps of ``pytorch_optimizer.LARS`` as configured by ``build_optimizer``, against:

    * weight tensors (``ndim > 1``): ``local_lr = eta * ||w|| / (||g|| + wd * ||w||)`` (no epsilon in
      this library), ``d = local_lr * (g + wd * w)``;
    * biases and BatchNorm parameters: ``d = g`` (no decay, no adaptation);
    * then momentum SGD with the global rate outside the buffer (``torch.optim.SGD``'s form):
      ``buf = d`` at the first step, then ``buf = m * buf + d``; ``w -= lr * buf``, or with Nesterov
      ``w -= lr * (d + m * buf)``.
    """
    lr, momentum, weight_decay, eta = 0.7, 0.9, 1e-2, 2e-3
    network = _tiny_network()
    by_hand = copy.deepcopy(network)
    optimizer = build_optimizer(
        "lars", network, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, trust_coefficient=eta
    )
    buffers: dict[str, torch.Tensor] = {}
    for step in range(3):
        _backward(network, step)
        _backward(by_hand, step)
        weight, gradient = network[0].weight.detach().clone(), network[0].weight.grad.clone()
        bias, bias_gradient = network[0].bias.detach().clone(), network[0].bias.grad.clone()
        optimizer.step()
        with torch.no_grad():
            for name, w in by_hand.named_parameters():
                g = w.grad
                if w.ndim > 1:
                    local_lr = eta * w.norm() / (g.norm() + weight_decay * w.norm())
                    d = local_lr * (g + weight_decay * w)
                else:
                    d = g.clone()
                buffers[name] = d if step == 0 else momentum * buffers[name] + d
                w -= lr * (d + momentum * buffers[name] if nesterov else buffers[name])
        for (name, p), q in zip(network.named_parameters(), by_hand.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{name} after step {step + 1}")
        if step == 0:  # written out once: the weight matrix is adapted and decayed, the bias neither
            local_lr = eta * weight.norm() / (gradient.norm() + weight_decay * weight.norm())
            first = (1 + momentum) if nesterov else 1.0  # Nesterov: d + m * buf with buf = d
            torch.testing.assert_close(
                network[0].weight, weight - lr * first * local_lr * (gradient + weight_decay * weight)
            )
            torch.testing.assert_close(network[0].bias, bias - lr * first * bias_gradient)


def test_lamb_steps_equal_the_update_computed_by_hand() -> None:
    """Three steps of ``pytorch_optimizer.Lamb`` as configured by ``build_optimizer`` (uncorrected
    moments, step ``lr``): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``r = m / (sqrt(v) +
    eps)``; weights: ``u = r + wd * w``, ``w -= lr * min(||w||, 10) / (||u|| + eps) * u``; biases and
    BatchNorm parameters: ``w -= lr * r``."""
    lr, beta1, weight_decay = 0.01, 0.8, 0.1
    network = _tiny_network()
    by_hand = copy.deepcopy(network)
    optimizer = build_optimizer("lamb", network, lr=lr, momentum=beta1, weight_decay=weight_decay)
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        name: (0 * p, 0 * p) for name, p in by_hand.named_parameters()
    }
    for step in range(3):
        _backward(network, step)
        _backward(by_hand, step)
        optimizer.step()
        with torch.no_grad():
            for name, w in by_hand.named_parameters():
                g = w.grad
                m, v = moments[name]
                m, v = beta1 * m + (1 - beta1) * g, LAMB_BETA2 * v + (1 - LAMB_BETA2) * g**2
                moments[name] = (m, v)
                r = m / (v.sqrt() + LAMB_EPS)
                if w.ndim > 1:
                    u = r + weight_decay * w
                    w -= lr * w.norm().clamp(max=10.0) / (u.norm() + LAMB_EPS) * u
                else:
                    w -= lr * r
        for (name, p), q in zip(network.named_parameters(), by_hand.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{name} after step {step + 1}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"optimizer": "lars", "trust_coefficient": 0.0},
            r"trust_coefficient must be a positive number, got 0.0; LARS's usual value is 0.001",
        ),
        ({"optimizer": "lars", "trust_coefficient": -1e-3}, r"trust_coefficient must be a positive number, got -0.001"),
        (
            {"optimizer": "lars", "trust_coefficient": float("nan")},
            r"trust_coefficient must be a positive number, got nan",
        ),
        (
            {"optimizer": "lamb", "trust_coefficient": 0.01},
            r"trust_coefficient=0.01 is LARS's, optimizer 'lamb' has none.*use optimizer lars",
        ),
        ({"optimizer": "sgd", "trust_coefficient": 0.01}, r"optimizer 'sgd' has none"),
        (
            {"optimizer": "lamb", "nesterov": True},
            r"nesterov=True does not apply to optimizer 'lamb'.*set nesterov false",
        ),
    ],
)
def test_settings_that_do_not_apply_fail_before_training(kwargs: dict, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        ImageClassifier(arch="mlp", input_shape=(1, 8, 8), **kwargs)
    settings = {key: value for key, value in kwargs.items() if key != "optimizer"}
    with pytest.raises(UserInputError, match=match):  # the same checks guard build_optimizer
        build_optimizer(kwargs["optimizer"], nn.Linear(2, 2), lr=0.1, **settings)


def test_valid_combinations_build() -> None:
    network = _tiny_network()
    lars = build_optimizer("lars", network, lr=1.0, momentum=0.9, nesterov=True, trust_coefficient=0.02)
    assert all(g["nesterov"] and g["trust_coefficient"] == 0.02 for g in lars.param_groups)
    # as for sgd, Nesterov without momentum is plain (not an error)
    assert not build_optimizer("lars", network, lr=1.0, momentum=0.0, nesterov=True).param_groups[0]["nesterov"]
    lamb = build_optimizer("lamb", network, lr=1e-3, momentum=0.0)
    assert lamb.param_groups[0]["betas"] == (0.0, LAMB_BETA2)


class _GroupRates(pl.Callback):
    """Records every parameter group's learning rate before each training step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_scaling_warmup_and_step_decay_drive_both_groups(tmp_path: Path, optimizer: str) -> None:
    """2 epochs x 4 steps: sqrt scaling 64/32, warm-up of half an epoch (2 steps), step decay x0.1
    after epoch 1; both parameter groups follow the formula."""
    pl.seed_everything(0)
    model = ImageClassifier(
        arch="mlp", input_shape=(1, 8, 8), optimizer=optimizer, lr=0.05, base_batch_size=32, batch_size=64,
        lr_scaling="sqrt", warmup_epochs=0.5, lr_schedule="step", lr_milestones=[1], lr_gamma=0.1,
    )  # fmt: skip
    recorder = _GroupRates()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[recorder],
        default_root_dir=tmp_path, **QUIET_TRAINER,
    )  # fmt: skip
    trainer.fit(model, datamodule=Digits(batch_size=64))
    peak = 0.05 * math.sqrt(2)
    expected = [
        peak * lr_multiplier(t, total_steps=8, warmup_steps=2, schedule="step", milestones=[4], gamma=0.1)
        for t in range(8)
    ]
    assert [rates[0] for rates in recorder.lrs] == pytest.approx(expected)
    assert all(len(rates) == 2 and rates[0] == rates[1] for rates in recorder.lrs)
