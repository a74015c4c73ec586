"""Loss and accuracy at many points of parameter space, many points per forward pass.

A landscape needs the loss at hundreds of parameter sets (a 21 x 21 surface is 441 of them) on
the same data. Writing each set into the model and running a forward pass per point pays the
per-call overhead (Python, kernel launches, small matmuls) once per point and data batch.
Here ``torch.func.vmap`` over ``torch.func.functional_call`` evaluates a *chunk* of parameter
sets in one batched forward pass: linear layers become batched matmuls and convolutions grouped
convolutions over the stacked weights. Nothing is written into the model, so its parameters and
buffers stay bit-identical; chunks bound the memory (activations grow with the chunk size).

Loss of a point: the sample-weighted mean of the micro-batch losses,
``L = sum_b n_b * loss_b / sum_b n_b`` (``loss_b`` a batch mean), the same for accuracy; with
an ``all_reduce`` (sum over processes) the sums run over all ranks' samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_hessian.curvature.batches import batch_size
from lightning_hessian.curvature.objective import BatchLoss, BatchLossModule, batch_loss

__all__ = [
    "BatchLoss",
    "EvaluationMethod",
    "LossCurve",
    "LossSurface",
    "autograd_ready",
    "batch_size",
    "default_batch_loss",
    "evaluate_points",
    "evaluate_stacked",
    "loss_curve",
    "loss_surface",
]

EvaluationMethod = Literal["auto", "vmap", "sequential"]
_METHODS = ("auto", "vmap", "sequential")


def default_batch_loss(module: nn.Module, batch: Any) -> Tensor:
    """Deprecated alias of :func:`lightning_hessian.curvature.objective.batch_loss`."""
    return batch_loss(module, batch)


def autograd_ready(batch: Any) -> Any:
    """``batch`` with every tensor created under ``torch.inference_mode`` cloned.

    Inference tensors cannot be saved for backward; samples collated under
    ``trainer.validate``/``trainer.test`` are such tensors.

    Returns:
        A batch of the same structure (``batch`` itself if it is neither a tensor nor a
        container); tensors that were not inference tensors are the same objects.
    """
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, Mapping):
        mapping_type: Callable[..., Any] = type(batch)  # dict, OrderedDict, ...: built from a dict
        return mapping_type({k: autograd_ready(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(autograd_ready(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(autograd_ready(v) for v in batch)
    return batch


def evaluate_stacked(
    model: nn.Module,
    num_points: int,
    build_chunk: Callable[[int, int], dict[str, Tensor]],
    batches: Sequence[Any],
    *,
    batch_loss: BatchLoss | None = None,
    accuracy: bool = True,
    method: EvaluationMethod = "auto",
    chunk_size: int = 16,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of ``model`` at ``num_points`` parameter/buffer sets.

    ``build_chunk(start, stop)`` returns, for points ``start:stop``, a dict mapping parameter or
    buffer names of ``model`` to tensors with a leading dimension ``stop - start``; names not in
    it keep the model's own values. The model is not modified.

    Args:
        model: the module, already in the mode to evaluate in (eval mode for landscapes).
        num_points: number of points.
        build_chunk: the stacked tensors of a range of points.
        batches: micro-batches; each point's loss is their sample-weighted mean.
        batch_loss: ``batch_loss(module, batch)``, the batch-mean loss; default
            :func:`~lightning_hessian.curvature.objective.batch_loss` (the module's
            ``hessian_loss`` hook, else cross-entropy).
        accuracy: also compute top-1 accuracy
            (:func:`~lightning_hessian.curvature.objective.batch_accuracy`: the module's
            ``hessian_accuracy`` hook; NaN where accuracy is not defined).
        method: ``"vmap"`` (batched over points), ``"sequential"`` (one point per pass) or
            ``"auto"`` (vmap, falling back to sequential with a warning if the model cannot be
            vmapped, e.g. data-dependent control flow or ``.item()`` in ``forward``).
        chunk_size: points per batched pass; halved automatically on an out-of-memory error.
        all_reduce: sums a tensor over processes (DDP); ``None`` for one process.

    Returns:
        ``(loss, accuracy)``, float64 arrays of length ``num_points``.

    Raises:
        ValueError: for an unknown ``method``, a ``chunk_size`` below 1 or no ``batches``.
        torch.OutOfMemoryError: if even one point per pass does not fit in memory.
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not one of {_METHODS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if not batches:
        raise ValueError("evaluate_stacked needs at least one batch of data")
    objective = BatchLossModule(model, batch_loss, accuracy=accuracy)
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    loss_sums = torch.zeros(num_points, dtype=torch.float64, device=device)
    accuracy_sums = torch.zeros(num_points, dtype=torch.float64, device=device)
    sizes = [batch_size(b) for b in batches]

    def run_vmap(stacked: dict[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        prefixed = {f"inner.{name}": value for name, value in stacked.items()}
        return vmap(lambda tensors: functional_call(objective, tensors, (batch,)), in_dims=(0,))(prefixed)

    def run_sequential(stacked: dict[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        count = next(iter(stacked.values())).shape[0] if stacked else 1
        results = [
            functional_call(objective, {f"inner.{n}": v[i] for n, v in stacked.items()}, (batch,)) for i in range(count)
        ]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])

    use_vmap = method in ("auto", "vmap")
    with torch.no_grad():
        start = 0
        while start < num_points:
            stop = min(start + chunk_size, num_points)
            stacked = build_chunk(start, stop)
            try:
                chunk_loss = torch.zeros(stop - start, dtype=torch.float64, device=device)
                chunk_accuracy = torch.zeros_like(chunk_loss)
                for batch, n in zip(batches, sizes, strict=True):
                    runner = run_vmap if use_vmap else run_sequential
                    loss, acc = runner(stacked, batch)
                    chunk_loss += n * loss.to(torch.float64).reshape(-1)
                    chunk_accuracy += n * acc.to(torch.float64).reshape(-1)
            except torch.OutOfMemoryError:
                if chunk_size == 1:
                    raise
                chunk_size = max(1, chunk_size // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            except Exception as error:  # functorch cannot batch some models; fall back, once
                if method != "auto" or not use_vmap:
                    raise
                warnings.warn(
                    f"Evaluating landscape points with vmap failed ({type(error).__name__}: {error}); falling back"
                    " to one point per forward pass, which is slower. Pass method='sequential' to skip vmap.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                use_vmap = False
                continue
            loss_sums[start:stop] = chunk_loss
            accuracy_sums[start:stop] = chunk_accuracy
            start = stop
    count = torch.tensor([float(sum(sizes))], dtype=torch.float64, device=device)
    if all_reduce is not None:
        reduced = all_reduce(torch.cat([loss_sums, accuracy_sums, count]))
        loss_sums, accuracy_sums, count = reduced[:num_points], reduced[num_points:-1], reduced[-1:]
    return (loss_sums / count).cpu().numpy(), (accuracy_sums / count).cpu().numpy()


def _as_coordinates(coordinates: Any, num_directions: int) -> Tensor:
    coords = torch.as_tensor(np.asarray(coordinates, dtype=np.float64))
    if coords.dim() == 1 and num_directions == 1:
        coords = coords[:, None]
    if coords.dim() != 2 or coords.shape[1] != num_directions:
        raise ValueError(f"coordinates must have shape (num_points, {num_directions}), got {tuple(coords.shape)}")
    return coords


def evaluate_points(
    model: nn.Module,
    directions: Sequence[Mapping[str, Tensor]],
    coordinates: Any,
    batches: Sequence[Any],
    *,
    center: Mapping[str, Tensor] | None = None,
    batch_loss: BatchLoss | None = None,
    accuracy: bool = True,
    method: EvaluationMethod = "auto",
    chunk_size: int = 16,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at ``theta_p = center + sum_d coordinates[p, d] * directions[d]``.

    Args:
        model: the module (in eval mode for landscapes); not modified.
        directions: ``D`` directions keyed by parameter name; parameters in none of them stay.
        coordinates: array ``(P, D)`` (or ``(P,)`` for one direction).
        batches: micro-batches of data.
        center: the base point; the model's current parameters by default.
        batch_loss, accuracy, method, chunk_size, all_reduce: see :func:`evaluate_stacked`.

    Returns:
        ``(loss, accuracy)``, float64 arrays of length ``P``.

    Raises:
        ValueError: without directions, if ``coordinates`` is not of shape ``(P, D)``, or as
            :func:`evaluate_stacked` for ``method``, ``chunk_size`` and ``batches``.
        KeyError: if a direction names a parameter the model does not have.
    """
    if not directions:
        raise ValueError("evaluate_points needs at least one direction")
    named = dict(model.named_parameters())
    unknown = [n for d in directions for n in d if n not in named]
    if unknown:
        raise KeyError(f"directions name parameters the model does not have: {unknown[:5]}")
    wanted = {name for d in directions for name in d}
    names = [name for name in named if name in wanted]
    center = {n: named[n].detach() for n in names} if center is None else {n: center[n].detach() for n in names}
    coords = _as_coordinates(coordinates, len(directions))
    # (D, *shape) per parameter; a direction without the parameter contributes zero.
    stacked_directions = {
        n: torch.stack([d[n].to(center[n]) if n in d else torch.zeros_like(center[n]) for d in directions])
        for n in names
    }

    def build_chunk(start: int, stop: int) -> dict[str, Tensor]:
        chunk = coords[start:stop]
        out = {}
        for n in names:
            c = chunk.to(device=center[n].device, dtype=center[n].dtype)
            out[n] = center[n].unsqueeze(0) + torch.tensordot(c, stacked_directions[n], dims=1)
        return out

    return evaluate_stacked(
        model,
        coords.shape[0],
        build_chunk,
        batches,
        batch_loss=batch_loss,
        accuracy=accuracy,
        method=method,
        chunk_size=chunk_size,
        all_reduce=all_reduce,
    )


@dataclass
class LossCurve:
    """Loss and accuracy along one direction: ``L(theta + steps[i] * d)``."""

    name: str
    steps: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    @property
    def center_loss(self) -> float:
        """Loss at the step closest to zero (the model itself when the range contains 0)."""
        return float(self.loss[int(np.argmin(np.abs(self.steps)))])


@dataclass
class LossSurface:
    """Loss and accuracy on a grid: ``loss[i, j] = L(theta + alphas[i] * d1 + betas[j] * d2)``."""

    names: tuple[str, str]
    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.names[0]}_{self.names[1]}"


def loss_curve(
    model: nn.Module,
    direction: Mapping[str, Tensor],
    steps: Any,
    batches: Sequence[Any],
    *,
    name: str = "direction",
    **kwargs: Any,
) -> LossCurve:
    """:class:`LossCurve` along ``direction`` at ``steps``; ``kwargs`` go to :func:`evaluate_points`."""
    steps = np.asarray(steps, dtype=np.float64)
    loss, accuracy = evaluate_points(model, [direction], steps[:, None], batches, **kwargs)
    return LossCurve(name=name, steps=steps, loss=loss, accuracy=accuracy)


def loss_surface(
    model: nn.Module,
    direction_1: Mapping[str, Tensor],
    direction_2: Mapping[str, Tensor],
    alphas: Any,
    betas: Any,
    batches: Sequence[Any],
    *,
    names: tuple[str, str] = ("d1", "d2"),
    **kwargs: Any,
) -> LossSurface:
    """:class:`LossSurface` over the grid ``alphas x betas``; ``kwargs`` go to :func:`evaluate_points`."""
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    coords = np.stack([grid_a.reshape(-1), grid_b.reshape(-1)], axis=1)
    loss, accuracy = evaluate_points(model, [direction_1, direction_2], coords, batches, **kwargs)
    shape = (len(alphas), len(betas))
    return LossSurface(
        names=names, alphas=alphas, betas=betas, loss=loss.reshape(shape), accuracy=accuracy.reshape(shape)
    )
