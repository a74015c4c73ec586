"""Running a sweep: each run's ``hessian-train`` processes, one after the other, and their records.

Each run directory gets a ``sweep.json`` and a ``train.log`` (:mod:`~lightning_hessian.sweep.records`).
A run whose ``sweep.json`` says ``finished`` is skipped, so an interrupted sweep continues where
it stopped. A run that was stopped from outside (``interrupted`` by Ctrl-C or SIGTERM, or still
``running`` because the sweep itself was killed) continues from its last checkpoint with the same
settings (:func:`find_resume_point`; ``hessian-train``'s resumption is exact, see
:mod:`lightning_hessian.resume`), or, when that checkpoint ends training (the run was killed in
its end-of-training analyses, which Lightning does not redo from it), from the checkpoint before
(``before_end.ckpt``: its last epoch is trained again); a run that failed, or one that cannot
continue (other settings, no checkpoint yet, ``resume=False``), is moved to
``ROOT/NAME/.attempts/`` and run again from the start. A failed run does not stop the sweep.
After a successful ``fit`` the sweep runs ``hessian-train test`` into the same directory on the
checkpoint that the fit recorded in ``checkpoint.json`` (:mod:`lightning_hessian.checkpoint_io`;
not merely the newest ``.ckpt`` file, which may be a partial one), so the run has a ``test/acc``
and the callbacks' analyses on the test split.

The training process runs in its own process group, holding the run directory's
:class:`~lightning_hessian.sweep.lock.RunLock`. SIGINT and SIGTERM sent to the sweep are passed on
to it (then SIGKILL after :data:`STOP_GRACE_SECONDS`), and on Linux it gets SIGTERM when the sweep
dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so a killed sweep leaves no training behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from lightning_hessian.checkpoint_io import CHECKPOINT_RECORD, recorded_checkpoint
from lightning_hessian.resume import BEFORE_END_CHECKPOINT, last_checkpoint_in, read_resume_info
from lightning_hessian.sweep.lock import RunBusyError, RunLock
from lightning_hessian.sweep.machine import describe_machine
from lightning_hessian.sweep.records import LOG_FILE, move_aside, read_record, utc_now, write_record
from lightning_hessian.sweep.settings import SweepRun, SweepSettings, plan_sweep, train_arguments

__all__ = [
    "STOP_GRACE_SECONDS",
    "ResumePoint",
    "SweepInterrupted",
    "find_resume_point",
    "run_sweep",
    "stop_on_signal",
]

#: seconds a training process gets to stop after the forwarded SIGINT/SIGTERM before SIGKILL
STOP_GRACE_SECONDS = 30.0


#: the settings that decide what a run trains: an interrupted run continues only with the same ones
_TRAINING_SETTINGS = ("configs", "overrides", "extra_args")


def _config_digests(settings: SweepSettings) -> list[str]:
    """SHA-256 of each config file's content: a run continues only under configs it started with."""
    return [hashlib.sha256(Path(config).read_bytes()).hexdigest() for config in settings.configs]


def _settings_record(settings: SweepSettings) -> dict[str, Any]:
    return {
        "configs": list(settings.configs),
        "overrides": list(settings.overrides),
        "extra_args": list(settings.extra_args),
        "test": settings.test,
    }


# statuses of an attempt that was stopped from outside (Ctrl-C/SIGTERM: "interrupted"; the sweep
# killed, e.g. with its machine: still "running"), as opposed to one that failed by itself
_STOPPED_FROM_OUTSIDE = ("running", "interrupted")


@dataclass(frozen=True)
class ResumePoint:
    """Where an unfinished run continues.

    Attributes:
        stage: ``"fit"``: continue training from ``checkpoint`` (``hessian-train fit
            --ckpt_path``); ``"test"``: the fit had finished, only what follows it (``test`` on
            ``checkpoint``) is left.
        checkpoint: the checkpoint it continues from.
        kept: the entry for the record's ``resumed`` list: the earlier attempt's ``started``,
            ``status`` and ``machine`` (it may have run elsewhere), ``stage``, ``checkpoint``, its
            ``epoch`` and ``global_step`` and ``kept_seconds``, the earlier attempt's wall time up
            to the checkpoint (the work that is not lost; ``None`` when the checkpoint has no save
            time).
    """

    stage: str
    checkpoint: Path
    kept: dict[str, Any]

    def describe(self) -> str:
        where = f"epoch {self.kept['epoch']}, step {self.kept['global_step']}"
        kept = self.kept.get("kept_seconds")
        work = "" if kept is None else f"; {kept:.0f} s of its work kept"
        if self.stage == "fit":
            redo = (
                "; its last checkpoint had ended training, so training from there and its end are redone"
                if self.checkpoint.name == BEFORE_END_CHECKPOINT
                else ""
            )
            return f"resuming the {self.kept['status']} attempt's fit from {self.checkpoint} ({where}{work}{redo})"
        return f"the {self.kept['status']} attempt's fit had finished ({where}{work}); running what follows it"


def _timestamp(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except (TypeError, ValueError):
        return None


def _finished_fit(run_dir: Path) -> tuple[Path, dict[str, Any], float] | None:
    """The fit that finished in ``run_dir``, if one did: its
    :data:`~lightning_hessian.checkpoint_io.CHECKPOINT_RECORD` says ``finished`` and the
    checkpoint it names exists.

    Returns:
        ``(checkpoint, the record, the time the record was written)``, or ``None``.
    """
    checkpoint, _ = recorded_checkpoint(run_dir)
    if checkpoint is None:
        return None
    path = run_dir / CHECKPOINT_RECORD
    try:
        record = json.loads(path.read_text())
        written = path.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("status") != "finished":
        return None
    return checkpoint, record, written


def find_resume_point(
    settings: SweepSettings, run_dir: Path, record: dict[str, Any] | None
) -> tuple[ResumePoint | None, str]:
    """Whether the unfinished run in ``run_dir`` (its ``sweep.json``: ``record``) can continue.

    It can when it was stopped from outside (status ``interrupted``, or ``running`` left by a
    killed sweep), with the settings of ``settings``, and either its fit had finished
    (``checkpoint.json`` says ``finished``: only the test is left) or ``run_dir/checkpoints``
    holds a last checkpoint (``last*.ckpt``) to continue the fit from. Call it while holding the
    directory's :class:`~lightning_hessian.sweep.lock.RunLock` (no process is writing there).

    Returns:
        ``(resume point, "")``, or ``(None, why not)``.
    """
    if record is None:
        return None, "it has no readable sweep.json"
    status = record.get("status")
    if status not in _STOPPED_FROM_OUTSIDE:
        return None, f"it {status}" if status == "failed" else f"its status is {status!r}"
    current = _settings_record(settings)
    recorded = {key: record.get(key) for key in _TRAINING_SETTINGS}
    if recorded != {key: current[key] for key in _TRAINING_SETTINGS}:
        return None, f"it ran with other settings {recorded}"
    digests = record.get("config_sha256")  # absent in records of older versions: the paths decide
    if digests is not None and digests != _config_digests(settings):
        return None, "its config files have changed since it started (config_sha256)"
    started = _timestamp(record.get("started"))
    finished = _finished_fit(run_dir)
    if finished is not None:
        checkpoint, fit_record, written = finished
        kept = {
            "stage": "test",
            "epoch": fit_record.get("epoch"),
            "global_step": fit_record.get("global_step"),
            "saved_at": written,
        }
        return ResumePoint("test", checkpoint, _kept(record, checkpoint, kept, started)), ""
    last = last_checkpoint_in(run_dir / "checkpoints")
    if last is None:
        return None, "it saved no last checkpoint in checkpoints/ (stopped before its first checkpoint)"
    try:
        info = read_resume_info(last)
    except Exception as error:  # any unreadable file: start again rather than fail the sweep
        return None, f"its last checkpoint {last} cannot be read ({type(error).__name__}: {error})"
    if _ends_fit(run_dir, info):
        ends = (
            f"its last checkpoint {last} was saved when training had reached its end (epoch {info['epoch']}, step"
            f" {info['global_step']}), and Lightning does not redo the end of training (its analyses) from it"
        )
        # KeepCheckpointBeforeEnd's copy of the checkpoint before: train the last epoch again
        last, info, why_not = _checkpoint_before_end(run_dir, info)
        if last is None:
            return None, f"{ends}; {why_not}"
    kept = {"stage": "fit", "epoch": info["epoch"], "global_step": info["global_step"], "saved_at": info["saved_at"]}
    if not info["has_rng"]:
        kept["exact"] = False  # saved without RNGStateCallback: the resumed run draws other random numbers
    return ResumePoint("fit", last, _kept(record, last, kept, started)), ""


def _checkpoint_before_end(run_dir: Path, end: dict[str, Any]) -> tuple[Path | None, dict[str, Any], str]:
    """:data:`~lightning_hessian.resume.BEFORE_END_CHECKPOINT` of ``run_dir`` when it can stand in
    for a last checkpoint that ends training (its information ``end``): readable, from an earlier
    step, and not itself the end of training.

    Returns:
        ``(checkpoint, its information, "")``, or ``(None, end, why not)``.
    """
    path = run_dir / "checkpoints" / BEFORE_END_CHECKPOINT
    if not path.is_file():
        return None, end, f"there is no {BEFORE_END_CHECKPOINT} (saved by KeepCheckpointBeforeEnd) to redo it from"
    try:
        info = read_resume_info(path)
    except Exception as error:  # any unreadable file: start again rather than fail the sweep
        return None, end, f"{path} cannot be read ({type(error).__name__}: {error})"
    if info["global_step"] >= end["global_step"] or _ends_fit(run_dir, info):
        return None, end, f"{path} (step {info['global_step']}) is not from before the end"
    return path, info, ""


def _ends_fit(run_dir: Path, info: dict[str, Any]) -> bool:
    """Whether training stopped after the checkpoint that ``info`` describes
    (:func:`~lightning_hessian.resume.read_resume_info`).

    Returns:
        What the checkpoint recorded (``ends_fit``), else (a checkpoint from before that record)
        whether an ``EarlyStopping`` state stopped at its epoch (``True`` too when that cannot be
        told) or the epoch and step limits in the run's ``config.yaml`` (what LightningCLI saved)
        are reached; ``False`` when neither is known.
    """
    if info.get("ends_fit") is not None:
        return bool(info["ends_fit"])
    if info.get("early_stopped") is not False:  # stopped, or cannot tell (after the first epoch)
        return True
    try:
        trainer = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("trainer") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return False  # no limits known: a checkpoint during training
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if isinstance(max_steps, int) and max_steps >= 0 and info["global_step"] >= max_steps:
        return True
    return isinstance(max_epochs, int) and max_epochs >= 0 and info["epoch"] + 1 >= max_epochs


def _kept(record: dict[str, Any], checkpoint: Path, entry: dict[str, Any], started: float | None) -> dict[str, Any]:
    saved_at = entry.pop("saved_at")
    kept_seconds = saved = None
    if isinstance(saved_at, (int, float)):
        saved = _iso(float(saved_at))
        if started is not None:
            kept_seconds = round(max(0.0, float(saved_at) - started), 3)
    return {
        "attempt_started": record.get("started"),
        "status": record.get("status"),
        "machine": record.get("machine"),
        **entry,
        "checkpoint": str(checkpoint),
        "checkpoint_saved": saved,
        "kept_seconds": kept_seconds,
    }


def _iso(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as ISO 8601 in UTC, to the microsecond."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


# Deferred while a child starts, so that an interrupt cannot land between the fork and the moment
# the sweep knows the child's process (it would leave the child running, unreaped).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _DeferredInterrupts:
    """SIGINT/SIGTERM arriving between :meth:`hold` and :meth:`release` are recorded, not acted on;
    :meth:`release` puts the handlers back and re-raises the first one.

    Python runs signal handlers in the main thread whichever thread the kernel chose, so this
    swaps the Python-level handlers: a per-thread signal mask cannot hold a process-directed
    signal once the process has another thread (a TensorBoard writer, a data loader, pytest's).
    Outside the main thread (where handlers cannot be set, and none would run) it does nothing.
    """

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def hold(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        self.pending.append(signum)

    def release(self) -> None:
        """Restore the handlers; a recorded signal is raised again, now handled as usual (for
        SIGTERM under ``hessian-sweep``: :class:`SweepInterrupted` from :func:`stop_on_signal`)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        if self.pending:
            signal.raise_signal(self.pending[0])


def _die_with_sweep() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when the sweep dies (Linux
    ``PR_SET_PDEATHSIG``, which survives exec).

    Returns:
        The ``preexec_fn``, or ``None`` off Linux.
    """
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
        except (OSError, AttributeError):
            prctl = None
    if prctl is None:
        return None
    sweep_pid = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM (or another signal) received by the sweep: stop like Ctrl-C, passing ``signum`` on
    (:func:`stop_on_signal` raises it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _stop_process_group(process: subprocess.Popen[str], signum: int) -> None:
    """Send ``signum`` to the child's process group, then SIGKILL after :data:`STOP_GRACE_SECONDS`
    (at once on a second Ctrl-C); returns once the child is reaped."""
    try:
        os.killpg(process.pid, signum)
        process.wait(timeout=STOP_GRACE_SECONDS)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    except ProcessLookupError:
        process.wait()
        return
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _run_logged(command: list[str], log: TextIO, echo: bool, lock: RunLock | None = None) -> int:
    """Run ``command``, writing its output to ``log`` (and to stdout with ``echo``).

    The child runs in a process group of its own (its DDP workers too) and inherits ``lock``. If
    the sweep is interrupted, the signal it got (SIGINT for Ctrl-C, else the one in
    :class:`SweepInterrupted`) is passed on to that group, and the child is reaped before the interrupt propagates.

    Returns:
        The child's exit code.
    """
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    interrupts = _DeferredInterrupts()
    interrupts.hold()
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment,
            start_new_session=True, preexec_fn=_die_with_sweep(),
            pass_fds=lock.pass_fds if lock is not None else (),
        )  # fmt: skip
    except BaseException:
        interrupts.release()
        raise
    try:
        interrupts.release()  # an interrupt deferred meanwhile is raised here, where the child is known
        if lock is not None:
            lock.record_child(process)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        return process.wait()
    except BaseException as error:
        default = signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
        _stop_process_group(process, getattr(error, "signum", default))
        raise
    finally:
        log.flush()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _execute(
    settings: SweepSettings,
    run: SweepRun,
    echo: bool,
    lock: RunLock | None = None,
    resume: ResumePoint | None = None,
    earlier: dict[str, Any] | None = None,
) -> None:
    """Fit (and test) one run, keeping ``sweep.json`` up to date; ``lock`` is the run directory's.

    With ``resume`` the run continues an earlier attempt (whose record is ``earlier``): the fit
    from the resume point's checkpoint, or only the test when the fit had finished. The record's
    ``resumed`` list keeps each earlier attempt's contribution; ``wall_seconds`` and
    ``fit_seconds`` count the work the run kept (this attempt plus each earlier one up to its
    checkpoint), not the work lost, and ``fit_ended`` is when the fit ended (the moment that
    separates the fit's events from the test's).

    Raises:
        KeyboardInterrupt: the sweep was interrupted (the record says ``interrupted``).
    """
    record: dict[str, Any] = {
        "sweep": settings.sweep_name,
        "batch_size": run.batch_size,
        "seed": run.seed,
        **_settings_record(settings),
        "config_sha256": _config_digests(settings),
        "status": "running",
        "started": utc_now(),
        "machine": describe_machine(),
        "fit_command": run.fit_command,
        "log": LOG_FILE,
    }
    if settings.variant is not None:
        record["variant"] = settings.variant
    if resume is not None:
        record["resumed"] = [*(earlier or {}).get("resumed", []), resume.kept]
        if resume.stage == "fit":
            record["fit_command"] = [*run.fit_command, f"--ckpt_path={resume.checkpoint}"]
        else:
            record["fit_command"] = (earlier or {}).get("fit_command", run.fit_command)
    resumed = record.get("resumed", [])
    kept_seconds = sum(entry.get("kept_seconds") or 0.0 for entry in resumed)
    if resume is not None and resume.stage == "test":  # the fit is the earlier attempts'
        earlier = earlier or {}
        record["fit_seconds"] = earlier.get("fit_seconds", round(kept_seconds, 3))
        record["fit_ended"] = earlier.get("fit_ended", resume.kept.get("checkpoint_saved"))
        record["fit_returncode"] = 0
    write_record(run.run_dir, record)
    start = time.perf_counter()
    try:
        with (run.run_dir / LOG_FILE).open("a") as log:
            returncode = 0
            if resume is not None:
                log.write(f"hessian-sweep: {resume.describe()}\n")
            if resume is None or resume.stage == "fit":
                returncode = _run_logged(record["fit_command"], log, echo, lock)
                fit_kept = sum(entry.get("kept_seconds") or 0.0 for entry in resumed if entry.get("stage") == "fit")
                record["fit_seconds"] = round(time.perf_counter() - start + fit_kept, 3)
                record["fit_ended"] = _iso(time.time())
                record["fit_returncode"] = returncode
                write_record(run.run_dir, record)  # a sweep killed during the test knows the fit finished
            if returncode == 0 and settings.test:
                checkpoint, reason = recorded_checkpoint(run.run_dir)
                if checkpoint is None:
                    record["test"] = f"skipped: {reason}"
                else:
                    test_command = [
                        *settings.train_command,
                        "test",
                        *train_arguments(settings, run.batch_size, run.seed),
                        f"--ckpt_path={checkpoint}",
                    ]
                    record["test_command"] = test_command
                    record["test_checkpoint"] = str(checkpoint)
                    test_start = time.perf_counter()
                    returncode = _run_logged(test_command, log, echo, lock)
                    record["test_seconds"] = round(time.perf_counter() - test_start, 3)
                    record["test_returncode"] = returncode
    except KeyboardInterrupt:
        wall = round(time.perf_counter() - start + kept_seconds, 3)
        record.update(status="interrupted", wall_seconds=wall, ended=utc_now())
        write_record(run.run_dir, record)
        run.status, run.record = "interrupted", record
        raise
    except OSError as error:  # the command could not start (missing executable ...)
        returncode = -1
        record["error"] = f"{type(error).__name__}: {error}"
    run.wall_seconds = round(time.perf_counter() - start + kept_seconds, 3)
    run.status = "finished" if returncode == 0 else "failed"
    record.update(status=run.status, returncode=returncode, wall_seconds=run.wall_seconds, ended=utc_now())
    if run.status == "failed":
        run.message = record.get("error") or _tail(run.run_dir / LOG_FILE)
        record["error_tail"] = run.message
    write_record(run.run_dir, record)
    run.record = record


def _skip_finished(
    settings: SweepSettings, run: SweepRun, existing: dict[str, Any] | None, prefix: str, out: TextIO
) -> bool:
    """Mark ``run`` skipped and say so when its record says ``finished``.

    Returns:
        Whether it was finished.
    """
    if existing is None or existing.get("status") != "finished":
        return False
    run.status, run.record = "skipped", existing
    recorded = {key: existing.get(key) for key in _settings_record(settings)}
    if recorded != _settings_record(settings):
        run.message = f"finished with other settings {recorded}; not rerun (delete {run.run_dir} or use another --name)"
    print(f"{prefix}: finished before, skipped{'; ' + run.message if run.message else ''}", file=out)
    return True


def _claim(
    settings: SweepSettings, run: SweepRun, resume: bool, prefix: str, out: TextIO
) -> tuple[RunLock | None, ResumePoint | None, dict[str, Any] | None]:
    """Lock the run directory and decide under the lock how the run goes on: from the start in a
    fresh directory, from a resume point, or from the start after the earlier attempt is moved aside.

    The record is read again under the lock (another sweep may have finished the run since), and
    the lock of a run that resumes is kept from the decision to the end of the run.

    Returns:
        ``(lock, resume point or None, the record read under the lock)``; the lock is ``None``
        (and released) when the run turned out to be finished. :class:`RunLock` raises
        :class:`~lightning_hessian.sweep.lock.RunBusyError` when a live process holds the directory.
    """
    earlier_attempt = run.run_dir.exists()
    lock = RunLock(run.run_dir)
    try:
        existing = read_record(run.run_dir)
        if existing is not None and existing.get("status") == "finished":
            lock.release()
            return None, None, existing
        if not earlier_attempt:
            return lock, None, existing
        if resume:
            point, why_not = find_resume_point(settings, run.run_dir, existing)
            if point is not None:
                return lock, point, existing
        else:
            why_not = "resuming is off"
        moved = move_aside(run.run_dir)  # under the lock: nobody writes there while it moves
    except BaseException:
        lock.release()
        raise
    lock.release()
    status = existing.get("status") if existing else "no sweep.json"
    print(f"{prefix}: earlier attempt ({status}) moved to {moved}; not resumed: {why_not}", file=out)
    return RunLock(run.run_dir), None, existing


def run_sweep(
    settings: SweepSettings,
    *,
    dry_run: bool = False,
    echo: bool = False,
    resume: bool = True,
    out: TextIO | None = None,
) -> list[SweepRun]:
    """Run (or with ``dry_run`` only print) every combination.

    Progress goes to ``out`` (default: standard output); the runs' own output to their
    ``train.log`` (and with ``echo`` to standard output as well). A run stopped from outside
    continues from its last checkpoint (:func:`find_resume_point`), unless ``resume`` is false:
    then, like a failed run, it is moved to ``.attempts`` and run again from the start.

    Returns:
        The runs in execution order (:func:`~lightning_hessian.sweep.plan_sweep`), each with its
        status (``finished``, ``skipped``, ``failed`` or ``refused``; ``pending`` for the runs that
        ``dry_run`` only printed).
    """
    out = sys.stdout if out is None else out
    runs = plan_sweep(settings)
    total = len(runs)
    print(f"hessian-sweep: {total} runs into {settings.sweep_dir}", file=out)
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{total}] {run.version}"
        existing = read_record(run.run_dir)
        if _skip_finished(settings, run, existing, prefix, out):
            continue
        if dry_run:
            point = find_resume_point(settings, run.run_dir, existing)[0] if resume and existing else None
            if point is None:
                print(f"{prefix}: {shlex.join(run.fit_command)}", file=out)
            elif point.stage == "fit":
                command = [*run.fit_command, f"--ckpt_path={point.checkpoint}"]
                print(f"{prefix}: {point.describe()}: {shlex.join(command)}", file=out)
            else:
                print(f"{prefix}: {point.describe()}", file=out)
            continue
        try:
            lock, resume_point, existing = _claim(settings, run, resume, prefix, out)
        except RunBusyError as error:
            run.status, run.message = "refused", str(error)
            print(f"{prefix}: refused: {error}", file=out, flush=True)
            continue
        if lock is None:  # another sweep finished it meanwhile
            _skip_finished(settings, run, existing, prefix, out)
            continue
        with lock:
            if resume_point is not None:
                print(f"{prefix}: {resume_point.describe()}", file=out)
            print(f"{prefix}: running (log: {run.run_dir / LOG_FILE})", file=out, flush=True)
            _execute(settings, run, echo, lock, resume_point, existing)
        kept = sum(entry.get("kept_seconds") or 0.0 for entry in run.record.get("resumed", []))
        earlier = f" ({kept:.1f} s of it before the resume)" if resume_point is not None else ""
        print(f"{prefix}: {run.status} in {run.wall_seconds:.1f} s{earlier}", file=out, flush=True)
    failed = [run for run in runs if run.status in ("failed", "refused")]
    statuses = ("finished", "skipped", "failed", "refused")
    counts = {status: sum(run.status == status for run in runs) for status in statuses}
    if not dry_run:
        refused = f", {counts['refused']} refused (in use)" if counts["refused"] else ""
        print(
            f"hessian-sweep: {counts['finished']} finished, {counts['skipped']} skipped (finished before), "
            f"{counts['failed']} failed{refused}",
            file=out,
        )
    for run in failed:
        print(f"  {run.status.upper()} {run.run_dir} (log: {run.run_dir / LOG_FILE}):", file=out)
        for line in run.message.splitlines()[-5:]:
            print(f"    {line}", file=out)
    if not dry_run and counts["finished"] + counts["skipped"]:
        print(f"Report: hessian-report {shlex.quote(str(settings.sweep_dir))} --out report/", file=out)
    return runs


def stop_on_signal(signum: int, frame: Any) -> None:
    """A signal handler that stops the sweep like Ctrl-C (for SIGTERM: a job scheduler, ``kill``):
    the current run's process group gets the same signal and its ``sweep.json`` says ``interrupted``.

    Raises:
        SweepInterrupted: always, carrying ``signum`` (a ``KeyboardInterrupt``).
    """
    raise SweepInterrupted(signum)
