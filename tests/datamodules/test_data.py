"""Tests of the data modules: file formats, splits, global batch mapping, augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import write_cifar_folder, write_idx, write_mnist_folder

from lightning_hessian.data import (
    CIFAR10,
    CIFAR100,
    DEBIAN_FASHION_MNIST_DIR,
    MNIST,
    DataNotFoundError,
    Digits,
    FashionMNIST,
    per_device_batch_size,
    random_crop_flip,
    read_idx,
)
from lightning_hessian.errors import UserInputError
from lightning_hessian.models import ImageClassifier


def test_digits_split_shapes_and_pixel_range() -> None:
    dm = Digits(batch_size=32, val_fraction=0.1, seed=0)
    dm.setup("fit")
    sizes = (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset))
    assert sum(sizes) == 1797 and sizes[2] == 359 and sizes[1] == round(0.1 * 1438)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= dm.train_dataset.images.min() and dm.train_dataset.images.max() <= 1.0
    assert dm.mean == (0.3053,) and dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    assert Digits(normalize=False).mean == (0.0,) and Digits(normalize=False).std == (1.0,)


def _pairs(dataset) -> set[tuple[bytes, int]]:
    return {(img.numpy().tobytes(), int(label)) for img, label in zip(dataset.images, dataset.labels, strict=True)}


def test_validation_split_is_seeded_disjoint_and_test_split_fixed() -> None:
    first, again, other = Digits(seed=0), Digits(seed=0), Digits(seed=1)
    for dm in (first, again, other):
        dm.setup("fit")
    assert torch.equal(first.val_dataset.images, again.val_dataset.images)
    assert not torch.equal(first.val_dataset.images, other.val_dataset.images)
    assert torch.equal(first.test_dataset.images, other.test_dataset.images)
    train, val, test = _pairs(first.train_dataset), _pairs(first.val_dataset), _pairs(first.test_dataset)
    assert not (train & val) and not (train & test) and not (val & test)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / ("images.gz" if gz else "images"), array)
    assert torch.equal(read_idx(path), torch.from_numpy(array))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_files_are_read(tmp_path: Path) -> None:
    dm = FashionMNIST(data_dir=str(tmp_path / "empty"), val_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 60_000 and len(dm.test_dataset) == 10_000
    assert dm.test_dataset.images.shape == (10_000, 1, 28, 28) and dm.test_dataset.images.dtype == torch.uint8
    # Fashion-MNIST is balanced: 1000 test images per class
    assert torch.bincount(dm.test_dataset.labels).tolist() == [1000] * 10
    pixels = torch.cat([dm.train_dataset.images, dm.val_dataset.images]).float() / 255
    assert pixels.mean().item() == pytest.approx(dm.dataset_mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(dm.dataset_std[0], abs=1e-3)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_like_modules_read_data_dir_first(tmp_path: Path, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    write_mnist_folder(folder, num_train=50, num_test=20, gz=layout == "flat")
    dm = FashionMNIST(data_dir=str(tmp_path), val_fraction=0.2)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (40, 10, 20)
    expected = read_idx(next(folder.glob("t10k-images*")))
    assert torch.equal(dm.test_dataset.images[:, 0], expected)


def test_cifar_pickle_format_is_read(cifar_dir: Path) -> None:
    dm = CIFAR10(data_dir=str(cifar_dir), val_fraction=0.2)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (80, 20, 40)
    with open(cifar_dir / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        raw = pickle.load(handle)
    # rows are channel-major: the first 1024 bytes are the red plane
    image, label = dm.test_dataset[3]
    assert torch.equal((image * 255).round().to(torch.uint8)[0].flatten(), torch.from_numpy(raw["data"][3][:1024]))
    assert label.item() == raw["labels"][3]
    hundred = write_cifar_folder(cifar_dir.parent / "c100", num_classes=100)
    dm100 = CIFAR100(data_dir=str(hundred))
    dm100.setup("fit")
    assert dm100.num_classes == 100 and len(dm100.test_dataset) == 40


@pytest.mark.parametrize("module", [CIFAR10, CIFAR100, MNIST])
def test_missing_data_says_how_to_get_it(tmp_path: Path, module: type) -> None:
    with pytest.raises(DataNotFoundError, match="download=true"):
        module(data_dir=str(tmp_path / "nothing"), download=False).setup("fit")


def test_wrong_labels_and_shapes_fail_at_setup_naming_value_and_fix(tmp_path: Path) -> None:
    """Files that do not fit the data module fail at setup, before training, naming the bad value
    and where it came from (not mid-run as a device-side assert or a shape mismatch in a layer)."""
    rng = np.random.default_rng(0)
    labels = tmp_path / "labels"
    write_mnist_folder(labels, num_train=30, num_test=10)
    write_idx(labels / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12], dtype=np.uint8))
    with pytest.raises(UserInputError, match=r"test labels from .*t10k-labels.* must be .* in \[0, 10\).*found 12"):
        MNIST(data_dir=str(labels)).setup("fit")

    shapes = tmp_path / "shapes"  # 32 x 32 images (another dataset's) where MNIST has 28 x 28
    write_mnist_folder(shapes, num_train=30, num_test=10)
    write_idx(shapes / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 32, 32), dtype=np.uint8))
    with pytest.raises(UserInputError, match=r"train images .* shape \(30, 1, 32, 32\).*input_shape \(1, 28, 28\)"):
        MNIST(data_dir=str(shapes)).setup("fit")

    class Shifted(Digits):  # a user's own module whose labels run 1..10
        def load_split(self, train: bool):
            images, targets = super().load_split(train)
            return images, targets + 1

    with pytest.raises(UserInputError, match=r"found 10; .*num_classes covers labels 1\.\.10"):
        Shifted().setup("fit")

    class Unscaled(Digits):  # floats in 0..16, not pixels in [0, 1]
        def load_split(self, train: bool):
            images, targets = super().load_split(train)
            return images * 16, targets

    with pytest.raises(UserInputError, match=r"floats in \[0, 16\]; float images must be pixels in \[0, 1\]"):
        Unscaled().setup("fit")


def test_truncated_or_damaged_idx_file_names_the_file(tmp_path: Path) -> None:
    folder = write_mnist_folder(tmp_path / "mnist", num_train=30, num_test=10)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])  # a download cut short
    with pytest.raises(UserInputError, match=f"{images} is truncated or not a gzip file.*download the dataset again"):
        MNIST(data_dir=str(folder)).setup("fit")
    plain = write_idx(tmp_path / "plain" / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    plain.write_bytes(plain.read_bytes()[:-3])
    with pytest.raises(UserInputError, match=r"header says shape \(10,\) but the file holds 7 values"):
        read_idx(plain)


def test_per_device_batch_size_mapping() -> None:
    assert per_device_batch_size(2048, 1, 1) == 2048
    assert per_device_batch_size(2048, 8, 1) == 256
    assert per_device_batch_size(2048, 4, 4) == 128
    with pytest.raises(ValueError, match="multiple of world_size x accumulate_grad_batches = 2 x 3 = 6"):
        per_device_batch_size(64, 2, 3)


def test_global_batch_is_split_over_accumulation_and_checked_before_training(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", accumulate_grad_batches=4, logger=False, default_root_dir=tmp_path)
    dm = Digits(batch_size=64)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.per_device_batch_size == 16
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 16

    model = ImageClassifier(arch="mlp", input_shape=(1, 8, 8))
    before = [p.detach().clone() for p in model.parameters()]
    bad = pl.Trainer(accelerator="cpu", accumulate_grad_batches=3, logger=False, max_steps=2, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="global batch_size 64 must be a positive multiple"):
        bad.fit(model, datamodule=Digits(batch_size=64))
    assert bad.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_random_crop_flip_is_a_shifted_crop_of_the_zero_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 3, 6, 6)
    out = random_crop_flip(images, padding=2, flip=True)
    padded = F.pad(images, (2, 2, 2, 2))
    candidates_found = 0
    for image, augmented in zip(padded, out, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
            if torch.equal((image.flip(2) if flip else image)[:, dy : dy + 6, dx : dx + 6], augmented)
        ]
        assert matches, "augmented image is not a crop of the padded image"
        candidates_found += 1
    assert candidates_found == 16
    assert not torch.equal(out, images)  # 16 images: some shift or flip happened
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


class _BatchSpy(pl.Callback):
    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch[0].clone())


def test_augmentation_applies_only_to_training_batches(cifar_dir: Path, tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = CIFAR10(data_dir=str(cifar_dir), batch_size=8, augment=True, val_fraction=0.2)
    spy = _BatchSpy()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(ImageClassifier(arch="c1", num_classes=10, lr=0.01), datamodule=dm)
    originals = {img.numpy().tobytes() for img in dm.train_dataset.images}
    seen = [((b * 255).round().to(torch.uint8)) for b in torch.cat(spy.train)]
    assert sum(img.numpy().tobytes() not in originals for img in seen) > 0
    assert dm.on_after_batch_transfer(dm.val_dataset.batch(range(4)), 0)[0].equal(dm.val_dataset.batch(range(4))[0])
