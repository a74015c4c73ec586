"""Shared fixtures: tiny on-disk datasets in the real file formats, configs, a clean run directory,
one intra-op thread for tiny models."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

# `lightning` gives its logger a stderr handler when first imported. Imported lazily inside a test
# that uses capsys, the handler would keep that test's stream, closed afterwards ("Logging error").
try:
    import lightning  # noqa: F401
except ImportError:  # pragma: no cover - `lightning` is a test extra
    pass

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def write_cifar_folder(
    root: Path, *, num_train: int = 100, num_test: int = 40, num_classes: int = 10, seed: int = 0
) -> Path:
    """Write a CIFAR-10 (or, with 100 classes, CIFAR-100) folder in torchvision's pickle format.

    Returns ``root``; the files are under ``root/cifar-10-batches-py`` or ``root/cifar-100-python``.
    """
    rng = np.random.default_rng(seed)

    def entry(count: int, label_key: str) -> dict:
        return {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, count).tolist(),
        }

    if num_classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        files = {"train": entry(num_train, "fine_labels"), "test": entry(num_test, "fine_labels")}
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        per_batch = num_train // 5
        files = {f"data_batch_{i}": entry(per_batch, "labels") for i in range(1, 6)}
        files["test_batch"] = entry(num_test, "labels")
    for name, content in files.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the IDX format (gzipped when ``path`` ends in ``.gz``)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_folder(root: Path, *, num_train: int = 60, num_test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """Write the four (Fashion-)MNIST IDX files with random content into ``root``."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, count, dtype=np.uint8))
    return root


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A tiny CIFAR-10 folder (100 train, 40 test images) written by the test."""
    return write_cifar_folder(tmp_path / "cifar")


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so that ``runs/`` and ``data/`` land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (restored after): fastest for tiny models, and far faster than torch's
    default on a shared, loaded machine. Test modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
