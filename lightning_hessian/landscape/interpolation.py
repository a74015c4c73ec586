"""Loss along the straight line between two models (Goodfellow et al. 2015; Keskar et al. 2017).

``theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B``: ``alpha = 0`` is model A, ``alpha = 1``
model B, and ``alpha`` outside ``[0, 1]`` extrapolates. Every floating-point entry of the state
dict is interpolated, parameters *and* buffers: BatchNorm running means and variances follow the
path (interpolating the weights alone and keeping A's statistics makes B's end point wrong).
Integer buffers (BatchNorm's ``num_batches_tracked``) are taken from A.

BatchNorm statistics (``batch_norm``): ``"interpolate"`` uses the interpolated running statistics
(variances clamped at zero), exact at both end points; ``"recompute"`` gives every point the
statistics of its own weights on data (:func:`~lightning_hessian.landscape.batch_norm.recompute_batch_norm_statistics`),
which is what a model at ``theta(alpha)`` would be evaluated with, and the only meaningful choice
outside ``[0, 1]``, where interpolated variances fall to zero and the loss explodes for that reason
alone. At the end points the recomputed statistics are the models' statistics on that data, not
the ones saved with them.

All points are evaluated with :func:`~lightning_hessian.landscape.evaluation.evaluate_stacked`
(vmap over the stacked state), optionally with the top Hessian eigenvalue at each point, the
curvature along the path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.landscape.batch_norm import has_running_statistics, recompute_batch_norm_statistics
from lightning_hessian.landscape.evaluation import BatchLoss, EvaluationMethod, evaluate_stacked

__all__ = [
    "BatchNormStatistics",
    "InterpolationResult",
    "StateMismatchError",
    "check_state_matches",
    "interpolate_state",
    "interpolation_path",
]


class StateMismatchError(ValueError):
    """A state dict does not fit a model: missing or unexpected keys, or different shapes."""


def check_state_matches(model: nn.Module, state: Mapping[str, Tensor], *, source: str = "state dict") -> None:
    """Raise :class:`StateMismatchError` naming every difference between ``state`` and ``model``.

    Args:
        model: the module the state should load into.
        state: a ``state_dict``-like mapping of names to tensors.
        source: how to name ``state`` in the message (e.g. the checkpoint path).

    Raises:
        StateMismatchError: if ``state`` has missing or unexpected keys or tensors of other shapes.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in {source} vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and isinstance(state[k], Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not match the model's architecture ({type(model).__name__}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        lines.append(
            f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if shapes:
        lines.append(
            f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else "")
        )
    lines.append("Check that the config builds the architecture the checkpoint was trained with.")
    raise StateMismatchError("\n".join(lines))


def _is_variance(name: str) -> bool:
    """BatchNorm's running variance (``running_var``): extrapolation may make it negative."""
    return name.rsplit(".", 1)[-1] == "running_var"


def interpolate_state(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * A + alpha * B`` for floating-point entries; other entries from A.

    Running variances are clamped at zero: outside ``[0, 1]`` the line leaves the set of valid
    variances, and a negative one would make BatchNorm return NaN.

    Returns:
        A new state dict with the keys of ``state_a`` (non-floating entries cloned from A).
    """
    out = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.is_floating_point():
            out[name] = (1 - alpha) * a + alpha * b.to(a)
            if _is_variance(name):
                out[name] = out[name].clamp_min(0)
        else:
            out[name] = a.clone()
    return out


@dataclass
class InterpolationResult:
    """Loss and accuracy (per data split) along ``theta(alpha)``, and optionally curvature."""

    alphas: np.ndarray
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]
    top_eigenvalue: np.ndarray | None = None

    def rows(self) -> list[dict[str, float]]:
        """One dict per alpha: ``alpha``, ``<split>_loss``, ``<split>_accuracy``, ``top_eigenvalue``."""
        rows = []
        for i, alpha in enumerate(self.alphas):
            row = {"alpha": float(alpha)}
            for split in self.loss:
                row[f"{split}_loss"] = float(self.loss[split][i])
                row[f"{split}_accuracy"] = float(self.accuracy[split][i])
            if self.top_eigenvalue is not None:
                row["top_eigenvalue"] = float(self.top_eigenvalue[i])
            rows.append(row)
        return rows


BatchNormStatistics = Literal["interpolate", "recompute"]


def _recomputed_statistics(
    model: nn.Module,
    count: int,
    build_chunk: Callable[[int, int], dict[str, Tensor]],
    batches: Sequence[Any],
    loss: BatchLoss | None,
) -> dict[str, Tensor]:
    """BatchNorm statistics recomputed at each of the ``count`` points (``build_chunk``'s states).

    Returns:
        Per ``running_mean``/``running_var`` buffer name, its values at the points stacked along a
        new first dimension, each recomputed on ``batches`` with that point's weights.
    """
    buffers = {
        f"{prefix}.{name}" if prefix else name: tensor
        for prefix, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, tensor in module.named_buffers(recurse=False)
        if name in ("running_mean", "running_var") and tensor is not None
    }
    values: dict[str, list[Tensor]] = {name: [] for name in buffers}
    state = model.state_dict(keep_vars=True)
    for i in range(count):
        point = {k: v[0] for k, v in build_chunk(i, i + 1).items()}
        with torch.no_grad():
            for k, tensor in state.items():
                if k in point:
                    tensor.copy_(point[k])
        recompute_batch_norm_statistics(model, batches, loss=loss)
        for name, tensor in buffers.items():
            values[name].append(tensor.detach().clone())
    return {name: torch.stack(stacked) for name, stacked in values.items()}


def interpolation_path(
    model: nn.Module,
    state_a: Mapping[str, Tensor],
    state_b: Mapping[str, Tensor],
    alphas: Any,
    data: Mapping[str, Sequence[Any]],
    *,
    batch_loss: BatchLoss | None = None,
    accuracy: bool = True,
    method: EvaluationMethod = "auto",
    chunk_size: int = 8,
    eigenvalues: bool = False,
    eigen_kwargs: Mapping[str, Any] | None = None,
    eigen_split: str | None = None,
    batch_norm: BatchNormStatistics = "interpolate",
    batch_norm_data: Sequence[Any] | None = None,
) -> InterpolationResult:
    """Loss/accuracy of ``model`` with the interpolated states, on each split of ``data``.

    Args:
        model: a module of the architecture both states belong to; evaluated in eval mode and
            left bit-identical.
        state_a, state_b: the two ``state_dict``\\ s (checked against ``model``).
        alphas: the interpolation coefficients.
        data: split name -> micro-batches, e.g. ``{"train": [...], "test": [...]}``.
        batch_loss, accuracy, method, chunk_size: see
            :func:`~lightning_hessian.landscape.evaluation.evaluate_stacked`.
        eigenvalues: also compute the top Hessian eigenvalue at every alpha (Lanczos, on the
            first split of ``data`` or ``eigen_split``).
        eigen_kwargs: options for :func:`lightning_hessian.curvature.top_eigenvalues`.
        batch_norm: ``"interpolate"`` or ``"recompute"`` the BatchNorm running statistics at each
            point (module docstring); no effect on a model without running statistics.
        batch_norm_data: the micro-batches ``"recompute"`` computes them on (default: the
            ``"train"`` split of ``data``, else its first split).

    Returns:
        An :class:`InterpolationResult`: per split, the loss and accuracy at each alpha, and the
        top eigenvalues (NaN where they failed) when ``eigenvalues`` is set.

    Raises:
        ValueError: ``batch_norm`` is neither ``"interpolate"`` nor ``"recompute"``.
    """
    check_state_matches(model, state_a, source="model A")
    check_state_matches(model, state_b, source="model B")
    if batch_norm not in ("interpolate", "recompute"):
        raise ValueError(f"batch_norm={batch_norm!r}: use 'interpolate' or 'recompute'")
    alphas = np.asarray(alphas, dtype=np.float64)
    own = model.state_dict()
    device = next((t.device for t in own.values()), torch.device("cpu"))
    names = [k for k, v in own.items() if v.is_floating_point()]
    a_stack = {k: state_a[k].detach().to(device=device, dtype=own[k].dtype) for k in names}
    b_stack = {k: state_b[k].detach().to(device=device, dtype=own[k].dtype) for k in names}

    recomputed: dict[str, Tensor] = {}  # per BatchNorm buffer, its values at every alpha

    def build_chunk(start: int, stop: int) -> dict[str, Tensor]:
        out = {}
        for k in names:
            if k in recomputed:
                out[k] = recomputed[k][start:stop]
                continue
            weights = torch.as_tensor(alphas[start:stop], dtype=own[k].dtype, device=device)
            weights = weights.reshape(-1, *([1] * own[k].dim()))
            # (1 - w) A + w B is exact at both end points (A + w (B - A) is not at w = 1)
            out[k] = (1 - weights) * a_stack[k].unsqueeze(0) + weights * b_stack[k].unsqueeze(0)
            if _is_variance(k):
                out[k] = out[k].clamp_min(0)
        return out

    losses: dict[str, np.ndarray] = {}
    accuracies: dict[str, np.ndarray] = {}
    with analysis_mode(model, tensors=True):
        if batch_norm == "recompute" and has_running_statistics(model):
            recomputed = _recomputed_statistics(
                model, len(alphas), build_chunk, batch_norm_data or data.get("train") or next(iter(data.values())),
                batch_loss,
            )  # fmt: skip
        for split, batches in data.items():
            losses[split], accuracies[split] = evaluate_stacked(
                model,
                len(alphas),
                build_chunk,
                batches,
                batch_loss=batch_loss,
                accuracy=accuracy,
                method=method,
                chunk_size=chunk_size,
            )
        top = None
        if eigenvalues:
            from lightning_hessian.landscape.directions import eigenvector_directions

            split = eigen_split or next(iter(data))
            top = np.full(len(alphas), math.nan)
            for i, alpha in enumerate(alphas):
                if not math.isfinite(losses[split][i]):  # no curvature to speak of; Lanczos would fail
                    continue
                point = {k: v[0] for k, v in build_chunk(i, i + 1).items()}
                with torch.no_grad():
                    for k, tensor in model.state_dict(keep_vars=True).items():
                        if k in point:
                            tensor.copy_(point[k])
                try:
                    values, _ = eigenvector_directions(
                        model, data[split], 1, batch_loss=batch_loss, **dict(eigen_kwargs or {})
                    )
                except (RuntimeError, ValueError) as error:  # e.g. non-finite HVPs far out on the line
                    warnings.warn(f"top eigenvalue at alpha={alpha:g} failed ({error}); recorded as NaN", stacklevel=2)
                    continue
                top[i] = values[0]
    return InterpolationResult(alphas=alphas, loss=losses, accuracy=accuracies, top_eigenvalue=top)
