"""Cross-check through the `pyhessian` package (Yao et al.), behind the same result types.

``pip install lightning-hessian[pyhessian]``. The package is imported lazily, only here.

Limits of PyHessian 0.1, which this adapter documents rather than hides:

* top-k is power iteration with deflation, stopping when the eigenvalue changes by less than
  ``tol`` relative: no residuals, eigenvalues may come out of order, later ones inaccurate (on
  ResNet-18 the 2nd of the top 5 was 6% off); each product is a new double-backward graph per
  batch (about 5x a gradient pass);
* trace is plain Hutchinson stopping on the relative change of the running mean (no standard
  error);
* ``density()`` calls ``torch.eig``, removed in torch 2.x, so it fails: not offered here;
* it puts the model in eval mode, leaves graph-carrying ``.grad`` tensors on the parameters and
  draws probes from the global RNG. The adapter runs it inside
  :func:`~lightning_hessian.curvature.context.preserved_state`, so flags, ``.grad``, parameters
  and RNG states come back bit-identical;
* it differentiates every parameter with ``requires_grad``; a ``param_filter`` is honoured by
  switching the other parameters off temporarily. It cannot all-reduce across processes. Its
  ``criterion(model(x), y)`` interface is fed the operator's own batches through a small indexing
  module, so ``batch_loss`` models and unequal batches work unchanged.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import torch
from torch import nn

from lightning_hessian.curvature.context import exact_float32, preserved_state
from lightning_hessian.curvature.linear import LinearOperator
from lightning_hessian.curvature.objective import BatchLossModule, loss_of_outputs
from lightning_hessian.curvature.operator import HessianOperator
from lightning_hessian.curvature.results import EigenResult, TraceResult

__all__ = ["PyHessianCounter", "pyhessian_top_eigenvalues", "pyhessian_trace"]


def PyHessianCounter(*args: Any, **kwargs: Any) -> Any:
    """A ``pyhessian.hessian`` that counts its Hessian-vector products in ``hvp_count``.

    Returns:
        A ``pyhessian.hessian`` subclass instance built from ``args`` and ``kwargs``.

    Raises:
        ImportError: if the ``pyhessian`` package is not installed.
    """
    # imported here, not at module level: pyhessian is an optional dependency
    try:
        from pyhessian import hessian
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='pyhessian' needs the `pyhessian` package: pip install lightning-hessian[pyhessian]"
        ) from error

    class _Counting(hessian):
        hvp_count = 0

        def dataloader_hv_product(self, v: Any) -> Any:
            self.hvp_count += 1
            return super().dataloader_hv_product(v)

    return _Counting(*args, **kwargs)


def _check(op: LinearOperator) -> HessianOperator:
    if not isinstance(op, HessianOperator):
        raise TypeError(f"backend='pyhessian' needs a HessianOperator, got {type(op).__name__}.")
    if op.all_reduce is not None:
        raise ValueError(
            "backend='pyhessian' cannot all-reduce across processes; construct the operator without all_reduce."
        )
    return op


def _loss_module(op: HessianOperator) -> nn.Module:
    """``forward(batch)`` = the operator's batch-mean loss, built from its public settings
    (``model`` and ``batch_loss`` or ``loss_fn``), like the operator's own products.

    Returns:
        A :class:`~lightning_hessian.curvature.objective.BatchLossModule` around ``op.model``.
    """
    if op.batch_loss is not None:
        loss = op.batch_loss
    else:
        assert op.loss_fn is not None  # HessianOperator refuses to be built without either
        loss = loss_of_outputs(op.loss_fn)
    return BatchLossModule(op.model, loss)


class _IndexedLoss(nn.Module):
    """PyHessian computes ``criterion(model(inputs), targets)`` and weights a batch by
    ``inputs.size(0)``. Feeding it ``inputs = full((n_b,), b)`` and a model that returns batch
    ``b``'s loss lets it differentiate any loss (``batch_loss`` too) with exact weights."""

    def __init__(self, loss_module: nn.Module, batches: list[Any]) -> None:
        super().__init__()
        self.loss_module = loss_module
        self.batches = batches

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.loss_module(self.batches[int(index[0])])


def _identity_criterion(loss: torch.Tensor, _targets: Any) -> torch.Tensor:
    return loss


def _run(op: HessianOperator, seed: int, body: Any) -> Any:
    model = op.model
    with preserved_state(model, tensors=True):
        selected = set(op.param_names)
        for name, param in model.named_parameters():
            param.requires_grad_(name in selected)
            param.grad = None  # PyHessian's gradient accumulates into .grad
        loss_module = _loss_module(op)
        if op.dtype != next(model.parameters()).dtype:
            loss_module = copy.deepcopy(loss_module).to(op.dtype)
        indexed = _IndexedLoss(loss_module, op.batches)
        loader = [
            (torch.full((count,), index, device=op.device), torch.zeros(count, device=op.device))
            for index, count in enumerate(op.batch_sizes)
        ]
        torch.manual_seed(seed)  # PyHessian draws from the global RNG (restored on exit)
        with torch.inference_mode(False), torch.enable_grad(), exact_float32(), warnings.catch_warnings():
            # its loss.backward(create_graph=True) warns about a .grad cycle; the grads are reset below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            engine = PyHessianCounter(indexed, _identity_criterion, dataloader=loader, cuda=op.device.type == "cuda")
            result = body(engine)
        for param in model.parameters():
            param.grad = None
    return result


def pyhessian_top_eigenvalues(
    op: LinearOperator, k: int = 1, tol: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> EigenResult:
    """PyHessian's power iteration for the top ``k`` eigenvalues, as an :class:`EigenResult`.

    Eigenvalues are returned in PyHessian's order (not re-sorted, so its ordering errors stay
    visible). Residuals are computed with ``op`` afterwards: ``k`` more products, which ``op``
    counts in its own ``hvp_count`` and ``hvp_count`` of the result includes (so the result's
    count is PyHessian's products plus ``k``). ``converged`` is ``residual <= tol * |eigenvalue|``,
    the native backend's test (some eigenvalue lies within the residual of each returned value).

    ``op`` must be a :class:`~lightning_hessian.curvature.operator.HessianOperator` without
    ``all_reduce`` (``TypeError``, ``ValueError`` otherwise).

    Returns:
        An :class:`EigenResult` with ``k`` pairs in PyHessian's order.
    """
    op = _check(op)
    began = time.perf_counter()

    def body(engine: Any) -> tuple[list[float], list[list[torch.Tensor]], int]:
        values, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        return values, vectors, engine.hvp_count

    values, vectors, hvps = _run(op, seed, body)
    seconds = time.perf_counter() - began
    flat = torch.stack([torch.cat([t.detach().reshape(-1) for t in vector]).to(op.dtype) for vector in vectors], dim=1)
    eigenvalues = torch.tensor(values, dtype=torch.float64)
    residuals = torch.linalg.vector_norm(
        op.matmat(flat).double() - flat.double() * eigenvalues.to(flat.device), dim=0
    ).cpu()
    return EigenResult(
        eigenvalues=eigenvalues,
        eigenvectors=[op.unflatten(flat[:, i].contiguous()) for i in range(k)],
        residuals=residuals,
        converged=residuals <= tol * eigenvalues.abs(),
        hvp_count=hvps + k,
        seconds=seconds,
        vectors=flat,
        tol=tol,
    )


def pyhessian_trace(op: LinearOperator, tol: float = 1e-3, max_iter: int = 100, seed: int = 0) -> TraceResult:
    """PyHessian's Hutchinson trace as a :class:`TraceResult` (stderr from its samples).

    ``op`` must be a :class:`~lightning_hessian.curvature.operator.HessianOperator` without
    ``all_reduce`` (``TypeError``, ``ValueError`` otherwise).

    Returns:
        A :class:`TraceResult` (``method="pyhessian-hutchinson"``); ``converged`` when PyHessian
        stopped before ``max_iter`` samples.
    """
    op = _check(op)
    began = time.perf_counter()

    def body(engine: Any) -> tuple[list[float], int]:
        return engine.trace(maxIter=max_iter, tol=tol), engine.hvp_count

    samples, hvps = _run(op, seed, body)
    values = torch.tensor(samples, dtype=torch.float64)
    stderr = float(values.std() / values.numel() ** 0.5) if values.numel() > 1 else float("inf")
    return TraceResult(
        estimate=float(values.mean()),
        stderr=stderr,
        num_probes=values.numel(),
        hvp_count=hvps,
        seconds=time.perf_counter() - began,
        method="pyhessian-hutchinson",
        converged=values.numel() < max_iter,
    )
