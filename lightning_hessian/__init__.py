"""lightning-hessian: Hessian-based analysis of large-batch training and adversarial robustness.

The public API; each name is documented in its module and in the README.
"""

from lightning_hessian.attacks import AdversarialTraining, AttackSpec, fgsm, pgd
from lightning_hessian.callbacks import (
    AdaptiveBatchSizeCallback,
    AdversarialRobustnessCallback,
    EpochAnalysisCallback,
    HessianSpectrumCallback,
    LossLandscapeCallback,
    batch_loss,
)
from lightning_hessian.curvature import (
    HessianOperator,
    analysis_mode,
    hessian_trace,
    input_curvature,
    input_gradient_norms,
    input_hessian_eigenvalues,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.curvature.objective import batch_accuracy, inputs_and_targets
from lightning_hessian.data import CIFAR10, CIFAR100, MNIST, Digits, FashionMNIST
from lightning_hessian.errors import InputNotFoundError, UserInputError
from lightning_hessian.landscape import epsilon_sharpness, interpolation_path, loss_curve, loss_surface
from lightning_hessian.models import ImageClassifier

__version__ = "0.1.0"

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "AdaptiveBatchSizeCallback",
    "AdversarialRobustnessCallback",
    "AdversarialTraining",
    "AttackSpec",
    "Digits",
    "EpochAnalysisCallback",
    "FashionMNIST",
    "HessianOperator",
    "HessianSpectrumCallback",
    "ImageClassifier",
    "InputNotFoundError",
    "LossLandscapeCallback",
    "UserInputError",
    "__version__",
    "analysis_mode",
    "batch_accuracy",
    "batch_loss",
    "epsilon_sharpness",
    "fgsm",
    "hessian_trace",
    "input_curvature",
    "input_gradient_norms",
    "input_hessian_eigenvalues",
    "inputs_and_targets",
    "interpolation_path",
    "loss_curve",
    "loss_surface",
    "pgd",
    "spectral_density",
    "top_eigenvalues",
]
