"""Keskar et al.'s epsilon-sharpness (ICLR 2017, "On Large-Batch Training for Deep Learning").

    phi(theta, eps) = 100 * (max_{y in C_eps} L(theta + y) - L(theta)) / (1 + L(theta)),
    C_eps = { y : |y_i| <= eps * (|theta_i| + 1) }   (the full space, A = I)

the relative loss increase, in percent, that the worst perturbation inside a box scaled to the
weights can cause. Keskar et al. maximise with L-BFGS-B; here the maximisation is projected
sign-gradient ascent (the steepest ascent for a box, like PGD for an L-infinity ball): from
``y = 0``, ``y <- clip(y + step * bound * sign(grad), -bound, bound)``. The largest loss seen over
the iterations is reported, so the value is a lower bound on the true maximum that grows with
``steps``, the same as for any iterative maximiser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.curvature.objective import BatchLoss, BatchLossModule
from lightning_hessian.curvature.objective import batch_loss as default_batch_loss
from lightning_hessian.landscape.evaluation import autograd_ready, batch_size

__all__ = ["SharpnessResult", "epsilon_sharpness"]


@dataclass
class SharpnessResult:
    """``sharpness`` in percent, the loss at ``theta`` and the largest loss found in the box."""

    sharpness: float
    loss: float
    max_loss: float
    steps: int


def _loss_and_grads(
    model: nn.Module,
    names: list[str],
    center: list[Tensor],
    offsets: list[Tensor],
    batches: Sequence[Any],
    batch_loss: BatchLoss,
    all_reduce: Callable[[Tensor], Tensor] | None,
    need_grad: bool,
) -> tuple[float, list[Tensor]]:
    """Sample-mean loss at ``center + offsets`` and its gradient w.r.t. the offsets."""
    grads = [torch.zeros_like(o, dtype=torch.float64) for o in offsets]
    loss_sum = torch.zeros((), dtype=torch.float64, device=offsets[0].device)
    count: float = 0  # the local sample count, then (all-reduced) the global one
    for batch in batches:
        n = batch_size(batch)
        leaves = [o.detach().requires_grad_(need_grad) for o in offsets]
        params = {name: c + o for name, c, o in zip(names, center, leaves, strict=True)}
        loss = _call_loss(model, params, batch, batch_loss)
        if need_grad:
            for total, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True), strict=True):
                if g is not None:
                    total.add_(g.double(), alpha=n)
        loss_sum = loss_sum + n * loss.detach().double()
        count += n
    if all_reduce is not None:
        flat = torch.cat(
            [loss_sum.reshape(1), torch.tensor([float(count)], dtype=torch.float64, device=loss_sum.device)]
            + ([g.reshape(-1) for g in grads] if need_grad else [])
        )
        flat = all_reduce(flat)
        loss_sum, count_t = flat[0], flat[1]
        offset = 2
        if need_grad:
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        count = float(count_t)
    return float(loss_sum) / count, grads


def _call_loss(model: nn.Module, params: dict[str, Tensor], batch: Any, batch_loss: BatchLoss) -> Tensor:
    wrapper = BatchLossModule(model, batch_loss)
    return functional_call(wrapper, {f"inner.{k}": v for k, v in params.items()}, (batch,))


def epsilon_sharpness(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    epsilon: float = 1e-3,
    steps: int = 10,
    step_size: float | None = None,
    batch_loss: BatchLoss | None = None,
    params: Iterable[str] | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> SharpnessResult:
    """Keskar's epsilon-sharpness of ``model`` on ``batches`` (percent; see the module docstring).

    Args:
        model: the module (in eval mode for BatchNorm nets); not modified (the perturbation goes
            through ``functional_call``), ``.grad`` untouched.
        batches: micro-batches; the loss is their sample-weighted mean.
        epsilon: box size relative to ``|theta_i| + 1`` (Keskar et al. use 1e-3 and 5e-4).
        steps: ascent iterations (each one forward and backward pass over ``batches``).
        step_size: step as a fraction of the box half-width; ``2.5 / steps`` by default.
        batch_loss: the batch-mean loss; cross-entropy by default.
        params: names of the perturbed parameters; all trainable ones by default.
        all_reduce: sums a tensor over processes (DDP), ``None`` for one process.

    Returns:
        A :class:`SharpnessResult`: the sharpness in percent, the loss at ``theta`` and the largest
        loss found in the box.

    Raises:
        ValueError: if ``epsilon``, ``steps`` or ``step_size`` is not positive.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon={epsilon} must be > 0")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    step_size = 2.5 / steps if step_size is None else step_size
    if step_size <= 0:
        raise ValueError(f"step_size={step_size} must be > 0")
    batch_loss = batch_loss or default_batch_loss
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if params is None else list(params)
    center = [named[n].detach() for n in names]
    batches = [autograd_ready(b) for b in batches]
    bounds = [epsilon * (c.abs() + 1) for c in center]
    offsets = [torch.zeros_like(c) for c in center]
    with torch.inference_mode(False), torch.enable_grad():
        base_loss, grads = _loss_and_grads(model, names, center, offsets, batches, batch_loss, all_reduce, True)
        best = base_loss
        for step in range(steps):
            with torch.no_grad():
                for o, g, b in zip(offsets, grads, bounds, strict=True):
                    o.add_(step_size * b * torch.sign(g).to(o.dtype))
                    torch.maximum(torch.minimum(o, b), -b, out=o)
            last = step == steps - 1
            loss, grads = _loss_and_grads(model, names, center, offsets, batches, batch_loss, all_reduce, not last)
            best = max(best, loss)
    return SharpnessResult(
        sharpness=100.0 * (best - base_loss) / (1.0 + base_loss), loss=base_loss, max_loss=best, steps=steps
    )
