"""``hessian-train``: the LightningCLI of the package (also ``python -m lightning_hessian.cli``).

Usage::

    hessian-train fit --config configs/quickstart.yaml
    hessian-train fit --config configs/cifar_bs2048.yaml --trainer.devices=4
    hessian-train test --config configs/cifar_bs128.yaml --ckpt_path runs/cifar_bs128/version_0/checkpoints/last.ckpt
    hessian-train fit --config configs/cifar_bs128.yaml --print_config
    hessian-train fit --config configs/quickstart.yaml --ckpt_path last   # resume the newest run

The model is always :class:`~lightning_hessian.models.ImageClassifier` (``model:`` section, no
``class_path``); the data module is any :class:`~lightning_hessian.data.ImageDataModule`
subclass (``data: class_path: lightning_hessian.data.CIFAR10``). The CLI links:

* ``data.batch_size`` (the global batch) -> ``model.batch_size`` (learning-rate scaling);
* ``data.num_classes``, ``data.input_shape``, ``data.mean``, ``data.std`` -> the model (its
  input normalisation), when the classes are instantiated.

Default logger: TensorBoard under ``runs/<name>/version_<n>`` (``tensorboard --logdir runs``).

Resuming (:mod:`lightning_hessian.resume`): ``fit`` saves ``last.ckpt`` with every checkpoint
(unless a configured ``ModelCheckpoint`` sets ``save_last``), checkpoints hold the random number
generator states (:class:`~lightning_hessian.resume.RNGStateCallback`, appended to the config's
callbacks), ``--ckpt_path last`` is the newest ``version_<n>`` with a last checkpoint (an error if
there is none) and ``fit`` continues that run's directory, its event files purged from the
checkpoint's step on. The last checkpoint before the one that ends training is kept as
``checkpoints/before_end.ckpt`` (:class:`~lightning_hessian.resume.KeepCheckpointBeforeEnd`), to
redo the end of a run killed in its end-of-training analyses.
Invalid names (architecture, activation, optimiser, schedule, dataset) are reported with the
valid choices before anything is trained.

Errors in the user's input (bad values, a missing or damaged dataset, a batch that does not divide,
options a callback refuses) end the command with one line ``hessian-train: error: ...`` and exit
status 2 (:mod:`lightning_hessian.errors`); bugs keep their traceback. Checkpoints are written
atomically (:mod:`lightning_hessian.checkpoint_io`), and after ``fit`` the run's log directory gets
``checkpoint.json`` naming the checkpoint written (``hessian-sweep`` tests that one). ``predict``
is not offered: the model has no predict step of its own.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_hessian.checkpoint_io import use_atomic_checkpoint_io, write_checkpoint_record
from lightning_hessian.data import DATASETS, ImageDataModule
from lightning_hessian.errors import InputNotFoundError, is_user_error, run_console_script
from lightning_hessian.models import ImageClassifier
from lightning_hessian.resume import (
    CheckpointLogSync,
    KeepCheckpointBeforeEnd,
    RNGStateCallback,
    find_resume_checkpoint,
    last_checkpoint_in,
    read_resume_info,
)

__all__ = ["HessianArgumentParser", "HessianCLI", "build_from_config", "main"]

#: data module attributes copied into the model's constructor once the data module exists
_INSTANTIATION_LINKS = ("num_classes", "input_shape", "mean", "std")
#: what `hessian-train --help` says the tool is
DESCRIPTION = (
    "Train the image classifiers of lightning-hessian (Hessian analysis of large-batch and adversarially "
    "robust training) at a global batch size, with the Hessian spectrum, robustness and loss-landscape "
    "callbacks logging to TensorBoard; one YAML config (--config) plus command-line overrides."
)


class _DataAttribute:
    """``data -> data.<name>`` for instantiation links, tuples as lists (hparams.yaml stays plain
    YAML). A class, not a closure: ``ddp_spawn`` pickles the parser with the trainer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, data: ImageDataModule) -> Any:
        value = getattr(data, self.name)
        return list(value) if isinstance(value, tuple) else value

    def __repr__(self) -> str:  # `fit --help` lists links as `repr(compute_fn)(data)`
        return f"{type(self).__name__}({self.name!r})"


class HessianArgumentParser(LightningArgumentParser):
    """Adds the list of valid data modules to errors about the ``data`` section."""

    @override
    def error(self, message: str, *args: Any, **kwargs: Any) -> Any:
        if 'key "data"' in message:
            message += (
                f"\nValid data modules: {', '.join(DATASETS)} "
                "(data.class_path: lightning_hessian.data.<name>, or --data=<name>)"
            )
        if not self.exit_on_error:  # nested parsers: the error goes up to the top-level parser
            return super().error(message, *args, **kwargs)
        # the same `PROG: error: ...` line (and exit status 2) as every other user error
        prog = (self.prog or "hessian-train").split()[0]
        sys.stderr.write(f"{prog}: error: {message}\n")
        raise SystemExit(2)


class HessianCLI(LightningCLI):
    """LightningCLI with the package's model, data modules, links and TensorBoard default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", HessianArgumentParser)
        parser_kwargs = kwargs.get("parser_kwargs") or {}
        kwargs["parser_kwargs"] = {"prog": "hessian-train", "description": DESCRIPTION, **parser_kwargs}
        trainer_defaults = {
            # a plain class_path dict, not lazy_instance: ddp_spawn must pickle the parser
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "hessian", "default_hp_metric": False},
            },
            # appended to the config's callbacks: exact resumption (lightning_hessian.resume)
            "callbacks": [RNGStateCallback(), CheckpointLogSync(), KeepCheckpointBeforeEnd()],
            **kwargs.pop("trainer_defaults", {}),
        }
        kwargs["trainer_defaults"] = trainer_defaults
        # config.yaml lands in the run's version directory; rerunning into it is fine.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate``, ``test``: ``predict`` is dropped (ImageClassifier has no predict step)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.init_args.batch_size", "model.batch_size")
        for name in _INSTANTIATION_LINKS:
            parser.link_arguments("data", f"model.{name}", compute_fn=_DataAttribute(name), apply_on="instantiate")

    @override
    def instantiate_classes(self) -> None:
        # Bad names and values surface as ValueError from the constructors: report them like a
        # parse error (usage + message, exit code 2) instead of a traceback; bugs keep theirs.
        try:
            super().instantiate_classes()
        except ValueError as err:
            if not is_user_error(err):
                raise
            self.parser.error(str(err))

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)  # keeps a CheckpointIO the user configured
        return trainer

    def after_fit(self) -> None:
        """Record the checkpoint ``fit`` wrote (``checkpoint.json`` in the log directory)."""
        write_checkpoint_record(self.trainer)

    # -- resuming (README "Resuming", lightning_hessian.resume) --------------------------------
    @override
    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last``: the newest run's last checkpoint, or an error if there is none;
        ``fit`` then logs into that run's version directory.

        Raises:
            InputNotFoundError: ``--ckpt_path last`` and there is no last checkpoint where the
                config's ``ModelCheckpoint`` or logger would have put it.
        """
        self._resume_checkpoint: Path | None = None
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") != "last":
            return
        trainer_config = config.get("trainer")
        checkpoint, version, searched = _find_last_checkpoint(trainer_config)
        if checkpoint is None:
            raise InputNotFoundError(
                f"--ckpt_path last: there is no last checkpoint in {searched} to resume from (hessian-train"
                " writes last.ckpt with every checkpoint, by default at the end of each epoch). Start the run"
                " without --ckpt_path, or give a checkpoint file: --ckpt_path PATH"
            )
        self._resume_checkpoint = checkpoint
        logger = _first_logger(trainer_config)
        if self.subcommand == "fit" and version is not None and logger is not None:
            init_args = logger.get("init_args")
            if init_args is not None and init_args.get("version") is None:
                init_args["version"] = version  # continue the run's curves in its own directory

    def _use_resolved_checkpoint(self) -> str | None:
        config = self.config_init[self.subcommand]
        if getattr(self, "_resume_checkpoint", None) is not None:
            config["ckpt_path"] = str(self._resume_checkpoint)
        return config.get("ckpt_path")

    def before_fit(self) -> None:
        """Save a last checkpoint unless the config says otherwise (``save_last``); the event files
        of a resumed run are continued by :class:`~lightning_hessian.resume.CheckpointLogSync`."""
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None:
                callback.save_last = True
        if self._use_resolved_checkpoint() is not None and getattr(self, "_resume_checkpoint", None) is not None:
            # resuming into the run's own directory: its checkpoints are there, of course
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def before_validate(self) -> None:
        self._use_resolved_checkpoint()

    def before_test(self) -> None:
        self._use_resolved_checkpoint()


def _first_logger(trainer_config: Any) -> Any | None:
    """The first logger's ``{class_path, init_args}`` in a parsed trainer config.

    Returns:
        The logger's config, or ``None`` when no logger is given as a class (e.g. ``logger: false``).
    """
    logger = trainer_config.get("logger") if trainer_config is not None else None
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is None or isinstance(logger, bool) or not hasattr(logger, "get") or logger.get("class_path") is None:
        return None
    return logger


def _class_of(class_path: str) -> type | None:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _find_last_checkpoint(trainer_config: Any) -> tuple[Path | None, int | str | None, str]:
    """The last checkpoint for ``--ckpt_path last``, found where the config's ``ModelCheckpoint``
    and logger put checkpoints (``save_dir/name/version_<n>/checkpoints``, a ``ModelCheckpoint``'s
    ``dirpath``, or ``default_root_dir/checkpoints``).

    Returns:
        ``(checkpoint, logger version, where it was looked for)``; the checkpoint is ``None`` when
        there is none, the version when it is not known.
    """
    callbacks = trainer_config.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        cls = _class_of(callback.get("class_path", "")) if hasattr(callback, "get") else None
        dirpath = (callback.get("init_args") or {}).get("dirpath") if cls is not None else None
        if isinstance(cls, type) and issubclass(cls, ModelCheckpoint) and dirpath:
            checkpoint = last_checkpoint_in(dirpath)
            version = None
            if checkpoint is not None and (log_dir := read_resume_info(checkpoint)["log_dir"]):
                match = re.fullmatch(r"version_(\d+)", Path(log_dir).name)
                version = int(match.group(1)) if match else Path(log_dir).name
            return checkpoint, version, f"{dirpath} (ModelCheckpoint.dirpath)"
    logger = _first_logger(trainer_config)
    if logger is not None:
        init_args = logger.get("init_args") or {}
        save_dir = init_args.get("save_dir") or trainer_config.get("default_root_dir") or os.getcwd()
        name = init_args.get("name", "lightning_logs")
        root = Path(save_dir) / str(name or "")
        version = init_args.get("version")
        found = find_resume_checkpoint(root, version)
        runs = (
            root / (f"version_{version}" if isinstance(version, int) else str(version))
            if version is not None
            else root / "version_*"
        )
        return (*(found or (None, None)), str(runs / "checkpoints"))
    root_dir = Path(trainer_config.get("default_root_dir") or os.getcwd())
    if trainer_config.get("logger") in (None, True):  # Lightning's default TensorBoard logger
        found = find_resume_checkpoint(root_dir / "lightning_logs")
        return (*(found or (None, None)), str(root_dir / "lightning_logs" / "version_*" / "checkpoints"))
    return last_checkpoint_in(root_dir / "checkpoints"), None, str(root_dir / "checkpoints")


def build_from_config(
    config: str | Path, overrides: Sequence[str] = ()
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The LightningModule and LightningDataModule a ``hessian-train`` config describes, without a
    trainer, a logger or callbacks (``hessian-landscape`` builds the model its checkpoints fit).

    Args:
        config: the config file.
        overrides: extra command-line arguments for the config parser (``--model.arch=c1``).

    Returns:
        ``(model, datamodule)``, instantiated and linked as ``hessian-train`` does.
    """
    args = [
        "--config", str(config), *overrides,
        "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    with warnings.catch_warnings():
        # the calling script's own sys.argv is not for LightningCLI; `args` is the whole input
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = HessianCLI(args=args, run=False, save_config_callback=None)
    return cli.model, cli.datamodule


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``hessian-train`` console script.

    Errors in the user's input end it with one line ``hessian-train: error: ...`` on standard error
    and ``SystemExit(2)``, as parse errors do; anything else keeps its traceback.

    Raises:
        SystemExit: with status 2, after an error in the user's input (LightningCLI's own parse
            errors also end in ``SystemExit``).
    """

    def run() -> int:
        HessianCLI(args=args)
        return 0

    if run_console_script("hessian-train", run) == 2:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
