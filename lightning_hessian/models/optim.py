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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_hessian.errors import UserInputError

__all__ = ["LR_SCALING_RULES", "LR_SCHEDULES", "OPTIMIZERS", "lr_multiplier", "scaled_learning_rate"]

LR_SCALING_RULES: tuple[str, ...] = ("linear", "sqrt", "none")
LR_SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def _check_name(kind: str, name: str, valid: Sequence[str]) -> None:
    if name not in valid:
        raise UserInputError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")


def scaled_learning_rate(base_lr: float, batch_size: int, base_batch_size: int, rule: str) -> float:
    """``base_lr * f(batch_size / base_batch_size)`` for the scaling rule ``rule``.

    Raises:
        ValueError: unknown rule or non-positive sizes.
    """
    _check_name("LR scaling rule", rule, LR_SCALING_RULES)
    if batch_size < 1 or base_batch_size < 1:
        raise UserInputError(f"batch sizes must be positive, got batch_size={batch_size}, base_batch_size={base_batch_size}")
    ratio = batch_size / base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
    return base_lr * factor


def lr_multiplier(
    step: int,
    *,
    total_steps: int | float,
    warmup_steps: int = 0,
    schedule: str = "constant",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The schedule multiplier ``m(step)`` (see the module docstring); ``step`` counts from 0.

    Args:
        step: optimiser step.
        total_steps: steps of the whole run (needed by ``cosine``; may be ``inf`` otherwise).
        warmup_steps: length of the linear warm-up.
        schedule: ``constant``, ``step`` or ``cosine``.
        milestones: steps at which ``step`` multiplies the rate by ``gamma``.
        gamma: decay factor of ``step``.
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
