"""Robust accuracy of a model under an :class:`~lightning_hessian.attacks.specs.AttackSpec`.

:func:`evaluate_attack` dispatches to the native fast path (FGSM and PGD, every epsilon of the
spec stacked into one batched pass of ``batch_size`` samples) or to foolbox
(:func:`~lightning_hessian.attacks.foolbox_adapter.run_foolbox_attack`, every attack). Both
return the same :class:`~lightning_hessian.attacks.foolbox_adapter.AttackOutcome`; the native
FGSM equals foolbox's bit for bit and the native PGD is the same algorithm.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import Tensor, nn

from lightning_hessian.attacks.foolbox_adapter import AttackOutcome, check_inputs_in_bounds, run_foolbox_attack
from lightning_hessian.attacks.native import eval_mode, frozen_parameters, pgd
from lightning_hessian.attacks.specs import AttackSpec

__all__ = ["Backend", "check_logits", "evaluate_attack", "run_native_attack"]

Backend = Literal["native", "foolbox"]


def check_logits(outputs: Tensor, attack_name: str) -> None:
    """Raise if ``outputs`` look like probabilities (non-negative rows summing to one).

    Margin attacks (CW) compare logit differences; on softmax outputs those saturate and the
    attack silently reports nonsense. Log-probabilities are fine (their differences are logit
    differences).

    Raises:
        ValueError: if ``outputs`` is not 2-D (batch, classes) or looks like probabilities.
    """
    outputs = outputs.detach().float()
    if outputs.ndim != 2:
        raise ValueError(f"{attack_name} needs (batch, classes) outputs, got shape {tuple(outputs.shape)}")
    row_sums = outputs.sum(dim=1)
    if bool((outputs >= 0).all()) and torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4):
        raise ValueError(
            f"{attack_name} needs logits, but the model's outputs are probabilities (non-negative rows summing "
            "to 1). Return logits from forward (apply softmax in the loss/metrics instead) or drop this attack"
        )


def _micro_batches(total: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def run_native_attack(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    spec: AttackSpec,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> AttackOutcome:
    """FGSM or PGD at every epsilon of ``spec`` with :func:`~lightning_hessian.attacks.native.pgd`.

    The ``K`` positive epsilons times ``N`` samples are attacked as one stacked set of ``K * N``
    inputs with per-sample epsilons, in micro-batches of ``batch_size``: on a GPU a few large
    batches beat ``K`` passes over small ones. Epsilon 0 is not attacked (:func:`pgd` returns
    the input exactly there, so its robust accuracy is the clean accuracy). Model modes and
    parameter flags are restored on exit; no parameter ``.grad`` is written.

    Returns:
        The :class:`AttackOutcome` (``robust_correct`` of shape ``(len(spec.epsilons), N)``, no
        ``norms``).

    Raises:
        ValueError: if ``spec``'s attack has no native implementation (DeepFool, CW), or
            ``inputs`` lie outside ``bounds``.
    """
    if not spec.info.native:
        raise ValueError(f"attack {spec.name!r} has no native implementation; use backend='foolbox'")
    check_inputs_in_bounds(inputs, bounds)
    num_samples = inputs.shape[0]
    # epsilon 0 allows no perturbation (pgd returns x0 exactly): its row is the clean one, unattacked
    attacked = [k for k, eps in enumerate(spec.epsilons) if eps > 0]
    epsilons = torch.tensor([spec.epsilons[k] for k in attacked], dtype=inputs.dtype, device=inputs.device)
    step_sizes = torch.tensor(
        [spec.pgd_step_size(spec.epsilons[k]) for k in attacked], dtype=inputs.dtype, device=inputs.device
    )
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), frozen_parameters(model):
        x = inputs.detach().clone()
        y = targets.detach().clone()
        with torch.no_grad():
            clean_correct = torch.cat(
                [model(x[part]).argmax(dim=-1) == y[part] for part in _micro_batches(num_samples, batch_size)]
            )
        robust_correct = torch.empty(len(attacked) * num_samples, dtype=torch.bool, device=x.device)
        for part in _micro_batches(robust_correct.numel(), batch_size):
            index = torch.arange(part.start, part.stop, device=x.device)
            sample, which = index % num_samples, index // num_samples
            x_adv = pgd(
                model,
                x[sample],
                y[sample],
                epsilons[which],
                steps=spec.num_steps,
                step_size=step_sizes[which],
                norm=spec.info.norm,
                random_init=spec.random_start and spec.name != "fgsm",
                bounds=bounds,
                generator=generator,
            )
            with torch.no_grad():
                robust_correct[part] = model(x_adv).argmax(dim=-1) == y[sample]
    robust = clean_correct.unsqueeze(0).repeat(len(spec.epsilons), 1)
    robust[attacked] &= robust_correct.view(len(attacked), num_samples)
    return AttackOutcome(robust_correct=robust, clean_correct=clean_correct)


def evaluate_attack(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    spec: AttackSpec,
    *,
    backend: Backend = "native",
    bounds: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> AttackOutcome:
    """Attack ``(inputs, targets)`` with ``spec``: natively where possible and asked, else foolbox.

    Args:
        model: maps inputs in ``bounds`` to logits; left in the state it came in.
        inputs: the samples (pixel space), on the model's device.
        targets: integer labels.
        spec: attack name, epsilons and parameters.
        backend: ``"native"`` runs FGSM/PGD with this package's implementation (DeepFool and CW
            always go through foolbox); ``"foolbox"`` runs everything through foolbox.
        bounds: the input range.
        batch_size: micro-batch size (foolbox runs are split the same way).
        generator: random generator of the native PGD start (foolbox uses the global one).

    Returns:
        The :class:`AttackOutcome` of all samples (``norms`` for DeepFool/CW).

    Raises:
        ValueError: for an unknown ``backend``, or ``inputs`` outside ``bounds``.
    """
    if backend not in ("native", "foolbox"):
        raise ValueError(f"unknown backend {backend!r}; valid backends: 'native', 'foolbox'")
    if backend == "native" and spec.info.native:
        return run_native_attack(
            model, inputs, targets, spec, bounds=bounds, batch_size=batch_size, generator=generator
        )
    outcomes = [
        run_foolbox_attack(model, inputs[part], targets[part], spec, bounds=bounds)
        for part in _micro_batches(inputs.shape[0], batch_size)
    ]
    # every outcome has norms or none has: that depends on the attack (spec.info.minimal) only
    norms = None if outcomes[0].norms is None else torch.cat(cast(list[Tensor], [o.norms for o in outcomes]))
    return AttackOutcome(
        robust_correct=torch.cat([outcome.robust_correct for outcome in outcomes], dim=1),
        clean_correct=torch.cat([outcome.clean_correct for outcome in outcomes]),
        norms=norms,
    )
