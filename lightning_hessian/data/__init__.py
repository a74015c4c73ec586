"""data layer of lightning_hessian: image classification data modules (pixel-space batches,
global batch size, optional GPU-resident tensors)."""

from lightning_hessian.data.augment import random_crop_flip
from lightning_hessian.data.base import DataNotFoundError, ImageDataModule, ImageTensorDataset, per_device_batch_size
from lightning_hessian.data.datasets import CIFAR10, CIFAR100, DEBIAN_FASHION_MNIST_DIR, MNIST, Digits, FashionMNIST
from lightning_hessian.data.idx import read_idx

#: data module classes by the name used in configs (``class_path: lightning_hessian.data.<name>``)
DATASETS = {cls.__name__: cls for cls in (Digits, MNIST, FashionMNIST, CIFAR10, CIFAR100)}

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "MNIST",
    "DataNotFoundError",
    "Digits",
    "FashionMNIST",
    "ImageDataModule",
    "ImageTensorDataset",
    "per_device_batch_size",
    "random_crop_flip",
    "read_idx",
]
