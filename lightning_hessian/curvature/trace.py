"""Stochastic trace estimation: Hutchinson and Hutch++, probes pushed through ``matmat`` in batches.

Hutchinson: :math:`\\operatorname{tr} H = \\mathbb{E}[z^\\top H z]` for Rademacher :math:`z`; the
standard error is the sample standard deviation over :math:`\\sqrt{\\#\\text{probes}}`.

Hutch++ (Meyer, Musco, Musco, Williams 2021): sketch :math:`Y = H S` with :math:`s` Rademacher
columns, :math:`Q = \\operatorname{orth}(Y)`, then

.. math:: \\operatorname{tr} H = \\operatorname{tr}(Q^\\top H Q)
          + \\operatorname{tr}\\big((I - QQ^\\top) H (I - QQ^\\top)\\big),

the first term exact (:math:`s` more products), the second by Hutchinson on projected probes.
A Hessian's few large outlier eigenvalues land in :math:`Q`, so the remainder has far less
variance. The reported standard error is that of the remainder given :math:`Q`.

Both stop when ``stderr <= rel_tol * |estimate|`` (checked after each batch of probes, from the
second batch on) or when ``max_probes`` Hessian-vector products are spent. When the operator is
so small that the probes still needed exceed its dimension, the trace is computed exactly from
unit vectors instead (``stderr = 0``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.curvature.linear import (
    hvp_counter,
    operator_context,
    operator_device,
    operator_matmat,
    plain_tensors,
    random_rademacher,
    seeded_generator,
)

__all__ = ["TraceResult", "hessian_trace"]


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (Hutch++: of the stochastic remainder, given the sketch).
        num_probes: random vectors drawn (Hutch++: sketch plus remainder probes).
        hvp_count: Hessian-vector products used (Hutch++: twice the sketch plus the remainder).
        seconds: wall-clock time.
        method: ``"hutchinson"`` or ``"hutch++"``.
        converged: whether ``stderr <= rel_tol * |estimate|`` was reached.
    """

    estimate: float
    stderr: float
    num_probes: int
    hvp_count: int
    seconds: float
    method: str = "hutch++"
    converged: bool = False

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.estimate) if self.estimate else math.inf


def _rademacher_quadratic_forms(op: Any, count: int, generator: torch.Generator, basis: Tensor | None) -> Tensor:
    """``z^T H z`` for ``count`` Rademacher probes (projected off ``basis`` if given), float64."""
    device = operator_device(op)
    Z = random_rademacher((op.num_params, count), generator, device)
    if basis is not None:
        Z -= basis @ (basis.T @ Z)
    HZ = operator_matmat(op, Z).to(torch.float64)
    return (Z * HZ).sum(dim=0)


def _exact_trace(op: Any, batch: int) -> float:
    """Sum of ``e_i^T H e_i`` over all unit vectors, ``batch`` at a time."""
    device = operator_device(op)
    total = 0.0
    for start in range(0, op.num_params, batch):
        count = min(batch, op.num_params - start)
        E = torch.zeros(op.num_params, count, dtype=torch.float64, device=device)
        E[torch.arange(start, start + count), torch.arange(count)] = 1.0
        total += float(operator_matmat(op, E).to(torch.float64)[start : start + count].diagonal().sum())
    return total


@plain_tensors
def hessian_trace(
    op: Any,
    method: str = "hutch++",
    rel_tol: float | None = 1e-2,
    max_probes: int = 1000,
    batch_probes: int = 16,
    seed: int = 0,
    *,
    sketch_size: int | None = None,
    backend: str = "native",
) -> TraceResult:
    """Estimate the trace of ``op`` with its standard error.

    Args:
        op: a ``HessianOperator`` or any object with ``num_params`` and ``matvec``/``matmat``.
        method: ``"hutch++"`` (default; variance-reduced) or ``"hutchinson"``.
        rel_tol: stop when the standard error is at most ``rel_tol`` times the estimate's
            magnitude; ``None`` spends exactly ``max_probes`` products.
        max_probes: budget of Hessian-vector products.
        batch_probes: probes per ``matmat`` call.
        seed: seed of the probes (private generator; identical on all DDP ranks).
        sketch_size: Hutch++ sketch columns (default ``batch_probes``, or ``max_probes // 3`` when
            ``rel_tol`` is ``None``).
        backend: ``"native"``, or ``"pyhessian"`` (its Hutchinson loop, for cross-checks).
    """
    if backend == "pyhessian":
        from lightning_hessian.curvature.pyhessian_backend import pyhessian_trace

        return pyhessian_trace(op, tol=rel_tol or 1e-3, max_iter=max_probes, seed=seed)
    if backend != "native":
        raise ValueError(f"backend={backend!r} must be 'native' or 'pyhessian'.")
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method={method!r} must be 'hutch++' or 'hutchinson'.")
    if rel_tol is not None and rel_tol <= 0:
        raise ValueError(f"rel_tol={rel_tol} must be positive or None.")
    if batch_probes < 1 or max_probes < 2:
        raise ValueError(f"batch_probes={batch_probes} must be >= 1 and max_probes={max_probes} >= 2.")
    began = time.perf_counter()
    start_count = hvp_counter(op)
    generator = seeded_generator(seed)
    size = op.num_params
    exact = 0.0
    basis = None
    hvps = 0
    sketch = 0
    with operator_context(op):
        if method == "hutch++":
            if max_probes < 3:
                raise ValueError(f"hutch++ needs max_probes >= 3, got {max_probes}.")
            sketch = sketch_size or (max_probes // 3 if rel_tol is None else min(batch_probes, max_probes // 3))
            sketch = max(1, min(sketch, size, (max_probes - 1) // 2))
            S = random_rademacher((size, sketch), generator, operator_device(op))
            Y = operator_matmat(op, S).to(torch.float64)
            basis = torch.linalg.qr(Y).Q
            HQ = operator_matmat(op, basis).to(torch.float64)
            exact = float((basis * HQ).sum())
            hvps = 2 * sketch
        remaining = max_probes - hvps
        forms: list[Tensor] = []
        drawn = 0
        converged = False
        while remaining > 0:
            count = min(batch_probes, remaining)
            forms.append(_rademacher_quadratic_forms(op, count, generator, basis))
            drawn += count
            remaining -= count
            hvps += count
            values = torch.cat(forms)
            if rel_tol is not None and drawn >= 2 and len(forms) >= 2:
                estimate = exact + float(values.mean())
                stderr = float(values.std() / math.sqrt(drawn))
                if stderr <= rel_tol * abs(estimate):
                    converged = True
                    break
                needed = (stderr / (rel_tol * max(abs(estimate), 1e-300))) ** 2 * drawn - drawn
                if size <= remaining and needed >= size:
                    # Small operator: ``size`` unit vectors give the exact trace sooner.
                    exact_trace = _exact_trace(op, batch_probes)
                    counted = hvp_counter(op) - start_count
                    return TraceResult(
                        estimate=exact_trace,
                        stderr=0.0,
                        num_probes=size,
                        hvp_count=counted if counted > 0 else hvps + size,
                        seconds=time.perf_counter() - began,
                        method=method,
                        converged=True,
                    )
    values = torch.cat(forms) if forms else torch.zeros(1, dtype=torch.float64)
    estimate = exact + float(values.mean())
    stderr = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.inf
    counted = hvp_counter(op) - start_count
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_probes=sketch + drawn,
        hvp_count=counted if counted > 0 else hvps,
        seconds=time.perf_counter() - began,
        method=method,
        converged=converged or (rel_tol is not None and stderr <= rel_tol * abs(estimate)),
    )
