"""What a sweep runs: its settings, and the ``hessian-train`` command of each run.

A sweep is one ``hessian-train fit`` (and ``test``) per (batch size, seed)::

    python -m lightning_hessian.cli fit --config CONFIG --data.batch_size B --seed_everything S \\
        --trainer.logger.init_args.save_dir ROOT --trainer.logger.init_args.name NAME \\
        --trainer.logger.init_args.version bsB_seedS [--KEY=VALUE for each --set] [extra args]

so every run logs to ``ROOT/NAME/bsB_seedS`` (:func:`run_version`), where ``hessian-report
ROOT/NAME`` finds it. ``data.batch_size`` is the global batch (the learning-rate scaling and
warm-up of the config apply to it).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_hessian.errors import UserInputError

__all__ = ["DEFAULT_TRAIN_COMMAND", "SweepRun", "SweepSettings", "plan_sweep", "run_version", "train_arguments"]

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


def train_arguments(settings: SweepSettings, batch_size: int, seed: int) -> list[str]:
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

    Returns:
        One :class:`SweepRun` per (seed, batch size), with its run directory and ``fit`` command.
    """
    runs = []
    for seed in settings.seeds:
        for batch_size in settings.batch_sizes:
            command = [*settings.train_command, "fit", *train_arguments(settings, batch_size, seed)]
            runs.append(SweepRun(batch_size, seed, settings.sweep_dir / run_version(batch_size, seed), command))
    return runs
