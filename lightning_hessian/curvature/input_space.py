"""Curvature with respect to the input: per-sample ``||grad_x J||`` and extreme eigenvalues of
the input Hessian :math:`\\nabla^2_x J(x, y)` (the paper's :math:`\\lambda_1^x`).

In eval mode samples do not interact, so the Hessian of the summed per-sample losses with respect
to a whole batch of inputs is block diagonal, one block per sample. One Hessian-vector product of
the batch therefore advances an independent Lanczos recurrence for every sample at once; the
gradient graph is built once per batch and reused by every step (double backward).

For a ReLU network with softmax cross-entropy the input Hessian is :math:`J^\\top(\\operatorname{diag}
p - pp^\\top)J`, positive semidefinite: the inner maximisation of robust training has no saddle
points. Twice-differentiable activations (softplus, ELU) give negative curvature.

Inputs are taken in the model's input space (the framework puts normalisation inside the model,
so this is pixel space). The per-sample loss is ``n * loss_fn(model(x), y)`` for a batch of ``n``,
exact for losses that average over samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.curvature.context import analysis_mode, batch_norm_as_affine
from lightning_hessian.curvature.lanczos import BatchedLanczos, batched_lanczos
from lightning_hessian.curvature.linear import random_normal, seeded_generator
from lightning_hessian.curvature.objective import BatchLoss, BatchLossModule, loss_of_outputs
from lightning_hessian.curvature.operator import LossFunction

__all__ = [
    "InputCurvature",
    "InputHessianResult",
    "input_curvature",
    "input_gradient_norms",
    "input_hessian_eigenvalues",
]


@dataclass
class InputHessianResult:
    """Per-sample extreme eigenvalues of the input Hessian.

    Attributes:
        eigenvalues: (n,) float64, the largest (or smallest) eigenvalue per sample.
        residuals: (n,) Lanczos residual estimates.
        converged: (n,) residual at most ``tol`` times that sample's largest Ritz magnitude.
        steps: (n,) Lanczos steps (one batched Hessian-vector product each).
        which: ``"largest"`` or ``"smallest"``.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: Tensor
    steps: Tensor
    which: str

    @property
    def mean(self) -> float:
        return float(self.eigenvalues.mean())


@dataclass
class InputCurvature:
    """Input-space curvature of a sample set, per sample and averaged."""

    gradient_norms: Tensor
    largest: InputHessianResult
    smallest: InputHessianResult | None = None

    @property
    def mean_gradient_norm(self) -> float:
        return float(self.gradient_norms.mean())

    @property
    def mean_top_eigenvalue(self) -> float:
        return self.largest.mean

    @property
    def mean_smallest_eigenvalue(self) -> float | None:
        return None if self.smallest is None else self.smallest.mean

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Scalar summaries for logging."""
        out = {
            f"{prefix}input_grad_norm": self.mean_gradient_norm,
            f"{prefix}input_lambda_max": self.mean_top_eigenvalue,
        }
        if self.smallest is not None:
            out[f"{prefix}input_lambda_min"] = self.smallest.mean
            out[f"{prefix}input_lambda_min_min"] = float(self.smallest.eigenvalues.min())
        return out


def _sum_loss(
    model: nn.Module, loss_fn: LossFunction | None, batch_loss: BatchLoss | None, dtype: torch.dtype
) -> Callable[[Tensor, Any], Tensor]:
    """``(x, y) -> sum of per-sample losses`` through ``functional_call`` with detached weights."""
    if batch_loss is not None:
        loss_of_batch = batch_loss
    elif loss_fn is not None:
        loss_of_batch = loss_of_outputs(loss_fn)
    else:
        raise ValueError("Pass `loss_fn(output, y)` or `batch_loss(module, batch)`.")
    wrapper = BatchLossModule(model, loss_of_batch)
    tensors = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors["inner." + name] = tensor

    batch_norm_context = batch_norm_as_affine(model)

    def loss(x: Tensor, y: Any) -> Tensor:
        with batch_norm_context():  # the same function, with a cheap double backward
            return x.shape[0] * torch.func.functional_call(wrapper, tensors, ((x, y),))

    return loss


def _prepare(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    return x.detach().to(device=device, dtype=dtype).clone().requires_grad_()


def _model_dtype_device(model: nn.Module, x: Tensor, dtype: torch.dtype | None) -> tuple[torch.dtype, torch.device]:
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else x.device
    if dtype is None:
        dtype = first.dtype if first is not None and first.dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, device


def input_gradient_norms(
    model: nn.Module,
    loss_fn: LossFunction | None,
    x: Tensor,
    y: Any,
    *,
    batch_loss: BatchLoss | None = None,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-sample :math:`\\lVert \\nabla_x J(x_i, y_i) \\rVert_2`, shape (n,), float64 on the CPU.

    Runs in eval mode with every touched state restored.

    Returns:
        (n,) float64 gradient norms on the CPU, one per sample of ``x``.
    """
    dtype, device = _model_dtype_device(model, x, dtype)
    norms = []
    with analysis_mode(model):
        loss = _sum_loss(model, loss_fn, batch_loss, dtype)
        for start in range(0, x.shape[0], batch_size):
            xs = _prepare(x[start : start + batch_size], dtype, device)
            ys = y[start : start + batch_size].to(device)
            (grad,) = torch.autograd.grad(loss(xs, ys.clone()), xs)
            norms.append(torch.linalg.vector_norm(grad.flatten(1).double(), dim=1).cpu())
    return torch.cat(norms)


def _input_lanczos(
    model: nn.Module,
    loss_fn: LossFunction | None,
    x: Tensor,
    y: Any,
    which: tuple[str, ...],
    *,
    batch_loss: BatchLoss | None,
    batch_size: int,
    tol: float,
    max_steps: int,
    seed: int,
    dtype: torch.dtype | None,
    with_gradient: bool = False,
) -> tuple[dict[str, InputHessianResult], Tensor | None]:
    if tol <= 0 or max_steps < 1 or batch_size < 1:
        raise ValueError(f"tol={tol}, max_steps={max_steps} and batch_size={batch_size} must be positive.")
    dtype, device = _model_dtype_device(model, x, dtype)
    generator = seeded_generator(seed)
    pieces: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {w: [] for w in which}
    grad_norms = []

    def extremes(run: BatchedLanczos) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        values, _, residuals = run.ritz()
        scale = values.nan_to_num().abs().amax(dim=1).clamp_min(1e-300)
        out = {}
        for name in which:
            filler = -math.inf if name == "largest" else math.inf
            pick = values.nan_to_num(nan=filler)
            index = pick.argmax(dim=1) if name == "largest" else pick.argmin(dim=1)
            value = values.gather(1, index[:, None]).squeeze(1)
            residual = residuals.gather(1, index[:, None]).squeeze(1)
            out[name] = (value, residual, residual <= tol * scale)
        return out

    with analysis_mode(model):
        loss = _sum_loss(model, loss_fn, batch_loss, dtype)
        for start in range(0, x.shape[0], batch_size):
            xs = _prepare(x[start : start + batch_size], dtype, device)
            ys = y[start : start + batch_size].to(device).clone()
            count, shape = xs.shape[0], xs.shape
            (grad,) = torch.autograd.grad(loss(xs, ys), xs, create_graph=True)
            if with_gradient:
                grad_norms.append(torch.linalg.vector_norm(grad.detach().flatten(1).double(), dim=1).cpu())

            def apply(
                vectors: Tensor,
                rows: Tensor,
                grad: Tensor = grad,
                xs: Tensor = xs,
                count: int = count,
                shape: torch.Size = shape,
            ) -> Tensor:
                full = torch.zeros(count, vectors.shape[1], dtype=dtype, device=device)
                full[rows] = vectors.to(dtype)
                (product,) = torch.autograd.grad(grad, xs, full.view(shape), retain_graph=True)
                return product.flatten(1)[rows]

            def stop(run: BatchedLanczos) -> bool:
                return all(bool(flags.all()) for _, _, flags in extremes(run).values())

            start_vectors = random_normal((count, xs[0].numel()), generator, device)
            run = batched_lanczos(apply, start_vectors, max_steps, stop=stop)
            for name, (value, residual, flags) in extremes(run).items():
                pieces[name].append((value.cpu(), residual.cpu(), flags.cpu(), run.lengths.cpu()))
            del grad
    results = {
        name: InputHessianResult(
            eigenvalues=torch.cat([p[0] for p in parts]),
            residuals=torch.cat([p[1] for p in parts]),
            converged=torch.cat([p[2] for p in parts]),
            steps=torch.cat([p[3] for p in parts]),
            which=name,
        )
        for name, parts in pieces.items()
    }
    return results, (torch.cat(grad_norms) if with_gradient else None)


def input_hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFunction | None,
    x: Tensor,
    y: Any,
    which: str = "largest",
    *,
    batch_loss: BatchLoss | None = None,
    batch_size: int = 256,
    tol: float = 1e-4,
    max_steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> InputHessianResult:
    """Per-sample largest (or smallest) eigenvalue of :math:`\\nabla^2_x J(x_i, y_i)`.

    Args:
        model: the network (analysed in eval mode; state restored afterwards).
        loss_fn: ``loss_fn(model(x), y)`` returning the batch-mean loss.
        x: inputs (n, ...), in the model's input space.
        y: targets (n, ...).
        which: ``"largest"`` or ``"smallest"``.
        batch_loss: alternative to ``loss_fn``: ``batch_loss(module, (x, y))``, batch-mean.
        batch_size: samples per batched Lanczos (each step is one double-backward of the batch).
        tol: converged when the residual is at most ``tol`` times the sample's largest Ritz magnitude.
        max_steps: Lanczos steps at most (capped at the input dimension).
        seed: start-vector seed (private generator).
        dtype: analysis precision (default the parameters' dtype); float64 for checks.

    Returns:
        An :class:`InputHessianResult` with one entry per sample of ``x`` (CPU tensors).

    Raises:
        ValueError: if ``which`` is not ``"largest"`` or ``"smallest"``, if ``tol``,
            ``max_steps`` or ``batch_size`` is not positive, or if neither ``loss_fn`` nor
            ``batch_loss`` is given.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r} must be 'largest' or 'smallest'.")
    results, _ = _input_lanczos(
        model,
        loss_fn,
        x,
        y,
        (which,),
        batch_loss=batch_loss,
        batch_size=batch_size,
        tol=tol,
        max_steps=max_steps,
        seed=seed,
        dtype=dtype,
    )
    return results[which]


def input_curvature(
    model: nn.Module,
    loss_fn: LossFunction | None,
    x: Tensor,
    y: Any,
    *,
    smallest: bool = False,
    batch_loss: BatchLoss | None = None,
    batch_size: int = 256,
    tol: float = 1e-4,
    max_steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> InputCurvature:
    """Gradient norms and the largest (and optionally smallest) input-Hessian eigenvalue per
    sample, from one gradient graph and one batched Lanczos run per batch.

    Returns:
        An :class:`InputCurvature` (``smallest`` only with ``smallest=True``), CPU tensors.
    """
    which = ("largest", "smallest") if smallest else ("largest",)
    results, norms = _input_lanczos(
        model,
        loss_fn,
        x,
        y,
        which,
        batch_loss=batch_loss,
        batch_size=batch_size,
        tol=tol,
        max_steps=max_steps,
        seed=seed,
        dtype=dtype,
        with_gradient=True,
    )
    assert norms is not None  # with_gradient=True: _input_lanczos returns the norms
    return InputCurvature(gradient_norms=norms, largest=results["largest"], smallest=results.get("smallest"))
