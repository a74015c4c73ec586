"""Curvature engine: Hessian-vector products, Lanczos spectra, trace, density, input Hessians.

Pure torch, no Lightning import; usable on its own.
"""

from lightning_hessian.curvature.context import analysis_mode, exact_float32, preserved_state
from lightning_hessian.curvature.density import spectral_density
from lightning_hessian.curvature.input_space import (
    InputCurvature,
    InputHessianResult,
    input_curvature,
    input_gradient_norms,
    input_hessian_eigenvalues,
)
from lightning_hessian.curvature.lanczos import top_eigenvalues
from lightning_hessian.curvature.linear import LinearOperator, MatrixOperator
from lightning_hessian.curvature.operator import HessianOperator
from lightning_hessian.curvature.results import DensityResult, EigenResult, LanczosProgress, TraceResult
from lightning_hessian.curvature.trace import hessian_trace

__all__ = [
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "InputCurvature",
    "InputHessianResult",
    "LanczosProgress",
    "LinearOperator",
    "MatrixOperator",
    "TraceResult",
    "analysis_mode",
    "exact_float32",
    "hessian_trace",
    "input_curvature",
    "input_gradient_norms",
    "input_hessian_eigenvalues",
    "preserved_state",
    "spectral_density",
    "top_eigenvalues",
]
