"""Extreme eigenpairs of a symmetric operator: block Lanczos with full re-orthogonalisation.

The Krylov basis :math:`Q` is kept in float64 and every new block is orthogonalised against all
of it twice (classical Gram-Schmidt, twice is enough). The projected matrix
:math:`T = Q^\\top H Q` is kept dense, so a thick restart (keep the best Ritz vectors, continue from
the residual block) needs no special structure. Ritz pairs :math:`(\\theta_i, Q s_i)` of
``eigh(T)`` have the residual

.. math:: \\lVert H Q s_i - \\theta_i Q s_i \\rVert = \\lVert W_{\\text{last}} s_{i,\\text{last}} \\rVert,

where :math:`W_{\\text{last}}` is the orthogonalised product block of the last step; a pair is
converged when that is at most ``tol`` times the largest Ritz magnitude seen (an estimate of
:math:`\\lVert H \\rVert`). Eigenvalue errors are at most the residual and usually its square over
the spectral gap.

:func:`batched_lanczos` runs many independent single-vector recurrences at once (one ``matmat``
per step), for stochastic Lanczos quadrature probes and per-sample input Hessians.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
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
    random_normal,
    seeded_generator,
)

__all__ = ["EigenResult", "LanczosProgress", "top_eigenvalues", "batched_lanczos", "BatchedLanczos"]


@dataclass
class LanczosProgress:
    """Passed to ``callback`` after every Lanczos step."""

    hvp_count: int
    seconds: float
    eigenvalues: Tensor
    residuals: Tensor
    num_converged: int


@dataclass
class EigenResult:
    """Extreme eigenpairs of a Hessian.

    Attributes:
        eigenvalues: float64, descending for ``which="largest"``, ascending for ``"smallest"``.
        eigenvectors: unit-norm eigenvectors, one dict of parameter-shaped tensors per eigenvalue
            (flat tensors for operators without ``unflatten``).
        residuals: :math:`\\lVert H v - \\lambda v \\rVert` for each pair (float64).
        converged: whether each residual met ``tol`` times the spectral-norm estimate.
        hvp_count: Hessian-vector products used.
        seconds: wall-clock time.
        vectors: the eigenvectors as columns of a (num_params, k) tensor in the operator's dtype.
        tol: the tolerance used.

    A run stopped by ``time_budget`` or ``max_iter`` before its basis held ``k`` vectors returns
    fewer than ``k`` pairs.
    """

    eigenvalues: Tensor
    eigenvectors: list[Any]
    residuals: Tensor
    converged: Tensor
    hvp_count: int
    seconds: float
    vectors: Tensor | None = None
    tol: float | None = None


def _init_block(op: Any, init: Sequence[Any] | None, block: int, generator: torch.Generator, device: torch.device) -> Tensor:
    size = op.num_params
    start = random_normal((size, block), generator, device)
    if init:
        flats = []
        for vector in init:
            if isinstance(vector, Mapping):
                vector = op.flatten(vector)
            flats.append(vector.detach().reshape(-1).to(device, torch.float64))
        guess = torch.zeros(size, block, dtype=torch.float64, device=device)
        for index, flat in enumerate(flats):
            guess[:, index % block] += flat / flat.norm().clamp_min(1e-300)
        # A small random part keeps eigenvectors orthogonal to the guess reachable.
        start = guess + 1e-2 * start / math.sqrt(size)
    return start


def _orthonormal_fill(basis: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` random unit vectors orthogonal to ``basis`` (P, n) and to each other."""
    fresh = random_normal((basis.shape[0], count), generator, basis.device)
    for _ in range(2):
        fresh -= basis @ (basis.T @ fresh)
    return torch.linalg.qr(fresh).Q


def _next_block(W: Tensor, basis: Tensor, room: int, scale: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``Qn`` of the residual block ``W`` (already orthogonal to ``basis``) and
    its coupling ``R`` with ``W = Qn R``; at most ``room`` columns.

    Directions with a negligible singular value mean an invariant subspace was found: they are
    replaced by random directions orthogonal to everything, with zero coupling, so the search
    continues (exact in exact arithmetic).
    """
    count = min(W.shape[1], room)
    U, singular, Vh = torch.linalg.svd(W, full_matrices=False)
    rank = int((singular > 1e-12 * max(scale, 1e-300)).sum())
    rank = min(rank, count)
    Qn, R = U[:, :rank], singular[:rank, None] * Vh[:rank]
    if rank < count:
        fresh = _orthonormal_fill(torch.cat([basis, Qn], dim=1), count - rank, generator)
        Qn = torch.cat([Qn, fresh], dim=1)
        R = torch.cat([R, R.new_zeros(count - rank, W.shape[1])])
    return Qn, R


@plain_tensors
def top_eigenvalues(
    op: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    init: Sequence[Any] | None = None,
    seed: int = 0,
    time_budget: float | None = None,
    callback: Callable[[LanczosProgress], None] | None = None,
    *,
    block_size: int = 1,
    krylov_size: int | None = None,
    backend: str = "native",
) -> EigenResult:
    """The ``k`` largest (or most negative) eigenvalues of ``op`` and their eigenvectors.

    Args:
        op: a :class:`~lightning_hessian.curvature.operator.HessianOperator` or any object with
            ``num_params`` and ``matvec``/``matmat``.
        k: number of eigenpairs.
        which: ``"largest"`` (algebraically largest, the sharpness :math:`\\lambda_1`) or
            ``"smallest"`` (most negative curvature: is the point a saddle?).
        tol: converged when the residual is at most ``tol`` times the largest Ritz magnitude.
        max_iter: budget of Hessian-vector products (default ``max(300, 50 k)``).
        init: warm start: earlier eigenvectors (dicts keyed by parameter name or flat tensors).
        seed: seed of the start block (a private generator: the global RNG is not used, and all
            DDP ranks draw the same vectors).
        time_budget: stop after this many seconds with what has converged (flags are honest).
            With an ``all_reduce`` operator the ranks agree on stopping (one tiny all-reduce per step).
        callback: called with a :class:`LanczosProgress` after every step.
        block_size: vectors per step, pushed through one ``matmat``. Larger blocks use more
            products in total but fewer passes over the data, which pays on accelerators.
        krylov_size: basis size before a thick restart (default ``max(2k + 2 block + 16, 32)``).
        backend: ``"native"``, or ``"pyhessian"`` to cross-check with the PyHessian package
            (power iteration; ``op`` must be a ``HessianOperator``).
    """
    if backend == "pyhessian":
        from lightning_hessian.curvature.pyhessian_backend import pyhessian_top_eigenvalues

        return pyhessian_top_eigenvalues(op, k=k, tol=tol, max_iter=max_iter or 100, seed=seed)
    if backend != "native":
        raise ValueError(f"backend={backend!r} must be 'native' or 'pyhessian'.")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r} must be 'largest' or 'smallest'.")
    size = int(op.num_params)
    if not 1 <= k <= size:
        raise ValueError(f"k={k} must be between 1 and the number of parameters ({size}).")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be at least 1.")
    if tol <= 0:
        raise ValueError(f"tol={tol} must be positive.")
    block = min(block_size, size)
    max_iter = max_iter if max_iter is not None else max(300, 50 * k)
    basis_cap = min(size, krylov_size or max(2 * k + 2 * block + 16, 32))
    basis_cap = max(basis_cap, min(size, k + 2 * block))
    device = operator_device(op)
    generator = seeded_generator(seed)
    largest = which == "largest"
    began = time.perf_counter()
    hvps = 0
    start_count = hvp_counter(op)

    Q = torch.zeros(size, basis_cap + block, dtype=torch.float64, device=device)
    T = torch.zeros(basis_cap + block, basis_cap + block, dtype=torch.float64, device=device)
    Q[:, :block] = torch.linalg.qr(_init_block(op, init, block, generator, device)).Q
    filled, current = block, slice(0, block)
    scale = 0.0

    with operator_context(op):
        while True:
            W = operator_matmat(op, Q[:, current]).to(torch.float64)
            hvps += current.stop - current.start
            basis = Q[:, :filled]
            C = basis.T @ W
            W -= basis @ C
            correction = basis.T @ W
            W -= basis @ correction
            C += correction
            T[:filled, current] = C
            T[current, :filled] = C.T
            T[current, current] = (C[current] + C[current].T) / 2

            theta, S = torch.linalg.eigh(T[:filled, :filled])
            residual_all = torch.linalg.vector_norm(W @ S[current], dim=0)
            scale = max(scale, float(theta.abs().max()))
            order = torch.argsort(theta, descending=largest)
            wanted = order[: min(k, filled)]
            exhausted = filled >= size  # the basis spans everything: Ritz pairs are exact
            converged = residual_all[wanted] <= tol * max(scale, 1e-300)
            seconds = time.perf_counter() - began
            if callback is not None:
                callback(LanczosProgress(hvps, seconds, theta[wanted].cpu(), residual_all[wanted].cpu(), int(converged.sum())))
            out_of_time = time_budget is not None and seconds >= time_budget
            all_reduce = getattr(op, "all_reduce", None)
            if time_budget is not None and all_reduce is not None:  # every rank must stop together
                flag = torch.tensor([float(out_of_time)], dtype=torch.float64, device=device)
                out_of_time = bool(all_reduce(flag).item() > 0)
            if (len(wanted) == k and bool(converged.all())) or exhausted or hvps >= max_iter or out_of_time:
                break

            restart = filled + min(current.stop - current.start, size - filled) > basis_cap
            if restart:  # thick restart: keep the best Ritz vectors, continue from the residual block
                keep_count = min(max(k, k + (filled - k) // 2), basis_cap - (current.stop - current.start))
                keep = order[:keep_count]
                coupling_basis = S[current][:, keep]  # residual of Ritz vector i is W @ this[:, i]
                Q[:, :keep_count] = Q[:, :filled] @ S[:, keep]
                T.zero_()
                T[:keep_count, :keep_count] = torch.diag(theta[keep])
                filled = keep_count
                source = slice(0, keep_count)
            else:
                coupling_basis = None
                source = current
            Qn, R = _next_block(W, Q[:, :filled], size - filled, scale, generator)
            if coupling_basis is not None:
                R = R @ coupling_basis
            nxt = slice(filled, filled + Qn.shape[1])
            Q[:, nxt] = Qn
            T[nxt, source] = R
            T[source, nxt] = R.T
            filled = nxt.stop
            current = nxt

    values = theta[wanted]
    vectors = Q[:, :filled] @ S[:, wanted]
    residuals = residual_all[wanted]
    op_dtype = getattr(op, "dtype", torch.float64)
    flat = vectors.to(op_dtype)
    unflatten = getattr(op, "unflatten", None)
    eigenvectors = [unflatten(flat[:, i].contiguous()) if unflatten else flat[:, i].contiguous() for i in range(flat.shape[1])]
    counted = hvp_counter(op) - start_count
    return EigenResult(
        eigenvalues=values.cpu(),
        eigenvectors=eigenvectors,
        residuals=residuals.cpu(),
        converged=(residuals <= tol * max(scale, 1e-300)).cpu(),
        hvp_count=counted if counted > 0 else hvps,
        seconds=time.perf_counter() - began,
        vectors=flat,
        tol=tol,
    )


@dataclass
class BatchedLanczos:
    """Independent Lanczos recurrences run side by side (row ``r`` is recurrence ``r``).

    Attributes:
        alpha: (R, m) diagonals of the tridiagonal matrices.
        beta: (R, m) off-diagonals, ``beta[:, j]`` couples steps ``j`` and ``j + 1``.
        lengths: (R,) steps of each recurrence (shorter where it found an invariant subspace).
        start_norms: (R,) norms of the start vectors.
    """

    alpha: Tensor
    beta: Tensor
    lengths: Tensor
    start_norms: Tensor

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values, squared first components (quadrature weights) and residual estimates.

        All (R, m), float64; entries past a recurrence's length have weight 0 and value NaN.
        """
        rows, steps = self.alpha.shape
        values = torch.full((rows, steps), math.nan, dtype=torch.float64, device=self.alpha.device)
        weights = torch.zeros_like(values)
        residuals = torch.full_like(values, math.nan)
        for length in torch.unique(self.lengths).tolist():
            index = (self.lengths == length).nonzero().squeeze(1)
            a = self.alpha[index, :length]
            b = self.beta[index, : length - 1]
            T = torch.diag_embed(a) + torch.diag_embed(b, offset=1) + torch.diag_embed(b, offset=-1)
            theta, S = torch.linalg.eigh(T)
            values[index, :length] = theta
            weights[index, :length] = S[:, 0, :] ** 2
            residuals[index, :length] = (self.beta[index, length - 1 : length] * S[:, -1, :]).abs()
        return values, weights, residuals


@plain_tensors
def batched_lanczos(
    apply: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    stop: Callable[[BatchedLanczos], bool] | None = None,
) -> BatchedLanczos:
    """Run ``R`` independent Lanczos recurrences with full re-orthogonalisation, float64.

    Args:
        apply: ``apply(V, rows)`` returns the operator of each recurrence in ``rows`` applied to
            the matching row of ``V`` (shape (len(rows), P)); rows may share one batched pass.
        start: (R, P) start vectors (normalised here).
        steps: at most this many steps (capped at P).
        stop: called after each step with the recurrences so far; ``True`` ends early.
    """
    rows, size = start.shape
    steps = min(steps, size)
    device = start.device
    basis = torch.zeros(rows, steps + 1, size, dtype=torch.float64, device=device)
    alpha = torch.zeros(rows, steps, dtype=torch.float64, device=device)
    beta = torch.zeros(rows, steps, dtype=torch.float64, device=device)
    lengths = torch.full((rows,), steps, dtype=torch.long, device=device)
    start = start.to(torch.float64)
    start_norms = torch.linalg.vector_norm(start, dim=1)
    basis[:, 0] = start / start_norms.clamp_min(1e-300)[:, None]
    active = torch.ones(rows, dtype=torch.bool, device=device)
    scale = torch.zeros(rows, dtype=torch.float64, device=device)
    for step in range(steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        q = basis[index, step]
        w = apply(q, index).to(torch.float64)
        a = (q * w).sum(dim=1)
        alpha[index, step] = a
        previous = basis[index, : step + 1]  # (r, step+1, P)
        for _ in range(2):  # full re-orthogonalisation, twice
            w -= torch.bmm(torch.bmm(w.unsqueeze(1), previous.transpose(1, 2)), previous).squeeze(1)
        b = torch.linalg.vector_norm(w, dim=1)
        scale[index] = torch.maximum(scale[index], a.abs() + b)
        beta[index, step] = b
        if step + 1 < steps:
            basis[index, step + 1] = w / b.clamp_min(1e-300)[:, None]
        ended = b <= 1e-12 * scale[index].clamp_min(1e-300)  # invariant subspace: exact already
        if bool(ended.any()):
            finished = index[ended]
            lengths[finished] = step + 1
            active[finished] = False
        if stop is not None:
            current = torch.minimum(lengths, torch.full_like(lengths, step + 1))
            if stop(BatchedLanczos(alpha[:, : step + 1], beta[:, : step + 1], current, start_norms)):
                lengths = current
                alpha, beta = alpha[:, : step + 1], beta[:, : step + 1]
                break
    return BatchedLanczos(alpha, beta, lengths, start_norms)
