"""lightning-hessian: Hessian-based analysis of large-batch training and adversarial robustness."""

__version__ = "0.1.0"

__all__ = ["__version__"]
