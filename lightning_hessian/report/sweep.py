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
sweep runs ``hessian-train test`` on the last checkpoint into the same directory, so the run has a
``test/acc`` and the callbacks' analyses on the test split (``--no-test`` skips it).

Each run directory gets a ``sweep.json`` (config, batch size, seed, overrides, commands, status,
wall times) and a ``train.log`` with the output. A run whose ``sweep.json`` says ``finished`` is
skipped, so an interrupted sweep continues where it stopped; a run that failed or was interrupted
is moved to ``ROOT/NAME/.attempts/`` and run again. A failed run does not stop the sweep: the
failures are listed at the end and the exit status is 1.
"""

from __future__ import annotations

import argparse
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

__all__ = ["SweepRun", "SweepSettings", "main", "plan_sweep", "run_sweep"]

SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
ATTEMPTS_DIR = ".attempts"
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
            raise ValueError("hessian-sweep: give at least one --config.")
        for config in self.configs:
            if not Path(config).is_file():
                raise ValueError(f"hessian-sweep: config file {config!r} does not exist.")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"hessian-sweep: --batch-sizes must be positive integers, got {list(self.batch_sizes)}.")
        if not self.seeds:
            raise ValueError("hessian-sweep: give at least one seed (--seeds 0 1 2).")
        for name, values in (("--batch-sizes", self.batch_sizes), ("--seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"hessian-sweep: {name} has duplicates: {list(values)}.")
        for override in self.overrides:
            key, sep, _ = override.partition("=")
            if not sep or not key or key.startswith("-"):
                raise ValueError(
                    f"hessian-sweep: --set {override!r} must look like KEY=VALUE, e.g. model.adversarial.method=fgsm."
                )
            if f"--{key}".startswith(_SWEEP_OWNED_FLAGS):
                raise ValueError(
                    f"hessian-sweep: --set {key}=... is set by the sweep itself (batch size, seed, logger); "
                    "use --batch-sizes/--seeds/--root/--name."
                )
        for argument in self.extra_args:
            if argument.startswith(_SWEEP_OWNED_FLAGS):
                raise ValueError(
                    f"hessian-sweep: {argument!r} after `--` would override what the sweep sets for each run "
                    "(batch size, seed, logger); use --batch-sizes/--seeds/--root/--name."
                )
        if not self.train_command:
            raise ValueError("hessian-sweep: the train command is empty.")
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
    status: str = "pending"  # pending, skipped, finished, failed, interrupted
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
            raise ValueError(f"hessian-sweep: cannot read config {config!r}: {error}") from error
        trainer = loaded.get("trainer") if isinstance(loaded, dict) else None
        if isinstance(trainer, dict) and "logger" in trainer:
            logger = trainer["logger"]
    if logger is None:
        return  # hessian-train's default: TensorBoardLogger
    if isinstance(logger, dict) and "class_path" not in logger:
        return  # init_args of hessian-train's default TensorBoardLogger
    class_path = logger.get("class_path", "") if isinstance(logger, dict) else ""
    if not str(class_path).endswith("TensorBoardLogger"):
        raise ValueError(
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


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
    last = [p for p in checkpoints if p.name.startswith("last")]
    return (last or checkpoints or [None])[-1]


def _run_logged(command: list[str], log: TextIO, echo: bool) -> int:
    """Run ``command``, writing its output to ``log`` (and to stdout with ``echo``); its exit code."""
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A new process group: Ctrl-C reaches the child through us, and we can end its DDP workers too.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, start_new_session=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        return process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
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


def _execute(settings: SweepSettings, run: SweepRun, echo: bool) -> None:
    """Fit (and test) one run, keeping ``sweep.json`` up to date."""
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
            returncode = _run_logged(run.fit_command, log, echo)
            record["fit_seconds"] = round(time.perf_counter() - start, 3)
            record["fit_returncode"] = returncode
            if returncode == 0 and settings.test:
                checkpoint = _latest_checkpoint(run.run_dir)
                if checkpoint is None:
                    record["test"] = "skipped: fit wrote no checkpoint (trainer.enable_checkpointing is off?)"
                else:
                    test_command = [
                        *settings.train_command,
                        "test",
                        *_cli_arguments(settings, run.batch_size, run.seed),
                        f"--ckpt_path={checkpoint}",
                    ]
                    record["test_command"] = test_command
                    test_start = time.perf_counter()
                    returncode = _run_logged(test_command, log, echo)
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
        if run.run_dir.exists():
            moved = _move_aside(run.run_dir)
            status = existing.get("status") if existing else "no sweep.json"
            print(f"{prefix}: earlier attempt ({status}) moved to {moved}", file=out)
        print(f"{prefix}: running (log: {run.run_dir / LOG_FILE})", file=out, flush=True)
        _execute(settings, run, echo)
        print(f"{prefix}: {run.status} in {run.wall_seconds:.1f} s", file=out, flush=True)
    failed = [run for run in runs if run.status == "failed"]
    counts = {status: sum(run.status == status for run in runs) for status in ("finished", "skipped", "failed")}
    if not dry_run:
        print(
            f"hessian-sweep: {counts['finished']} finished, {counts['skipped']} skipped (finished before), "
            f"{counts['failed']} failed",
            file=out,
        )
    for run in failed:
        print(f"  FAILED {run.run_dir} (log: {run.run_dir / LOG_FILE}):", file=out)
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
    """Entry point of the ``hessian-sweep`` console script; exit status 1 if any run failed."""
    try:
        settings, arguments = settings_from_args(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        print(str(error), file=sys.stderr)
        return 2
    # SIGTERM (a job scheduler, `kill`) ends the sweep like Ctrl-C: the current run's process group
    # is stopped and its sweep.json says "interrupted".
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        runs = run_sweep(settings, dry_run=arguments.dry_run, echo=arguments.echo)
    except KeyboardInterrupt:
        print("hessian-sweep: interrupted; run it again to continue (finished runs are skipped)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if any(run.status == "failed" for run in runs) else 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
