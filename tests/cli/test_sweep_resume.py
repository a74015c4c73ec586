"""hessian-sweep continues a run that was stopped from outside from its last checkpoint."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICKSTART

from lightning_hessian.cli.sweep import main
from lightning_hessian.report.events import read_events
from lightning_hessian.sweep import ATTEMPTS_DIR, LOCK_FILE, SweepSettings, find_resume_point, run_sweep

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


def _save_checkpoint(run_dir: Path, saved_at: float) -> None:
    """A real last checkpoint at epoch 2, step 7, as hessian-train's callbacks fill it."""
    checkpoint = {
        "epoch": 2,
        "global_step": 7,
        "state_dict": {"w": torch.zeros(2)},
        "callbacks": {
            "RNGStateCallback": {"rng": {"torch": torch.get_rng_state()}},
            "CheckpointLogSync": {"saved_at": saved_at, "log_dir": str(run_dir.resolve())},
        },
    }
    torch.save(checkpoint, run_dir / "checkpoints" / "last.ckpt")


def _stop_during_fit(run_dir: Path, status: str, **changes) -> dict:
    """Turn a run directory into one stopped during its fit: the record says ``status`` (with
    ``changes``), there is no checkpoint.json, and the last checkpoint was saved 40 s after the
    attempt started. Returns the record."""
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
    run_dir, earlier = _stopped_attempt(settings, status)
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
            "stage": "fit",
            "epoch": 2,
            "global_step": 7,
            "checkpoint": str(last),
            "kept_seconds": 40.0,
        }
    ]
    # the run's time is the work it kept: this attempt plus the 40 s before the checkpoint
    assert record["wall_seconds"] == run.wall_seconds and 40.0 < run.wall_seconds < 40.0 + record["fit_seconds"] + 60
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
    resumed = json.loads((run_dir / "sweep.json").read_text())["resumed"]
    assert [entry["attempt_started"] for entry in resumed] == [earlier["started"], record["started"]]
    # its checkpoint was saved before the second attempt started: that attempt kept nothing
    assert resumed[1]["kept_seconds"] == 0.0


def test_a_run_whose_fit_had_finished_runs_only_the_test(settings: SweepSettings) -> None:
    (run,) = run_sweep(settings, out=io.StringIO())
    run_dir = run.run_dir
    record = json.loads((run_dir / "sweep.json").read_text())
    record.update(status="running", fit_returncode=0, fit_seconds=12.5)  # killed during the test
    (run_dir / "sweep.json").write_text(json.dumps(record))
    (run_dir / "calls.txt").unlink()

    (run,) = run_sweep(settings)
    assert run.status == "finished"
    (test,) = _calls(run_dir)
    assert test.startswith("test ") and test.endswith(f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    record = json.loads((run_dir / "sweep.json").read_text())
    (entry,) = record["resumed"]
    assert entry["stage"] == "test" and entry["kept_seconds"] is not None
    assert record["fit_command"] == run.fit_command  # the earlier attempt's fit, not run again
    assert "fit_seconds" not in record and record["test_returncode"] == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "failed"}, "it failed"),
        ({"overrides": ["model.lr=0.1"]}, "it ran with other settings"),
        ({"no_checkpoint": True}, "it saved no last checkpoint in checkpoints/"),
        ({"unreadable": True}, "its last checkpoint .* cannot be read"),
        ({"restart": True}, "resuming is off"),
    ],
)
def test_a_run_that_cannot_continue_is_moved_aside_and_started_again(
    settings: SweepSettings, change: dict, reason: str, capsys: pytest.CaptureFixture
) -> None:
    flags = {key: change.pop(key, False) for key in ("no_checkpoint", "unreadable", "restart")}
    run_dir, _ = _stopped_attempt(settings, **change)
    if flags["no_checkpoint"]:
        (run_dir / "checkpoints" / "last.ckpt").unlink()
    if flags["unreadable"]:
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"half a zip")
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
    deadline = time.monotonic() + 240
    while not (tmp_path / "held").exists():
        assert sweep.poll() is None, (run_dir / "train.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "hessian-train did not reach step 4"
        time.sleep(0.05)
    child = json.loads((run_dir / LOCK_FILE).read_text())["child_pid"]
    sweep.kill()  # first the sweep, so that it records nothing; then its training
    sweep.wait(timeout=60)
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while not _gone(child):  # SIGKILL takes effect asynchronously
        assert time.monotonic() < deadline + 60, f"training pid {child} survived SIGKILL"
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
