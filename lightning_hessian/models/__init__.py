"""models layer of lightning_hessian: the image classifier, its architectures (and Ghost BatchNorm)
and LR rules."""

from lightning_hessian.models.architectures import (
    ACTIVATIONS,
    ARCHITECTURES,
    INITS,
    Normalize,
    build_architecture,
    he_normal_init,
    make_activation,
    register_architecture,
)
from lightning_hessian.models.classifier import ImageClassifier
from lightning_hessian.models.ghost_batch_norm import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    convert_to_ghost_batch_norm,
)
from lightning_hessian.models.optim import (
    LR_SCALING_RULES,
    LR_SCHEDULES,
    OPTIMIZERS,
    build_optimizer,
    lr_multiplier,
    parameter_groups,
    scaled_learning_rate,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "INITS",
    "LR_SCALING_RULES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "ImageClassifier",
    "Normalize",
    "build_architecture",
    "build_optimizer",
    "convert_to_ghost_batch_norm",
    "he_normal_init",
    "lr_multiplier",
    "make_activation",
    "parameter_groups",
    "register_architecture",
    "scaled_learning_rate",
]
