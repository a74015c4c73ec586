"""EpochAnalysisCallback: schedule, fixed samples, stages, errors, no effect on training, and the
time budget that the spectrum, robustness and landscape callbacks share."""

from __future__ import annotations

import copy
import time

import pytest
import pytorch_lightning as pl
import torch
from helpers import QUIET_TRAINER
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback, batch_loss, slice_batch
from lightning_hessian.callbacks.budget import TimeBudget


class NoisyDataset(Dataset):
    """Consumes the global RNG in __getitem__, like a random augmentation does."""

    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=generator)
        self.y = torch.randint(0, 3, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn(5), self.y[i]


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return batch_loss(self, batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", batch_loss(self, batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", batch_loss(self, batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(NoisyDataset(), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(NoisyDataset(32), batch_size=16)

    def test_dataloader(self):
        return DataLoader(NoisyDataset(24), batch_size=8)


class RecordingCallback(EpochAnalysisCallback):
    """Records what it was given and does RNG- and grad-touching work, as real analyses do."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int, AnalysisSamples, bool, bool]] = []

    def analyse(self, trainer, pl_module, samples):
        loss = batch_loss(pl_module, samples.batch)
        loss.backward()  # leaves .grad: analysis_mode must restore it
        torch.randn(10)  # consumes the RNG: analysis_mode must restore it
        self.calls.append(
            (trainer.state.fn, trainer.current_epoch, samples, pl_module.training, torch.is_grad_enabled())
        )
        return {"probe/loss": loss.item()}


def _fit(callbacks, tmp_path, epochs=3):
    pl.seed_everything(7)
    model = TinyModule()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        **QUIET_TRAINER,
        default_root_dir=tmp_path,
        num_sanity_val_steps=2,
    )
    trainer.fit(model)
    return trainer, model


def test_schedule_samples_and_modes(tmp_path):
    probe = RecordingCallback(every_n_epochs=2, num_samples=20, seed=3)
    trainer, model = _fit([probe], tmp_path, epochs=4)
    # epochs 1 and 3 (every 2nd), never the sanity check
    assert [c[1] for c in probe.calls] == [1, 3]
    first, second = probe.calls[0][2], probe.calls[1][2]
    assert first.num_local == first.num_global == 20
    assert first.batch is second.batch  # chosen once, kept
    # the analysis saw eval mode and gradients on; the model is back in train mode afterwards
    assert all(not c[3] and c[4] for c in probe.calls)
    assert trainer.callback_metrics["probe/loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(model.eval()(first.batch[0]), first.batch[1])), rel=1e-5
    )


def test_seeded_selection_is_reproducible(tmp_path):
    a = RecordingCallback(num_samples=10, seed=1)
    b = RecordingCallback(num_samples=10, seed=1)
    c = RecordingCallback(num_samples=10, seed=2)
    for probe in (a, b, c):
        _fit([probe], tmp_path, epochs=1)
    ax, bx, cx = (p.calls[0][2].batch[0] for p in (a, b, c))
    # noise in __getitem__ differs with the RNG, so compare which rows were picked via targets+rounding
    assert torch.allclose(ax, bx, atol=0.1)
    assert not torch.allclose(ax, cx, atol=0.1)


def test_training_is_bit_identical_with_callback(tmp_path):
    _, plain = _fit([], tmp_path)
    trainer, probed = _fit([RecordingCallback(num_samples=16)], tmp_path)
    for p, q in zip(plain.parameters(), probed.parameters(), strict=True):
        assert torch.equal(p, q)
    for b, c in zip(plain.buffers(), probed.buffers(), strict=True):
        assert torch.equal(b, c)
    momentum_a = [s["momentum_buffer"] for s in plain.trainer.optimizers[0].state.values()]
    momentum_b = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum_a, momentum_b, strict=True))


def test_runs_under_validate_and_test_with_their_splits(tmp_path):
    probe = RecordingCallback(num_samples=8, split="val")
    trainer, model = _fit([], tmp_path, epochs=1)
    trainer = pl.Trainer(logger=False, callbacks=[probe], enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(model)
    trainer.test(model)
    assert [c[0] for c in probe.calls] == ["validate", "test"]
    assert all(c[4] for c in probe.calls)  # grad enabled inside inference_mode
    assert set(probe._samples) == {"val", "test"}


def test_num_samples_larger_than_split_fails_before_training(tmp_path):
    model = TinyModule()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[RecordingCallback(num_samples=65)],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="num_samples=65 is larger than the train split \\(64 samples\\)"):
        trainer.fit(model)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "holdout"}, "split='holdout'"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"every_n_epochs": -1}, "every_n_epochs=-1"),
        ({"time_budget": 0}, "time_budget=0"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RecordingCallback(**kwargs)


def test_true_half_precision_is_refused(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1,
        precision="bf16-true",
        callbacks=[RecordingCallback()],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="bf16-mixed"):
        trainer.fit(TinyModule())


def test_hessian_loss_override_and_slicing():
    class Custom(TinyModule):
        def hessian_loss(self, batch):
            return self(batch["features"]).pow(2).mean()

    module = Custom().eval()
    batch = {"features": torch.randn(6, 5), "id": "keep"}
    assert torch.equal(batch_loss(module, batch), module(batch["features"]).pow(2).mean())
    part = slice_batch(batch, 2, 5)
    assert part["features"].shape == (3, 5) and part["id"] == "keep"
    with pytest.raises(TypeError, match="hessian_loss"):
        batch_loss(TinyModule(), {"features": torch.randn(2, 5)})


def test_state_dict_prevents_repeats_after_resume(tmp_path):
    probe = RecordingCallback(num_samples=8)
    _fit([probe], tmp_path, epochs=2)
    resumed = RecordingCallback(num_samples=8)
    resumed.load_state_dict(copy.deepcopy(probe.state_dict()))
    assert resumed.state_dict() == {"last_epoch": 1, "last_step": -1}


class BatchFetchDataset(TensorDataset):
    """A dataset that fetches many indices at once, as torch's DataLoader allows."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def test_getitems_datasets_and_clamping_under_test(tmp_path):
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))

    class FetchModule(TinyModule):
        def train_dataloader(self):
            return DataLoader(BatchFetchDataset(x, y), batch_size=8, collate_fn=lambda batch: batch)

        def test_dataloader(self):
            return DataLoader(BatchFetchDataset(x[:6], y[:6]), batch_size=8, collate_fn=lambda batch: batch)

    probe = RecordingCallback(num_samples=12, seed=0)
    model = FetchModule()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    samples = probe.calls[0][2]
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:12]
    assert torch.equal(samples.batch[0], x[chosen]) and torch.equal(samples.batch[1], y[chosen])
    with pytest.warns(UserWarning, match="analysing all 6 samples"):
        trainer.test(model)
    assert probe.calls[-1][2].num_global == 6


# ------------------------------------------------------------------------------ the time budget


class _Ranks:
    """An ``all_reduce`` over simulated ranks: this rank's tensor plus the others' flags."""

    def __init__(self, others_spent: bool) -> None:
        self.others_spent = others_spent
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return tensor + float(self.others_spent)


def test_time_budget_without_seconds_is_never_spent():
    budget = TimeBudget(None, _Ranks(others_spent=True))
    assert not budget.spent() and budget.local_remaining() is None
    budget.note_stopped_early()
    assert not budget.exhausted and budget.all_reduce.calls == 0  # no collective without a budget


def test_time_budget_is_spent_when_its_seconds_pass_and_stays_spent():
    budget = TimeBudget(0.05)
    assert not budget.spent() and 0 < budget.local_remaining() <= 0.05
    budget.note_stopped_early()  # an engine call that stopped early with time left: not the clock
    assert not budget.exhausted
    time.sleep(0.06)
    assert budget.local_remaining() == 0.0
    budget.note_stopped_early()
    assert budget.exhausted and budget.spent()
    budget.start = time.perf_counter()  # spent is remembered: the answer cannot flip back
    assert budget.spent() and budget.elapsed() < 0.05


def test_time_budget_decisions_are_collective():
    """One rank out of time means all are (their next collective calls must match); under DDP an
    engine call gets no clock of its own, and a stop it reports does not count by itself."""
    ranks = _Ranks(others_spent=True)
    budget = TimeBudget(3600.0, ranks)
    assert budget.distributed and budget.local_remaining() is None
    budget.start -= 7200.0
    budget.note_stopped_early()
    assert not budget.exhausted  # only spent() decides under DDP
    budget.start += 7200.0
    assert budget.spent() and ranks.calls == 1  # this rank has time; another has none
    assert budget.spent() and ranks.calls == 1  # remembered: no further collective
    in_time = TimeBudget(3600.0, _Ranks(others_spent=False))
    assert not in_time.spent() and not in_time.spent() and in_time.all_reduce.calls == 2


def test_time_budget_refuses_a_non_positive_budget():
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0.0)


def test_every_analysis_callback_takes_its_budget_from_the_base(tmp_path):
    """The spectrum, robustness and landscape callbacks all spend one TimeBudget made by
    EpochAnalysisCallback.start_budget (none keeps a clock of its own)."""
    from lightning_hessian import AdversarialRobustnessCallback, HessianSpectrumCallback, LossLandscapeCallback

    made: list[tuple[str, float | None]] = []

    def recording(self, trainer, pl_module):
        budget = TimeBudget(self.time_budget, self.all_reduce_sum(trainer), pl_module.device)
        made.append((type(self).__name__, budget.seconds))
        return budget

    callbacks = [
        HessianSpectrumCallback(num_samples=16, time_budget=600.0),
        AdversarialRobustnessCallback(num_samples=16, split="train", bounds=(-10.0, 10.0), time_budget=500.0),
        LossLandscapeCallback(curves=["random1"], surfaces=[], curve_points=3, num_samples=16, time_budget=400.0),
    ]
    original = EpochAnalysisCallback.start_budget
    EpochAnalysisCallback.start_budget = recording
    try:
        _fit(callbacks, tmp_path, epochs=1)
    finally:
        EpochAnalysisCallback.start_budget = original
    assert made == [
        ("HessianSpectrumCallback", 600.0),
        ("AdversarialRobustnessCallback", 500.0),
        ("LossLandscapeCallback", 400.0),
    ]
