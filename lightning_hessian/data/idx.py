"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped.

IDX: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions ``d``, then
``d`` big-endian int32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.errors import UserInputError

__all__ = ["find_idx_file", "read_idx"]

_FIX = "delete it and download the dataset again (data.download=true), or point data.data_dir at intact files"
_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (``.gz`` decompressed transparently) into a tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a cut-off download, a disk that filled up
        raise UserInputError(f"{path} is truncated or not a gzip file ({error}); {_FIX}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise UserInputError(f"{path} is not an IDX file (bad magic number {data[:4]!r}); {_FIX}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    item_size = np.dtype(_DTYPES[data[2]]).itemsize
    values = (len(data) - 4 - 4 * ndim) // item_size
    if len(data) < 4 + 4 * ndim or values != int(np.prod(shape)):
        raise UserInputError(f"{path}: the header says shape {shape} but the file holds {values} values; {_FIX}")
    array = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim, count=values)
    return torch.from_numpy(array.reshape(shape).astype(array.dtype.newbyteorder("=")).copy())


def find_idx_file(directories: list[Path], stem: str) -> Path | None:
    """The first ``<dir>/<stem>`` or ``<dir>/<stem>.gz`` that exists, else ``None``."""
    for directory in directories:
        for name in (stem, stem + ".gz"):
            candidate = directory / name
            if candidate.is_file():
                return candidate
    return None
