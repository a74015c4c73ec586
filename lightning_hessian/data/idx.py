"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped.

IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions ``d``, then
``d`` big-endian int32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["find_idx_file", "read_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (``.gz`` decompressed transparently) into a tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return torch.from_numpy(array.reshape(shape).astype(array.dtype.newbyteorder("=")).copy())


def find_idx_file(directories: list[Path], stem: str) -> Path | None:
    """The first ``<dir>/<stem>`` or ``<dir>/<stem>.gz`` that exists, else ``None``."""
    for directory in directories:
        for name in (stem, stem + ".gz"):
            candidate = directory / name
            if candidate.is_file():
                return candidate
    return None
