"""Native PyTorch gradient attacks: FGSM and projected gradient descent (Linf and L2).

One implementation shared by robust training (:mod:`lightning_hessian.attacks.training`) and
robustness evaluation (the callback's fast path). The update follows foolbox 3.3.4 operation by
operation, so that our FGSM equals foolbox's ``LinfFastGradientAttack`` bit for bit and our PGD is
the same algorithm as its ``LinfPGD``/``L2PGD``:

.. math::

    x_{t+1} = \\Pi_{B_p(x_0, \\epsilon) \\cap [l, u]^n}\\big(x_t + \\alpha\\, d(\\nabla_x L(x_t))\\big),
    \\qquad d(g) = \\operatorname{sign}(g) \\;(L_\\infty), \\quad d(g) = g / \\lVert g \\rVert_2 \\;(L_2),

where :math:`L` is the *summed* cross-entropy of the batch (so that the step does not depend on
the batch size), :math:`\\Pi` first clips the perturbation to the epsilon ball and then the input
to its bounds, and :math:`x_0` optionally starts at a uniform random point of the ball
(Madry et al. 2018). FGSM (Goodfellow et al. 2015) is one Linf step of size epsilon from
:math:`x_0`.

Every function takes gradients with ``torch.autograd.grad`` with respect to the input only: no
parameter ``.grad`` is written. They run the model in whatever mode it is in; callers put it in
eval mode (see :func:`eval_mode`). ``epsilon`` may be a float or a per-sample tensor of shape
``(N,)``, so that several epsilons can be attacked in one batched pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Norm",
    "Objective",
    "cross_entropy_objective",
    "eval_mode",
    "fgsm",
    "forward_in_micro_batches",
    "frozen_parameters",
    "input_gradient",
    "perturbation_norms",
    "pgd",
    "random_start",
]

Norm = Literal["linf", "l2"]
#: Maps the model's output on the perturbed batch to the scalar the attack ascends.
Objective = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag on exit.

    Perturbations are generated with BatchNorm on its running statistics and dropout off: in
    train mode the attack would update the running statistics and see a different function.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.train(flag)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter, restore each flag on exit.

    For evaluation only: the forward pass then records nothing for weight gradients (faster,
    less memory) and libraries that call ``.backward()`` (foolbox) cannot write parameter
    ``.grad``. Robust training does not use it (toggling flags under DDP is not worth the risk;
    ``torch.autograd.grad`` with respect to the input skips weight gradients anyway).
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def cross_entropy_objective(targets: Tensor) -> Objective:
    """The untargeted attack objective: summed cross-entropy of the logits against ``targets``.

    Computed in float32 at least, so that a bf16 model under autocast still gives a usable
    gradient direction.

    Returns:
        The objective ``logits -> summed cross-entropy``, a 0-d float32 tensor.
    """

    def objective(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    return objective


def forward_in_micro_batches(model: nn.Module, inputs: Tensor, micro_batch_size: int | None = None) -> Tensor:
    """``model(inputs)``, computed on slices of ``micro_batch_size`` samples and concatenated.

    The slices are part of one autograd graph, so a gradient through the result is the gradient
    through ``model(inputs)``, provided each sample's output depends only on that sample: refused
    for a model with a BatchNorm layer in training mode (batch statistics would be per slice). It
    saves no memory: every slice's activations are kept until the backward pass.
    Worth it on a CPU when one slice's activations fit the cache and the whole batch's do not: a
    PGD-5 training step of m1 at 16384 samples on one thread was 1.28x faster with the attack in
    slices of 256 (median of 3 rounds on a loaded machine, ``benchmarks/robust_training_step.py``).

    Args:
        model: maps inputs to outputs of one row per sample.
        inputs: the batch, samples along dim 0.
        micro_batch_size: samples per slice; ``None`` (or at least the batch) runs one forward.

    Returns:
        The outputs for all of ``inputs``.

    Raises:
        ValueError: if ``micro_batch_size`` is below 1, or slicing would change a BatchNorm's
            batch statistics.
    """
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    if micro_batch_size is None or micro_batch_size >= inputs.shape[0]:
        return model(inputs)
    training_norms = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if training_norms:
        raise ValueError(
            "micro-batches change the batch statistics of BatchNorm layers in training mode "
            f"({', '.join(training_norms)}); use eval_mode(model) or micro_batch_size=None"
        )
    return torch.cat([model(part) for part in inputs.split(micro_batch_size)])


def input_gradient(
    model: nn.Module, inputs: Tensor, objective: Objective, micro_batch_size: int | None = None
) -> Tensor:
    """The gradient of ``objective(model(inputs))`` with respect to ``inputs`` only.

    ``inputs`` is detached first, so the result does not depend on (nor write into) any graph or
    parameter ``.grad``. Gradients are enabled here, so an outer ``no_grad`` is fine; under
    ``inference_mode`` the caller must leave it first and clone inference tensors.

    Args:
        model: maps inputs to logits.
        inputs: the batch.
        objective: maps the logits of the whole batch to the scalar to differentiate.
        micro_batch_size: forward in slices of this many samples
            (:func:`forward_in_micro_batches`); ``None``: the whole batch at once.

    Returns:
        The gradient, detached, of the shape of ``inputs``.
    """
    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        logits = forward_in_micro_batches(model, leaf, micro_batch_size)
        (gradient,) = torch.autograd.grad(objective(logits), leaf)
    return gradient.detach()


def _per_sample(epsilon: float | Tensor, like: Tensor) -> float | Tensor:
    """A float as it is, a per-sample ``(N,)`` tensor reshaped to broadcast against ``like``."""
    if isinstance(epsilon, Tensor):
        if epsilon.ndim == like.ndim and epsilon.shape[0] == like.shape[0] and epsilon[0].numel() == 1:
            return epsilon  # already reshaped
        if epsilon.ndim != 1 or epsilon.shape[0] != like.shape[0]:
            raise ValueError(f"a per-sample epsilon must have shape ({like.shape[0]},), got {tuple(epsilon.shape)}")
        return epsilon.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return float(epsilon)


def perturbation_norms(delta: Tensor, norm: Norm) -> Tensor:
    """Per-sample ``norm`` of a batch of perturbations, shape ``(N,)``."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    raise ValueError(f"unknown norm {norm!r}; valid norms: 'linf', 'l2'")


def _normalise(gradient: Tensor, norm: Norm) -> Tensor:
    if norm == "linf":
        return gradient.sign()
    norms = perturbation_norms(gradient, "l2").clamp_min(1e-12)  # no division by zero
    return gradient * (1 / norms).view(-1, *([1] * (gradient.ndim - 1)))


def _project(x: Tensor, x0: Tensor, epsilon: float | Tensor, norm: Norm) -> Tensor:
    delta = x - x0
    if norm == "linf":
        if isinstance(epsilon, Tensor):  # maximum/minimum: 4x faster than a broadcasting clamp on CPU
            return x0 + torch.minimum(torch.maximum(delta, -epsilon), epsilon)
        return x0 + torch.clamp(delta, -epsilon, epsilon)
    norms = perturbation_norms(delta, "l2").clamp_min(1e-12)
    shape = (-1, *([1] * (delta.ndim - 1)))
    factor = torch.clamp_max(epsilon / norms.view(shape), 1.0)  # shrink, never grow
    return x0 + delta * factor


def random_start(x0: Tensor, epsilon: float | Tensor, norm: Norm, generator: torch.Generator | None = None) -> Tensor:
    """A point drawn uniformly from the ``norm`` ball of radius ``epsilon`` around ``x0``.

    L2 uses Voelker et al. (2017): the first n coordinates of a uniform point on the (n+2)-sphere
    are uniform in the n-ball. Not clipped to the input bounds (the caller clips).

    Returns:
        The start point, of the shape and dtype of ``x0``.

    Raises:
        ValueError: for an unknown ``norm`` or a per-sample ``epsilon`` of the wrong shape.
    """
    eps = _per_sample(epsilon, x0)
    if norm == "linf":
        unit = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return x0 + (2 * unit - 1) * eps
    if norm == "l2":
        n = x0[0].numel()
        sphere = torch.randn((x0.shape[0], n + 2), generator=generator, device=x0.device, dtype=x0.dtype)
        sphere = sphere / sphere.norm(dim=1, keepdim=True)
        return x0 + eps * sphere[:, :n].reshape(x0.shape)
    raise ValueError(f"unknown norm {norm!r}; valid norms: 'linf', 'l2'")


def pgd(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    epsilon: float | Tensor,
    *,
    steps: int,
    step_size: float | Tensor,
    norm: Norm = "linf",
    random_init: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
    objective: Objective | None = None,
    generator: torch.Generator | None = None,
    micro_batch_size: int | None = None,
) -> Tensor:
    """Projected gradient ascent on ``objective`` inside the ``norm`` ball of radius ``epsilon``.

    Args:
        model: maps inputs to logits; used in its current train/eval mode.
        inputs: clean inputs ``x0`` inside ``bounds``.
        targets: true labels for the default objective (summed cross-entropy); may be ``None``
            when ``objective`` is given.
        epsilon: radius of the ball, a float or per-sample ``(N,)`` tensor.
        steps: number of gradient steps (1 with ``step_size=epsilon`` and no random start is FGSM).
        step_size: absolute step size ``alpha`` (float or per-sample tensor).
        norm: ``"linf"`` (sign steps) or ``"l2"`` (normalised gradient steps).
        random_init: start at a uniform random point of the ball (Madry et al.) instead of ``x0``.
        bounds: the valid input range (pixel space [0, 1] for this package's models).
        objective: the scalar to maximise as a function of the logits; default summed
            cross-entropy against ``targets``.
        generator: random generator for the start point (default: the global one).
        micro_batch_size: forward and backward passes in slices of this many samples (the same
            result for a model in eval mode; :func:`forward_in_micro_batches`); ``None``: the
            whole batch at once.

    Returns:
        The perturbed inputs, detached, same shape and dtype as ``inputs``.

    Raises:
        ValueError: for an unknown ``norm``, ``steps`` below 1, neither ``targets`` nor
            ``objective``, a per-sample ``epsilon``/``step_size`` of the wrong shape, or a
            ``micro_batch_size`` that :func:`forward_in_micro_batches` refuses.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm {norm!r}; valid norms: 'linf', 'l2'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if objective is None:
        if targets is None:
            raise ValueError("pass the true labels as `targets` or a custom `objective`")
        objective = cross_entropy_objective(targets)
    lower, upper = bounds
    x0 = inputs.detach()
    eps = _per_sample(epsilon, x0)
    alpha = _per_sample(step_size, x0)
    x = torch.clamp(random_start(x0, eps, norm, generator), lower, upper) if random_init else x0
    for _ in range(steps):
        direction = _normalise(input_gradient(model, x, objective, micro_batch_size), norm)
        x = x + alpha * direction
        x = _project(x, x0, eps, norm)
        x = torch.clamp(x, lower, upper)
    return x.detach()


def fgsm(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None,
    epsilon: float | Tensor,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    objective: Objective | None = None,
) -> Tensor:
    """Fast gradient sign method: ``clip(x0 + epsilon * sign(grad_x L(x0)))``, one Linf step.

    Equals foolbox 3.3.4's ``LinfFastGradientAttack`` (FGSM) bit for bit on the same model.

    Returns:
        The perturbed inputs, detached, same shape and dtype as ``inputs``.
    """
    return pgd(
        model,
        inputs,
        targets,
        epsilon,
        steps=1,
        step_size=epsilon,
        norm="linf",
        random_init=False,
        bounds=bounds,
        objective=objective,
    )
