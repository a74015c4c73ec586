"""The package's LightningModule and LightningDataModules for the unified ``lightning`` package.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same classes twice, and a trainer of one
package refuses modules of the other ("You passed a `pytorch_lightning` object ... to a
`lightning.pytorch` Trainer"). The package is written against ``pytorch_lightning`` (its
dependency); this module offers the same classes built on ``lightning.pytorch``::

    import lightning as L
    from lightning_hessian.unified import FashionMNIST, ImageClassifier

    data = FashionMNIST(batch_size=256)
    trainer = L.Trainer(callbacks=[HessianSpectrumCallback()])
    trainer.fit(ImageClassifier(arch="lenet5", num_classes=10, input_shape=(1, 28, 28)), datamodule=data)

They are not copies of the code: :func:`rebase` makes, for each class, a class with the same
attributes and functions whose Lightning base is ``lightning.pytorch``'s instead of
``pytorch_lightning``'s (``FashionMNIST -> ImageDataModule -> lightning.pytorch.LightningDataModule``).
``isinstance`` and ``issubclass`` hold within each family, so ``lightning.pytorch.cli.LightningCLI``
takes ``ImageDataModule`` with ``subclass_mode_data=True`` and the data modules as subclasses. The
callbacks need no such variant: they are callbacks of both packages. Requires the ``lightning``
package (``pip install lightning``).
"""

from __future__ import annotations

import types
from typing import Any

import pytorch_lightning as pl

try:
    import lightning.pytorch as unified
except ImportError as error:  # pragma: no cover - lightning is a test extra
    raise ImportError(
        "lightning_hessian.unified needs the unified Lightning package: pip install lightning"
        " (or use the pytorch_lightning classes from lightning_hessian directly)."
    ) from error

from lightning_hessian import data as _data
from lightning_hessian import models as _models

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "MNIST",
    "Digits",
    "FashionMNIST",
    "ImageClassifier",
    "ImageDataModule",
    "rebase",
]

#: the pytorch_lightning roots and their lightning.pytorch counterparts
_ROOTS: dict[type, type] = {
    pl.LightningModule: unified.LightningModule,
    pl.LightningDataModule: unified.LightningDataModule,
}
_REBASED: dict[type, type] = {}


def _with_class_cell(function: types.FunctionType, old: type, new: type) -> types.FunctionType:
    """``function`` with its ``__class__`` cell (zero-argument ``super()``) pointing to ``new``."""
    code = function.__code__
    if "__class__" not in code.co_freevars or function.__closure__ is None:
        return function
    cells = tuple(
        types.CellType(new) if name == "__class__" and cell.cell_contents is old else cell
        for name, cell in zip(code.co_freevars, function.__closure__, strict=True)  # one cell per free variable
    )
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__, cells)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = function.__qualname__, function.__doc__, function.__module__
    copy.__annotations__ = function.__annotations__
    return copy


def _rebind(value: Any, old: type, new: type) -> Any:
    if isinstance(value, types.FunctionType):
        return _with_class_cell(value, old, new)
    if isinstance(value, (staticmethod, classmethod)):
        return type(value)(_rebind(value.__func__, old, new))
    if isinstance(value, property):
        fget, fset, fdel = (None if f is None else _rebind(f, old, new) for f in (value.fget, value.fset, value.fdel))
        return property(fget, fset, fdel, value.__doc__)
    return value


def rebase(cls: type) -> type:
    """The ``lightning.pytorch`` counterpart of a ``pytorch_lightning``-based class (memoised).

    Classes that do not derive from a ``pytorch_lightning`` LightningModule/LightningDataModule
    are returned unchanged.

    Returns:
        The class with the same name, attributes and functions, derived from the ``lightning.pytorch``
        counterparts of ``cls``'s bases; ``cls`` itself for other classes.
    """
    if cls in _ROOTS:
        return _ROOTS[cls]
    if cls in _REBASED:
        return _REBASED[cls]
    if not issubclass(cls, tuple(_ROOTS)):
        return cls
    bases = tuple(rebase(base) for base in cls.__bases__)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    metaclass: type[type] = type(cls)  # the class's own metaclass (type itself for Lightning's classes)
    new = metaclass(cls.__name__, bases, namespace)
    for name, value in namespace.items():  # after creation: the cells must name the new class
        rebound = _rebind(value, cls, new)
        if rebound is not value:
            setattr(new, name, rebound)
    new.__module__ = __name__
    _REBASED[cls] = new
    return new


ImageClassifier = rebase(_models.ImageClassifier)
ImageDataModule = rebase(_data.ImageDataModule)
Digits = rebase(_data.Digits)
MNIST = rebase(_data.MNIST)
FashionMNIST = rebase(_data.FashionMNIST)
CIFAR10 = rebase(_data.CIFAR10)
CIFAR100 = rebase(_data.CIFAR100)
DATASETS = {cls.__name__: cls for cls in (Digits, MNIST, FashionMNIST, CIFAR10, CIFAR100)}
