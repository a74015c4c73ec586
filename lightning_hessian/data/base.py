"""Base data module: in-memory image tensors, global batch size, seeded split, batched augmentation.

Conventions shared by every data module of the package:

* **Pixel space.** Batches are float images in ``[0, 1]``, shape ``(N, C, H, W)``, with int64
  labels. Normalisation is not applied to the data: the module exposes ``mean``/``std`` and the
  model normalises inside the network (see :mod:`lightning_hessian.models.classifier`).
* **Global batch.** ``batch_size`` is the number of samples per optimiser step over all devices
  and accumulated micro-batches. Each device loads
  ``batch_size / (num_nodes * devices * accumulate_grad_batches)`` samples per micro-batch
  (:func:`per_device_batch_size`), so ``batch_size: 2048`` means 2048 on 1 GPU with accumulation
  or on 8 GPUs. A size that does not divide raises before training starts.
* **Whole datasets in memory.** The datasets here are small (CIFAR-10: 150 MB as uint8), so they
  are held as tensors and a batch is one gather (:class:`ImageTensorDataset`), not ``batch_size``
  Python calls. With ``gpu_resident=True`` the tensors live on the training device and no CPU data
  loading happens at all; random crop/flip run on the device in ``on_after_batch_transfer``.
* **Fixed validation split.** ``val_fraction`` of the training set, drawn with ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_hessian.data.augment import random_crop_flip
from lightning_hessian.errors import InputNotFoundError, UserInputError

__all__ = ["DataNotFoundError", "ImageDataModule", "ImageTensorDataset", "per_device_batch_size"]


class DataNotFoundError(InputNotFoundError):
    """The dataset files are missing and ``download`` is off; the message says how to get them."""


def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int) -> int:
    """Samples per device and micro-batch: ``global / (world_size * accumulate_grad_batches)``.

    Returns:
        The per-device batch size.

    Raises:
        UserInputError: if the global batch does not divide evenly.
    """
    parts = world_size * accumulate_grad_batches
    if global_batch_size < 1 or global_batch_size % parts:
        raise UserInputError(
            f"the global batch_size {global_batch_size} must be a positive multiple of "
            f"world_size x accumulate_grad_batches = {world_size} x {accumulate_grad_batches} = {parts}; "
            f"change data.batch_size, trainer.devices/num_nodes or trainer.accumulate_grad_batches"
        )
    return global_batch_size // parts


def _to_pixels(images: Tensor) -> Tensor:
    """uint8 images to float in [0, 1]; float images are taken to be in [0, 1] already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


class ImageTensorDataset(Dataset):
    """Images ``(N, C, H, W)`` (uint8, or float in [0, 1]) and labels ``(N,)`` held as tensors.

    ``dataset[i]`` is ``(image, label)`` with a float image in ``[0, 1]``, usable with any
    ``DataLoader``; :meth:`batch` gathers many samples with one indexing operation.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
            raise UserInputError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return _to_pixels(self.images[index]), self.labels[index]

    def batch(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` of ``indices``, images as float in ``[0, 1]``."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
        return _to_pixels(self.images[index]), self.labels[index]

    def subset(self, indices: Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(self.images[indices], self.labels[indices])

    def to(self, device: torch.device | str) -> ImageTensorDataset:
        return ImageTensorDataset(self.images.to(device), self.labels.to(device))


class _BatchFetchDataset(Dataset):
    """Adapter that makes a ``DataLoader`` fetch whole batches through ``__getitems__``.

    Only for the loaders of :class:`ImageDataModule` (they pass ``collate_fn=_keep_batch``); use
    the wrapped ``dataset`` for anything else.
    """

    def __init__(self, dataset: ImageTensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        return self.dataset.batch(indices)


def _keep_batch(batch: Any) -> Any:
    return batch


class ImageDataModule(pl.LightningDataModule):
    """Base class of the image classification data modules (see the module docstring).

    Subclasses set the class attributes and implement :meth:`load_split` (and :meth:`download_data`
    where downloading is possible).

    Args:
        data_dir: directory holding (or receiving) the dataset files.
        batch_size: **global** batch size per optimiser step (see :func:`per_device_batch_size`);
            read again by every ``train_dataloader()`` call, so it may change between epochs
            (:class:`~lightning_hessian.callbacks.absa.AdaptiveBatchSizeCallback`).
        download: download missing files in ``prepare_data`` (rank 0).
        augment: random crop (zero padding ``crop_padding``) and horizontal flip (if the dataset
            allows it) of training batches; validation and test data are never augmented.
        normalize: expose the dataset's channel statistics as ``mean``/``std`` for the model's
            input normalisation; ``False`` exposes 0/1 (no normalisation).
        val_fraction: fraction of the training set held out for validation, in (0, 1).
        seed: seed of the validation split.
        gpu_resident: keep the whole dataset as tensors on the training device.
        num_workers: DataLoader worker processes (0 is usually fastest: a batch is one gather).
        eval_batch_size: global batch size for validation/test (default: ``batch_size``).
    """

    #: number of classes
    num_classes: int = 10
    #: ``(channels, height, width)``
    input_shape: tuple[int, int, int] = (3, 32, 32)
    #: per-channel statistics of the training images in [0, 1]
    dataset_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    dataset_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    #: augmentation of this dataset when ``augment`` is on
    crop_padding: int = 0
    horizontal_flip: bool = False

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        download: bool = False,
        augment: bool = True,
        normalize: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        gpu_resident: bool = False,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserInputError(f"batch_size must be positive, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise UserInputError(f"eval_batch_size must be positive or None, got {eval_batch_size}")
        # batch_size is left out: the model logs it, and Lightning refuses differing duplicates.
        self.save_hyperparameters(
            {
                "dataset": type(self).__name__,
                "data_dir": str(data_dir),
                "download": download,
                "augment": augment,
                "normalize": normalize,
                "val_fraction": val_fraction,
                "seed": seed,
                "gpu_resident": gpu_resident,
                "num_workers": num_workers,
                "eval_batch_size": eval_batch_size,
            }
        )
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.download = download
        self.augment = augment
        self.normalize = normalize
        self.val_fraction = val_fraction
        self.seed = seed
        self.gpu_resident = gpu_resident
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size
        self.per_device_batch_size = batch_size
        self.per_device_eval_batch_size = eval_batch_size or batch_size
        self.train_dataset: ImageTensorDataset | None = None
        self.val_dataset: ImageTensorDataset | None = None
        self.test_dataset: ImageTensorDataset | None = None

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean for the model's input normalisation (0 when ``normalize`` is off)."""
        return tuple(self.dataset_mean) if self.normalize else (0.0,) * self.input_shape[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation for the model's input normalisation (1 when off)."""
        return tuple(self.dataset_std) if self.normalize else (1.0,) * self.input_shape[0]

    # -- to implement in subclasses ------------------------------------------------------------
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """``(images (N, C, H, W) uint8 or float in [0, 1], labels (N,))`` of the official
        training or test split; raise :class:`DataNotFoundError` if the files are missing."""
        raise NotImplementedError

    def download_data(self) -> None:
        """Download the dataset into ``data_dir`` (only called when ``download`` is on)."""
        raise NotImplementedError(f"{type(self).__name__} cannot download its data")

    def is_available(self) -> bool:
        """Whether :meth:`load_split` can read the data without downloading."""
        return True

    def describe_source(self, train: bool) -> str:
        """Where :meth:`load_split` reads the split from, for error messages."""
        return f"data_dir {str(self.data_dir)!r}"

    def check_split(self, images: Tensor, labels: Tensor, *, train: bool) -> tuple[Tensor, Tensor]:
        """``(images, labels)`` unchanged if they fit this module, else :class:`UserInputError`.

        Checked before training, because a mismatch otherwise surfaces mid-run as a raw torch error
        (a shape mismatch in the first layer, a device-side assert in the loss) or not at all
        (float pixels in 0..255): images ``(N, *input_shape)``, uint8 or float in ``[0, 1]``;
        integer labels in ``[0, num_classes)``.

        Returns:
            ``(images, labels)``, the same tensors.

        Raises:
            UserInputError: the images have the wrong shape or float values outside ``[0, 1]``, or
                the labels are not integers in ``[0, num_classes)``.
        """
        name, split = type(self).__name__, "train" if train else "test"
        source = self.describe_source(train)
        expected = tuple(int(size) for size in self.input_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UserInputError(
                f"{name}: the {split} images from {source} have shape {tuple(images.shape)}, but {name} needs "
                f"(N, C, H, W) with (C, H, W) = input_shape {expected}; point data.data_dir at {name}'s files "
                f"or pick the data module of this dataset (--data=<name>)"
            )
        if images.is_floating_point() and images.numel():
            low, high = float(images.min()), float(images.max())
            if not 0.0 <= low <= high <= 1.0:
                raise UserInputError(
                    f"{name}: the {split} images from {source} are floats in [{low:g}, {high:g}]; float images "
                    "must be pixels in [0, 1] (divide by 255, or return uint8)"
                )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise UserInputError(
                f"{name}: the {split} labels from {source} are {labels.dtype}; labels must be integer class indices"
            )
        if labels.numel():
            smallest, largest = int(labels.min()), int(labels.max())
            if smallest < 0 or largest >= self.num_classes:
                bad = smallest if smallest < 0 else largest
                raise UserInputError(
                    f"{name}: the {split} labels from {source} must be class indices in [0, {self.num_classes}) "
                    f"(num_classes={self.num_classes}), found {bad}; these files are not {name}'s, or use a data "
                    f"module whose num_classes covers labels {smallest}..{largest}"
                )
        return images, labels

    # -- Lightning hooks -----------------------------------------------------------------------
    @override
    def prepare_data(self) -> None:
        if self.download and not self.is_available():
            self.download_data()

    @override
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        self.per_device_batch_size = per_device_batch_size(self.batch_size, world_size, accumulate)
        self.per_device_eval_batch_size = max(1, (self.eval_batch_size or self.batch_size) // world_size)
        if self.train_dataset is None:
            train = ImageTensorDataset(*self.check_split(*self.load_split(train=True), train=True))
            test = ImageTensorDataset(*self.check_split(*self.load_split(train=False), train=False))
            num_val = max(1, round(self.val_fraction * len(train)))
            if num_val >= len(train):
                raise UserInputError(f"val_fraction {self.val_fraction} leaves no training samples out of {len(train)}")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
            self.val_dataset, self.train_dataset = train.subset(order[:num_val]), train.subset(order[num_val:])
            self.test_dataset = test
        if self.gpu_resident and trainer is not None:  # a no-op when already there
            device = trainer.strategy.root_device
            assert self.val_dataset is not None and self.test_dataset is not None  # built with train_dataset
            self.train_dataset = self.train_dataset.to(device)
            self.val_dataset = self.val_dataset.to(device)
            self.test_dataset = self.test_dataset.to(device)

    def _loader(self, dataset: ImageTensorDataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        on_cpu = dataset.images.device.type == "cpu"
        return DataLoader(
            _BatchFetchDataset(dataset),
            batch_size=self.per_device_batch_size if train else self.per_device_eval_batch_size,
            shuffle=train,
            drop_last=train,  # every optimiser step sees exactly the global batch
            collate_fn=_keep_batch,
            num_workers=self.num_workers if on_cpu else 0,
            persistent_workers=on_cpu and self.num_workers > 0,
            pin_memory=on_cpu and torch.cuda.is_available(),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:  # batch_size may have changed since setup (AdaptiveBatchSizeCallback)
            self.per_device_batch_size = per_device_batch_size(
                self.batch_size, trainer.world_size, trainer.accumulate_grad_batches
            )
        loader = self._loader(self.train_dataset, train=True)
        assert self.train_dataset is not None  # _loader refuses None
        if len(loader) == 0:
            raise UserInputError(
                f"the training set ({len(self.train_dataset)} samples) is smaller than one per-device "
                f"batch ({self.per_device_batch_size}); lower data.batch_size"
            )
        return loader

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.augment and trainer is not None and trainer.training and (self.crop_padding or self.horizontal_flip):
            images, labels = batch
            batch = (random_crop_flip(images, padding=self.crop_padding, flip=self.horizontal_flip), labels)
        return batch
