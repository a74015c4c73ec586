"""Large-batch learning-rate rules: batch-size scaling, linear warm-up, step/cosine decay.

The learning rate at optimiser step ``t`` is

.. math::

    \\eta_t = \\eta_{\\text{base}}\\, f\\!\\left(\\frac{B}{B_{\\text{base}}}\\right) m(t),

where ``B`` is the global batch (all devices, all accumulated micro-batches), ``f`` is the
scaling rule (``linear``: ``f(k) = k``, Goyal et al. 2017; ``sqrt``: ``f(k) = sqrt(k)``, Krizhevsky
2014 / Hoffer et al. 2017; ``none``: ``f(k) = 1``) and ``m(t)`` the schedule multiplier: a linear
warm-up ``m(t) = (t + 1) / T_w`` for the first ``T_w`` steps, then ``constant`` (1), ``step``
(``gamma ** (number of milestones <= t)``) or ``cosine``
(``(1 + cos(pi (t - T_w) / (T - T_w))) / 2`` over the ``T`` total steps).

The optimisers (:func:`build_optimizer`) are ``sgd`` and ``adam`` (``torch.optim``, every parameter
decayed) and the layer-wise adaptive large-batch optimisers ``lars`` (You et al. 2017, "Large Batch
Training of Convolutional Networks") and ``lamb`` (You et al. 2019/2020, "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes"), taken from ``pytorch-optimizer``
(``pytorch_optimizer.LARS``, ``pytorch_optimizer.Lamb``) over the two groups of
:func:`parameter_groups`: weight matrices and kernels decayed and adapted, biases and BatchNorm
parameters (all 1-D) neither.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_hessian.errors import UserInputError

__all__ = [
    "DEFAULT_TRUST_COEFFICIENT",
    "LR_SCALING_RULES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "build_optimizer",
    "check_optimizer_settings",
    "lr_multiplier",
    "parameter_groups",
    "scaled_learning_rate",
]

LR_SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
LR_SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "lars", "lamb")
# LARS's trust coefficient eta (You et al. 2017, also pytorch-optimizer's default).
DEFAULT_TRUST_COEFFICIENT: float = 1e-3
# LAMB's second-moment decay and epsilon (You et al. 2019's values; momentum is its beta1).
LAMB_BETA2: float = 0.999
LAMB_EPS: float = 1e-6


def _check_name(kind: str, name: str, valid: Sequence[str]) -> None:
    if name not in valid:
        raise UserInputError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """``base_lr * f(batch_size / base_batch_size)`` for the scaling rule ``rule``.

    Returns:
        The scaled learning rate.

    Raises:
        UserInputError: (a ``ValueError``) unknown rule or non-positive sizes.
    """
    _check_name("LR scaling rule", rule, LR_SCALING_RULES)
    if batch_size < 1 or base_batch_size < 1:
        raise UserInputError(
            f"batch sizes must be positive, got batch_size={batch_size}, base_batch_size={base_batch_size}"
        )
    ratio = batch_size / base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
    return base_lr * factor


def lr_multiplier(
    step: float,
    *,
    total_steps: int | float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The schedule multiplier ``m(step)`` (see the module docstring); ``step`` counts from 0.

    Args:
        step: optimiser step (fractional on a rescaled clock, as ``ImageClassifier``'s schedule).
        total_steps: steps of the whole run (needed by ``cosine``; may be ``inf`` otherwise).
        warmup_steps: length of the linear warm-up.
        schedule: ``constant``, ``step`` or ``cosine``.
        milestones: steps at which ``step`` multiplies the rate by ``gamma``.
        gamma: decay factor of ``step``.

    Returns:
        The multiplier of the peak learning rate at ``step``.

    Raises:
        UserInputError: (a ``ValueError``) an unknown schedule, or ``cosine`` with infinite ``total_steps``.
    """
    _check_name("LR schedule", schedule, LR_SCHEDULES)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return gamma ** sum(1 for milestone in milestones if step >= milestone)
    if schedule == "cosine":
        if not math.isfinite(total_steps):
            raise UserInputError("the cosine schedule needs a finite number of steps (set max_epochs or max_steps)")
        span = max(1.0, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def check_optimizer_settings(name: str, *, nesterov: bool, trust_coefficient: float) -> None:
    """Refuse an unknown optimiser and settings that do not apply to it (before training starts).

    ``trust_coefficient`` belongs to ``lars`` only (``lamb``'s trust ratio has no coefficient), so a
    value other than :data:`DEFAULT_TRUST_COEFFICIENT` with another optimiser is refused rather than
    ignored; ``nesterov`` is refused with ``lamb`` (Adam moments: ``momentum`` is its ``beta1``).

    Raises:
        UserInputError: naming the bad value and the fix.
    """
    _check_name("optimizer", name, OPTIMIZERS)
    if not (isinstance(trust_coefficient, (int, float)) and math.isfinite(trust_coefficient) and trust_coefficient > 0):
        raise UserInputError(
            f"trust_coefficient must be a positive number, got {trust_coefficient}; "
            f"LARS's usual value is {DEFAULT_TRUST_COEFFICIENT} (You et al. 2017)"
        )
    if name != "lars" and trust_coefficient != DEFAULT_TRUST_COEFFICIENT:
        raise UserInputError(
            f"trust_coefficient={trust_coefficient} is LARS's, optimizer {name!r} has none "
            "(LAMB's trust ratio is min(||w||, 10) / ||update||): use optimizer lars, "
            f"or leave trust_coefficient at its default {DEFAULT_TRUST_COEFFICIENT}"
        )
    if name == "lamb" and nesterov:
        raise UserInputError(
            "nesterov=True does not apply to optimizer 'lamb' (Adam moments; momentum is its beta1): "
            "set nesterov false, or use optimizer sgd or lars for Nesterov momentum"
        )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The two parameter groups of the large-batch optimisers ``lars`` and ``lamb``.

    * ``decay`` (``adapt: True``): parameters of two or more dimensions (conv kernels, weight
      matrices), with ``weight_decay`` and the layer-wise trust-ratio adaptation;
    * ``no_decay`` (``adapt: False``): 1-D and scalar parameters (biases, BatchNorm scales and
      shifts), without weight decay or adaptation: plain momentum SGD under ``lars``, a plain
      Adam-style step under ``lamb``.

    This split by dimension is the usual one (You et al.; Goyal et al. 2017 for the decay) and also
    exactly the rule ``pytorch_optimizer.LARS`` applies itself (it adapts and decays only
    ``p.ndim > 1``); ``lamb`` gets it through the group flag ``adam`` (:func:`build_optimizer`).
    Frozen parameters (``requires_grad=False``) are left out and empty groups dropped. The group
    ``name`` is what ``LearningRateMonitor`` logs (``lr-LARS/decay``, ``lr-LARS/no_decay``).

    Returns:
        The non-empty groups among ``decay`` and ``no_decay``, in that order.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "adapt": True},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "adapt": False},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    trust_coefficient: float = DEFAULT_TRUST_COEFFICIENT,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``model``'s parameters, at the (peak) learning rate ``lr``.

    * ``sgd``: ``torch.optim.SGD`` (``nesterov`` only with ``momentum > 0``), ``adam``:
      ``torch.optim.Adam`` with ``betas=(momentum, 0.999)``; both decay every parameter (one group).
    * ``lars``: ``pytorch_optimizer.LARS`` over :func:`parameter_groups`. Per weight tensor ``w``
      with gradient ``g``: local rate ``lambda = trust_coefficient * ||w|| / (||g|| + weight_decay *
      ||w||)`` (1 where ``||w||`` or the denominator is 0), direction ``d = lambda * (g +
      weight_decay * w)``; 1-D parameters: ``d = g``. Then momentum SGD as ``torch.optim.SGD``:
      ``buf = momentum * buf + d`` (``buf = d`` at the first step), ``w -= lr * buf`` (Nesterov:
      ``w -= lr * (d + momentum * buf)``). The global rate sits outside the momentum buffer (as in
      ``torch.optim.SGD``), where You et al.'s Algorithm 1 folds it in: the same under a constant
      rate.
    * ``lamb``: ``pytorch_optimizer.Lamb`` over :func:`parameter_groups`, ``betas=(momentum,
      LAMB_BETA2)``, ``eps=LAMB_EPS``, weight decay added to the Adam direction ``r = m / (sqrt(v) +
      eps)`` before the trust ratio (the paper's ``r + lambda w``; ``weight_decouple=False``), step
      ``w -= lr * min(||w||, 10) / (||r + lambda w|| + eps) * (r + lambda w)``; the library keeps
      uncorrected moments (the paper's v3 update) and ``adam_debias=True`` leaves the step at ``lr``
      rather than ``lr / (1 - beta1^t)`` (the trust ratio fixes the step's size anyway). The
      ``no_decay`` group runs with ``adam=True``: trust ratio 1, ``w -= lr * m / (sqrt(v) + eps)``,
      without bias correction up to ~6x Adam's step early on (within 30% after 1000 steps).

    An unknown name or settings that do not apply raise :class:`~lightning_hessian.errors.UserInputError`
    (:func:`check_optimizer_settings`).

    Returns:
        The optimiser.
    """
    check_optimizer_settings(name, nesterov=nesterov, trust_coefficient=trust_coefficient)
    nesterov = nesterov and momentum > 0
    if name == "sgd":
        # Batch norm and bias parameters are decayed too, as in the paper's and Goyal et al.'s setups.
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    # Imported here: only these two need pytorch-optimizer (a dependency; its import costs a little).
    from pytorch_optimizer import LARS, Lamb

    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(
            groups, lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
            weight_decay=weight_decay, trust_coefficient=trust_coefficient,
        )  # fmt: skip
    for group in groups:
        group["adam"] = not group["adapt"]  # Lamb's per-group switch: trust ratio 1 (no adaptation)
    return Lamb(
        groups, lr=lr, betas=(momentum, LAMB_BETA2), eps=LAMB_EPS, weight_decay=weight_decay,
        weight_decouple=False, adam_debias=True,
    )  # fmt: skip
