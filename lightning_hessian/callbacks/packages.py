"""Both Lightning packages at once: ``pytorch_lightning`` and the unified ``lightning.pytorch``.

The two packages ship the same classes twice, and each package's checks only accept its own:
``pytorch_lightning.utilities.model_helpers.is_overridden`` raises "Expected a parent" for a
``lightning.pytorch`` module, ``isinstance(logger, pytorch_lightning.loggers.TensorBoardLogger)``
is False for the other package's logger. The callbacks therefore never call a package-specific
check on a user's object; they go through the functions here, which accept either package's
objects (a trainer of one package never mixes them: Lightning refuses that itself).

The callbacks subclass :class:`Callback` below: ``pytorch_lightning.Callback`` and, when the
``lightning`` package is installed, ``lightning.pytorch.Callback`` too, so that either package's
``LightningCLI`` accepts them in ``trainer.callbacks`` (both bases are hook-only classes with the
same no-op hooks; a trainer calls callbacks by hook name).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from lightning_utilities.core.overrides import is_overridden as _is_overridden

from lightning_hessian.metrics import Split

if TYPE_CHECKING:
    from typing import TypeAlias

    # The type checker sees both packages (the tests and the ``unified`` extra install both).
    import lightning.pytorch as _unified
    from pytorch_lightning.loggers import TensorBoardLogger

    #: A ``Trainer`` of either package: what the callbacks' hooks receive.
    AnyTrainer: TypeAlias = pl.Trainer | _unified.Trainer
    #: A ``LightningModule`` of either package.
    AnyLightningModule: TypeAlias = pl.LightningModule | _unified.LightningModule
    #: A ``TensorBoardLogger`` of either package.
    AnyTensorBoardLogger: TypeAlias = TensorBoardLogger | _unified.loggers.TensorBoardLogger

__all__ = [
    "Callback",
    "is_overridden",
    "lightning_packages",
    "split_dataloader",
    "tensorboard_logger_types",
    "trainer_fn",
]


@cache
def lightning_packages() -> tuple[ModuleType, ...]:
    """The installed Lightning packages: ``pytorch_lightning`` and, if installed, ``lightning.pytorch``."""
    packages = []
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            packages.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(packages)


if TYPE_CHECKING:
    from lightning.pytorch import Callback as _UnifiedCallback
else:
    try:
        from lightning.pytorch import Callback as _UnifiedCallback
    except ImportError:  # only pytorch_lightning is installed
        _UnifiedCallback = None

# (the type checker, which sees both packages, takes the first branch only)
if TYPE_CHECKING or _UnifiedCallback is not None:
    # Each base's hooks take its own package's Trainer and LightningModule, so the type checker finds the
    # two bases' hook signatures incompatible; the subclasses' hooks take either (AnyTrainer, AnyLightningModule).
    class Callback(pl.Callback, _UnifiedCallback):  # type: ignore[misc]
        """A Lightning ``Callback`` of both packages (see the module docstring)."""

else:
    Callback = pl.Callback


@cache
def tensorboard_logger_types() -> tuple[type[AnyTensorBoardLogger], ...]:
    """``TensorBoardLogger`` of every installed Lightning package."""
    return tuple(package.loggers.TensorBoardLogger for package in lightning_packages())


def _lightning_base(instance: object) -> type | None:
    for package in lightning_packages():
        for base in (package.LightningModule, package.LightningDataModule, package.Callback):
            if isinstance(instance, base):
                return base
    return None


def is_overridden(method_name: str, instance: object | None) -> bool:
    """Whether ``instance`` (a LightningModule, LightningDataModule or Callback of either
    package) overrides ``method_name`` of its Lightning base class.

    Returns:
        ``True`` when it does; for an object of no Lightning base, whether it has a callable
        ``method_name``; ``False`` for ``None``.
    """
    if instance is None:
        return False
    base = _lightning_base(instance)
    if base is None:
        return callable(getattr(instance, method_name, None))
    return _is_overridden(method_name, instance, base)


def _first_loader(loaders: Any) -> Any:
    """The first DataLoader of what a ``*_dataloader`` hook may return: a loader, a list/tuple or
    dict of loaders, or a ``CombinedLoader`` (of either package) of those.

    Returns:
        The first loader; ``None`` for ``None`` or an empty collection.
    """
    if type(loaders).__name__ == "CombinedLoader":
        loaders = loaders.iterables
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if type(loaders).__name__ == "CombinedLoader":
        return _first_loader(loaders)
    return loaders


def trainer_fn(trainer: Any) -> str:
    """What the trainer is running: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``
    (``TrainerFn``'s value; ``str()`` of the enum is its name on Python 3.11).

    Returns:
        The value of ``trainer.state.fn`` as a string (``"None"`` before the trainer runs).
    """
    fn = trainer.state.fn
    return str(getattr(fn, "value", fn))


def _data_source(trainer: Any, split: Split) -> Any | None:
    """Lightning's record of where ``split``'s loaders come from (a module, a datamodule or the
    loaders given to ``fit``/``validate``/``test``), set before any ``setup`` hook runs.

    Returns:
        The loop's ``_data_source``; ``None`` when the loop has none.
    """
    fn = trainer_fn(trainer)
    if split == "train":
        loop = trainer.fit_loop
    elif split == "val":
        loop = trainer.validate_loop if fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
    else:
        loop = trainer.test_loop
    return getattr(loop, "_data_source", None)


def split_dataloader(trainer: Any, split: Split) -> Any | None:
    """The first DataLoader of ``split``, however the user passed the data; ``None`` if none.

    The loaders Lightning has already attached to the trainer when it has (they carry its
    distributed sampler and ``limit_*_batches`` handling), else the loader its data source gives
    right now: the ``*_dataloader`` hook of the datamodule or module, or the loaders passed to
    ``trainer.fit``/``validate``/``test`` (attached to the trainer only when the loop sets up
    its data, after ``on_fit_start``).

    Returns:
        The loader; ``None`` when the split has no data, or its datamodule or module does not
        define the split's ``*_dataloader`` hook.
    """
    attached = {"train": "train_dataloader", "val": "val_dataloaders", "test": "test_dataloaders"}[split]
    fn = trainer_fn(trainer)
    # during fit, trainer.val_dataloaders are the fit loop's; under validate, the validate loop's
    loaded = getattr(trainer, attached, None) if split != "train" or fn == "fit" else None
    loader = _first_loader(loaded)
    if loader is not None:
        return loader
    source = _data_source(trainer, split)
    if source is None or source.instance is None:
        return None
    if _lightning_base(source.instance) is not None:
        if not is_overridden(source.name, source.instance):
            return None
    return _first_loader(source.dataloader())
