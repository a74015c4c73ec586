"""The data modules: Digits (embedded), MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100.

All share :class:`~lightning_hessian.data.base.ImageDataModule`'s options and conventions
(pixel-space batches, global ``batch_size``, seeded validation split, ``gpu_resident``).
Files are read directly from torchvision's on-disk formats (IDX for MNIST-like sets, the pickled
``cifar-*-python`` batches for CIFAR), so a folder prepared by ``torchvision.datasets`` works,
and torchvision is only used to download.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_hessian.data.base import DataNotFoundError, ImageDataModule
from lightning_hessian.data.idx import find_idx_file, read_idx

__all__ = ["CIFAR10", "CIFAR100", "DEBIAN_FASHION_MNIST_DIR", "MNIST", "Digits", "FashionMNIST"]

#: where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class Digits(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes): embedded, no download.

    The dataset has no official test split: a fixed 20% (seed 0, independent of ``seed``) is the
    test set; ``val_fraction`` of the rest is the validation set. ``data_dir``/``download`` are
    ignored. No augmentation (8x8 images).
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    # mean/std of all 1797 images scaled to [0, 1] (pixel values 0..16 divided by 16)
    dataset_mean = (0.3053,)
    dataset_std = (0.3760,)
    test_fraction = 0.2

    @override
    def describe_source(self, train: bool) -> str:
        return "scikit-learn's load_digits()"

    @override
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        num_test = round(self.test_fraction * len(labels))
        index = order[num_test:] if train else order[:num_test]
        return images[index], labels[index]


class _TorchvisionImages(ImageDataModule):
    """A dataset that torchvision can download into ``data_dir`` (class ``torchvision_name`` of
    ``torchvision.datasets``, train and test split)."""

    #: torchvision's dataset class, which is also its folder name under ``data_dir``
    torchvision_name = ""

    @override
    def download_data(self) -> None:
        import torchvision

        dataset_class = getattr(torchvision.datasets, self.torchvision_name)
        for train in (True, False):
            try:
                dataset_class(str(self.data_dir), train=train, download=True)
            except (RuntimeError, OSError) as error:  # torchvision's "Error downloading ...", no network, full disk
                message = " ".join(str(error).split())
                raise DataNotFoundError(
                    f"{type(self).__name__}: downloading into {self.data_dir} failed: {message}. Check the network "
                    f"connection, or put the files into data.data_dir yourself and set data.download=false."
                ) from error


class _IdxImages(_TorchvisionImages):
    """MNIST-like datasets stored as IDX files (``train-images-idx3-ubyte[.gz]`` etc.)."""

    num_classes = 10
    input_shape = (1, 28, 28)
    crop_padding = 2
    horizontal_flip = False
    #: directories searched after ``data_dir`` and ``<data_dir>/<torchvision_name>/raw``
    system_dirs: tuple[Path, ...] = ()
    how_to_get = ""

    def _directories(self) -> list[Path]:
        return [self.data_dir, self.data_dir / self.torchvision_name / "raw", *self.system_dirs]

    def _files(self, train: bool) -> tuple[Path | None, Path | None]:
        prefix = "train" if train else "t10k"
        dirs = self._directories()
        return find_idx_file(dirs, f"{prefix}-images-idx3-ubyte"), find_idx_file(dirs, f"{prefix}-labels-idx1-ubyte")

    @override
    def is_available(self) -> bool:
        return all(path is not None for split in (True, False) for path in self._files(split))

    @override
    def describe_source(self, train: bool) -> str:
        found = [str(path) for path in self._files(train) if path is not None]
        return " and ".join(found) if found else super().describe_source(train)

    @override
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images_path, labels_path = self._files(train)
        if images_path is None or labels_path is None:
            searched = ", ".join(str(d) for d in self._directories())
            raise DataNotFoundError(
                f"{type(self).__name__}: no {'train' if train else 't10k'}-images-idx3-ubyte[.gz] / "
                f"labels-idx1-ubyte[.gz] files in {searched}. Set data.download=true to download them "
                f"into data_dir with torchvision{self.how_to_get}, or point data.data_dir at a folder "
                f"that has them."
            )
        images, labels = read_idx(images_path), read_idx(labels_path)
        return images.unsqueeze(1), labels.long()


class MNIST(_IdxImages):
    """MNIST (60k/10k 28x28 grey digits). Augmentation: random shifts of up to 2 pixels."""

    torchvision_name = "MNIST"
    dataset_mean = (0.1307,)
    dataset_std = (0.3081,)


class FashionMNIST(_IdxImages):
    """Fashion-MNIST (60k/10k 28x28 grey clothing images). Augmentation: shifts of up to 2
    pixels and horizontal flips.

    Besides ``data_dir`` (plain IDX files or torchvision's ``FashionMNIST/raw`` layout), the files
    of the Debian package ``dataset-fashion-mnist`` in ``/usr/share/datasets/fashion-mnist`` are
    used when present.
    """

    torchvision_name = "FashionMNIST"
    horizontal_flip = True
    dataset_mean = (0.2860,)
    dataset_std = (0.3530,)
    system_dirs = (DEBIAN_FASHION_MNIST_DIR,)
    how_to_get = ", or install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"


class _PickledCifar(_TorchvisionImages):
    """CIFAR in torchvision's ``cifar-*-python`` format: pickled dicts with ``data`` (N x 3072
    uint8, channel-major) and labels."""

    input_shape = (3, 32, 32)
    crop_padding = 4
    horizontal_flip = True
    folder = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key = ""

    def _folder(self) -> Path:
        return self.data_dir / self.folder

    @override
    def describe_source(self, train: bool) -> str:
        return str(self._folder())

    @override
    def is_available(self) -> bool:
        return all((self._folder() / name).is_file() for name in (*self.train_files, *self.test_files))

    @override
    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        names = self.train_files if train else self.test_files
        missing = [name for name in names if not (self._folder() / name).is_file()]
        if missing:
            raise DataNotFoundError(
                f"{type(self).__name__}: missing {', '.join(missing)} in {self._folder()}. Set "
                f"data.download=true to download the dataset into data_dir ({self.data_dir}) with "
                f"torchvision, or point data.data_dir at the folder that contains {self.folder}/."
            )
        images, labels = [], []
        for name in names:
            with open(self._folder() / name, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[self.label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFAR10(_PickledCifar):
    """CIFAR-10 (50k/10k 32x32 colour images, 10 classes). Augmentation: 4-pixel random crop
    and horizontal flip. Files: ``<data_dir>/cifar-10-batches-py/``."""

    num_classes = 10
    dataset_mean = (0.4914, 0.4822, 0.4465)
    dataset_std = (0.2470, 0.2435, 0.2616)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    torchvision_name = "CIFAR10"


class CIFAR100(_PickledCifar):
    """CIFAR-100 (50k/10k 32x32 colour images, 100 fine classes). Files:
    ``<data_dir>/cifar-100-python/``."""

    num_classes = 100
    dataset_mean = (0.5071, 0.4865, 0.4409)
    dataset_std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    torchvision_name = "CIFAR100"
