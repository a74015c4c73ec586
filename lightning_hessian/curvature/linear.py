"""What the spectral routines need from an operator, and an explicit-matrix operator for checks.

:func:`~lightning_hessian.curvature.lanczos.top_eigenvalues`, :func:`hessian_trace` and
:func:`spectral_density` accept any object with ``num_params`` and ``matvec``/``matmat``
(optionally ``device``, ``dtype``, ``flatten``/``unflatten``, ``all_reduce`` and an
``analysis()`` context), so analytic matrices test the numerics independently of autograd. The
routines count the products they request themselves.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from lightning_hessian.errors import UserInputError

__all__ = ["LinearOperator", "MatrixOperator"]

P = ParamSpec("P")
R = TypeVar("R")


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors of length ``num_params``."""

    num_params: int

    def matvec(self, v: Tensor) -> Tensor: ...


class MatrixOperator:
    """A symmetric matrix as an operator: ``matmat(V) = A @ V``, counting products.

    Args:
        matrix: a square matrix, dense or sparse (any layout ``matrix @ V`` supports).

    Raises:
        UserInputError: if ``matrix`` is not square.
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise UserInputError(f"MatrixOperator needs a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.num_params = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.hvp_count = 0

    def matvec(self, v: Tensor) -> Tensor:
        """``A @ v`` for a flat vector ``v``."""
        self.hvp_count += 1
        return self.matrix @ v.to(self.dtype)

    def matmat(self, V: Tensor) -> Tensor:
        """``A @ V`` for ``V`` of shape (P, K).

        When ``V`` is the transpose of a row-major (K, P) tensor (as the spectral routines pass
        it), a dense ``A`` computes ``(V^T A^T)^T`` instead: the same numbers, returned as the
        transpose of a row-major result, so neither side needs a transposing copy.

        Returns:
            The (P, K) product in the matrix's dtype.
        """
        self.hvp_count += V.shape[1]
        V = V.to(self.dtype)
        if self.matrix.layout == torch.strided and V.T.is_contiguous():
            return (V.T @ self.matrix.T).T
        return self.matrix @ V


def plain_tensors(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` outside ``inference_mode`` and without autograd recording.

    The spectral routines allocate and update float64 work tensors in place; under a caller's
    ``torch.inference_mode`` those would be inference tensors that the operator cannot use. The
    operator itself turns gradients back on for its products.

    Returns:
        ``function`` wrapped: the same signature and result.
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with torch.inference_mode(False), torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


def operator_matmat(op: LinearOperator, V: Tensor) -> Tensor:
    """``op @ V`` for ``V`` of shape (P, K), through ``matmat`` if the operator has one."""
    dtype = getattr(op, "dtype", V.dtype)
    if hasattr(op, "matmat"):
        return op.matmat(V.to(dtype))
    return torch.stack([op.matvec(V[:, i].to(dtype)) for i in range(V.shape[1])], dim=1)


def operator_rows(op: LinearOperator, rows: Tensor) -> Tensor:
    """The operator applied to each row of ``rows`` (K, P): a contiguous (K, P) float64 tensor.

    The spectral routines keep their vectors as rows (each vector contiguous in memory) and pass
    ``matmat`` the transpose of a contiguous (K, P) tensor; a ``matmat`` that returns the
    transpose of a row-major result (as ``HessianOperator`` and ``MatrixOperator`` do) costs no
    transposing copy on either side.

    Returns:
        The (K, P) float64 products, contiguous, one row per row of ``rows``.
    """
    product = operator_matmat(op, rows.contiguous().T).T
    return product.to(torch.float64).contiguous()


def row_dots(A: Tensor, B: Tensor) -> Tensor:
    """``(A * B).sum(dim=1)`` for (K, P) tensors without a (K, P) temporary."""
    return torch.bmm(A.unsqueeze(1), B.unsqueeze(2)).reshape(A.shape[0])


def operator_context(op: LinearOperator) -> contextlib.AbstractContextManager:
    """The operator's ``analysis()`` context (one state snapshot for many products), if any."""
    analysis = getattr(op, "analysis", None)
    return analysis() if callable(analysis) else contextlib.nullcontext()


def operator_device(op: LinearOperator) -> torch.device:
    """The operator's ``device`` (CPU if it names none)."""
    return torch.device(getattr(op, "device", "cpu"))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: identical streams on every rank and device, the global RNG untouched."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def random_normal(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal float64 entries drawn on the CPU from ``generator``, moved to ``device``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def random_rademacher(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Random signs (+1/-1, float64) drawn on the CPU from ``generator``, moved to ``device``."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return signs.to(device=device, dtype=torch.float64).mul_(2.0).sub_(1.0)
