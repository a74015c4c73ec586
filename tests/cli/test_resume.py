"""Exact resumption: RNG states in checkpoints, ``--ckpt_path last``, event files without repeated
steps (``lightning_hessian.resume``, ``hessian-train``'s resume defaults, the report's reader)."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers import QUICKSTART, QUIET_CLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.cli import main
from lightning_hessian.report.events import read_events
from lightning_hessian.resume import (
    BEFORE_END_CHECKPOINT,
    CheckpointLogSync,
    KeepCheckpointBeforeEnd,
    RNGStateCallback,
    capture_rng_state,
    continue_event_log,
    find_resume_checkpoint,
    read_resume_info,
    restore_rng_state,
)

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu", "devices": 1}


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], np.random.randn()


# ---------------------------------------------------------------------------------------------
# RNG states


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    np.random.randn()  # a cached Gaussian in NumPy's state
    random.gauss(0, 1)  # and in Python's
    callback = RNGStateCallback()
    torch.save({"callbacks": {callback.state_key: callback.state_dict()}}, tmp_path / "state.ckpt")
    expected = _draws()
    _draws()
    loaded = torch.load(tmp_path / "state.ckpt", weights_only=True)  # tensors and plain values only
    RNGStateCallback().load_state_dict(loaded["callbacks"][callback.state_key])
    assert _draws() == expected


def test_restore_rng_state_leaves_missing_parts_alone() -> None:
    state = capture_rng_state()
    expected_torch = torch.rand(2)
    np.random.seed(5)
    numpy_next = np.random.rand()
    np.random.seed(5)
    restore_rng_state({"torch": state["torch"]})
    assert torch.equal(torch.rand(2), expected_torch) and np.random.rand() == numpy_next


class NoisyModule(pl.LightningModule):
    """Dropout and per-step noise: every step draws from the global generator."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.1 * torch.randn_like(x)
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = torch.Generator().manual_seed(1)
        dataset = TensorDataset(torch.randn(40, 6, generator=data), torch.randint(0, 2, (40,), generator=data))
        return DataLoader(dataset, batch_size=8, shuffle=True)  # order from torch's global generator


def _fit(tmp_path: Path, max_epochs: int, callbacks: list, ckpt_path: str | None = None) -> NoisyModule:
    pl.seed_everything(0)
    model = NoisyModule()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=[*callbacks, checkpoint], **QUIET)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("with_callback", [True, False])
def test_rng_callback_makes_a_resumed_fit_repeat_the_uninterrupted_one(tmp_path: Path, with_callback: bool) -> None:
    """Any LightningModule: shuffling, dropout and noise after the checkpoint repeat exactly."""
    callbacks = lambda: [RNGStateCallback()] if with_callback else []  # noqa: E731
    uninterrupted = _fit(tmp_path / "a", 4, callbacks())
    _fit(tmp_path / "b", 2, callbacks())
    resumed = _fit(tmp_path / "b", 4, callbacks(), ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    equal = all(torch.equal(p, q) for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True))
    assert equal == with_callback  # without it, Lightning's resume draws other numbers


class StopAfterTwoEpochs(pl.callbacks.EarlyStopping):
    """An early stop after the second epoch (from then on every loss meets the threshold)."""

    def __init__(self) -> None:
        super().__init__(monitor="loss", stopping_threshold=1e9, check_on_train_epoch_end=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= 1:
            super().on_train_epoch_end(trainer, pl_module)


class LoggingNoisyModule(NoisyModule):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, on_epoch=True, on_step=False)
        return loss


class EvaluatedNoisyModule(LoggingNoisyModule):
    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self.net(x), y))

    def test_dataloader(self) -> DataLoader:
        return self.train_dataloader()


@pytest.mark.parametrize("stop", ["max_epochs", "early_stop"])
def test_the_checkpoint_says_whether_training_ends_after_it(tmp_path: Path, stop: str) -> None:
    """Lightning keeps neither ``should_stop`` nor the epoch limit in a checkpoint; the one where
    training ends says so (``ends_fit``), the ones before it do not, and resuming from it warns."""
    pl.seed_everything(0)
    callbacks = [CheckpointLogSync(), RNGStateCallback()]
    if stop == "early_stop":
        callbacks.append(StopAfterTwoEpochs())
    every_epoch = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=-1, every_n_epochs=1
    )
    trainer = pl.Trainer(
        max_epochs=3 if stop == "max_epochs" else 10, logger=False, callbacks=[*callbacks, every_epoch], **QUIET
    )
    trainer.fit(LoggingNoisyModule())
    assert trainer.current_epoch == (3 if stop == "max_epochs" else 2)
    epochs = {
        read_resume_info(path)["epoch"]: read_resume_info(path)
        for path in (tmp_path / "checkpoints").glob("epoch=*.ckpt")
    }
    assert sorted(epochs) == ([0, 1, 2] if stop == "max_epochs" else [0, 1])
    last_epoch = max(epochs)
    assert [epochs[e]["ends_fit"] for e in sorted(epochs)] == [e == last_epoch for e in sorted(epochs)]
    if stop == "early_stop":
        assert epochs[last_epoch]["early_stopped"] is True and epochs[0]["early_stopped"] is None
    with pytest.warns(UserWarning, match="reached its end"):
        resumed = pl.Trainer(
            max_epochs=3 if stop == "max_epochs" else 10, logger=False, enable_checkpointing=False,
            default_root_dir=tmp_path, callbacks=[CheckpointLogSync(), RNGStateCallback()], **QUIET,
        )  # fmt: skip
        resumed.fit(LoggingNoisyModule(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    # testing the finished run's checkpoint resumes nothing: no warning
    tester = pl.Trainer(logger=False, callbacks=[CheckpointLogSync(), RNGStateCallback()], **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tester.test(EvaluatedNoisyModule(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), verbose=False)
    assert not [w for w in caught if "reached its end" in str(w.message)]


class Killed(Exception):
    """A kill in the end-of-training analyses (Lightning turns KeyboardInterrupt into an exit)."""


class EndOfTraining(pl.Callback):
    """Stands for the end-of-training analyses: records each ``on_train_end`` with what the
    checkpoint directory holds then, and can be killed there (an exception: no ``on_fit_end``)."""

    def __init__(self, directory: Path, kill: bool = False) -> None:
        self.directory, self.kill = directory, kill
        self.seen: list[dict] = []

    def on_train_end(self, trainer, pl_module) -> None:
        before_end = self.directory / BEFORE_END_CHECKPOINT
        self.seen.append({
            "step": trainer.global_step,
            "before_end": read_resume_info(before_end) if before_end.exists() else None,
            "last": read_resume_info(self.directory / "last.ckpt"),
        })  # fmt: skip
        if self.kill:
            raise Killed  # what a kill leaves: no on_fit_end


@pytest.mark.parametrize("stop", ["max_epochs", "early_stop"])
def test_a_run_killed_in_its_end_of_training_redoes_it_from_the_checkpoint_before(tmp_path: Path, stop: str) -> None:
    """The checkpoint before the one that ends training is kept while the end-of-training hooks run;
    resumed from it, the run trains its last epoch again (ending with the uninterrupted run's
    weights) and runs those hooks; a fit that ends normally deletes the copy."""
    steps_per_epoch = 5  # 40 samples, batches of 8
    max_epochs = 3 if stop == "max_epochs" else 10

    def fit(directory: Path, end: EndOfTraining, ckpt_path: str | None = None) -> LoggingNoisyModule:
        pl.seed_everything(0)
        callbacks = [CheckpointLogSync(), RNGStateCallback(), KeepCheckpointBeforeEnd(), end]
        if stop == "early_stop":
            callbacks.append(StopAfterTwoEpochs())
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True)
        trainer = pl.Trainer(max_epochs=max_epochs, logger=False, callbacks=[*callbacks, checkpoint], **QUIET)
        model = LoggingNoisyModule()
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    last_epoch = 2 if stop == "max_epochs" else 1
    uninterrupted_end = EndOfTraining(tmp_path / "a")
    uninterrupted = fit(tmp_path / "a", uninterrupted_end)
    (seen,) = uninterrupted_end.seen
    assert seen["last"]["ends_fit"] and seen["last"]["epoch"] == last_epoch
    kept = seen["before_end"]  # the previous epoch's checkpoint, there while the end of training runs
    assert kept is not None and kept["epoch"] == last_epoch - 1 and not kept["ends_fit"]
    assert kept["global_step"] == last_epoch * steps_per_epoch
    assert not (tmp_path / "a" / BEFORE_END_CHECKPOINT).exists()  # the fit ended: deleted

    killed_end = EndOfTraining(tmp_path / "b", kill=True)
    with pytest.raises(Killed):
        fit(tmp_path / "b", killed_end)
    before_end = tmp_path / "b" / BEFORE_END_CHECKPOINT
    assert read_resume_info(before_end)["global_step"] == kept["global_step"]
    if stop == "max_epochs":  # a fit that only loads the end checkpoint (skips training) leaves the copy alone
        with pytest.warns(UserWarning, match="reached its end"):
            fit(tmp_path / "b", EndOfTraining(tmp_path / "b"), ckpt_path=str(tmp_path / "b" / "last.ckpt"))
        assert read_resume_info(before_end)["global_step"] == kept["global_step"]
    # resumed from the copy and killed at the end again: the copy is still the one before the end
    again = EndOfTraining(tmp_path / "b", kill=True)
    with pytest.raises(Killed):
        fit(tmp_path / "b", again, ckpt_path=str(before_end))
    assert again.seen[0]["before_end"]["global_step"] == kept["global_step"]
    assert read_resume_info(before_end)["global_step"] == kept["global_step"]
    resumed_end = EndOfTraining(tmp_path / "b")
    resumed = fit(tmp_path / "b", resumed_end, ckpt_path=str(before_end))
    (seen,) = resumed_end.seen  # the end of training ran, at the uninterrupted run's step
    assert seen["step"] == (last_epoch + 1) * steps_per_epoch == uninterrupted_end.seen[0]["step"]
    for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # one process, one thread count: the same arithmetic
    assert not before_end.exists()


def test_a_checkpoint_in_the_middle_of_the_last_epoch_does_not_end_training(tmp_path: Path) -> None:
    """Checkpoints every 2 of the 5 steps of each of 2 epochs: only the one after the last batch
    ends training, and the copy kept is the one before it (step 8, in the middle of epoch 1)."""
    end = EndOfTraining(tmp_path)
    every_2_steps = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_train_steps=2, every_n_epochs=0
    )
    callbacks = [CheckpointLogSync(), RNGStateCallback(), KeepCheckpointBeforeEnd(), end, every_2_steps]
    pl.Trainer(max_epochs=2, logger=False, callbacks=callbacks, **QUIET).fit(NoisyModule())
    infos = {info["global_step"]: info for info in map(read_resume_info, tmp_path.glob("epoch=*.ckpt"))}
    assert sorted(infos) == [2, 4, 6, 8, 10]
    assert {step: info["ends_fit"] for step, info in infos.items()} == {
        2: False,
        4: False,
        6: False,
        8: False,
        10: True,
    }
    assert end.seen[0]["before_end"]["global_step"] == 8


def test_nothing_is_kept_when_training_ends_at_its_first_checkpoint(tmp_path: Path) -> None:
    end = EndOfTraining(tmp_path)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, callbacks=[CheckpointLogSync(), KeepCheckpointBeforeEnd(), end, checkpoint], **QUIET
    )
    trainer.fit(NoisyModule())
    assert end.seen[0]["before_end"] is None and end.seen[0]["last"]["ends_fit"]


# ---------------------------------------------------------------------------------------------
# event files


def _writer(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir))


def _accumulated(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_read_events_keeps_one_value_per_step_the_last_written(tmp_path: Path) -> None:
    first = _writer(tmp_path)
    for step in range(4):
        first.add_scalar("loss", 10.0 + step, step)
    first.add_scalar("loss", 99.0, 3)  # the same step twice in one file
    first.close()
    time.sleep(1.1)  # event file names carry the second they were created in
    second = _writer(tmp_path)  # a second writer, without a purge marker
    for step in (2, 3, 4):
        second.add_scalar("loss", 20.0 + step, step)
    second.close()
    assert len(_accumulated(tmp_path)["loss"]) == 8  # TensorBoard's accumulator keeps all of them

    points = read_events(tmp_path).scalars["loss"]
    assert sorted((p.step, p.value) for p in points) == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0), (4, 24.0)]
    assert read_events(tmp_path).final("loss") == 24.0


def test_continue_event_log_purges_after_the_checkpoint_and_keeps_what_came_before(tmp_path: Path) -> None:
    killed = _writer(tmp_path)
    for step in range(6):
        killed.add_scalar("train/loss", float(step), step)
    killed.add_scalar("analysis/lambda", 7.0, 6)  # at the checkpoint's step, before the checkpoint
    killed.flush()
    saved_at = time.time()  # the checkpoint: global step 6
    time.sleep(0.01)
    for step in range(6, 9):  # after the checkpoint, then killed
        killed.add_scalar("train/loss", -1.0, step)
    killed.add_scalar("analysis/lambda", -1.0, 8)
    killed.close()
    time.sleep(1.1)

    resumed = _writer(tmp_path)
    assert continue_event_log(resumed, tmp_path, purge_step=6, saved_at=saved_at) == 1
    for step in range(6, 9):
        resumed.add_scalar("train/loss", float(step), step)
    resumed.close()

    scalars = _accumulated(tmp_path)
    assert scalars["train/loss"] == [(s, float(s)) for s in range(9)]
    assert scalars["analysis/lambda"] == [(6, 7.0)]
    assert {
        tag: [(p.step, p.value) for p in points] for tag, points in read_events(tmp_path).scalars.items()
    } == scalars


def test_find_resume_checkpoint_takes_the_newest_run_with_a_last_checkpoint(tmp_path: Path) -> None:
    for version, files in {0: ["last.ckpt", "epoch=1.ckpt"], 1: ["last.ckpt"], 2: ["epoch=0.ckpt"], 3: []}.items():
        directory = tmp_path / f"version_{version}" / "checkpoints"
        directory.mkdir(parents=True)
        for name in files:
            (directory / name).write_bytes(b"")
    (tmp_path / "version_4").mkdir()  # a `test` run: no checkpoints directory
    assert find_resume_checkpoint(tmp_path) == (tmp_path / "version_1" / "checkpoints" / "last.ckpt", 1)
    assert find_resume_checkpoint(tmp_path, 0) == (tmp_path / "version_0" / "checkpoints" / "last.ckpt", 0)
    assert find_resume_checkpoint(tmp_path, 2) is None
    assert find_resume_checkpoint(tmp_path / "nowhere") is None


# ---------------------------------------------------------------------------------------------
# hessian-train


TINY = [*QUIET_CLI, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


@pytest.mark.usefixtures("clean_argv")
def test_ckpt_path_last_without_a_checkpoint_is_an_error(in_tmp_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(QUICKSTART)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", config, *TINY, "--ckpt_path", "last"])
    assert info.value.code == 2
    assert (
        "--ckpt_path last: there is no last checkpoint in runs/quickstart/version_*/checkpoints"
        in capsys.readouterr().err
    )
    assert not (in_tmp_dir / "runs" / "quickstart" / "version_0" / "checkpoints").exists()


@pytest.mark.usefixtures("clean_argv")
def test_fit_saves_a_last_checkpoint_unless_the_config_says_otherwise(
    in_tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = str(QUICKSTART)
    main(["fit", "--config", config, *TINY])
    checkpoints = in_tmp_dir / "runs" / "quickstart" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)["callbacks"]
    assert "rng" in state["RNGStateCallback"] and state["CheckpointLogSync"]["saved_at"] > 0
    assert set(state) >= {"RNGStateCallback", "CheckpointLogSync"}

    main([
        "fit", "--config", config, *TINY, "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=false", "--trainer.callbacks.filename=mine",
    ])  # fmt: skip
    assert [p.name for p in (in_tmp_dir / "runs" / "quickstart" / "version_1" / "checkpoints").iterdir()] == [
        "mine.ckpt"
    ]

    # `test --ckpt_path last`: the newest run with a last checkpoint (version_0), logged to a new directory
    with caplog.at_level("INFO"):
        main(["test", "--config", config, *TINY, "--ckpt_path", "last", "--trainer.limit_test_batches=1"])
    assert f"checkpoint path at {Path('runs/quickstart/version_0/checkpoints/last.ckpt')}" in caplog.text
    assert list((in_tmp_dir / "runs" / "quickstart" / "version_2").glob("events.out.tfevents.*"))


HELPERS = '''
"""Callbacks of the kill-and-resume test (imported by hessian-train in a subprocess)."""
import os
import time
from pathlib import Path

import pytorch_lightning as pl


class EpochEndProbe(pl.Callback):
    """Logs at trainer.global_step at epoch end before the checkpoint, as the analysis callbacks
    do, with its schedule in the checkpoint (a resumed run does not log it again)."""

    def __init__(self):
        self.last_epoch = -1

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch > self.last_epoch:
            self.last_epoch = trainer.current_epoch
            value = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
            for logger in trainer.loggers:
                logger.log_metrics({"probe/param_sum": value}, step=trainer.global_step)

    def state_dict(self):
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state):
        self.last_epoch = state["last_epoch"]


class EndProbe(pl.Callback):
    """Stands for the end-of-training analyses: logs at the end of training, and with $HOLD_AT_END
    set flushes the loggers, writes `held_end` and waits there to be killed."""

    def on_train_end(self, trainer, pl_module):
        value = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        for logger in trainer.loggers:
            logger.log_metrics({"probe/end_param_sum": value}, step=trainer.global_step)
        if os.environ.get("HOLD_AT_END"):
            for logger in trainer.loggers:
                logger.save()
            Path("held_end").write_text(str(trainer.global_step))
            while True:
                time.sleep(0.02)


class HoldAt(pl.Callback):
    """Before the batch at global step $HOLD_AT_STEP: flush the loggers (the events logged since the
    checkpoint are on disk, as they would be after a while), write `marker`, wait to be killed."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(os.environ.get("HOLD_AT_STEP", "-1")):
            for logger in trainer.loggers:
                logger.save()
            Path("held").write_text(str(trainer.global_step))
            while True:
                time.sleep(0.02)
'''

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 2,
        "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
        "logger": {
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "tiny", "default_hp_metric": False},
        },
        "callbacks": [
            {
                "class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "epoch"},
            },
            {"class_path": "resume_helpers.EpochEndProbe"},
            {"class_path": "resume_helpers.HoldAt"},
            {"class_path": "resume_helpers.EndProbe"},
        ],
    },
    # gaussian_noise: every step draws from the global generator
    "model": {
        "arch": "mlp", "lr": 0.1, "base_batch_size": 64, "adversarial": {"method": "gaussian_noise", "epsilon": 0.05},
    },
    "data": {
        "class_path": "lightning_hessian.data.Digits", "init_args": {"batch_size": 64, "val_fraction": 0.1, "seed": 0},
    },
}  # fmt: skip


def _hessian_train(directory: Path, *extra: str, hold_at: int = -1, hold_at_end: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOLD_AT_STEP": str(hold_at)}
    env.pop("HOLD_AT_END", None)
    if hold_at_end:
        env["HOLD_AT_END"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(directory.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "lightning_hessian.cli", "fit", "--config", "../tiny.yaml", *extra]
    log = open(directory / f"log{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen(command, cwd=directory, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, directory: Path, timeout: float = 120) -> None:
    if process.wait(timeout=timeout) != 0:
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(directory.glob("log*.txt")))
        pytest.fail(f"hessian-train failed in {directory}:\n{logs}")


def _wait_for(marker: Path, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert process.poll() is None, f"hessian-train ended before {what}"
        assert time.monotonic() < deadline, f"hessian-train did not reach {what}"
        time.sleep(0.05)


def test_kill_9_in_the_end_of_training_then_the_checkpoint_before_repeats_it(tmp_path: Path) -> None:
    """Killed in its end-of-training analyses, a run resumed from ``before_end.ckpt`` (what
    hessian-train keeps by default) trains its last epoch again and ends as the uninterrupted run:
    the same weights, and the end-of-training value logged once, at the same step."""
    (tmp_path / "resume_helpers.py").write_text(textwrap.dedent(HELPERS))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    uninterrupted_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    uninterrupted_dir.mkdir()
    resumed_dir.mkdir()
    uninterrupted = _hessian_train(uninterrupted_dir)
    killed = _hessian_train(resumed_dir, hold_at_end=True)
    _wait_for(resumed_dir / "held_end", killed, "the end of training")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    run = resumed_dir / "runs" / "tiny" / "version_0"
    last, before_end = run / "checkpoints" / "last.ckpt", run / "checkpoints" / BEFORE_END_CHECKPOINT
    assert read_resume_info(last)["ends_fit"] and read_resume_info(last)["global_step"] == 12
    kept = read_resume_info(before_end)  # the epoch before the last: 3 epochs of 4 steps
    assert (kept["epoch"], kept["global_step"], kept["ends_fit"]) == (1, 8, False)

    _finish(
        _hessian_train(resumed_dir, "--ckpt_path", str(before_end), "--trainer.logger.init_args.version=0"),
        resumed_dir,
    )
    _finish(uninterrupted, uninterrupted_dir)
    assert [p.name for p in (resumed_dir / "runs" / "tiny").iterdir()] == ["version_0"]
    assert not before_end.exists()  # the fit ended normally
    expected = torch.load(uninterrupted_dir / "runs/tiny/version_0/checkpoints/last.ckpt", weights_only=True)
    actual = torch.load(last, weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 12
    assert all(torch.equal(actual["state_dict"][k], v) for k, v in expected["state_dict"].items())
    reference = _accumulated(uninterrupted_dir / "runs" / "tiny" / "version_0")
    curves = _accumulated(run)
    assert reference["probe/end_param_sum"] and curves["probe/end_param_sum"] == reference["probe/end_param_sum"]
    assert {tag: sorted(points) for tag, points in curves.items()} == {
        tag: sorted(points) for tag, points in reference.items()
    }


def test_kill_9_mid_epoch_then_ckpt_path_last_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "resume_helpers.py").write_text(textwrap.dedent(HELPERS))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    uninterrupted_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    uninterrupted_dir.mkdir()
    resumed_dir.mkdir()
    uninterrupted = _hessian_train(uninterrupted_dir)
    # 4 steps an epoch, a checkpoint at the end of each: step 6 is mid-epoch, after the step-4 checkpoint
    killed = _hessian_train(resumed_dir, hold_at=6)
    deadline = time.monotonic() + 180
    while not (resumed_dir / "held").exists():
        assert killed.poll() is None, (resumed_dir / "held", "hessian-train ended before step 6")
        assert time.monotonic() < deadline, "hessian-train did not reach step 6"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    run = resumed_dir / "runs" / "tiny" / "version_0"
    assert [p.name for p in (run / "checkpoints").glob("*.ckpt")] != []
    killed_events = _accumulated(run)
    assert {4, 5} <= {step for step, _ in killed_events["train/loss_step"]}  # logged after the checkpoint

    _finish(_hessian_train(resumed_dir, "--ckpt_path", "last"), resumed_dir)
    _finish(uninterrupted, uninterrupted_dir)

    # one run directory, continued
    assert [p.name for p in (resumed_dir / "runs" / "tiny").iterdir()] == ["version_0"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    # the weights and the optimiser of the uninterrupted run, bit for bit
    expected = torch.load(uninterrupted_dir / "runs/tiny/version_0/checkpoints/last.ckpt", weights_only=True)
    actual = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 12
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    assert all(torch.equal(actual["state_dict"][k], v) for k, v in expected["state_dict"].items())
    momenta = [
        (s["momentum_buffer"], actual["optimizer_states"][0]["state"][i]["momentum_buffer"])
        for i, s in expected["optimizer_states"][0]["state"].items()
    ]
    assert momenta and all(torch.equal(a, b) for a, b in momenta)
    # every curve, as TensorBoard reads it (the purge honoured), is the uninterrupted run's
    reference = _accumulated(uninterrupted_dir / "runs" / "tiny" / "version_0")
    assert {"train/loss_step", "train/loss", "val/loss", "lr-SGD", "probe/param_sum"} <= set(reference)
    curves = _accumulated(run)
    assert {tag: sorted(points) for tag, points in curves.items()} == {
        tag: sorted(points) for tag, points in reference.items()
    }
    # and the report's reader has one value per step per tag
    for tag, points in read_events(run).scalars.items():
        steps = [p.step for p in points]
        assert len(steps) == len(set(steps)), tag
        assert sorted((p.step, p.value) for p in points) == sorted(dict(reference[tag]).items()), tag
    assert collections.Counter(step for step, _ in curves["probe/param_sum"]) == {4: 1, 8: 1, 12: 1}
