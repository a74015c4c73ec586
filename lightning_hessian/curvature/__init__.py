"""Curvature engine: Hessian-vector products, Lanczos spectra, trace, density, input Hessians.

Pure torch, no Lightning import; usable on its own.
"""

from lightning_hessian.curvature.context import analysis_mode, exact_float32, preserved_state

__all__ = ["analysis_mode", "exact_float32", "preserved_state"]
