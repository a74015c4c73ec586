"""attacks layer of lightning_hessian: native FGSM/PGD, robust-training losses, a foolbox adapter.

Pure torch (plus foolbox for evaluation); imports only :mod:`lightning_hessian.curvature`.
"""

from lightning_hessian.attacks.evaluation import check_logits, evaluate_attack, run_native_attack
from lightning_hessian.attacks.foolbox_adapter import AttackOutcome, run_foolbox_attack
from lightning_hessian.attacks.native import (
    fgsm,
    forward_in_micro_batches,
    input_gradient,
    perturbation_norms,
    pgd,
    random_start,
)
from lightning_hessian.attacks.specs import ATTACKS, AttackInfo, AttackSpec
from lightning_hessian.attacks.training import ADVERSARIAL_TRAINING_METHODS, AdversarialTraining, TrainingLoss

__all__ = [
    "ADVERSARIAL_TRAINING_METHODS",
    "ATTACKS",
    "AdversarialTraining",
    "AttackInfo",
    "AttackOutcome",
    "AttackSpec",
    "TrainingLoss",
    "check_logits",
    "evaluate_attack",
    "fgsm",
    "forward_in_micro_batches",
    "input_gradient",
    "perturbation_norms",
    "pgd",
    "random_start",
    "run_foolbox_attack",
    "run_native_attack",
]
