"""Batches as the analyses see them: nested tuples, lists, namedtuples or dicts of tensors.

The sample count of a batch is dim 0 of its first tensor; the inputs and targets of an
``(x, y, ...)`` batch are its first two entries (or the ``x``/``y``-style keys of a dict). The
operator, the landscape layer and the callbacks all read batches through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["INPUT_TARGET_KEYS", "batch_size", "find_inputs_targets", "map_tensors", "slice_batch"]

#: dict keys searched, in order, for the inputs and targets of a dict batch
INPUT_TARGET_KEYS = (("x", "y"), ("input", "target"), ("inputs", "targets"), ("image", "label"))


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it; other values are kept."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapping_type: Callable[..., Any] = type(batch)  # dict, OrderedDict, ...: built from (key, value) pairs
        return mapping_type((key, map_tensors(value, fn)) for key, value in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(value, fn) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in a (nested) batch; other values are kept."""
    return map_tensors(batch, lambda tensor: tensor[start:stop])


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: dim 0 of its first tensor.

    Returns:
        The size of dim 0 of the first tensor found (depth first, in order).

    Raises:
        TypeError: if the batch holds no tensor.
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_size(value)
        except TypeError:
            continue
    raise TypeError(
        f"No tensor found in a batch of type {type(batch).__name__} (the sample count is dim 0 of its first tensor)"
    )


def find_inputs_targets(batch: Any) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` of a tuple/list ``(x, y, ...)`` or a dict with x/y-style keys; ``None`` otherwise."""
    if isinstance(batch, Mapping):
        for x_key, y_key in INPUT_TARGET_KEYS:
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        return None
    if isinstance(batch, Sequence) and not isinstance(batch, (str, Tensor)) and len(batch) >= 2:
        return batch[0], batch[1]
    return None
