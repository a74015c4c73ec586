"""Run foolbox 3.3.4 attacks on a PyTorch model with foolbox's traps handled.

The traps (measured, see ``docs/design.md``, "foolbox 3.3.4") and what :func:`run_foolbox_attack` does about them:

- ``fb.PyTorchModel`` moves the model to ``cuda:0`` when no device is given: we pass the
  inputs' device.
- eagerpy computes gradients with ``loss.backward()``, which accumulates into the parameters'
  ``.grad``: parameters are frozen (``requires_grad=False``) during the attack, and every
  ``.grad`` is restored bit for bit afterwards (:func:`~lightning_hessian.curvature.context.preserved_state`).
- it only warns on train-mode models: the model runs in eval mode (each module's flag restored).
- tensors created under ``torch.inference_mode`` (``trainer.validate``/``test``) cannot enter
  autograd: inference mode is switched off, gradients on, and the inputs cloned.
- inputs outside the bounds fail with a bare ``assert``: we raise a clear error first.
- PGD's default step (``epsilon / 30`` for Linf) is too small for few steps: the step is always
  set explicitly, relative (``2.5 / steps``, so one foolbox call serves every epsilon) or absolute.
- fixed-epsilon attacks run once per epsilon inside foolbox anyway, but all epsilons go in one
  call; minimal-perturbation attacks (DeepFool, CW) run once and are clipped to each epsilon.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_hessian.attacks.native import eval_mode, frozen_parameters, perturbation_norms
from lightning_hessian.attacks.specs import AttackSpec
from lightning_hessian.curvature.context import preserved_state

__all__ = ["AttackOutcome", "check_inputs_in_bounds", "foolbox_attack", "run_foolbox_attack"]


@dataclass
class AttackOutcome:
    """Per-sample result of one attack on one batch.

    Attributes:
        robust_correct: ``(K, N)`` bool, sample ``n`` is classified correctly *and* the attack
            at epsilon ``k`` failed (so a misclassified clean sample is never robust).
        clean_correct: ``(N,)`` bool, the clean prediction is correct.
        norms: for minimal-perturbation attacks, ``(N,)`` norm of the smallest adversarial
            perturbation found: 0 for misclassified clean samples, ``inf`` where none was found;
            ``None`` for fixed-epsilon attacks.
    """

    robust_correct: Tensor
    clean_correct: Tensor
    norms: Tensor | None = None


def check_inputs_in_bounds(inputs: Tensor, bounds: tuple[float, float]) -> None:
    """Raise a clear error if ``inputs`` leave ``bounds`` (foolbox would fail on an assert)."""
    lower, upper = bounds
    low, high = inputs.min().item(), inputs.max().item()
    if low < lower or high > upper:
        raise ValueError(
            f"attack inputs lie in [{low:.4g}, {high:.4g}], outside the bounds [{lower}, {upper}]. Attacks work "
            "in pixel space: keep the data module's normalisation inside the model (e.g. a Normalize layer "
            "in forward), or give the callback the data's normalisation (mean=..., std=...)"
        )


def foolbox_attack(spec: AttackSpec):  # -> foolbox.attacks.base.Attack (foolbox imported lazily)
    """The foolbox attack object for ``spec``, every step size set explicitly."""
    import foolbox as fb

    if spec.name == "fgsm":
        return fb.attacks.LinfFastGradientAttack(random_start=False)
    if spec.name in ("linf_pgd", "l2_pgd"):
        cls = fb.attacks.LinfPGD if spec.name == "linf_pgd" else fb.attacks.L2PGD
        steps = spec.num_steps
        if spec.step_size is None:  # relative step: one attack object serves every epsilon
            return cls(rel_stepsize=2.5 / steps, steps=steps, random_start=spec.random_start)
        return cls(abs_stepsize=spec.step_size, steps=steps, random_start=spec.random_start)
    if spec.name in ("linf_deepfool", "l2_deepfool"):
        deepfool = fb.attacks.LinfDeepFoolAttack if spec.name == "linf_deepfool" else fb.attacks.L2DeepFoolAttack
        return deepfool(steps=spec.num_steps, candidates=spec.candidates, overshoot=spec.overshoot)
    if spec.name == "l2_cw":
        return fb.attacks.L2CarliniWagnerAttack(
            binary_search_steps=spec.binary_search_steps,
            steps=spec.num_steps,
            stepsize=spec.step_size if spec.step_size is not None else 1e-2,
            initial_const=spec.initial_const,
        )
    raise ValueError(f"no foolbox attack for {spec.name!r}")  # pragma: no cover - AttackSpec validates


@contextlib.contextmanager
def _foolbox_guard(model: nn.Module) -> Iterator[None]:
    """Gradients on (even under inference mode), eval mode, frozen parameters, ``.grad`` restored."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_state(model, rng=False))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(eval_mode(model))
        stack.enter_context(frozen_parameters(model))
        yield


def run_foolbox_attack(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    spec: AttackSpec,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> AttackOutcome:
    """Attack ``(inputs, targets)`` with foolbox at every epsilon of ``spec``.

    Args:
        model: maps inputs in ``bounds`` to logits (any normalisation inside it). Its modes,
            ``requires_grad`` flags and ``.grad`` are unchanged afterwards.
        inputs: a batch inside ``bounds``, on the model's device.
        targets: integer labels.
        spec: the attack and its epsilons/parameters.
        bounds: the input range.

    Returns:
        :class:`AttackOutcome`; ``norms`` for DeepFool/CW.
    """
    import foolbox as fb

    check_inputs_in_bounds(inputs, bounds)
    with _foolbox_guard(model):
        x = inputs.detach().clone()
        y = targets.detach().clone()
        fmodel = fb.PyTorchModel(model, bounds=bounds, device=x.device)
        attack = foolbox_attack(spec)
        epsilons = list(spec.epsilons)
        with torch.no_grad():
            clean_correct = model(x).argmax(dim=-1) == y
        if spec.info.minimal:
            # None first: the unclipped minimal perturbation, then its clips to every epsilon
            raw, _, success = attack(fmodel, x, y, epsilons=[None, *epsilons])
            found = success[0]
            norms = perturbation_norms(raw[0] - x, spec.info.norm)
            norms = torch.where(found, norms, torch.full_like(norms, float("inf")))
            norms = torch.where(clean_correct, norms, torch.zeros_like(norms))
            success = success[1:]
        else:
            _, _, success = attack(fmodel, x, y, epsilons=epsilons)
            norms = None
        robust_correct = clean_correct.unsqueeze(0) & ~success
    return AttackOutcome(robust_correct=robust_correct, clean_correct=clean_correct, norms=norms)
