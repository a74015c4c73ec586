r"""A spectral density as a TensorBoard histogram, and back.

:class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback` logs its stochastic Lanczos
quadrature density (values :math:`\rho(g_i)` on a uniform grid :math:`g_1 < \dots < g_m`) as the
histogram ``hessian/density`` (:data:`lightning_hessian.metrics.DENSITY`) with
:func:`density_histogram`; ``hessian-report`` reads it back with :func:`density_from_histogram`.
The counts of the histogram are numbers of eigenvalues, so TensorBoard's Histograms and
Distributions tabs show the spectrum of the :math:`n`-parameter Hessian evolving.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["density_from_histogram", "density_histogram"]


def density_histogram(grid: Tensor, density: Tensor, num_params: int) -> dict[str, Any]:
    r"""Arguments of ``SummaryWriter.add_histogram_raw`` for a spectral density on a uniform grid.

    Bucket :math:`i` covers :math:`(g_i - \Delta/2, g_i + \Delta/2]` and counts
    :math:`n \rho(g_i) \Delta / \sum_j \rho(g_j) \Delta` eigenvalues (:math:`n` = ``num_params``),
    so the counts sum to :math:`n` and ``sum`` is the trace of the smoothed density.

    Args:
        grid: the uniform grid, increasing.
        density: the density on ``grid`` (negative values, quadrature noise, count as 0).
        num_params: :math:`n`, the number of eigenvalues.

    Returns:
        ``min``, ``max``, ``num``, ``sum``, ``sum_squares``, ``bucket_limits`` (right edges) and
        ``bucket_counts``.
    """
    grid = grid.double()
    density = density.double().clamp_min(0.0)
    spacing = (grid[-1] - grid[0]) / max(len(grid) - 1, 1)
    mass = density / density.sum() if density.sum() > 0 else torch.full_like(density, 1.0 / len(density))
    counts = mass * num_params
    return {
        "min": float(grid[0] - spacing / 2),
        "max": float(grid[-1] + spacing / 2),
        "num": int(num_params),
        "sum": float((counts * grid).sum()),
        "sum_squares": float((counts * grid.square()).sum()),
        "bucket_limits": (grid + spacing / 2).tolist(),
        "bucket_counts": counts.tolist(),
    }


def density_from_histogram(edges: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bucket centres and a probability density (integrating to 1) from histogram buckets.

    The inverse of :func:`density_histogram`: dividing the counts (numbers of eigenvalues per
    bucket) by their total and by the bucket widths gives the density back.

    Args:
        edges: the ``m + 1`` bucket edges, increasing (as the report's event reader returns them).
        counts: the ``m`` bucket counts.

    Returns:
        ``(centres, density)``, both of length ``m``; a zero density when all counts are zero.
    """
    widths = np.diff(edges)
    total = counts.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(widths > 0, counts / (total * widths), 0.0) if total > 0 else np.zeros_like(counts)
    return centres, density
