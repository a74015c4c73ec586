"""models layer of lightning_hessian: the image classifier, its architectures and LR rules."""

from lightning_hessian.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    Normalize,
    build_architecture,
    make_activation,
    register_architecture,
)
from lightning_hessian.models.classifier import ImageClassifier
from lightning_hessian.models.optim import (
    LR_SCALING_RULES,
    LR_SCHEDULES,
    OPTIMIZERS,
    lr_multiplier,
    scaled_learning_rate,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "ImageClassifier",
    "LR_SCALING_RULES",
    "LR_SCHEDULES",
    "Normalize",
    "OPTIMIZERS",
    "build_architecture",
    "lr_multiplier",
    "make_activation",
    "register_architecture",
    "scaled_learning_rate",
]
