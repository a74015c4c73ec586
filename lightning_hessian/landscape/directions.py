"""Directions in parameter space along which a loss landscape is drawn.

A direction is a ``dict[str, Tensor]`` keyed by parameter name (the names of
``model.named_parameters()``), the same layout as the eigenvectors of
:func:`lightning_hessian.curvature.top_eigenvalues`. A landscape point is
``theta + sum_i c_i d_i`` for coordinates ``c`` and directions ``d_i``.

Three kinds of direction are provided:

* **top Hessian eigenvectors** (:func:`eigenvector_directions`): unit vectors ``v`` with
  ``H v = lambda v``; along them ``L(theta + t v) ~ L(theta) + t g.v + lambda t^2 / 2``.
* **the gradient** (:func:`gradient_direction`): the steepest-ascent direction of the loss.
* **filter-normalised random directions** (:func:`random_direction`, Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets"): a Gaussian direction whose every filter
  ``d[i]`` (the slice along the output dimension 0 of a weight) is rescaled to the norm of the
  matching filter of the weights, ``d[i] <- d[i] / ||d[i]|| * ||theta[i]||``. One-dimensional
  parameters (biases, BatchNorm/LayerNorm scales and shifts) get zero, as in the paper. This
  removes the scale invariance of ReLU networks, so landscapes of different models compare.

Normalisations (:func:`normalize_direction`): ``"filter"`` (the above, for any direction),
``"unit"`` (Euclidean norm 1 over all parameters; ``t`` is then a distance in parameter space)
and ``"none"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_hessian.curvature import HessianOperator, top_eigenvalues
from lightning_hessian.curvature.objective import BatchLoss
from lightning_hessian.curvature.objective import batch_loss as default_batch_loss
from lightning_hessian.landscape.evaluation import autograd_ready, batch_size

__all__ = [
    "Direction",
    "Normalization",
    "direction_dot",
    "direction_norm",
    "eigenvector_directions",
    "filter_normalize",
    "gradient_direction",
    "normalize_direction",
    "random_direction",
    "trainable_parameters",
    "unit_normalize",
]

Direction = dict[str, Tensor]
Normalization = Literal["filter", "unit", "none"]
_NORMALIZATIONS = ("filter", "unit", "none")


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Detached views of ``model``'s parameters that require gradients, keyed by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def direction_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Inner product ``<a, b>`` over the names both share, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for name, value in a.items():
        if name in b:
            total = total + torch.sum(value.double() * b[name].double()).cpu()
    return float(total)


def direction_norm(direction: Mapping[str, Tensor]) -> float:
    """Euclidean norm of ``direction`` over all its tensors (float64)."""
    return direction_dot(direction, direction) ** 0.5


def unit_normalize(direction: Mapping[str, Tensor]) -> Direction:
    """``direction / ||direction||``; raises for a zero direction."""
    norm = direction_norm(direction)
    if norm == 0.0:
        raise ValueError("Cannot normalise a zero direction to unit length (is the gradient exactly zero?)")
    return {name: value / norm for name, value in direction.items()}


def filter_normalize(direction: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Direction:
    """Li et al.'s filter normalisation of ``direction`` against the weights ``params``.

    For every tensor with two or more dimensions, each slice ``d[i]`` along dimension 0 (a conv
    filter, a row of a linear weight) is scaled to ``||theta[i]||``. Tensors with at most one
    dimension (biases, normalisation-layer parameters) become zero. A zero slice stays zero.

    Returns:
        A new direction with the names and shapes of ``direction``.

    Raises:
        KeyError: if ``direction`` names a tensor that ``params`` lacks.
        ValueError: if a tensor's shape differs from its weight's.
    """
    normalized: Direction = {}
    for name, value in direction.items():
        if name not in params:
            raise KeyError(f"filter_normalize: direction has {name!r}, which is not among the parameters")
        weight = params[name]
        if value.shape != weight.shape:
            raise ValueError(
                f"filter_normalize: {name!r} has shape {tuple(value.shape)} but the weight has {tuple(weight.shape)}"
            )
        if value.dim() <= 1:
            normalized[name] = torch.zeros_like(value)
            continue
        dims = tuple(range(1, value.dim()))
        d_norm = torch.linalg.vector_norm(value, dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(weight.to(value.dtype), dim=dims, keepdim=True)
        scale = torch.where(
            d_norm > 0, w_norm / d_norm.clamp_min(torch.finfo(value.dtype).tiny), torch.zeros_like(d_norm)
        )
        normalized[name] = value * scale
    return normalized


def normalize_direction(
    direction: Mapping[str, Tensor], params: Mapping[str, Tensor], normalization: Normalization
) -> Direction:
    """Apply ``normalization`` (``"filter"``, ``"unit"`` or ``"none"``) to ``direction``."""
    if normalization == "filter":
        return filter_normalize(direction, params)
    if normalization == "unit":
        return unit_normalize(direction)
    if normalization == "none":
        return dict(direction)
    raise ValueError(f"normalization={normalization!r} is not one of {_NORMALIZATIONS}")


def random_direction(
    params: Mapping[str, Tensor],
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    normalization: Normalization = "filter",
) -> Direction:
    """A Gaussian direction over ``params``, normalised (filter-wise by default).

    Drawn on the CPU in float32 with ``generator`` (or a fresh one seeded with ``seed``) and then
    moved to each parameter's device, so the same seed gives the same direction on every device
    and every DDP rank.

    Returns:
        A direction with the names, shapes, dtypes and devices of ``params``.
    """
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0 if seed is None else seed)
    direction = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        for name, p in params.items()
    }
    return normalize_direction(direction, params, normalization)


def gradient_direction(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    batch_loss: BatchLoss | None = None,
    params: Iterable[str] | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    normalization: Normalization = "unit",
) -> Direction:
    """The gradient of the sample-mean loss over ``batches`` w.r.t. ``model``'s parameters.

    The loss of each micro-batch (``batch_loss(model, batch)``, a batch mean; cross-entropy by
    default) is weighted by its size. ``all_reduce`` (a sum over processes) makes the gradient the
    one of the union of all ranks' samples. Uses ``torch.autograd.grad``, never ``.backward()``,
    so ``.grad`` is untouched. Returned normalised with ``normalization`` (unit length by default).

    Returns:
        The (normalised) gradient keyed by parameter name, in each parameter's dtype.

    Raises:
        ValueError: if ``batches`` (on all ranks) hold no sample.
    """
    batch_loss = batch_loss or default_batch_loss
    named = dict(model.named_parameters())
    names = list(trainable_parameters(model)) if params is None else list(params)
    tensors = [named[n] for n in names]
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
    count = 0
    with torch.inference_mode(False), torch.enable_grad():
        for batch in batches:
            batch = autograd_ready(batch)
            n = batch_size(batch)
            loss = batch_loss(model, batch)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total.add_(grad.double(), alpha=n)
            count += n
    if all_reduce is not None:
        flat = all_reduce(
            torch.cat(
                [s.reshape(-1) for s in sums]
                + [torch.tensor([float(count)], dtype=torch.float64, device=sums[0].device)]
            )
        )
        count_total = float(flat[-1])
        offset = 0
        for total in sums:
            total.copy_(flat[offset : offset + total.numel()].view_as(total))
            offset += total.numel()
    else:
        count_total = float(count)
    if count_total == 0:
        raise ValueError("gradient_direction got no samples")
    gradient = {name: (total / count_total).to(t.dtype) for name, total, t in zip(names, sums, tensors, strict=True)}
    return normalize_direction(gradient, {n: t.detach() for n, t in zip(names, tensors, strict=True)}, normalization)


def eigenvector_directions(
    model: nn.Module,
    batches: Sequence[Any],
    k: int,
    *,
    batch_loss: BatchLoss | None = None,
    params: Iterable[str] | None = None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    **eigen_kwargs: Any,
) -> tuple[list[float], list[Direction]]:
    """The ``k`` largest Hessian eigenpairs of the sample-mean loss over ``batches``.

    Delegates to :class:`lightning_hessian.curvature.HessianOperator` and
    :func:`lightning_hessian.curvature.top_eigenvalues` (Lanczos); ``eigen_kwargs`` go to the
    latter.

    Returns:
        The eigenvalues (largest first) and the unit-norm eigenvectors keyed by parameter name.
    """
    named = dict(model.named_parameters())
    names = list(trainable_parameters(model)) if params is None else list(params)
    operator = HessianOperator(
        model,
        None,
        params=[named[n] for n in names],
        batches=list(batches),
        batch_loss=batch_loss or default_batch_loss,
        all_reduce=all_reduce,
    )
    result = top_eigenvalues(operator, k, **eigen_kwargs)
    eigenvalues = [float(v) for v in result.eigenvalues]
    return eigenvalues, [{n: v[n] for n in names} for v in result.eigenvectors]
