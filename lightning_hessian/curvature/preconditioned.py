r"""The Hessian seen through a diagonal preconditioner: :math:`P^{-1/2} H P^{-1/2}`.

An adaptive optimizer steps :math:`\theta \leftarrow \theta - \eta P^{-1} m`; on a quadratic its
stability is governed by the eigenvalues of :math:`P^{-1} H`, which are those of the symmetric
:math:`P^{-1/2} H P^{-1/2}` (Cohen et al. 2022, "Adaptive gradient methods at the edge of
stability"). :class:`DiagonallyScaledOperator` is that symmetric map for any operator ``H`` and a
positive diagonal ``P`` given as a flat vector, so the Lanczos routines apply unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.curvature.linear import LinearOperator, operator_context, operator_matmat

__all__ = ["DiagonallyScaledOperator"]


class DiagonallyScaledOperator:
    r""":math:`v \mapsto D H D v` with :math:`D = \mathrm{diag}(\text{scale})`; for
    ``scale = P ** -0.5`` its eigenvalues are those of :math:`P^{-1} H`.

    Args:
        operator: the symmetric operator ``H`` (e.g. a
            :class:`~lightning_hessian.curvature.operator.HessianOperator`).
        scale: positive flat vector of length ``operator.num_params``.

    Raises:
        ValueError: if ``scale`` has the wrong length or entries that are not finite and positive.
    """

    def __init__(self, operator: LinearOperator, scale: Tensor) -> None:
        if scale.shape != (operator.num_params,):
            raise ValueError(f"scale must have shape ({operator.num_params},), got {tuple(scale.shape)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError("scale must be finite and positive (a diagonal preconditioner P ** -0.5)")
        self.operator = operator
        self.num_params = operator.num_params
        self.dtype: torch.dtype = getattr(operator, "dtype", scale.dtype)
        self.device: torch.device = getattr(operator, "device", scale.device)
        self.scale = scale.to(self.device, self.dtype)
        self.all_reduce: Callable[[Tensor], Tensor] | None = getattr(operator, "all_reduce", None)

    @property
    def hvp_count(self) -> int:
        return int(getattr(self.operator, "hvp_count", 0))

    @contextlib.contextmanager
    def analysis(self) -> Iterator[None]:
        with operator_context(self.operator):
            yield

    def matvec(self, v: Tensor) -> Tensor:
        return self.scale * self.operator.matvec(self.scale * v.to(self.dtype))

    def matmat(self, V: Tensor) -> Tensor:
        return self.scale[:, None] * operator_matmat(self.operator, self.scale[:, None] * V.to(self.dtype))

    def unflatten(self, flat: Tensor) -> Any:
        unflatten = getattr(self.operator, "unflatten", None)
        return unflatten(flat) if unflatten is not None else flat
