"""Stochastic trace estimation: adaptive choice between Hutchinson and Hutch++, probes in batches.

Hutchinson: :math:`\\operatorname{tr} H = \\mathbb{E}[z^\\top H z]` for Rademacher :math:`z`, with
per-probe variance :math:`2(\\lVert H \\rVert_F^2 - \\sum_i H_{ii}^2)`; the standard error is the
sample standard deviation over :math:`\\sqrt{\\#\\text{probes}}`.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): sketch :math:`Y = H S` with :math:`s` random columns,
:math:`Q = \\operatorname{orth}(Y)`, then

.. math:: \\operatorname{tr} H = \\operatorname{tr}(Q^\\top H Q)
          + \\operatorname{tr}\\big((I - QQ^\\top) H (I - QQ^\\top)\\big),

the first term exact (:math:`s` more products), the second by Hutchinson on projected probes,
whose variance is about :math:`2 \\lVert (I - QQ^\\top) H (I - QQ^\\top) \\rVert_F^2`. A Hessian's
few large outlier eigenvalues land in :math:`Q`, so the remainder has far less variance; on a flat
spectrum the :math:`2s` sketch products buy nothing. The reported standard error is that of the
remainder given :math:`Q` (the remainder probes are independent of :math:`Q`).

Why adaptive Hutch++ with a Hutchinson pilot (and not XTrace): the final estimate is always a
known part plus the mean of independent samples, so its standard error is the plain sample one
that the stopping rule needs (XTrace reuses every product in both parts and needs a
leave-one-out error estimate), and a flat spectrum pays for no sketch at all.

``method="auto"`` starts with a pilot of ``min_probes`` Hutchinson probes. If they already reach
``rel_tol``, that is the answer. Otherwise the pilot's products predict both costs without a
single extra product: Hutchinson's from unbiased estimates of :math:`\\lVert H \\rVert_F^2` and
:math:`\\sum_i H_{ii}^2` (steadier than the pilot's sample variance), Hutch++'s from the Frobenius
mass a sketch leaves behind, the mean squared distance of each pilot product :math:`H z_j` from
the span of the others (leave-one-out: unbiased for :math:`\\lVert (I - P_{-j}) H \\rVert_F^2`,
the one-sided tail of a rank :math:`p - 1` sketch, an upper bound of the two-sided tail of the
larger sketch actually used). Hutch++ is chosen when a few dominant eigenvalues carry the
variance, i.e. when the predicted sketch plus remainder costs fewer products than continuing
Hutchinson; its sketch then reuses the pilot's products (the pilot's samples are dropped, as
the sketch depends on their probes).

Deflation by known eigenvectors (``deflate_with``): the Ritz pairs :math:`(\\theta_i, y_i)` of a
Lanczos run on the same operator (:func:`~lightning_hessian.curvature.lanczos.top_eigenvalues`)
are an orthonormal :math:`Q` whose exact part is free, since Rayleigh-Ritz makes
:math:`y_i^\\top H y_i = \\theta_i`:

.. math:: \\operatorname{tr} H = \\sum_i \\theta_i
          + \\operatorname{tr}\\big((I - QQ^\\top) H (I - QQ^\\top)\\big),

and everything above (pilot, choice, Hutch++ sketch) then runs on the deflated operator. A
Hessian's Hutchinson variance is mostly its few outliers' :math:`2\\sum \\lambda_i^2`, the very
pairs a top-:math:`k` call has just found, so the remainder needs several times fewer probes. The
estimate stays unbiased (:math:`Q` is independent of the trace's probes); its products were
counted by the call that made them.

Every run stops when ``stderr <= rel_tol * |estimate|`` (checked from ``min_probes`` samples on,
each further batch sized by the products the current standard error predicts are still needed)
or when ``max_probes`` products are spent. When the products still needed exceed the operator's
dimension, the trace is computed exactly from unit vectors instead (``stderr = 0``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_hessian.curvature.linear import (
    LinearOperator,
    operator_context,
    operator_device,
    operator_rows,
    plain_tensors,
    random_rademacher,
    row_dots,
    seeded_generator,
)
from lightning_hessian.curvature.results import EigenResult, TraceResult
from lightning_hessian.errors import UserInputError

__all__ = ["TraceResult", "hessian_trace"]  # TraceResult: re-exported from results

_METHODS = ("auto", "hutch++", "hutchinson")
#: Default Hutch++ sketch under a tolerance: room for the about C outliers of a C-class
#: classifier's Hessian (Papyan 2019) for C up to 10, with oversampling.
_DEFAULT_SKETCH = 16


@dataclass
class _Run:
    """The state of one estimate: every product counted, the stochastic samples, the exact part."""

    op: LinearOperator
    generator: torch.Generator
    device: torch.device
    size: int
    hvps: int = 0
    drawn: int = 0
    exact_part: float = 0.0
    basis: Tensor | None = None
    samples: list[Tensor] = field(default_factory=list)

    def products(self, rows: Tensor) -> Tensor:
        """``H`` applied to each row of ``rows``, counted."""
        self.hvps += rows.shape[0]
        return operator_rows(self.op, rows)

    def probes(self, count: int) -> Tensor:
        """``count`` Rademacher rows, projected off the sketch basis if there is one."""
        Z = random_rademacher((count, self.size), self.generator, self.device)
        self.drawn += count
        return self.project(Z)

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        """Draw ``count`` probes, record their quadratic forms; returns the probes and products."""
        Z = self.probes(count)
        HZ = self.products(Z)
        self.samples.append(row_dots(Z, HZ))
        return Z, HZ

    def values(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, dtype=torch.float64)

    def estimate(self) -> float:
        values = self.values()
        return self.exact_part + (float(values.mean()) if values.numel() else 0.0)

    def stderr(self) -> float:
        values = self.values()
        return float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.inf

    def project(self, rows: Tensor) -> Tensor:
        """``rows`` with their components in the deflation/sketch basis removed (in place)."""
        if self.basis is not None:
            rows.addmm_(rows @ self.basis.T, self.basis, alpha=-1.0)
        return rows

    def deflate(self, vectors: Tensor, values: Tensor) -> None:
        """Take out the span of known orthonormal Ritz vectors (rows); their values are its exact trace."""
        self.basis = torch.linalg.qr(vectors.T).Q.T.contiguous()  # re-orthonormalised in float64
        self.exact_part = float(values.sum())

    def sketch(self, Y: Tensor) -> None:
        """Add ``orth(Y)`` (off the current basis) to the basis: its exact part costs one product per row."""
        fresh = self.project(self.project(Y.clone()))  # twice: Y may lie close to the basis
        fresh = torch.linalg.qr(fresh.T).Q.T.contiguous()
        self.exact_part += float(row_dots(fresh, self.products(fresh)).sum())
        self.basis = fresh if self.basis is None else torch.cat([self.basis, fresh])
        self.samples = []


def _leave_one_out_tail(Y: Tensor) -> float:
    """Mean over rows :math:`y_j = H z_j` of the squared distance from the span of the other rows.

    With :math:`G = Y Y^\\top = R^\\top R` the squared distance of row :math:`j` is
    :math:`1/(G^{-1})_{jj}`, and :math:`(G^{-1})_{jj}` is the squared norm of row :math:`j` of
    :math:`R^{-1}`: one small QR, no product.

    Returns:
        The mean squared distance (rows that the others span exactly count as 0).
    """
    R = torch.linalg.qr(Y.T, mode="r").R
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    inverse = torch.linalg.solve_triangular(R, eye, upper=True)
    distances = (1.0 / inverse.square().sum(dim=1)).nan_to_num(nan=0.0, posinf=0.0)
    return float(distances.mean())


def _hutchinson_variance(Z: Tensor, HZ: Tensor) -> float:
    """Unbiased estimate of the Rademacher Hutchinson variance
    :math:`2(\\lVert H \\rVert_F^2 - \\sum_i H_{ii}^2)` from probes ``Z`` and products ``HZ`` (rows).

    :math:`\\mathbb{E}\\lVert H z \\rVert^2 = \\lVert H \\rVert_F^2`, and for independent probes
    :math:`j \\ne l` the entries of :math:`d_j = z_j \\circ H z_j` are unbiased for :math:`H_{ii}`,
    so :math:`\\sum_i d_{j,i} d_{l,i}` is unbiased for :math:`\\sum_i H_{ii}^2`. Both are far less
    heavy-tailed than the sample variance of :math:`z^\\top H z` over a handful of probes, whose
    fourth moments a few large eigenvalues dominate: the pilot's sample variance can miss them.

    Returns:
        The variance estimate, clamped at 0.
    """
    count = Z.shape[0]
    frobenius = float(HZ.square().sum()) / count
    d = Z * HZ
    total = d.sum(dim=0)
    diagonal = (float(total.square().sum()) - float(d.square().sum())) / (count * (count - 1))
    return max(2.0 * (frobenius - diagonal), 0.0)


def _exact_trace(run: _Run, batch: int) -> float:
    """Sum of ``e_i^T H e_i`` over all unit vectors, ``batch`` at a time."""
    total = 0.0
    for start in range(0, run.size, batch):
        count = min(batch, run.size - start)
        E = torch.zeros(count, run.size, dtype=torch.float64, device=run.device)
        E[torch.arange(count), torch.arange(start, start + count)] = 1.0
        total += float(run.products(E)[:, start : start + count].diagonal().sum())
    return total


def _still_needed(run: _Run, rel_tol: float) -> float:
    """Samples still needed for ``stderr <= rel_tol * |estimate|`` at the current variance."""
    values = run.values()
    target = rel_tol * abs(run.estimate())
    if values.numel() < 2:
        return math.inf
    if target == 0.0:
        return math.inf
    return values.numel() * (run.stderr() / target) ** 2 - values.numel()


def _continue(run: _Run, rel_tol: float | None, max_probes: int, min_probes: int, batch_probes: int) -> bool:
    """Draw samples until the tolerance or the budget.

    Returns:
        Whether an exact trace is cheaper than the samples still needed (the caller then computes it).
    """
    while run.hvps < max_probes:
        have = run.values().numel()
        if rel_tol is None:
            count = batch_probes
        elif have < min_probes:
            count = min_probes - have
        else:
            needed = _still_needed(run, rel_tol)
            if needed <= 0:
                return False
            if needed >= run.size and run.size <= max_probes - run.hvps:
                return True
            count = max(1, min(batch_probes, math.ceil(needed)))
        run.sample(min(count, max_probes - run.hvps))
    return False


@plain_tensors
def hessian_trace(
    op: LinearOperator,
    method: str = "auto",
    rel_tol: float | None = 1e-2,
    max_probes: int = 1000,
    batch_probes: int = 16,
    seed: int = 0,
    *,
    sketch_size: int | None = None,
    min_probes: int = 8,
    deflate_with: EigenResult | None = None,
    backend: str = "native",
) -> TraceResult:
    """Estimate the trace of ``op`` with its standard error, spending as few products as it can.

    Args:
        op: a ``HessianOperator`` or any object with ``num_params`` and ``matvec``/``matmat``.
        method: ``"auto"`` (default: Hutchinson, or Hutch++ when the pilot shows that a few
            dominant eigenvalues carry the variance; see the module docstring), ``"hutch++"`` or
            ``"hutchinson"`` to force one. (The default was ``"hutch++"`` before ``"auto"``.)
        rel_tol: stop when the standard error is at most ``rel_tol`` times the estimate's
            magnitude; ``None`` spends exactly ``max_probes`` products.
        max_probes: budget of Hessian-vector products, every one counted (pilot and sketch too).
        batch_probes: at most this many probes per ``matmat`` call after the first batch.
        seed: seed of the probes (private generator; identical on all DDP ranks).
        sketch_size: Hutch++ sketch rows (default 16 under a tolerance, ``max_probes // 3`` when
            ``rel_tol`` is ``None``; with ``"auto"`` at least the pilot, whose products it reuses).
        min_probes: the pilot, and the fewest stochastic samples a standard error is trusted from.
        deflate_with: Ritz pairs of ``op`` itself (a :func:`~lightning_hessian.curvature.lanczos.
            top_eigenvalues` result on the same operator at the same parameters, converged or
            not): their span's trace is their eigenvalues' sum and the estimate runs on the rest
            (module docstring). Pairs from another operator would bias the estimate.
        backend: ``"native"``, or ``"pyhessian"`` (its Hutchinson loop, for cross-checks).

    Returns:
        A :class:`TraceResult`: ``hvp_count`` counts every product, ``method`` says which
        estimator produced ``estimate`` (``"exact"`` when unit vectors were cheaper).

    Raises:
        UserInputError: for an unknown ``method``/``backend``, non-positive counts/tolerance, or
            ``deflate_with`` without eigenvectors of ``op``'s size.
    """
    if backend == "pyhessian":
        from lightning_hessian.curvature.pyhessian_backend import pyhessian_trace

        return pyhessian_trace(op, tol=rel_tol or 1e-3, max_iter=max_probes, seed=seed)
    if backend != "native":
        raise UserInputError(f"backend={backend!r} must be 'native' or 'pyhessian'.")
    if method not in _METHODS:
        raise UserInputError(f"method={method!r} must be one of {_METHODS}.")
    if rel_tol is not None and rel_tol <= 0:
        raise UserInputError(f"rel_tol={rel_tol} must be positive (e.g. 0.01), or None for a fixed budget.")
    if batch_probes < 1 or max_probes < 2 or min_probes < 2:
        raise UserInputError(
            f"batch_probes={batch_probes} must be >= 1, max_probes={max_probes} and min_probes={min_probes} >= 2."
        )
    if method == "hutch++" and max_probes < 3:
        raise UserInputError(f"hutch++ needs max_probes >= 3, got {max_probes}.")
    began = time.perf_counter()
    size = int(op.num_params)
    run = _Run(op, seeded_generator(seed), operator_device(op), size)
    if deflate_with is not None:
        vectors = deflate_with.vectors
        if vectors is None or vectors.ndim != 2 or vectors.shape[0] != size:
            raise UserInputError(
                f"deflate_with needs the eigenvectors of this operator as a ({size}, k) `vectors` tensor, got"
                f" {None if vectors is None else tuple(vectors.shape)}; pass the result of top_eigenvalues(op, ...)."
            )
        if 0 < vectors.shape[1] < size:
            run.deflate(vectors.T.to(run.device, torch.float64), deflate_with.eigenvalues.to(torch.float64))
    chosen = method
    with operator_context(op):
        if method == "hutch++":
            if rel_tol is None:
                sketch = sketch_size or max_probes // 3
            else:
                sketch = sketch_size or min(_DEFAULT_SKETCH, max_probes // 3)
            sketch = max(1, min(sketch, size, (max_probes - 1) // 2))
            run.sketch(run.products(run.probes(sketch)))
        elif method == "auto":
            chosen = _pilot_and_choose(run, rel_tol, max_probes, min(min_probes, max_probes), sketch_size)
        exact = chosen != "exact" and _continue(run, rel_tol, max_probes, min_probes, batch_probes)
        if chosen == "exact" or exact:
            estimate, stderr, chosen = _exact_trace(run, batch_probes), 0.0, "exact"
        else:
            estimate, stderr = run.estimate(), run.stderr()
    converged = chosen == "exact" or (rel_tol is not None and stderr <= rel_tol * abs(estimate))
    return TraceResult(
        estimate=estimate,
        stderr=stderr,
        num_probes=size if chosen == "exact" else run.drawn,
        hvp_count=run.hvps,
        seconds=time.perf_counter() - began,
        method=chosen,
        converged=converged,
    )


def _pilot_and_choose(run: _Run, rel_tol: float | None, max_probes: int, pilot: int, sketch_size: int | None) -> str:
    """Run the Hutchinson pilot and pick what continues.

    Returns:
        ``"hutchinson"`` (the pilot's samples stay), ``"hutch++"`` (the pilot's products became the
        sketch) or ``"exact"``.
    """
    Z, HZ = run.sample(pilot)
    estimate, stderr = run.estimate(), run.stderr()
    if rel_tol is not None and stderr <= rel_tol * abs(estimate):
        return "hutchinson"
    HZ = run.project(HZ)  # with a deflation basis: the products of the deflated operator
    hutchinson_variance = _hutchinson_variance(Z, HZ)
    sketch_variance = 2.0 * _leave_one_out_tail(HZ)  # per remainder probe, an over-estimate
    if rel_tol is None:
        # Fixed budget: the smaller final variance wins.
        sketch = max(pilot, sketch_size or max_probes // 3)
        remainder = max_probes - 2 * sketch
        if remainder < 2 or hutchinson_variance / max_probes <= sketch_variance / remainder:
            return "hutchinson"
        _switch_to_sketch(run, HZ, sketch - pilot)
        return "hutch++"
    target_sq = (rel_tol * abs(estimate)) ** 2
    sketch = max(pilot, sketch_size or _DEFAULT_SKETCH)
    hutchinson_cost = hutchinson_variance / target_sq - pilot if target_sq > 0 else math.inf
    sketch_cost = (sketch - pilot) + sketch + max(pilot, sketch_variance / target_sq if target_sq > 0 else math.inf)
    room = max_probes - run.hvps
    if min(hutchinson_cost, sketch_cost) >= run.size and run.size <= room:
        return "exact"
    if sketch_cost >= hutchinson_cost or sketch_cost > room:
        return "hutchinson"
    _switch_to_sketch(run, HZ, sketch - pilot)
    return "hutch++"


def _switch_to_sketch(run: _Run, pilot_products: Tensor, extra: int) -> None:
    """Build the Hutch++ sketch from the pilot's products plus ``extra`` new ones; the pilot's
    samples are dropped (the sketch depends on their probes)."""
    Y = pilot_products
    if extra > 0:
        Y = torch.cat([Y, run.products(run.probes(extra))])
    run.sketch(Y[: run.size])
