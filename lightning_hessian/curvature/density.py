"""Eigenvalue density by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`q`, ``m`` Lanczos steps give a tridiagonal :math:`T` with eigenpairs
:math:`(\\theta_i, s_i)`; Gauss quadrature gives :math:`q^\\top f(H) q \\approx \\sum_i s_{1i}^2
f(\\theta_i)`. Averaging over Rademacher probes estimates the spectral measure
:math:`\\frac1n \\sum_j \\delta(t - \\lambda_j)`; a Gaussian kernel of width ``sigma`` turns the
nodes into a density on a grid. All probes run as one batched Lanczos: one ``matmat`` per step.

The density integrates to 1 (the grid extends well past the extreme nodes), and its mean times
``num_params`` estimates the trace (:attr:`DensityResult.trace_estimate`).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lightning_hessian.curvature.lanczos import batched_lanczos
from lightning_hessian.curvature.linear import (
    LinearOperator,
    operator_context,
    operator_device,
    operator_rows,
    plain_tensors,
    random_rademacher,
    seeded_generator,
)
from lightning_hessian.curvature.results import DensityResult
from lightning_hessian.errors import UserInputError

__all__ = ["DensityResult", "gaussian_density", "spectral_density"]  # DensityResult: re-exported from results


def gaussian_density(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Average over probes of :math:`\\sum_i w_i \\, \\mathcal N(t; \\theta_i, \\sigma^2)` on ``grid``.

    Args:
        nodes: (num_probes, steps) Ritz values, NaN where a probe ended early.
        weights: (num_probes, steps) quadrature weights.
        grid: (grid_size,) points to evaluate the density at.
        sigma: the kernel width.

    Returns:
        (grid_size,) the density on ``grid``.
    """
    valid = ~torch.isnan(nodes)
    theta = nodes[valid]
    w = weights[valid] / nodes.shape[0]
    kernel = torch.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) / (sigma * (2 * torch.pi) ** 0.5)
    return kernel @ w


@plain_tensors
def spectral_density(
    op: LinearOperator,
    num_probes: int = 8,
    lanczos_steps: int = 64,
    grid_size: int = 1024,
    sigma: float | None = None,
    seed: int = 0,
    *,
    relative_sigma: float = 0.01,
) -> DensityResult:
    """SLQ estimate of the eigenvalue density of ``op``.

    Args:
        op: a ``HessianOperator`` or any object with ``num_params`` and ``matvec``/``matmat``.
        num_probes: Rademacher probes, run together (memory: ``num_probes * lanczos_steps *
            num_params`` float64 numbers for the bases).
        lanczos_steps: Lanczos steps per probe (capped at ``num_params``).
        grid_size: points of the output grid.
        sigma: Gaussian kernel width; default ``relative_sigma`` times the spectrum's width
            (largest minus smallest node).
        seed: probe seed (private generator; identical on all DDP ranks).
        relative_sigma: kernel width relative to the spectrum's width when ``sigma`` is None.

    Returns:
        A :class:`DensityResult`; ``hvp_count`` counts every product (``num_probes`` per step).

    Raises:
        UserInputError: for non-positive counts, a grid of fewer than 2 points or a bad ``sigma``.
    """
    if num_probes < 1 or lanczos_steps < 1 or grid_size < 2:
        raise UserInputError(
            f"num_probes={num_probes}, lanczos_steps={lanczos_steps} must be >= 1 and grid_size={grid_size} >= 2."
        )
    if sigma is not None and sigma <= 0:
        raise UserInputError(f"sigma={sigma} must be positive, or None for relative_sigma times the spectrum's width.")
    began = time.perf_counter()
    generator = seeded_generator(seed)
    device = operator_device(op)
    start = random_rademacher((num_probes, op.num_params), generator, device)
    hvps = 0

    def apply(vectors: Tensor, rows: Tensor) -> Tensor:
        nonlocal hvps
        hvps += vectors.shape[0]
        return operator_rows(op, vectors)

    with operator_context(op):
        run = batched_lanczos(apply, start, lanczos_steps)
    nodes, weights, _ = run.ritz()
    valid = nodes[~torch.isnan(nodes)]
    low, high = float(valid.min()), float(valid.max())
    width = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    if sigma is None:
        sigma = relative_sigma * width
    pad = 6 * sigma + 0.05 * width
    grid = torch.linspace(low - pad, high + pad, grid_size, dtype=torch.float64, device=nodes.device)
    density = gaussian_density(nodes, weights, grid, sigma)
    return DensityResult(
        grid=grid.cpu(),
        density=density.cpu(),
        nodes=nodes.cpu(),
        weights=weights.cpu(),
        sigma=float(sigma),
        num_probes=num_probes,
        lanczos_steps=int(run.alpha.shape[1]),
        hvp_count=hvps,
        seconds=time.perf_counter() - began,
        num_params=int(op.num_params),
    )
