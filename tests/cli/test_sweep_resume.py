"""hessian-sweep continues a run that was stopped from outside from its last checkpoint."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICKSTART

from lightning_hessian.cli.sweep import main
from lightning_hessian.report.events import read_events
from lightning_hessian.resume import BEFORE_END_CHECKPOINT
from lightning_hessian.sweep import ATTEMPTS_DIR, LOCK_FILE, SweepSettings, find_resume_point, run_sweep
from lightning_hessian.sweep.machine import describe_machine

# A stand-in for hessian-train: appends its command line to calls.txt in the run directory; fit
# writes a checkpoint and names it in checkpoint.json (status finished), as hessian-train does.
FAKE_TRAIN = """
import json, os, sys
from pathlib import Path

subcommand, arguments = sys.argv[1], sys.argv[2:]
options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--") and "=" in a)
run = Path(options["trainer.logger.init_args.save_dir"]) / options["trainer.logger.init_args.name"]
run = run / options["trainer.logger.init_args.version"]
run.mkdir(parents=True, exist_ok=True)
with (run / "calls.txt").open("a") as calls:
    calls.write(" ".join([subcommand, *arguments]) + "\\n")
if subcommand == "fit":
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.ckpt").write_text("weights")
    record = {"checkpoint": os.path.abspath(run / "checkpoints" / "last.ckpt"), "status": "finished"}
    (run / "checkpoint.json").write_text(json.dumps(record))
"""


@pytest.fixture
def settings(tmp_path: Path) -> SweepSettings:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return SweepSettings(
        configs=(str(QUICKSTART),), batch_sizes=(32,), seeds=(0,), root=str(tmp_path / "sweeps"),
        train_command=(sys.executable, str(script)), overrides=("model.lr=0.05",),
    )  # fmt: skip


def _calls(run_dir: Path) -> list[str]:
    return (run_dir / "calls.txt").read_text().splitlines()


def _save_checkpoint(
    run_dir: Path,
    saved_at: float,
    ends_fit: bool | None = False,
    stopped_epoch: int | None = None,
    name: str = "last.ckpt",
    epoch: int = 2,
    global_step: int = 7,
) -> None:
    """A real checkpoint ``name`` (default the last, at epoch 2, step 7), as hessian-train's
    callbacks fill it; with ``ends_fit=None`` as older versions wrote it (no ``ends_fit``), with
    ``stopped_epoch`` an ``EarlyStopping`` state."""
    sync: dict = {"saved_at": saved_at, "log_dir": str(run_dir.resolve())}
    if ends_fit is not None:
        sync["ends_fit"] = ends_fit
    callbacks = {"RNGStateCallback": {"rng": {"torch": torch.get_rng_state()}}, "CheckpointLogSync": sync}
    if stopped_epoch is not None:
        callbacks["EarlyStopping{'monitor': 'train/loss', 'mode': 'min'}"] = {
            "wait_count": 0, "stopped_epoch": stopped_epoch, "best_score": torch.tensor(0.3), "patience": 3,
        }  # fmt: skip
    checkpoint = {
        "epoch": epoch,
        "global_step": global_step,
        "state_dict": {"w": torch.zeros(2)},
        "callbacks": callbacks,
    }
    torch.save(checkpoint, run_dir / "checkpoints" / name)


def _stop_during_fit(run_dir: Path, status: str, **changes) -> dict:
    """Turn a run directory into one stopped during its fit: the record says ``status`` (with
    ``changes``), there is no checkpoint.json, and the last checkpoint, saved 40 s after the
    attempt started, is not the last of the fit. Returns the record."""
    record = json.loads((run_dir / "sweep.json").read_text())
    record.update(status=status, **changes)
    for key in ("ended", "returncode", "wall_seconds", "test_command", "test_seconds", "test_returncode"):
        record.pop(key, None)
    (run_dir / "sweep.json").write_text(json.dumps(record))
    (run_dir / "checkpoint.json").unlink()
    (run_dir / "calls.txt").unlink()
    _save_checkpoint(run_dir, datetime.fromisoformat(record["started"]).timestamp() + 40.0)
    return record


def _stopped_attempt(settings: SweepSettings, status: str = "running", **changes) -> tuple[Path, dict]:
    """A finished sweep's run directory, then stopped during its fit (:func:`_stop_during_fit`)."""
    (run,) = run_sweep(settings, out=io.StringIO())
    return run.run_dir, _stop_during_fit(run.run_dir, status, **changes)


@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_a_run_stopped_from_outside_continues_its_fit_from_the_last_checkpoint(
    settings: SweepSettings, status: str, capsys: pytest.CaptureFixture
) -> None:
    # the first attempt ran on another machine (the study continued elsewhere from its checkpoint)
    elsewhere = {"host": "elsewhere", "cpu": "another CPU", "cpu_vector": "avx2", "torch": "2.14.1"}
    run_dir, earlier = _stopped_attempt(settings, status, machine=elsewhere)
    last = run_dir / "checkpoints" / "last.ckpt"

    (run,) = run_sweep(settings)
    assert run.status == "finished"
    fit, test = _calls(run_dir)
    assert fit.startswith("fit ") and fit.endswith(f"--model.lr=0.05 --ckpt_path={last}")
    assert test.startswith("test ")
    record = json.loads((run_dir / "sweep.json").read_text())
    assert record["status"] == "finished" and record["fit_command"][-1] == f"--ckpt_path={last}"
    assert record["resumed"] == [
        {
            "attempt_started": earlier["started"],
            "status": status,
            "machine": elsewhere,
            "stage": "fit",
            "epoch": 2,
            "global_step": 7,
            "checkpoint": str(last),
            "checkpoint_saved": (datetime.fromisoformat(earlier["started"]) + timedelta(seconds=40)).isoformat(),
            "kept_seconds": 40.0,
        }
    ]
    assert record["machine"] == describe_machine()  # this attempt's machine
    # the run's times are the work it kept: this attempt plus the 40 s before the checkpoint
    assert record["wall_seconds"] == run.wall_seconds and 40.0 < record["fit_seconds"] < run.wall_seconds
    assert datetime.fromisoformat(record["fit_ended"]) >= datetime.fromisoformat(record["started"])
    assert not (settings.sweep_dir / ATTEMPTS_DIR).exists()  # continued in place, nothing moved
    assert (
        f"resuming the {status} attempt's fit from {last} (epoch 2, step 7; 40 s of its work kept)"
        in (run_dir / "train.log").read_text()
    )
    assert "resuming" in capsys.readouterr().out

    # Stopped again, before a new checkpoint: the second resume keeps the first one's entry.
    record = _stop_during_fit(run_dir, "interrupted")
    _save_checkpoint(run_dir, datetime.fromisoformat(record["started"]).timestamp() - 5.0)
    (run,) = run_sweep(settings)
    assert run.status == "finished"
    resumed = json.loads((run_dir / "sweep.json").read_text())["resumed"]
    assert [entry["attempt_started"] for entry in resumed] == [earlier["started"], record["started"]]
    # its checkpoint was saved before the second attempt started: that attempt kept nothing
    assert resumed[1]["kept_seconds"] == 0.0


@pytest.mark.parametrize("older_record", [False, True], ids=["record-with-fit-times", "older-record"])
def test_a_run_whose_fit_had_finished_runs_only_the_test(settings: SweepSettings, older_record: bool) -> None:
    (run,) = run_sweep(settings, out=io.StringIO())
    run_dir = run.run_dir
    record = json.loads((run_dir / "sweep.json").read_text())
    record.update(status="running", fit_returncode=0, fit_seconds=12.5)  # killed during the test
    if older_record:  # written before the sweep recorded the fit's times after the fit
        for key in ("fit_seconds", "fit_ended", "fit_returncode"):
            record.pop(key)
    (run_dir / "sweep.json").write_text(json.dumps(record))
    (run_dir / "calls.txt").unlink()

    (run,) = run_sweep(settings)
    assert run.status == "finished"
    (test,) = _calls(run_dir)
    assert test.startswith("test ") and test.endswith(f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    resumed = json.loads((run_dir / "sweep.json").read_text())
    (entry,) = resumed["resumed"]
    assert entry["stage"] == "test" and entry["kept_seconds"] is not None
    assert resumed["fit_command"] == run.fit_command  # the earlier attempt's fit, not run again
    assert (resumed["fit_returncode"], resumed["test_returncode"]) == (0, 0)
    if older_record:  # the fit took from the attempt's start to checkpoint.json
        assert (resumed["fit_seconds"], resumed["fit_ended"]) == (entry["kept_seconds"], entry["checkpoint_saved"])
    else:
        assert (resumed["fit_seconds"], resumed["fit_ended"]) == (12.5, record["fit_ended"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "failed"}, "it failed"),
        ({"overrides": ["model.lr=0.1"]}, "it ran with other settings"),
        ({"config_sha256": ["0" * 64]}, r"its config files have changed since it started"),
        ({"no_checkpoint": True}, "it saved no last checkpoint in checkpoints/"),
        ({"unreadable": True}, "its last checkpoint .* cannot be read"),
        (
            {"ends_fit": True},
            "its last checkpoint .* was saved when training had reached its end .*; there is no before_end.ckpt",
        ),
        (
            {"ends_fit": True, "before_end": "unreadable"},
            "its last checkpoint .* reached its end .*; .*before_end.ckpt cannot be read",
        ),
        (
            {"ends_fit": True, "before_end": "same step"},
            r"its last checkpoint .* reached its end .*before_end.ckpt \(step 7\) is not from before",
        ),
        (
            {"ends_fit": True, "before_end": "ends"},
            r"its last checkpoint .* reached its end .*before_end.ckpt \(step 5\) is not from before",
        ),
        ({"early_stopped": True}, "its last checkpoint .* was saved when training had reached its end"),
        ({"max_epochs": 3}, "its last checkpoint .* was saved when training had reached its end"),
        ({"restart": True}, "resuming is off"),
    ],
)
def test_a_run_that_cannot_continue_is_moved_aside_and_started_again(
    settings: SweepSettings, change: dict, reason: str, capsys: pytest.CaptureFixture
) -> None:
    change = dict(change)
    flags = {
        key: change.pop(key, None)
        for key in ("no_checkpoint", "unreadable", "ends_fit", "before_end", "early_stopped", "max_epochs", "restart")
    }
    run_dir, record = _stopped_attempt(settings, **change)
    saved_at = datetime.fromisoformat(record["started"]).timestamp() + 40.0
    last = run_dir / "checkpoints" / "last.ckpt"
    if flags["no_checkpoint"]:
        last.unlink()
    if flags["unreadable"]:
        last.write_bytes(b"half a zip")
    if flags["ends_fit"]:  # the fit's last epoch: killed in its end-of-training analyses
        _save_checkpoint(run_dir, saved_at, ends_fit=True)
    if flags["before_end"] == "unreadable":
        (run_dir / "checkpoints" / BEFORE_END_CHECKPOINT).write_bytes(b"half a zip")
    elif flags["before_end"] is not None:  # one that cannot stand in for the last
        same_step = flags["before_end"] == "same step"
        _save_checkpoint(
            run_dir, saved_at - 10, ends_fit=not same_step, name=BEFORE_END_CHECKPOINT, epoch=1,
            global_step=7 if same_step else 5,
        )  # fmt: skip
    if flags["early_stopped"]:  # a checkpoint of an older version: EarlyStopping stopped at its epoch
        _save_checkpoint(run_dir, saved_at, ends_fit=None, stopped_epoch=2)
    if flags["max_epochs"]:  # a checkpoint of an older version at the config's last epoch
        _save_checkpoint(run_dir, saved_at, ends_fit=None)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": flags["max_epochs"]}}))
    capsys.readouterr()

    (run,) = run_sweep(settings, resume=not flags["restart"])
    assert run.status == "finished"
    (fit, _) = _calls(run_dir)
    assert "--ckpt_path" not in fit  # from the start
    assert "resumed" not in json.loads((run_dir / "sweep.json").read_text())
    (moved,) = (settings.sweep_dir / ATTEMPTS_DIR).iterdir()
    assert (moved / "checkpoints").is_dir()
    printed = capsys.readouterr().out
    assert "moved to" in printed
    assert re.search(f"not resumed: {reason}", printed), printed


def test_a_run_killed_in_its_end_of_training_continues_from_the_checkpoint_before(settings: SweepSettings) -> None:
    """Its last checkpoint ends training, so the sweep trains the last epoch again from the one
    before (KeepCheckpointBeforeEnd's copy), and the end of training runs."""
    run_dir, record = _stopped_attempt(settings)
    started = datetime.fromisoformat(record["started"]).timestamp()
    _save_checkpoint(run_dir, started + 40.0, ends_fit=True)
    before_end = run_dir / "checkpoints" / BEFORE_END_CHECKPOINT
    _save_checkpoint(run_dir, started + 30.0, name=BEFORE_END_CHECKPOINT, epoch=1, global_step=5)

    (run,) = run_sweep(settings, out=io.StringIO())
    assert run.status == "finished"
    fit, test = _calls(run_dir)
    assert fit.endswith(f"--ckpt_path={before_end}") and test.startswith("test ")
    (entry,) = json.loads((run_dir / "sweep.json").read_text())["resumed"]
    assert (entry["stage"], entry["epoch"], entry["global_step"], entry["kept_seconds"]) == ("fit", 1, 5, 30.0)
    assert entry["checkpoint"] == str(before_end)
    assert not (settings.sweep_dir / ATTEMPTS_DIR).exists()
    assert (
        f"resuming the running attempt's fit from {before_end} (epoch 1, step 5; 30 s of its work kept; its last"
        " checkpoint had ended training, so training from there and its end are redone)"
    ) in (run_dir / "train.log").read_text()


def test_an_older_checkpoint_before_the_configs_last_epoch_continues(settings: SweepSettings) -> None:
    """Without ``ends_fit`` (older versions) the config's limits decide: epoch 2 of 30 continues."""
    run_dir, record = _stopped_attempt(settings)
    _save_checkpoint(run_dir, datetime.fromisoformat(record["started"]).timestamp() + 40.0, ends_fit=None)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 30}}))
    (run,) = run_sweep(settings, out=io.StringIO())
    assert run.status == "finished" and _calls(run_dir)[0].endswith(
        "--ckpt_path=" + str(run_dir / "checkpoints" / "last.ckpt")
    )


def test_without_the_test_step_an_interrupted_fit_still_continues(settings: SweepSettings) -> None:
    run_dir, _ = _stopped_attempt(settings)
    (run,) = run_sweep(dataclasses.replace(settings, test=False), out=io.StringIO())
    (fit,) = _calls(run_dir)
    assert run.status == "finished" and "--ckpt_path=" in fit


def test_a_run_finished_by_another_sweep_meanwhile_is_skipped(
    settings: SweepSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record read before the lock said ``running``; read again under the lock it says
    ``finished`` (another sweep finished the run meanwhile): nothing runs, nothing is touched."""
    import lightning_hessian.sweep.runner as runner

    (run,) = run_sweep(settings, out=io.StringIO())
    finished = json.loads((run.run_dir / "sweep.json").read_text())
    (run.run_dir / "calls.txt").unlink()
    real_read, reads = runner.read_record, []

    def stale_then_real(run_dir: Path):
        reads.append(run_dir)
        return {**finished, "status": "running"} if len(reads) == 1 else real_read(run_dir)

    monkeypatch.setattr(runner, "read_record", stale_then_real)
    (run,) = run_sweep(settings, out=io.StringIO())
    assert run.status == "skipped" and len(reads) == 2
    assert not (run.run_dir / "calls.txt").exists()
    assert json.loads((run.run_dir / "sweep.json").read_text()) == finished


def test_dry_run_says_what_would_resume(settings: SweepSettings, capsys: pytest.CaptureFixture) -> None:
    run_dir, _ = _stopped_attempt(settings)
    capsys.readouterr()
    run_sweep(settings, dry_run=True)
    printed = capsys.readouterr().out
    assert "resuming the running attempt's fit from" in printed and "--ckpt_path=" in printed
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "running"  # nothing touched
    assert find_resume_point(settings, run_dir, None) == (None, "it has no readable sweep.json")


# ------------------------------------------------------- the real hessian-train, killed with its sweep


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _lock_free(path: Path) -> bool:
    """Whether nobody holds the ``flock`` of ``path`` (taken and given back at once)."""
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing gives the lock back


HOLD = '''
"""Imported by hessian-train in the test's subprocess: hold before the batch at global step
$HOLD_AT_STEP (after flushing the loggers), writing $HOLD_MARKER, until killed."""
import os
import time
from pathlib import Path

import pytorch_lightning as pl


class HoldAt(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == int(os.environ.get("HOLD_AT_STEP", "-1")):
            for logger in trainer.loggers:
                logger.save()
            Path(os.environ["HOLD_MARKER"]).write_text(str(trainer.global_step))
            while True:
                time.sleep(0.02)
'''

CONFIG = {
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 1,
        "limit_test_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": [{"class_path": "sweep_hold.HoldAt"}],
    },
    # gaussian_noise: every step draws from the global generator, so the resumed run must restore it
    "model": {
        "arch": "mlp", "lr": 0.1, "base_batch_size": 32, "adversarial": {"method": "gaussian_noise", "epsilon": 0.05},
    },
    "data": {"class_path": "lightning_hessian.data.Digits", "init_args": {"batch_size": 32}},
}  # fmt: skip


def test_a_sweep_killed_with_its_training_continues_and_repeats_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill -9`` of the sweep and its training mid-epoch (a machine that goes away): the rerun
    continues the run from its last checkpoint into the same directory, and ends with the weights
    and the curves of a run that was never stopped."""
    (tmp_path / "sweep_hold.py").write_text(textwrap.dedent(HOLD))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HOLD_MARKER", str(tmp_path / "held"))
    argv = ["--config", str(config), "--batch-sizes", "32", "--seeds", "0", "--root", str(tmp_path / "sweeps")]

    # 3 steps an epoch, a checkpoint after each: step 4 is mid-epoch, after the step-3 checkpoint
    sweep = subprocess.Popen(
        [sys.executable, "-m", "lightning_hessian.cli.sweep", *argv, "--name", "killed"],
        env={**os.environ, "HOLD_AT_STEP": "4"}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    run_dir = tmp_path / "sweeps" / "killed" / "bs32_seed0"
    child = None
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "held").exists():
            assert sweep.poll() is None, (run_dir / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "hessian-train did not reach step 4"
            time.sleep(0.05)
        child = json.loads((run_dir / LOCK_FILE).read_text())["child_pid"]
    finally:  # first the sweep, so that it records nothing; then its training (held, it ignores SIGTERM)
        sweep.kill()
        sweep.wait(timeout=60)
        if child is None and (run_dir / LOCK_FILE).exists():
            child = json.loads((run_dir / LOCK_FILE).read_text()).get("child_pid")
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 60
            # SIGKILL takes effect asynchronously, and a killed multi-threaded process shows as a
            # zombie while its other threads still hold its files: wait for the lock to be free
            while not (_gone(child) and _lock_free(run_dir / LOCK_FILE)):
                assert time.monotonic() < deadline, f"training pid {child} survived SIGKILL"
                time.sleep(0.05)
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "running"

    monkeypatch.setenv("HOLD_AT_STEP", "-1")
    assert main([*argv, "--name", "killed"]) == 0
    assert main([*argv, "--name", "uninterrupted"]) == 0

    record = json.loads((run_dir / "sweep.json").read_text())
    assert record["status"] == "finished"
    (entry,) = record["resumed"]
    assert (entry["stage"], entry["epoch"], entry["global_step"]) == ("fit", 0, 3)
    assert entry["kept_seconds"] > 0
    assert not (tmp_path / "sweeps" / "killed" / ATTEMPTS_DIR).exists()
    reference_dir = tmp_path / "sweeps" / "uninterrupted" / "bs32_seed0"
    expected = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    actual = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert actual["global_step"] == expected["global_step"] == 9
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], value, rtol=1e-6, atol=1e-7)
    # every curve of the fit and of the test, one value per step, as the report reads it
    resumed_curves, reference_curves = read_events(run_dir).scalars, read_events(reference_dir).scalars
    assert set(resumed_curves) == set(reference_curves) and "train/loss_step" in reference_curves
    for tag, points in reference_curves.items():
        steps = [p.step for p in resumed_curves[tag]]
        assert steps == [p.step for p in points] and len(steps) == len(set(steps)), tag
        assert [p.value for p in resumed_curves[tag]] == pytest.approx([p.value for p in points], rel=1e-5), tag
