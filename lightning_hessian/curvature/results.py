"""What the spectral routines return: eigenpairs, trace estimates, densities and Lanczos progress.

These types live apart from the algorithms so that every algorithm module (Lanczos, trace,
density) and the PyHessian adapter can import them without importing each other: this module
imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["DensityResult", "EigenResult", "LanczosProgress", "TraceResult"]


@dataclass
class LanczosProgress:
    """Passed to ``callback`` after every Lanczos step of
    :func:`~lightning_hessian.curvature.lanczos.top_eigenvalues`.

    Attributes:
        hvp_count: Hessian-vector products so far.
        seconds: wall-clock time so far.
        eigenvalues: the current Ritz values of the wanted pairs (float64).
        residuals: their residual norms :math:`\\lVert H y - \\theta y \\rVert` (float64).
        num_converged: how many of them meet the convergence test.
    """

    hvp_count: int
    seconds: float
    eigenvalues: Tensor
    residuals: Tensor
    num_converged: int


@dataclass
class EigenResult:
    """Extreme eigenpairs of a Hessian.

    Attributes:
        eigenvalues: float64, descending for ``which="largest"``, ascending for ``"smallest"``.
        eigenvectors: unit-norm eigenvectors, one dict of parameter-shaped tensors per eigenvalue
            (flat tensors for operators without ``unflatten``).
        residuals: :math:`\\lVert H v - \\lambda v \\rVert` for each pair (float64): some
            eigenvalue of the Hessian lies within this distance of the returned one.
        converged: whether each residual is at most ``tol`` times its eigenvalue's magnitude
            (see ``top_eigenvalues`` for what that guarantees).
        hvp_count: Hessian-vector products used.
        seconds: wall-clock time.
        vectors: the eigenvectors as columns of a (num_params, k) tensor in the operator's dtype.
        tol: the tolerance used.

    A run stopped by ``time_budget`` or ``max_iter`` before its basis held ``k`` vectors returns
    fewer than ``k`` pairs.
    """

    eigenvalues: Tensor
    eigenvectors: list[Any]
    residuals: Tensor
    converged: Tensor
    hvp_count: int
    seconds: float
    vectors: Tensor | None = None
    tol: float | None = None


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (Hutch++: of the stochastic remainder, given the sketch; 0 for
            an exact trace).
        num_probes: random vectors drawn (Hutch++: sketch plus remainder probes; an exact trace
            counts its unit vectors).
        hvp_count: every Hessian-vector product spent, including those of a pilot or a sketch
            that the final estimate does not use directly.
        seconds: wall-clock time.
        method: ``"hutchinson"``, ``"hutch++"``, ``"exact"`` or ``"pyhessian-hutchinson"``.
        converged: whether ``stderr <= rel_tol * |estimate|`` was reached.
    """

    estimate: float
    stderr: float
    num_probes: int
    hvp_count: int
    seconds: float
    method: str = "hutch++"
    converged: bool = False

    @property
    def relative_stderr(self) -> float:
        """``stderr / |estimate|`` (infinite for a zero estimate)."""
        return self.stderr / abs(self.estimate) if self.estimate else math.inf


@dataclass
class DensityResult:
    """A smoothed eigenvalue density.

    Attributes:
        grid: (grid_size,) eigenvalue axis, float64.
        density: (grid_size,) density values; the trapezoidal integral over ``grid`` is 1.
        nodes: (num_probes, steps) Ritz values per probe (NaN where a probe ended early).
        weights: (num_probes, steps) quadrature weights (each row sums to 1).
        sigma: the Gaussian kernel width used.
        num_probes: probes run.
        lanczos_steps: steps per probe.
        hvp_count: Hessian-vector products used.
        seconds: wall-clock time.
        num_params: the operator's dimension.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_probes: int
    lanczos_steps: int
    hvp_count: int
    seconds: float
    num_params: int

    @property
    def mean(self) -> float:
        """Mean eigenvalue, :math:`\\operatorname{tr}(H)/n`, from the quadrature."""
        return float((self.weights * self.nodes.nan_to_num()).sum(dim=1).mean())

    @property
    def trace_estimate(self) -> float:
        """:math:`\\operatorname{tr}(H)` estimated as ``mean * num_params``."""
        return self.mean * self.num_params
