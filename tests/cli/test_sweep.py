"""hessian-sweep: runs per (batch size, seed), sweep.json, skipping finished runs, surviving failures."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART

from lightning_hessian.cli.sweep import main
from lightning_hessian.report import build_report
from lightning_hessian.sweep import SweepSettings, plan_sweep, run_sweep

# A stand-in for hessian-train: records its calls in the logger's run directory, writes a
# checkpoint on fit and names it in checkpoint.json (as hessian-train does), and fails for batch
# size 64 while a `fail_64` file lies beside it.
FAKE_TRAIN = """
import json, os, sys
from pathlib import Path

subcommand, arguments = sys.argv[1], sys.argv[2:]
options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--") and "=" in a)
if options["data.batch_size"] == "64" and Path(__file__).with_name("fail_64").exists():
    print("training diverged: loss is nan")
    sys.exit(3)
run = Path(options["trainer.logger.init_args.save_dir"]) / options["trainer.logger.init_args.name"]
run = run / options["trainer.logger.init_args.version"]
run.mkdir(parents=True, exist_ok=True)
with (run / "calls.txt").open("a") as calls:
    calls.write(" ".join([subcommand, *arguments]) + "\\n")
if subcommand == "fit":
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "epoch=0-step=1.ckpt").write_text("weights")
    record = {"checkpoint": os.path.abspath(run / "checkpoints" / "epoch=0-step=1.ckpt")}
    (run / "checkpoint.json").write_text(json.dumps(record))
print(subcommand, "done")
"""


@pytest.fixture
def fake_train(tmp_path: Path) -> Path:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return script


def _settings(tmp_path: Path, fake_train: Path, **kwargs) -> SweepSettings:
    defaults = dict(
        configs=(str(QUICKSTART),), batch_sizes=(32, 64), seeds=(0,), root=str(tmp_path / "sweeps"),
        train_command=(sys.executable, str(fake_train)), overrides=("model.lr=0.05",),
        extra_args=("--trainer.max_epochs", "1"),
    )  # fmt: skip
    defaults.update(kwargs)
    return SweepSettings(**defaults)


def _calls(run_dir: Path) -> list[str]:
    return (run_dir / "calls.txt").read_text().splitlines()


def test_sweep_survives_a_failure_and_skips_finished_runs(tmp_path: Path, fake_train: Path) -> None:
    (tmp_path / "fail_64").write_text("")
    settings = _settings(tmp_path, fake_train)
    sweep_dir = tmp_path / "sweeps" / "quickstart-lr=0.05"
    assert settings.sweep_dir == sweep_dir
    good, bad = sweep_dir / "bs32_seed0", sweep_dir / "bs64_seed0"

    runs = run_sweep(settings)
    assert [(r.batch_size, r.status) for r in runs] == [(32, "finished"), (64, "failed")]
    fit, test = _calls(good)
    assert fit.startswith(f"fit --config {QUICKSTART} --data.batch_size=32 --seed_everything=0")
    assert fit.endswith("--model.lr=0.05 --trainer.max_epochs 1")
    assert test.startswith("test ") and test.endswith(f"--ckpt_path={good / 'checkpoints' / 'epoch=0-step=1.ckpt'}")
    record = json.loads((good / "sweep.json").read_text())
    assert (record["status"], record["batch_size"], record["seed"], record["returncode"]) == ("finished", 32, 0, 0)
    assert record["overrides"] == ["model.lr=0.05"] and record["configs"] == [str(QUICKSTART)]
    assert record["wall_seconds"] > 0 and "variant" not in record
    failed = json.loads((bad / "sweep.json").read_text())
    assert (failed["status"], failed["returncode"]) == ("failed", 3)
    assert "training diverged" in failed["error_tail"] and "training diverged" in (bad / "train.log").read_text()
    assert "test_command" not in failed  # no test after a failed fit

    # Second pass through the console entry point: the finished run is skipped, the failed one
    # is moved aside and run again; the exit status is 0 once nothing failed.
    (tmp_path / "fail_64").unlink()
    argv = [
        "--config", str(QUICKSTART), "--batch-sizes", "32", "64", "--seeds", "0", "--set", "model.lr=0.05",
        "--root", str(tmp_path / "sweeps"), "--train-command", f"{sys.executable} {fake_train}",
        "--", "--trainer.max_epochs", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(_calls(good)) == 2  # not run again
    assert json.loads((bad / "sweep.json").read_text())["status"] == "finished"
    attempts = list((sweep_dir / ".attempts").iterdir())
    assert len(attempts) == 1 and attempts[0].name.startswith("bs64_seed0-")
    assert json.loads((attempts[0] / "sweep.json").read_text())["status"] == "failed"

    # A failing run makes the exit status 1, and later runs still run.
    (tmp_path / "fail_64").write_text("")
    argv_new_seed = [a if a != "0" else "1" for a in argv]
    assert main(argv_new_seed) == 1
    assert json.loads((sweep_dir / "bs32_seed1" / "sweep.json").read_text())["status"] == "finished"


def test_command_that_cannot_start_is_a_failed_run(tmp_path: Path, fake_train: Path) -> None:
    settings = _settings(tmp_path, fake_train, batch_sizes=(32,), train_command=(str(tmp_path / "no_such_program"),))
    (run,) = run_sweep(settings)
    assert run.status == "failed" and "No such file" in run.message


def test_dry_run_prints_and_writes_nothing(tmp_path: Path, fake_train: Path, capsys: pytest.CaptureFixture) -> None:
    settings = _settings(tmp_path, fake_train, seeds=(0, 1), name="grid", variant="my label")
    runs = run_sweep(settings, dry_run=True)
    assert [(r.seed, r.batch_size) for r in runs] == [(0, 32), (0, 64), (1, 32), (1, 64)]  # seed-major
    assert all(r.status == "pending" for r in runs)
    output = capsys.readouterr().out
    assert (
        "--trainer.logger.init_args.version=bs64_seed1" in output and "--trainer.logger.init_args.name=grid" in output
    )
    assert not (tmp_path / "sweeps").exists()
    assert [r.run_dir for r in plan_sweep(settings)][-1] == tmp_path / "sweeps" / "grid" / "bs64_seed1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"overrides": ("model.lr",)}, "must look like KEY=VALUE"),
        ({"overrides": ("seed_everything=3",)}, "set by the sweep itself"),
        ({"overrides": ("trainer.logger.init_args.name=x",)}, "set by the sweep itself"),
        ({"extra_args": ("--data.batch_size", "64")}, "would override"),
        ({"configs": ("missing.yaml",)}, "does not exist"),
        ({"batch_sizes": (32, 0)}, "positive integers"),
        ({"seeds": (1, 1)}, "duplicates"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, fake_train: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _settings(tmp_path, fake_train, **change)


def test_config_with_other_logger_is_refused(tmp_path: Path, fake_train: Path) -> None:
    config = tmp_path / "csv.yaml"
    config.write_text("trainer:\n  logger:\n    class_path: pytorch_lightning.loggers.CSVLogger\n")
    with pytest.raises(ValueError, match="single TensorBoardLogger"):
        _settings(tmp_path, fake_train, configs=(str(QUICKSTART), str(config)))
    assert main(["--config", str(config), "--batch-sizes", "8"]) == 2


TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
        "limit_test_batches": 1, "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "lightning_hessian.callbacks.spectrum.HessianSpectrumCallback",
                "init_args": {
                    "top_k": 1, "quantities": ["eigenvalues"], "num_samples": 32, "eig_tol": 0.1, "max_iter": 6,
                },
            }
        ],
    },
    "model": {"arch": "mlp", "lr": 0.1, "base_batch_size": 32},
    "data": {"class_path": "lightning_hessian.data.Digits", "init_args": {"batch_size": 32}},
}  # fmt: skip


def test_real_hessian_train_end_to_end(tmp_path: Path) -> None:
    """The real CLI with the spectrum callback: fit + test into the sweep's run directory, read back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    root = tmp_path / "sweeps"
    assert (
        main(["--config", str(config), "--seeds", "3", "--root", str(root), "--name", "digits", "--batch-sizes", "32"])
        == 0
    )
    run_dir = root / "digits" / "bs32_seed3"
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "finished"
    # A failed run beside it (as a sweep whose fit died before logging anything leaves it).
    failed_dir = root / "digits" / "bs16_seed3"
    failed_dir.mkdir()
    (failed_dir / "sweep.json").write_text(json.dumps({"batch_size": 16, "seed": 3, "status": "failed"}))

    content = build_report([root / "digits"], tmp_path / "report")
    assert [(r.batch_size, r.seed, r.variant) for r in content.runs] == [(32, 3, "standard")]
    assert content.skipped == [(failed_dir.resolve(), "sweep.json status is 'failed', no event files")]
    (table,) = content.tables
    cells = table.rows[0].cells
    # The table's accuracy is what hessian-train test printed ...
    printed = re.search(r"test/acc\W+([0-9.]+)", (run_dir / "train.log").read_text())
    assert printed is not None
    assert cells["acc"].values == pytest.approx([float(printed.group(1))], abs=1e-6)
    # ... and its test-sample top eigenvalue the test's analysis, read here from the test's own event
    # file under its split-qualified tag, while the fit's training-sample value keeps its own tag.
    test_events = EventAccumulator(str(max(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)))
    test_events.Reload()
    (test_point,) = test_events.Scalars("hessian/test/eig_1")
    assert "hessian/eig_1" not in test_events.Tags()["scalars"]
    assert cells["hessian/test/eig_1"].values == pytest.approx([test_point.value])
    assert cells["hessian/eig_1"].values and cells["hessian/eig_1"].values != cells["hessian/test/eig_1"].values
    assert (tmp_path / "report" / "top_eigenvalue_vs_epoch.png").is_file()


def test_sigterm_stops_the_running_command_and_marks_the_run(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    slow = tmp_path / "slow_train.py"
    slow.write_text(
        "import os, sys, time\nfrom pathlib import Path\n"
        "Path(sys.argv[0]).with_name('child.pid').write_text(str(os.getpid()))\ntime.sleep(120)\n"
    )
    sweep = subprocess.Popen(
        [
            sys.executable, "-m", "lightning_hessian.cli.sweep", "--config", str(QUICKSTART),
            "--batch-sizes", "8", "16", "--root", str(tmp_path / "sweeps"),
            "--train-command", f"{sys.executable} {slow}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    sweep.send_signal(signal.SIGTERM)
    output, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 130, output
    assert "interrupted" in output
    record = json.loads((tmp_path / "sweeps" / "quickstart" / "bs8_seed0" / "sweep.json").read_text())
    assert record["status"] == "interrupted"
    assert not (tmp_path / "sweeps" / "quickstart" / "bs16_seed0").exists()  # the sweep stopped
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the training process was ended too


# ------------------------------------------------------------------ faults: killed sweeps, one writer

# A training stand-in that runs until stopped: it writes into its run directory, then its PID to
# `child.pid` beside the script (atomically; the tests wait for it). A SIGINT/SIGTERM it receives is
# written to `signal.txt` before it exits, or ignored while an `ignore_signals` file lies beside it.
SLOW_TRAIN = """
import os, signal, sys, time
from pathlib import Path

here = Path(sys.argv[0]).parent


def stop(signum, frame):
    (here / "signal.txt").write_text(signal.Signals(signum).name)
    sys.exit(1)


for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN if (here / "ignore_signals").exists() else stop)
options = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
run = Path(options["trainer.logger.init_args.save_dir"]) / options["trainer.logger.init_args.name"]
run = run / options["trainer.logger.init_args.version"]
run.mkdir(parents=True, exist_ok=True)
(run / "writer.txt").write_text(str(os.getpid()))
(here / "child.pid.tmp").write_text(str(os.getpid()))
os.replace(here / "child.pid.tmp", here / "child.pid")
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until true; fail after ``timeout`` seconds (a generous bound, not a timing assumption)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie that nobody reaps counts as ended)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_sweep(tmp_path: Path, train_script: Path):
    """`hessian-sweep` as its own process (batch size 8, seed 0) with ``train_script`` as hessian-train."""
    import subprocess

    log = (tmp_path / "sweep_output.txt").open("w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "lightning_hessian.cli.sweep", "--config", str(QUICKSTART), "--batch-sizes", "8",
            "--root", str(tmp_path / "sweeps"), "--train-command", f"{sys.executable} {train_script}",
        ],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    log.close()
    return process


def _sweep_argv(tmp_path: Path, train_script: Path) -> list[str]:
    return [
        "--config", str(QUICKSTART), "--batch-sizes", "8", "--root", str(tmp_path / "sweeps"),
        "--train-command", f"{sys.executable} {train_script}",
    ]  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_killed_sweep_takes_its_training_process_with_it(tmp_path: Path, fake_train: Path) -> None:
    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN)
    sweep = _start_sweep(tmp_path, slow)
    _wait_for(lambda: (tmp_path / "child.pid").exists(), "the training process to start")
    child = int((tmp_path / "child.pid").read_text())
    try:
        sweep.kill()  # SIGKILL: the sweep can do nothing about it
        sweep.wait(timeout=60)
        _wait_for(lambda: _gone(child), f"the orphaned training process {child} to end")
        assert (tmp_path / "signal.txt").read_text() == "SIGTERM"  # it was asked to stop, not killed
    finally:
        _kill(child)
    # The rerun takes the stale lock over and trains the run again.
    run_dir = tmp_path / "sweeps" / "quickstart" / "bs8_seed0"
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "running"  # as the kill left it
    assert main(_sweep_argv(tmp_path, fake_train)) == 0
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "finished"
    assert not (run_dir / "sweep.lock").exists()
    (attempt,) = (tmp_path / "sweeps" / "quickstart" / ".attempts").iterdir()
    assert (attempt / "writer.txt").read_text() == str(child)


def test_rerun_refuses_a_run_directory_that_a_live_process_writes(
    tmp_path: Path, fake_train: Path, capsys: pytest.CaptureFixture
) -> None:
    """A training process that survives its sweep (it ignores SIGTERM here; on other systems no
    signal reaches it at all) keeps the run directory: the rerun must not start a second writer."""
    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN)
    (tmp_path / "ignore_signals").write_text("")
    sweep = _start_sweep(tmp_path, slow)
    _wait_for(lambda: (tmp_path / "child.pid").exists(), "the training process to start")
    child = int((tmp_path / "child.pid").read_text())
    run_dir = tmp_path / "sweeps" / "quickstart" / "bs8_seed0"
    try:
        sweep.kill()
        sweep.wait(timeout=60)
        assert not _gone(child)
        assert main(_sweep_argv(tmp_path, fake_train)) == 1
        output = capsys.readouterr().out
        assert "refused" in output and f"training pid {child}" in output and "in use" in output
        assert (run_dir / "writer.txt").read_text() == str(child)  # left alone: not moved, not rerun
        assert not (run_dir / "calls.txt").exists() and not (run_dir.parent / ".attempts").exists()
        assert json.loads((run_dir / "sweep.json").read_text())["status"] == "running"
    finally:
        _kill(child)
    _wait_for(lambda: _gone(child), f"process {child} to end")
    # Its lock is stale now (the PIDs in it are dead): the next sweep takes the run over.
    assert json.loads((run_dir / "sweep.lock").read_text())["child_pid"] == child
    assert main(_sweep_argv(tmp_path, fake_train)) == 0
    assert json.loads((run_dir / "sweep.json").read_text())["status"] == "finished"
    assert len(_calls(run_dir)) == 2  # fit and test, once


def test_lock_with_a_live_pid_refuses_and_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    from lightning_hessian.sweep import LOCK_FILE, RunBusyError, RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir) as lock:
        with pytest.raises(RunBusyError, match=f"sweep pid {os.getpid()}"):
            RunLock(run_dir)  # held (flock) by a live process
        assert json.loads((run_dir / LOCK_FILE).read_text())["sweep_pid"] == os.getpid() == lock._info["sweep_pid"]
    assert not (run_dir / LOCK_FILE).exists()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # A lock file naming a live process of this host, without a held flock: refused, with the way out.
        (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "child_pid": sleeper.pid}))
        with pytest.raises(RunBusyError, match=f"training pid {sleeper.pid}.*delete"):
            RunLock(run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same lock once its process is gone: stale, taken over.
    with RunLock(run_dir):
        assert json.loads((run_dir / LOCK_FILE).read_text())["sweep_pid"] == os.getpid()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_is_passed_on_to_the_training_process(tmp_path: Path, signame: str) -> None:
    import signal

    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN)
    sweep = _start_sweep(tmp_path, slow)
    _wait_for(lambda: (tmp_path / "child.pid").exists(), "the training process to start")
    child = int((tmp_path / "child.pid").read_text())
    try:
        sweep.send_signal(getattr(signal, signame))
        assert sweep.wait(timeout=120) == 130, (tmp_path / "sweep_output.txt").read_text()
        assert (tmp_path / "signal.txt").read_text() == signame  # the same signal, not a substitute
        assert _gone(child)
    finally:
        _kill(child)
    record = json.loads((tmp_path / "sweeps" / "quickstart" / "bs8_seed0" / "sweep.json").read_text())
    assert record["status"] == "interrupted"


# A hessian-train stand-in whose fit leaves, after the checkpoint it records, a newer partial file
# (as a full disk did with a non-atomic checkpoint writer).
PARTIAL_AFTER_RECORD = """
import json, os, sys
from pathlib import Path

subcommand, arguments = sys.argv[1], sys.argv[2:]
options = dict(a[2:].split("=", 1) for a in arguments if a.startswith("--") and "=" in a)
run = Path(options["trainer.logger.init_args.save_dir"]) / options["trainer.logger.init_args.name"]
run = run / options["trainer.logger.init_args.version"]
if subcommand == "fit":
    (run / "checkpoints").mkdir(parents=True)
    good = run / "checkpoints" / "epoch=0-step=4.ckpt"
    good.write_text("complete")
    (run / "checkpoint.json").write_text(json.dumps({"checkpoint": os.path.abspath(good)}))
    partial = run / "checkpoints" / "epoch=1-step=8.ckpt"
    partial.write_text("trunc")
    os.utime(partial, (os.path.getmtime(good) + 60,) * 2)  # newer whatever the clock's resolution
else:
    assert subcommand == "test"
    ckpt = next(a.split("=", 1)[1] for a in arguments if a.startswith("--ckpt_path="))
    (run / "tested.txt").write_text(ckpt)
    sys.exit(0 if Path(ckpt).read_text() == "complete" else 4)
"""


def test_sweep_tests_the_checkpoint_the_fit_recorded_not_the_newest_file(tmp_path: Path) -> None:
    script = tmp_path / "partial_train.py"
    script.write_text(PARTIAL_AFTER_RECORD)
    assert main(_sweep_argv(tmp_path, script)) == 0
    run_dir = tmp_path / "sweeps" / "quickstart" / "bs8_seed0"
    good = run_dir / "checkpoints" / "epoch=0-step=4.ckpt"
    assert (run_dir / "tested.txt").read_text() == str(good)
    record = json.loads((run_dir / "sweep.json").read_text())
    assert (record["status"], record["test_checkpoint"]) == ("finished", str(good))

    # A fit that recorded no checkpoint is not tested with a guess.
    unrecorded = PARTIAL_AFTER_RECORD.replace('(run / "checkpoint.json").write_text', "print")
    (tmp_path / "no_record.py").write_text(unrecorded)
    assert main([*_sweep_argv(tmp_path, tmp_path / "no_record.py"), "--name", "unrecorded"]) == 0
    record = json.loads((tmp_path / "sweeps" / "unrecorded" / "bs8_seed0" / "sweep.json").read_text())
    assert "test_command" not in record and record["test"].startswith("skipped: fit wrote no checkpoint.json")


# ------------------------------------------------------------------ the deprecated module path


def test_the_old_module_path_still_runs_the_sweep_with_a_deprecation_warning(tmp_path: Path, fake_train: Path) -> None:
    """``python -m lightning_hessian.report.sweep`` (what older scripts and running studies call)
    warns once and runs ``hessian-sweep`` unchanged; its names still import."""
    import subprocess
    import warnings

    argv = [
        "--config", str(QUICKSTART), "--batch-sizes", "32", "--root", str(tmp_path / "sweeps"),
        "--train-command", f"{sys.executable} {fake_train}", "--no-test",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "lightning_hessian.report.sweep", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "lightning_hessian.report.sweep is deprecated" in result.stderr
        and "lightning_hessian.cli.sweep" in result.stderr
    )
    assert "1 finished" in result.stdout
    record = json.loads((tmp_path / "sweeps" / "quickstart" / "bs32_seed0" / "sweep.json").read_text())
    assert record["status"] == "finished"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lightning_hessian.report as report
        import lightning_hessian.sweep as sweep

        assert report.SweepSettings is sweep.SweepSettings and report.run_sweep is sweep.run_sweep
    assert any(
        issubclass(w.category, DeprecationWarning) and "lightning_hessian.sweep" in str(w.message) for w in caught
    )


def test_one_definition_of_the_sweep_record_file() -> None:
    """The sweep writes and the report reads the same ``sweep.json``: one constant, one reader."""
    from lightning_hessian.report import runs
    from lightning_hessian.sweep import records

    assert runs.SWEEP_FILE is records.SWEEP_FILE == "sweep.json"
    assert runs.read_record is records.read_record


@pytest.mark.parametrize("other_thread", [False, True], ids=["one-thread", "with-another-thread"])
def test_an_interrupt_while_the_child_starts_still_stops_and_reaps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_thread: bool
) -> None:
    """SIGTERM delivered the moment ``Popen`` returns (on a loaded machine the sweep can be off the
    CPU until the child is up): the sweep holds the signal until it knows the child, then stops it
    and reaps it, instead of leaving it running. Also when the process has another thread, which
    the kernel may pick for the signal (a per-thread signal mask did not hold it then: a full test
    session, whose earlier tests leave threads behind, caught that)."""
    import os
    import signal
    import subprocess
    import threading
    import time

    import lightning_hessian.sweep.runner as runner

    slow = tmp_path / "slow_train.py"
    slow.write_text(SLOW_TRAIN)
    started: list[int] = []
    real_popen = subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process.pid)
        _wait_for(lambda: (tmp_path / "child.pid").exists(), "the training process to start")
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before _run_logged's try block is entered
        # Let the signal reach whichever thread the kernel chose, then run code that checks for
        # signals, as the sweep's own code between the fork and its try block may do.
        time.sleep(0.2)
        signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return process

    monkeypatch.setattr(runner.subprocess, "Popen", popen_then_sigterm)
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    if other_thread:
        thread.start()
    try:
        assert main(_sweep_argv(tmp_path, slow)) == 130
        child = started[0]
        assert (tmp_path / "signal.txt").read_text() == "SIGTERM"
        assert _gone(child)
    finally:
        release.set()
        for pid in started:
            _kill(pid)
    record = json.loads((tmp_path / "sweeps" / "quickstart" / "bs8_seed0" / "sweep.json").read_text())
    assert record["status"] == "interrupted"
