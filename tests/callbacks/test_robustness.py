"""AdversarialRobustnessCallback on a plain LightningModule: metrics, figures, no side effects, errors, DDP."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import QUIET_TRAINER, digits_tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.attacks import AttackSpec, evaluate_attack
from lightning_hessian.callbacks.robustness import AdversarialRobustnessCallback

_X, _Y = digits_tensors()


pytestmark = pytest.mark.usefixtures("one_thread")


class DigitsModule(pl.LightningModule):
    """A plain LightningModule, not one of ours: BatchNorm, dropout, SGD with momentum."""

    def __init__(self, output: str = "logits", shift: float = 0.0) -> None:
        super().__init__()
        self.output = output
        self.shift = shift  # inputs outside [0, 1] when non-zero (as if normalised outside the model)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
        )

    def forward(self, x):
        logits = self.net(x)
        return logits.softmax(dim=1) if self.output == "probabilities" else logits

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(TensorDataset(_X[:600] + self.shift, _Y[:600]), batch_size=50, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(_X[1400:1600] + self.shift, _Y[1400:1600]), batch_size=100)

    def test_dataloader(self):
        return DataLoader(TensorDataset(_X[1600:] + self.shift, _Y[1600:]), batch_size=100)


def _trainer(tmp_path, callbacks, epochs=2, **kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=epochs,
        callbacks=callbacks,
        **QUIET_TRAINER,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def test_logs_robust_accuracy_median_norm_and_figures(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = AdversarialRobustnessCallback(
        attacks=[
            AttackSpec("fgsm", [0.0, 0.05, 0.1]),
            {"name": "linf_pgd", "epsilons": [0.05], "steps": 5},  # dicts work too (YAML)
            AttackSpec("l2_deepfool", [0.5, 1.0]),
        ],
        num_samples=120,
        seed=1,
    )
    pl.seed_everything(0)
    model = DigitsModule()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [callback], epochs=2, logger=logger)
    trainer.fit(model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("robust/")}
    assert set(metrics) == {
        "robust/clean_acc",
        "robust/fgsm/eps_0",
        "robust/fgsm/eps_0.05",
        "robust/fgsm/eps_0.1",
        "robust/linf_pgd/eps_0.05",
        "robust/l2_deepfool/eps_0.5",
        "robust/l2_deepfool/eps_1",
        "robust/l2_deepfool/median_norm",
        "robust/seconds",
    }
    # an independent computation on the callback's samples agrees
    samples = callback._samples["val"]
    assert samples.num_global == 120
    model.eval()
    with torch.no_grad():
        clean = (model(samples.batch[0]).argmax(1) == samples.batch[1]).float().mean().item()
    assert metrics["robust/clean_acc"] == pytest.approx(clean) and 0.5 < clean < 1
    assert metrics["robust/fgsm/eps_0"] == metrics["robust/clean_acc"]
    expected = evaluate_attack(
        model, samples.batch[0], samples.batch[1], AttackSpec("fgsm", [0.05, 0.1]), backend="foolbox"
    )
    assert metrics["robust/fgsm/eps_0.05"] == pytest.approx(expected.robust_correct[0].float().mean().item())
    assert metrics["robust/fgsm/eps_0.1"] == pytest.approx(expected.robust_correct[1].float().mean().item())
    assert metrics["robust/fgsm/eps_0.1"] < metrics["robust/fgsm/eps_0.05"] < clean
    assert metrics["robust/linf_pgd/eps_0.05"] <= metrics["robust/fgsm/eps_0.05"]
    assert 0 < metrics["robust/l2_deepfool/median_norm"] < 5
    # scalars at both epochs and one figure per attack in TensorBoard
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0}).Reload()
    assert len(events.Scalars("robust/fgsm/eps_0.05")) == 2
    assert {"robust/fgsm/curve", "robust/linf_pgd/curve", "robust/l2_deepfool/curve"} <= set(events.Tags()["images"])

    # validate and test run under inference mode, on their own splits
    trainer.validate(model, verbose=False)
    assert trainer.callback_metrics["robust/val/clean_acc"] == pytest.approx(clean)  # split-qualified tag
    trainer.test(model, verbose=False)
    assert callback._samples["test"].num_global == 120
    assert {"robust/test/clean_acc", "robust/test/fgsm/eps_0.05", "robust/test/l2_deepfool/median_norm"} <= set(
        callback.last_metrics
    )


def _fit_weights(tmp_path, callbacks):
    pl.seed_everything(3)
    model = DigitsModule()
    trainer = _trainer(tmp_path, callbacks, epochs=2)
    trainer.fit(model)
    return model, trainer.optimizers[0]


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain, plain_optimizer = _fit_weights(tmp_path, [])
    callbacks = [
        AdversarialRobustnessCallback(attacks=[AttackSpec("linf_pgd", [0.05], steps=3)], num_samples=64, split="train"),
        AdversarialRobustnessCallback(
            attacks=[
                AttackSpec("fgsm", [0.05]),
                AttackSpec("l2_pgd", [0.5], steps=2),
                AttackSpec("l2_deepfool", [0.5], steps=5),
            ],
            backend="foolbox",
            num_samples=64,
        ),
    ]
    attacked, attacked_optimizer = _fit_weights(tmp_path, callbacks)
    assert "robust/l2_deepfool/median_norm" in attacked.trainer.callback_metrics
    for p, q in zip(plain.parameters(), attacked.parameters(), strict=True):
        assert torch.equal(p, q)
    for b, c in zip(plain.buffers(), attacked.buffers(), strict=True):
        assert torch.equal(b, c)
    for a, b in zip(plain_optimizer.state.values(), attacked_optimizer.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"attacks": [{"name": "pgd", "epsilons": [0.1]}]},
            "unknown attack 'pgd'; valid attacks: fgsm, linf_pgd, l2_pgd",
        ),
        ({"attacks": [{"name": "fgsm", "epsilons": [-0.01]}]}, "epsilon must be >= 0"),
        ({"attacks": [{"name": "linf_pgd", "epsilons": [8]}]}, "larger than the input range"),
        ({"attacks": [{"name": "fgsm", "epsilons": [0.1]}, {"name": "fgsm", "epsilons": [0.2]}]}, "once"),
        ({"backend": "cleverhans"}, "valid backends: native, foolbox"),
        ({"bounds": (1.0, 0.0)}, "lower < upper"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialRobustnessCallback(**kwargs)


@pytest.mark.parametrize(
    "module_kwargs, attacks, message",
    [
        ({"output": "probabilities"}, [AttackSpec("l2_cw", [0.5])], "l2_cw needs logits"),
        ({"shift": -0.5}, [AttackSpec("fgsm", [0.1])], "outside the bounds"),
        ({}, [AttackSpec("l2_pgd", [8.5])], "L2 diameter"),  # 64 pixels in [0, 1]: diameter 8
    ],
)
def test_bad_model_or_data_fail_before_training(tmp_path, module_kwargs, attacks, message):
    pl.seed_everything(0)
    trainer = _trainer(tmp_path, [AdversarialRobustnessCallback(attacks=attacks, num_samples=16)], epochs=1)
    with pytest.raises(ValueError, match=message):
        trainer.fit(DigitsModule(**module_kwargs))
    assert trainer.global_step == 0


def test_configurable_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(AdversarialRobustnessCallback, "robust")
    config = parser.parse_string(
        "robust:\n"
        "  attacks:\n"
        "    - {name: linf_pgd, epsilons: [0.0, 0.03], steps: 7, step_size: 0.01}\n"
        "    - {name: l2_cw, epsilons: [0.5], binary_search_steps: 3}\n"
        "  num_samples: 256\n"
        "  backend: foolbox\n"
    )
    callback = parser.instantiate(config).robust
    assert callback.attacks == [
        AttackSpec("linf_pgd", [0.0, 0.03], steps=7, step_size=0.01),
        AttackSpec("l2_cw", [0.5], binary_search_steps=3),
    ]
    assert callback.num_samples == 256 and callback.backend == "foolbox" and callback.split == "val"


def _validate(tmp_path, **kwargs):
    pl.seed_everything(0)
    callback = AdversarialRobustnessCallback(
        attacks=[AttackSpec("fgsm", [0.0, 0.05, 0.1]), AttackSpec("l2_deepfool", [0.5], steps=10)],
        num_samples=101,
        seed=2,
    )
    trainer = _trainer(tmp_path, [callback], **kwargs)
    trainer.validate(DigitsModule(), verbose=False)
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith("robust/") and k != "robust/val/seconds"
    }


def test_ddp_ranks_attack_their_shards_and_sum(tmp_path):
    single = _validate(tmp_path)
    ddp = _validate(tmp_path, strategy="ddp_spawn", devices=2)
    assert set(ddp) == set(single)
    for name, value in single.items():
        # 101 samples over 2 ranks (51 + 50): the counts sum exactly, the median gathers all norms
        assert ddp[name] == pytest.approx(value, rel=1e-5), name


def test_time_budget_skips_remaining_attacks_with_a_warning(tmp_path):
    callback = AdversarialRobustnessCallback(
        attacks=[AttackSpec("fgsm", [0.05]), AttackSpec("linf_pgd", [0.05])], num_samples=32, time_budget=1e-9
    )
    trainer = _trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match=r"time_budget=1e-09s spent; skipped \['fgsm', 'linf_pgd'\]"):
        trainer.validate(DigitsModule(), verbose=False)
    assert "robust/val/clean_acc" in trainer.callback_metrics
    assert not any(name.startswith(("robust/fgsm", "robust/val/fgsm")) for name in trainer.callback_metrics)


def test_data_normalised_outside_the_model_is_attacked_in_pixel_space(tmp_path):
    from lightning_hessian.attacks.preprocessing import NormalizedInput

    pl.seed_everything(0)
    module = DigitsModule(shift=-0.5)  # the "data module" yields x - 0.5, the model expects it
    callback = AdversarialRobustnessCallback(
        attacks=[AttackSpec("fgsm", [0.05, 0.1])], mean=[0.5], std=[1.0], num_samples=64
    )
    trainer = _trainer(tmp_path, [callback])
    trainer.validate(module, verbose=False)
    samples = callback._samples["val"]
    pixels = samples.batch[0] + 0.5
    assert 0 <= pixels.min() and pixels.max() <= 1
    expected = evaluate_attack(
        NormalizedInput(module, [0.5], [1.0]), pixels, samples.batch[1], AttackSpec("fgsm", [0.05, 0.1])
    )
    accuracies = expected.robust_correct.float().mean(1)
    assert trainer.callback_metrics["robust/val/fgsm/eps_0.05"] == pytest.approx(accuracies[0].item())
    assert trainer.callback_metrics["robust/val/fgsm/eps_0.1"] == pytest.approx(accuracies[1].item())
    assert accuracies[1] < expected.clean_correct.float().mean()
    with pytest.raises(ValueError, match="both mean and std"):
        AdversarialRobustnessCallback(mean=[0.5])


class RobustDigitsModule(DigitsModule):
    """PGD training through :class:`AdversarialTraining` inside a plain ``training_step``."""

    def training_step(self, batch, batch_idx):
        from lightning_hessian.attacks import AdversarialTraining

        loss, logits, targets = AdversarialTraining(method="pgd", epsilon=0.1, steps=2).training_loss(self.net, *batch)
        self.log("train_acc", (logits.argmax(1) == targets).float().mean(), sync_dist=True)
        return loss


def test_robust_training_and_evaluation_under_ddp(tmp_path):
    pl.seed_everything(0)
    callback = AdversarialRobustnessCallback(attacks=[AttackSpec("linf_pgd", [0.1], steps=3)], num_samples=40)
    trainer = _trainer(
        tmp_path, [callback], epochs=1, strategy="ddp_spawn", devices=2, limit_train_batches=3, limit_val_batches=1
    )
    model = RobustDigitsModule()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model)
    assert trainer.state.finished and "train_acc" in trainer.callback_metrics
    assert (
        0
        <= float(trainer.callback_metrics["robust/linf_pgd/eps_0.1"])
        <= float(trainer.callback_metrics["robust/clean_acc"])
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True)
    )  # rank 0's trained weights came back
