"""What the spectral routines need from an operator, and an explicit-matrix operator for checks.

:func:`~lightning_hessian.curvature.lanczos.top_eigenvalues`, :func:`hessian_trace` and
:func:`spectral_density` accept any object with ``num_params`` and ``matvec``/``matmat``
(optionally ``device``, ``dtype``, ``hvp_count``, ``unflatten`` and an ``analysis()`` context),
so analytic matrices test the numerics independently of autograd.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LinearOperator", "MatrixOperator"]

P = ParamSpec("P")
R = TypeVar("R")


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors of length ``num_params``."""

    num_params: int

    def matvec(self, v: Tensor) -> Tensor: ...


class MatrixOperator:
    """A symmetric matrix as an operator: ``matmat(V) = A @ V``, counting products."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator needs a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvp_count = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.hvp_count += 1
        return self.matrix @ v.to(self.dtype)

    def matmat(self, V: Tensor) -> Tensor:
        self.hvp_count += V.shape[1]
        return self.matrix @ V.to(self.dtype)


def plain_tensors(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` outside ``inference_mode`` and without autograd recording.

    The spectral routines allocate and update float64 work tensors in place; under a caller's
    ``torch.inference_mode`` those would be inference tensors that the operator cannot use. The
    operator itself turns gradients back on for its products.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False), torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


def operator_matmat(op: Any, V: Tensor) -> Tensor:
    """``op @ V`` for ``V`` of shape (P, K), through ``matmat`` if the operator has one."""
    dtype = getattr(op, "dtype", V.dtype)
    if hasattr(op, "matmat"):
        return op.matmat(V.to(dtype))
    return torch.stack([op.matvec(V[:, i].to(dtype)) for i in range(V.shape[1])], dim=1)


def operator_context(op: Any) -> contextlib.AbstractContextManager:
    """The operator's ``analysis()`` context (one state snapshot for many products), if any."""
    analysis = getattr(op, "analysis", None)
    return analysis() if callable(analysis) else contextlib.nullcontext()


def operator_device(op: Any) -> torch.device:
    return torch.device(getattr(op, "device", "cpu"))


def hvp_counter(op: Any) -> int:
    return int(getattr(op, "hvp_count", 0))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: identical streams on every rank and device, the global RNG untouched."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def random_normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def random_rademacher(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (signs.to(torch.float64) * 2 - 1).to(device)


def iterate_chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)
