"""``hessian-sweep``: one ``hessian-train fit`` (and ``test``) per batch size and seed.

Usage::

    hessian-sweep --config configs/fashion_mnist_bs128.yaml --batch-sizes 64 256 1024 --seeds 0 1 2
    hessian-sweep --config configs/fashion_mnist_bs128.yaml --batch-sizes 64 1024 --seeds 0 \\
        --set model.adversarial.method=fgsm --set model.adversarial.epsilon=0.1
    hessian-sweep ... -- --trainer.max_epochs 5      # everything after ``--`` goes to hessian-train

Each combination runs as its own process, one after the other::

    python -m lightning_hessian.cli fit --config CONFIG --data.batch_size B --seed_everything S \\
        --trainer.logger.init_args.save_dir ROOT --trainer.logger.init_args.name NAME \\
        --trainer.logger.init_args.version bsB_seedS [--KEY=VALUE for each --set] [extra args]

so every run logs to ``ROOT/NAME/bsB_seedS`` (default ``runs/sweeps/NAME/bs1024_seed0``), where
``hessian-report ROOT/NAME`` finds it. ``data.batch_size`` is the global batch (the learning
rate scaling and warm-up of the config apply to it); each run may itself use several devices or
gradient accumulation through the config's ``trainer`` settings. After a successful ``fit`` the
sweep runs ``hessian-train test`` into the same directory on the checkpoint that the fit recorded
in ``checkpoint.json`` (:mod:`lightning_hessian.checkpoint_io`; not merely the newest ``.ckpt``
file, which may be a partial one), so the run has a ``test/acc`` and the callbacks' analyses on
the test split (``--no-test`` skips it).

Each run directory gets a ``sweep.json`` (config, batch size, seed, overrides, commands, status,
wall times) and a ``train.log`` with the output. A run whose ``sweep.json`` says ``finished`` is
skipped, so an interrupted sweep continues where it stopped; a run that failed or was interrupted
is moved to ``ROOT/NAME/.attempts/`` and run again. A failed run does not stop the sweep: the
failures are listed at the end and the exit status is 1.

**One writer per run directory.** While a run is in progress its directory holds ``sweep.lock``
(:class:`RunLock`): an exclusive ``flock`` that the training process inherits, and the PIDs of the
sweep and of that process. A sweep that finds the lock held, or a PID in it alive, refuses that run
with a message naming the process (exit status 1); a lock whose processes are gone is taken over.
The training process runs in its own process group; SIGINT and SIGTERM sent to the sweep are
passed on to it (then SIGKILL after :data:`STOP_GRACE_SECONDS`), and on Linux it gets SIGTERM when
the sweep dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so a killed sweep leaves no training behind.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from lightning_hessian.checkpoint_io import recorded_checkpoint
from lightning_hessian.errors import UserInputError, run_console_script

try:
    import fcntl
except ImportError:  # Windows: the PIDs in the lock file are the only guard
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunBusyError", "RunLock", "SweepRun", "SweepSettings", "main", "plan_sweep", "run_sweep"]

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
LOCK_FILE = "sweep.lock"
ATTEMPTS_DIR = ".attempts"
#: seconds a training process gets to stop after the forwarded SIGINT/SIGTERM before SIGKILL
STOP_GRACE_SECONDS = 30.0
#: The command that trains: ``hessian-train`` of the running interpreter.
DEFAULT_TRAIN_COMMAND = (sys.executable, "-m", "lightning_hessian.cli")
# hessian-train options the sweep sets itself for every run
_SWEEP_OWNED_FLAGS = ("--data.batch_size", "--data.init_args.batch_size", "--seed_everything", "--trainer.logger")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs.

    Attributes:
        configs: ``hessian-train`` config files, applied in order.
        batch_sizes: global batch sizes (``data.batch_size``).
        seeds: values of ``seed_everything``.
        overrides: ``KEY=VALUE`` settings passed as ``--KEY=VALUE`` to every run.
        extra_args: further ``hessian-train`` arguments, passed unchanged after the overrides.
        name: sweep name, the directory under ``root`` (default: derived from config and overrides).
        root: directory of all sweeps.
        variant: label for ``hessian-report`` grouping (default: read from the run's config).
        test: run ``hessian-train test`` on the last checkpoint after a successful fit.
        train_command: the command line that starts ``hessian-train``.
    """

    configs: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    name: str | None = None
    root: str = "runs/sweeps"
    variant: str | None = None
    test: bool = True
    train_command: tuple[str, ...] = DEFAULT_TRAIN_COMMAND

    def __post_init__(self) -> None:
        if not self.configs:
            raise UserInputError("hessian-sweep: give at least one --config.")
        for config in self.configs:
            if not Path(config).is_file():
                raise UserInputError(f"hessian-sweep: config file {config!r} does not exist.")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserInputError(
                f"hessian-sweep: --batch-sizes must be positive integers, got {list(self.batch_sizes)}."
            )
        if not self.seeds:
            raise UserInputError("hessian-sweep: give at least one seed (--seeds 0 1 2).")
        for name, values in (("--batch-sizes", self.batch_sizes), ("--seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise UserInputError(f"hessian-sweep: {name} has duplicates: {list(values)}.")
        for override in self.overrides:
            key, sep, _ = override.partition("=")
            if not sep or not key or key.startswith("-"):
                raise UserInputError(
                    f"hessian-sweep: --set {override!r} must look like KEY=VALUE, e.g. model.adversarial.method=fgsm."
                )
            if f"--{key}".startswith(_SWEEP_OWNED_FLAGS):
                raise UserInputError(
                    f"hessian-sweep: --set {key}=... is set by the sweep itself (batch size, seed, logger); "
                    "use --batch-sizes/--seeds/--root/--name."
                )
        for argument in self.extra_args:
            if argument.startswith(_SWEEP_OWNED_FLAGS):
                raise UserInputError(
                    f"hessian-sweep: {argument!r} after `--` would override what the sweep sets for each run "
                    "(batch size, seed, logger); use --batch-sizes/--seeds/--root/--name."
                )
        if not self.train_command:
            raise UserInputError("hessian-sweep: the train command is empty.")
        _check_logger(self.configs)

    @property
    def sweep_name(self) -> str:
        """``name``, or the first config's stem plus the overrides (``fashion_mnist_bs128-method=fgsm``)."""
        if self.name:
            return self.name
        parts = [Path(self.configs[0]).stem]
        for override in self.overrides:
            key, _, value = override.partition("=")
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
        return _NAME_UNSAFE.sub("_", "-".join(parts))

    @property
    def sweep_dir(self) -> Path:
        return Path(self.root) / self.sweep_name


@dataclass
class SweepRun:
    """One (batch size, seed) of a sweep and what happened to it."""

    batch_size: int
    seed: int
    run_dir: Path
    fit_command: list[str]
    status: str = "pending"  # pending, skipped, finished, failed, interrupted, refused
    wall_seconds: float | None = None
    message: str = ""
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.run_dir.name


def _check_logger(configs: Sequence[str]) -> None:
    """Refuse configs whose logger the sweep cannot point at its run directory (before any run)."""
    logger: Any = None
    for config in configs:
        try:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
        except yaml.YAMLError as error:
            raise UserInputError(f"hessian-sweep: cannot read config {config!r}: {error}") from error
        trainer = loaded.get("trainer") if isinstance(loaded, dict) else None
        if isinstance(trainer, dict) and "logger" in trainer:
            logger = trainer["logger"]
    if logger is None:
        return  # hessian-train's default: TensorBoardLogger
    if isinstance(logger, dict) and "class_path" not in logger:
        return  # init_args of hessian-train's default TensorBoardLogger
    class_path = logger.get("class_path", "") if isinstance(logger, dict) else ""
    if not str(class_path).endswith("TensorBoardLogger"):
        raise UserInputError(
            f"hessian-sweep: the config's trainer.logger is {logger!r}; the sweep names runs through a single "
            "TensorBoardLogger (save_dir/name/version). Use pytorch_lightning.loggers.TensorBoardLogger or remove "
            "trainer.logger from the config."
        )


def _cli_arguments(settings: SweepSettings, batch_size: int, seed: int) -> list[str]:
    """Arguments after the subcommand, shared by ``fit`` and ``test``."""
    arguments = []
    for config in settings.configs:
        arguments += ["--config", config]
    arguments += [
        f"--data.batch_size={batch_size}",
        f"--seed_everything={seed}",
        f"--trainer.logger.init_args.save_dir={settings.root}",
        f"--trainer.logger.init_args.name={settings.sweep_name}",
        f"--trainer.logger.init_args.version={run_version(batch_size, seed)}",
    ]
    arguments += [f"--{override}" for override in settings.overrides]
    arguments += list(settings.extra_args)
    return arguments


def run_version(batch_size: int, seed: int) -> str:
    """The run directory name of a combination: ``bs1024_seed0``."""
    return f"bs{batch_size}_seed{seed}"


def plan_sweep(settings: SweepSettings) -> list[SweepRun]:
    """The runs of a sweep in execution order: all batch sizes of the first seed first.

    Seed-major order gives a complete batch-size curve after the first pass over the batch sizes.
    """
    runs = []
    for seed in settings.seeds:
        for batch_size in settings.batch_sizes:
            command = [*settings.train_command, "fit", *_cli_arguments(settings, batch_size, seed)]
            runs.append(SweepRun(batch_size, seed, settings.sweep_dir / run_version(batch_size, seed), command))
    return runs


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SWEEP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / (SWEEP_FILE + ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(run_dir / SWEEP_FILE)  # atomic: a killed sweep never leaves half a file


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _settings_record(settings: SweepSettings) -> dict[str, Any]:
    return {
        "configs": list(settings.configs),
        "overrides": list(settings.overrides),
        "extra_args": list(settings.extra_args),
        "test": settings.test,
    }


class RunBusyError(UserInputError):
    """A run directory is in use by another live process (a sweep, or training a killed sweep left)."""


def _process_state(pid: int) -> tuple[str, str] | None:
    """``(state letter, start time in clock ticks)`` of ``pid`` from ``/proc`` (Linux), else ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _process_alive(pid: Any, started: Any = None) -> bool:
    """Whether process ``pid`` exists and is not a zombie; with ``started`` (its ``/proc`` start
    time when the lock was written) a reused PID does not count."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    state = _process_state(pid)
    if state is None:
        return True
    return state[0] not in ("Z", "X") and (started is None or state[1] == started)


class RunLock:
    """The exclusive claim of one run directory by one sweep: ``<run_dir>/sweep.lock``.

    Held as an exclusive ``flock`` (POSIX) on the file, whose descriptor the training process
    inherits, so the claim lasts as long as the sweep or its training process lives, whichever
    ends last. The file holds JSON: host, ``sweep_pid``, ``child_pid`` (with their start times, so
    that a reused PID is not mistaken for them) and the time of the claim; a lock that is not held
    but names a live process of this host counts as held (file systems without ``flock``).

    Raises:
        RunBusyError: the directory is in use by a live process (the message names it).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.child: subprocess.Popen[str] | None = None
        self._info: dict[str, Any] = {}
        self.fd: int | None = self._acquire()

    def _acquire(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise RunBusyError(self._busy_message(_read_lock(fd), held=True)) from None
                    except OSError as error:  # no flock on this file system: the PIDs decide
                        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                            raise
                try:
                    same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same_file = False
                if not same_file:  # its holder removed it meanwhile: claim the new file
                    os.close(fd)
                    continue
                info = _read_lock(fd)
                if info.get("host") == socket.gethostname() and any(
                    info.get(f"{role}_pid") != os.getpid()
                    and _process_alive(info.get(f"{role}_pid"), info.get(f"{role}_started"))
                    for role in ("sweep", "child")
                ):
                    raise RunBusyError(self._busy_message(info, held=False))
                self._info = {
                    "host": socket.gethostname(),
                    "sweep_pid": os.getpid(),
                    "sweep_started": (_process_state(os.getpid()) or (None, None))[1],
                    "child_pid": None,
                    "child_started": None,
                    "since": _now(),
                }
                _write_lock(fd, self._info)
                return fd
            except BaseException:
                os.close(fd)
                raise

    def _busy_message(self, info: dict[str, Any], held: bool) -> str:
        roles = (("child_pid", "training"), ("sweep_pid", "sweep"))
        holders = [f"{role} pid {info[key]}" for key, role in roles if info.get(key)]
        who = ", ".join(holders) or "another process"
        where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
        since = f" since {info['since']}" if info.get("since") else ""
        hint = "" if held else f"; if that process does not write there, delete {self.path}"
        return (
            f"{self.path.parent} is in use by {who}{where}{since} (lock {self.path}){hint}. A run directory takes one "
            "writer: wait for that run to end, or stop it, then run the sweep again."
        )

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptor the training process inherits, so that it keeps the lock if the sweep dies."""
        return (self.fd,) if self.fd is not None and fcntl is not None else ()

    def record_child(self, process: subprocess.Popen[str]) -> None:
        """Name the training process in the lock file."""
        self.child = process
        if self.fd is not None:
            self._info.update(child_pid=process.pid, child_started=(_process_state(process.pid) or (None, None))[1])
            _write_lock(self.fd, self._info)

    def release(self) -> None:
        """Give the directory up: the file is removed (unless a training process still holds it)."""
        if self.fd is None:
            return
        try:
            if self.child is None or self.child.poll() is not None:
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    self.path.unlink()
        except OSError:
            pass  # moved or removed already
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_lock(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_lock(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _die_with_sweep() -> Any:
    """A ``preexec_fn`` that makes the child get SIGTERM when the sweep dies (Linux
    ``PR_SET_PDEATHSIG``, which survives exec), or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    sweep_pid = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Stop(KeyboardInterrupt):
    """SIGTERM (or another signal) received by the sweep: stop like Ctrl-C, passing ``signum`` on."""

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
    """Run ``command``, writing its output to ``log`` (and to stdout with ``echo``); its exit code.

    The child runs in a process group of its own (its DDP workers too) and inherits ``lock``. If
    the sweep is interrupted, the signal it got (SIGINT for Ctrl-C, else the one in :class:`_Stop`)
    is passed on to that group, and the child is reaped before the interrupt propagates.
    """
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, start_new_session=True,
        preexec_fn=_die_with_sweep(), pass_fds=lock.pass_fds if lock is not None else (),
    )  # fmt: skip
    try:
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


def _move_aside(run_dir: Path) -> Path:
    """Move an unfinished run out of the report's way (hidden ``.attempts`` folder)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.parent / ATTEMPTS_DIR / f"{run_dir.name}-{stamp}"
    counter = 1
    while target.exists():
        target = target.with_name(f"{run_dir.name}-{stamp}-{counter}")
        counter += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(target))
    return target


def _execute(settings: SweepSettings, run: SweepRun, echo: bool, lock: RunLock | None = None) -> None:
    """Fit (and test) one run, keeping ``sweep.json`` up to date; ``lock`` is the run directory's."""
    record: dict[str, Any] = {
        "sweep": settings.sweep_name,
        "batch_size": run.batch_size,
        "seed": run.seed,
        **_settings_record(settings),
        "status": "running",
        "started": _now(),
        "host": socket.gethostname(),
        "fit_command": run.fit_command,
        "log": LOG_FILE,
    }
    if settings.variant is not None:
        record["variant"] = settings.variant
    _write_record(run.run_dir, record)
    start = time.perf_counter()
    try:
        with (run.run_dir / LOG_FILE).open("a") as log:
            returncode = _run_logged(run.fit_command, log, echo, lock)
            record["fit_seconds"] = round(time.perf_counter() - start, 3)
            record["fit_returncode"] = returncode
            if returncode == 0 and settings.test:
                checkpoint, reason = recorded_checkpoint(run.run_dir)
                if checkpoint is None:
                    record["test"] = f"skipped: {reason}"
                else:
                    test_command = [
                        *settings.train_command,
                        "test",
                        *_cli_arguments(settings, run.batch_size, run.seed),
                        f"--ckpt_path={checkpoint}",
                    ]
                    record["test_command"] = test_command
                    record["test_checkpoint"] = str(checkpoint)
                    test_start = time.perf_counter()
                    returncode = _run_logged(test_command, log, echo, lock)
                    record["test_seconds"] = round(time.perf_counter() - test_start, 3)
                    record["test_returncode"] = returncode
    except KeyboardInterrupt:
        record.update(status="interrupted", wall_seconds=round(time.perf_counter() - start, 3), ended=_now())
        _write_record(run.run_dir, record)
        run.status, run.record = "interrupted", record
        raise
    except OSError as error:  # the command could not start (missing executable ...)
        returncode = -1
        record["error"] = f"{type(error).__name__}: {error}"
    run.wall_seconds = round(time.perf_counter() - start, 3)
    run.status = "finished" if returncode == 0 else "failed"
    record.update(status=run.status, returncode=returncode, wall_seconds=run.wall_seconds, ended=_now())
    if run.status == "failed":
        run.message = record.get("error") or _tail(run.run_dir / LOG_FILE)
        record["error_tail"] = run.message
    _write_record(run.run_dir, record)
    run.record = record


def run_sweep(
    settings: SweepSettings, *, dry_run: bool = False, echo: bool = False, out: TextIO | None = None
) -> list[SweepRun]:
    """Run (or with ``dry_run`` only print) every combination; returns the runs with their status.

    Progress goes to ``out`` (default: standard output); the runs' own output to their
    ``train.log`` (and with ``echo`` to standard output as well).
    """
    out = sys.stdout if out is None else out
    runs = plan_sweep(settings)
    total = len(runs)
    print(f"hessian-sweep: {total} runs into {settings.sweep_dir}", file=out)
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{total}] {run.version}"
        existing = _read_record(run.run_dir)
        if existing is not None and existing.get("status") == "finished":
            run.status, run.record = "skipped", existing
            recorded = {key: existing.get(key) for key in _settings_record(settings)}
            if recorded != _settings_record(settings):
                run.message = (
                    f"finished with other settings {recorded}; not rerun (delete {run.run_dir} or use another --name)"
                )
            print(f"{prefix}: finished before, skipped{'; ' + run.message if run.message else ''}", file=out)
            continue
        if dry_run:
            print(f"{prefix}: {shlex.join(run.fit_command)}", file=out)
            continue
        try:
            if run.run_dir.exists():
                with RunLock(run.run_dir):  # nobody may be writing there while it moves
                    moved = _move_aside(run.run_dir)
                status = existing.get("status") if existing else "no sweep.json"
                print(f"{prefix}: earlier attempt ({status}) moved to {moved}", file=out)
            lock = RunLock(run.run_dir)
        except RunBusyError as error:
            run.status, run.message = "refused", str(error)
            print(f"{prefix}: refused: {error}", file=out, flush=True)
            continue
        with lock:
            print(f"{prefix}: running (log: {run.run_dir / LOG_FILE})", file=out, flush=True)
            _execute(settings, run, echo, lock)
        print(f"{prefix}: {run.status} in {run.wall_seconds:.1f} s", file=out, flush=True)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-sweep",
        description="Run hessian-train fit (and test) once per batch size and seed, one run after the other.",
        epilog="Arguments after `--` are passed to every hessian-train call, e.g. `-- --trainer.max_epochs 5`.",
    )
    parser.add_argument("--config", action="append", required=True, help="hessian-train config (repeatable, in order)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", required=True, metavar="B", help="global batch sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="seeds (default: 0)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="hessian-train setting for every run, e.g. model.adversarial.method=fgsm (repeatable)",
    )  # fmt: skip
    parser.add_argument("--name", help="sweep name (default: config name plus the --set values)")
    parser.add_argument("--root", default="runs/sweeps", help="directory of sweeps (default: runs/sweeps)")
    parser.add_argument("--variant", help="training-variant label for hessian-report (default: from the config)")
    parser.add_argument("--no-test", action="store_true", help="do not run hessian-train test after fit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--echo", action="store_true", help="also print the runs' output (always in train.log)")
    parser.add_argument(
        "--train-command", default=shlex.join(DEFAULT_TRAIN_COMMAND),
        help="command that starts hessian-train (default: %(default)s)",
    )  # fmt: skip
    return parser


def settings_from_args(argv: Sequence[str]) -> tuple[SweepSettings, argparse.Namespace]:
    """Parse a ``hessian-sweep`` command line (``--`` separates hessian-train's own arguments)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    arguments = _parser().parse_args(argv)
    settings = SweepSettings(
        configs=tuple(arguments.config),
        batch_sizes=tuple(arguments.batch_sizes),
        seeds=tuple(arguments.seeds),
        overrides=tuple(arguments.overrides),
        extra_args=tuple(extra),
        name=arguments.name,
        root=arguments.root,
        variant=arguments.variant,
        test=not arguments.no_test,
        train_command=tuple(shlex.split(arguments.train_command)),
    )
    return settings, arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessian-sweep`` console script; exit status 1 if any run failed or was
    refused (its directory in use), 2 for bad arguments (one line ``hessian-sweep: error: ...``)."""
    return run_console_script("hessian-sweep", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    settings, arguments = settings_from_args(argv)
    # SIGTERM (a job scheduler, `kill`) ends the sweep like Ctrl-C: the current run's process group
    # gets the same signal and its sweep.json says "interrupted".
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        runs = run_sweep(settings, dry_run=arguments.dry_run, echo=arguments.echo)
    except KeyboardInterrupt:
        print("hessian-sweep: interrupted; run it again to continue (finished runs are skipped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if any(run.status in ("failed", "refused") for run in runs) else 0


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


if __name__ == "__main__":
    sys.exit(main())
