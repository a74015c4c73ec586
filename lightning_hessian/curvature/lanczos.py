"""Extreme eigenpairs of a symmetric operator: block Lanczos with full re-orthogonalisation.

The Krylov basis :math:`Q` is kept in float64, one row per basis vector (each vector contiguous
in memory) in a buffer allocated once. The projected matrix :math:`T = Q^\\top H Q` is kept dense,
so a thick restart (keep the best Ritz vectors, continue from the residual block) needs no special
structure.

Each step multiplies the newest block :math:`Q_j` by :math:`H` and orthogonalises the product
:math:`W` in two stages: first against the blocks it is coupled to in exact arithmetic (itself and
its predecessor, the three-term recurrence), which removes the large components; then one
classical Gram-Schmidt pass against the whole basis removes what rounding left. A second full pass
runs only when that pass shrank a vector below :math:`1/\\sqrt2` of its norm (the
Daniel-Gragg-Kaufman-Stewart test): only then could cancellation have cost orthogonality ("twice is
enough", Kahan-Parlett). The residual block is then normalised, :math:`W = Q_{j+1} R_j` (a plain
division for single vectors, QR for blocks), so that

.. math:: H Q = Q T + Q_{j+1} R_j E_j^\\top,
          \\qquad \\lVert H Q s_i - \\theta_i Q s_i \\rVert = \\lVert R_j s_{i,j} \\rVert

for each Ritz pair :math:`(\\theta_i, Q s_i)` of ``eigh(T)`` (:math:`s_{i,j}` is the part of
:math:`s_i` on the newest block): residual norms cost a few small products, never a pass over
:math:`W` or :math:`Q`.

:func:`batched_lanczos` runs many independent single-vector recurrences at once (one ``apply``
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
    LinearOperator,
    operator_context,
    operator_device,
    operator_rows,
    plain_tensors,
    random_normal,
    row_dots,
    seeded_generator,
)
from lightning_hessian.curvature.results import EigenResult, LanczosProgress
from lightning_hessian.errors import UserInputError

__all__ = [
    "BatchedLanczos",
    "EigenResult",
    "LanczosProgress",
    "batched_lanczos",
    "top_eigenvalues",
]

#: A Gram-Schmidt pass that leaves less than this fraction of a vector's norm may have lost
#: orthogonality to cancellation: a second pass follows (Daniel, Gragg, Kaufman, Stewart 1976).
_SECOND_PASS_BELOW = 1 / math.sqrt(2)
#: A residual this small relative to the spectral-norm estimate means an invariant subspace.
_INVARIANT_SUBSPACE = 1e-12
#: No residual counts as smaller than this many float64 round-offs of the spectral-norm estimate
#: in the convergence test: the residuals come from the recurrence, and the products and the
#: Rayleigh-Ritz step round at about that level.
_ROUNDING_FLOOR = 16 * torch.finfo(torch.float64).eps


def _start_block(
    op: LinearOperator, init: Sequence[Any] | None, block: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    """(block, P) start rows: random, or the warm-start vectors plus a small random part."""
    size = op.num_params
    start = random_normal((block, size), generator, device)
    if init:
        guess = torch.zeros(block, size, dtype=torch.float64, device=device)
        flatten = getattr(op, "flatten", None)
        for index, vector in enumerate(init):
            if isinstance(vector, Mapping):
                if flatten is None:
                    raise UserInputError(
                        f"init holds parameter dictionaries, but {type(op).__name__} has no flatten();"
                        " pass flat tensors."
                    )
                vector = flatten(vector)
            flat = vector.detach().reshape(-1).to(device, torch.float64)
            guess[index % block] += flat / flat.norm().clamp_min(1e-300)
        # A small random part keeps eigenvectors orthogonal to the guess reachable.
        start = guess + 1e-2 * start / math.sqrt(size)
    return start


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """Orthonormal rows spanning ``rows``: a division for one row, QR for several."""
    if rows.shape[0] == 1:
        return rows / torch.linalg.vector_norm(rows).clamp_min(1e-300)
    return torch.linalg.qr(rows.T).Q.T


def _project_out(basis: Tensor, W: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass: ``W -= C^T basis`` in place with ``C = basis W^T``.

    Args:
        basis: (m, P) orthonormal rows.
        W: (b, P) rows to orthogonalise against ``basis``.

    Returns:
        The (m, b) coefficients ``C`` that were removed.
    """
    if W.shape[0] == 1:  # matrix-vector products: one read of the basis each
        coefficients = torch.mv(basis, W[0])
        W[0].addmv_(basis.T, coefficients, alpha=-1.0)
        return coefficients[:, None]
    coefficients = (W @ basis.T).T  # this orientation of the GEMM is the faster one for P >> m
    W.addmm_(coefficients.T, basis, alpha=-1.0)
    return coefficients


def _orthogonalise(Q: Tensor, filled: int, local: slice, W: Tensor) -> Tensor:
    """Orthogonalise ``W`` (b, P) against ``Q[:filled]`` in place; returns ``Q[:filled] @ W^T``.

    ``Q[local]`` are the rows holding :math:`W`'s large components (the recurrence's coupling);
    they are removed first, then one pass over every row removes rounding, and a second pass
    follows only when the first shrank a row by more than the DGKS factor.

    Returns:
        The (filled, b) float64 coefficients removed from ``W``: ``Q[:filled] @ W^T`` of the
        ``W`` passed in.
    """
    coefficients = torch.zeros(filled, W.shape[0], dtype=torch.float64, device=W.device)
    coefficients[local] += _project_out(Q[local], W)
    basis = Q[:filled]
    before = torch.linalg.vector_norm(W, dim=1)
    coefficients += _project_out(basis, W)
    after = torch.linalg.vector_norm(W, dim=1)
    if bool((after < _SECOND_PASS_BELOW * before).any()):
        coefficients += _project_out(basis, W)
    return coefficients


def _fresh_rows(bases: Sequence[Tensor], count: int, generator: torch.Generator) -> Tensor:
    """``count`` random orthonormal rows orthogonal to every row of ``bases``."""
    first = bases[0]
    fresh = random_normal((count, first.shape[1]), generator, first.device)
    for _ in range(2):
        for basis in bases:
            if basis.shape[0]:
                _project_out(basis, fresh)
    return _orthonormal_rows(fresh)


def _normalise_block(
    W: Tensor, basis: Tensor, room: int, scale: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Orthonormal rows ``N`` spanning the residual block ``W`` (already orthogonal to ``basis``)
    and the coupling ``R`` with ``W = R^T N`` read row-wise (``W^T = N^T R``); at most ``room`` rows.

    Directions with a negligible norm mean an invariant subspace was found: they are replaced by
    random directions orthogonal to everything, with zero coupling, so the search continues
    (exact in exact arithmetic).

    Args:
        W: (b, P) the orthogonalised product block.
        basis: (m, P) the current basis (fresh directions are made orthogonal to it).
        room: dimensions left outside the basis.
        scale: the spectral-norm estimate (norms below ``1e-12 * scale`` count as zero).
        generator: source of fresh directions.

    Returns:
        ``N`` (count, P) and ``R`` (count, b), ``count = min(b, room)``.
    """
    width = W.shape[0]
    count = min(width, room)
    threshold = _INVARIANT_SUBSPACE * max(scale, 1e-300)
    if width == 1:
        beta = torch.linalg.vector_norm(W[0])
        if count == 0:
            return W[:0], W.new_zeros(0, 1)
        if float(beta) > threshold:
            return W / beta, beta.reshape(1, 1)
        return _fresh_rows([basis], 1, generator), W.new_zeros(1, 1)
    factor_q, factor_r = torch.linalg.qr(W.T)  # W^T = factor_q factor_r
    if count == width:
        if bool((torch.linalg.svdvals(factor_r) > threshold).all()):
            return factor_q.T, factor_r
    # Rank-deficient (or no room): the SVD of the small R factor gives W's singular directions.
    left, singular, right_h = torch.linalg.svd(factor_r)
    rank = min(int((singular > threshold).sum()), count)
    rows = (factor_q @ left[:, :rank]).T
    coupling = singular[:rank, None] * right_h[:rank]
    if rank < count:
        rows = torch.cat([rows, _fresh_rows([basis, rows], count - rank, generator)])
        coupling = torch.cat([coupling, coupling.new_zeros(count - rank, width)])
    return rows, coupling


@plain_tensors
def top_eigenvalues(
    op: LinearOperator,
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

    What ``converged`` means: a pair is flagged converged when its residual
    :math:`r_i = \\lVert H y_i - \\theta_i y_i \\rVert` is at most ``tol * |theta_i|`` (the same
    relative test as ARPACK's and ``scipy.sparse.linalg.eigsh``'s ``tol``). That guarantees:

    * some eigenvalue of :math:`H` lies within :math:`r_i \\le` ``tol * |theta_i|`` of
      :math:`\\theta_i` (true for any unit vector and its Rayleigh quotient); and since the Ritz
      vectors are orthonormal, the :math:`k` values lie within
      :math:`(\\sum_i r_i^2)^{1/2}` of :math:`k` distinct eigenvalues (Kahan);
    * :math:`\\theta_i \\le \\lambda_i` for ``"largest"`` (:math:`\\ge` for ``"smallest"``): Ritz
      values interlace the spectrum, so a returned value never overshoots the :math:`i`-th
      eigenvalue;
    * that eigenvalue is :math:`\\lambda_i` itself, so the value is within ``tol`` relative of
      the true :math:`i`-th eigenvalue, when the wanted eigenvalues stand out from the rest of
      the spectrum by more than ``tol`` (outliers, as the top of a Hessian's spectrum usually
      is) and the start vector has a component along each of them. A Krylov method cannot
      detect an eigenvalue it has not found yet: inside a cluster spaced closer than ``tol``, at
      the edge of a dense bulk, or for exactly repeated eigenvalues (use ``block_size`` at least
      the multiplicity), a converged value can be a deeper eigenvalue than the :math:`i`-th
      (``tests/curvature/test_lanczos.py`` checks each case).

    Residuals are those of the exact recurrence: products rounded in float32 add an error of the
    order of their own rounding (about 1e-7 to 1e-6 of :math:`\\lVert H \\rVert`; use a float64
    operator for tolerances near that), and no residual counts as smaller than
    :math:`16\\epsilon_{64} \\lVert H \\rVert` in the test.

    Args:
        op: a :class:`~lightning_hessian.curvature.operator.HessianOperator` or any object with
            ``num_params`` and ``matvec``/``matmat`` (:class:`~lightning_hessian.curvature.linear.
            LinearOperator`).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraically largest, the sharpness :math:`\\lambda_1`) or
            ``"smallest"`` (most negative curvature: is the point a saddle?).
        tol: relative residual that counts as converged, hence the relative accuracy of the
            eigenvalues (see above).
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

    Returns:
        An :class:`EigenResult`; ``hvp_count`` counts every product this call made.

    Raises:
        UserInputError: for a bad ``k``, ``which``, ``tol``, ``block_size`` or ``backend``, or
            parameter dictionaries in ``init`` for an operator without ``flatten``.
    """
    if backend == "pyhessian":
        from lightning_hessian.curvature.pyhessian_backend import pyhessian_top_eigenvalues

        return pyhessian_top_eigenvalues(op, k=k, tol=tol, max_iter=max_iter or 100, seed=seed)
    if backend != "native":
        raise UserInputError(f"backend={backend!r} must be 'native' or 'pyhessian'.")
    if which not in ("largest", "smallest"):
        raise UserInputError(f"which={which!r} must be 'largest' or 'smallest'.")
    size = int(op.num_params)
    if not 1 <= k <= size:
        raise UserInputError(f"k={k} must be between 1 and the number of parameters ({size}).")
    if block_size < 1:
        raise UserInputError(f"block_size={block_size} must be at least 1.")
    if tol <= 0:
        raise UserInputError(f"tol={tol} must be positive, e.g. 1e-4.")
    block = min(block_size, size)
    max_iter = max_iter if max_iter is not None else max(300, 50 * k)
    basis_cap = min(size, krylov_size or max(2 * k + 2 * block + 16, 32))
    basis_cap = max(basis_cap, min(size, k + 2 * block))
    device = operator_device(op)
    generator = seeded_generator(seed)
    largest = which == "largest"
    began = time.perf_counter()
    hvps = 0

    # Preallocated, one basis vector per row (uninitialised: only rows below `filled` are read,
    # and zeroing would cost a pass over the whole buffer); T is the projected matrix Q^T H Q.
    Q = torch.empty(basis_cap + block, size, dtype=torch.float64, device=device)
    T = torch.zeros(basis_cap + block, basis_cap + block, dtype=torch.float64, device=device)
    Q[:block] = _orthonormal_rows(_start_block(op, init, block, generator, device))
    filled, current, local = block, slice(0, block), slice(0, block)
    scale = 0.0

    with operator_context(op):
        while True:
            width = current.stop - current.start
            W = operator_rows(op, Q[current])
            hvps += width
            coefficients = _orthogonalise(Q, filled, local, W)
            T[:filled, current] = coefficients
            T[current, :filled] = coefficients.T
            T[current, current] = (coefficients[current] + coefficients[current].T) / 2

            theta, S = torch.linalg.eigh(T[:filled, :filled])  # ascending
            scale = max(scale, float(theta.abs().max()))
            next_rows, coupling = _normalise_block(W, Q[:filled], size - filled, scale, generator)
            residual_all = torch.linalg.vector_norm(coupling @ S[current], dim=0)
            order = torch.argsort(theta, descending=largest)
            wanted = order[: min(k, filled)]
            exhausted = filled >= size  # the basis spans everything: Ritz pairs are exact
            converged = residual_all[wanted].clamp_min(_ROUNDING_FLOOR * scale) <= tol * theta[wanted].abs()
            seconds = time.perf_counter() - began
            if callback is not None:
                callback(
                    LanczosProgress(
                        hvps, seconds, theta[wanted].cpu(), residual_all[wanted].cpu(), int(converged.sum())
                    )
                )
            out_of_time = time_budget is not None and seconds >= time_budget
            all_reduce = getattr(op, "all_reduce", None)
            if time_budget is not None and all_reduce is not None:  # every rank must stop together
                flag = torch.tensor([float(out_of_time)], dtype=torch.float64, device=device)
                out_of_time = bool(all_reduce(flag).item() > 0)
            if (len(wanted) == k and bool(converged.all())) or exhausted or hvps >= max_iter or out_of_time:
                break

            if filled + next_rows.shape[0] > basis_cap:
                # Thick restart: keep the best Ritz vectors, continue from the residual block,
                # whose coupling to Ritz vector i is R s_{i,current}.
                keep_count = min(max(k, k + (filled - k) // 2), basis_cap - width)
                keep = order[:keep_count]
                coupling = coupling @ S[current][:, keep]
                Q[:keep_count] = S[:, keep].T @ Q[:filled]
                T.zero_()
                T[:keep_count, :keep_count] = torch.diag(theta[keep])
                filled = keep_count
                source = slice(0, keep_count)
            else:
                source = current
            nxt = slice(filled, filled + next_rows.shape[0])
            Q[nxt] = next_rows
            T[nxt, source] = coupling
            T[source, nxt] = coupling.T
            filled, current, local = nxt.stop, nxt, slice(source.start, nxt.stop)

    values = theta[wanted]
    rows = (S[:, wanted].T @ Q[:filled]).to(getattr(op, "dtype", torch.float64))
    unflatten = getattr(op, "unflatten", None)
    eigenvectors = [unflatten(rows[i]) if unflatten else rows[i] for i in range(rows.shape[0])]
    return EigenResult(
        eigenvalues=values.cpu(),
        eigenvectors=eigenvectors,
        residuals=residual_all[wanted].cpu(),
        converged=converged.cpu(),
        hvp_count=hvps,
        seconds=time.perf_counter() - began,
        vectors=rows.T,
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
        """Ritz values, squared first components (quadrature weights) and residual norms.

        The residual of Ritz pair :math:`(\\theta_i, s_i)` after :math:`m` steps is
        :math:`|\\beta_m s_{i,m}|` (last component of :math:`s_i`).

        Returns:
            Three (R, m) float64 tensors; entries past a recurrence's length have weight 0 and
            value NaN.
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


def _orthogonalise_each(basis: Tensor, beta: Tensor, step: int, index: Tensor, w: Tensor) -> Tensor:
    """One recurrence at a time (CPU: matrix-vector products on each contiguous basis, no copy).

    Args:
        basis: (R, steps, P) the recurrences' bases.
        beta: (R, steps) the off-diagonals so far.
        step: the step being taken; ``basis[:, step]`` was multiplied.
        index: the recurrences ``w`` belongs to.
        w: (len(index), P) products, orthogonalised in place.

    Returns:
        (len(index),) the diagonal coefficients :math:`\\alpha` (with the re-orthogonalisation's
        correction along :math:`q_j`).
    """
    alphas = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    for position, row in enumerate(index.tolist()):
        q, v = basis[row, step], w[position]
        a = torch.dot(q, v)
        v.sub_(q, alpha=float(a))  # the three-term recurrence removes the large components first
        if step > 0:
            v.sub_(basis[row, step - 1], alpha=float(beta[row, step - 1]))
        before = torch.linalg.vector_norm(v)
        earlier = basis[row, : step + 1]  # a view: each recurrence's basis is contiguous
        correction = _project_out(earlier, v[None])[:, 0]
        if bool(torch.linalg.vector_norm(v) < _SECOND_PASS_BELOW * before):
            correction += _project_out(earlier, v[None])[:, 0]
        alphas[position] = a + correction[step]
    return alphas


def _orthogonalise_batched(basis: Tensor, beta: Tensor, step: int, index: Tensor, w: Tensor) -> Tensor:
    """All recurrences in batched products (accelerators: few kernel launches).

    Finished recurrences take part as zero rows, so the basis is read through a view, never
    gathered. Arguments as :func:`_orthogonalise_each`.

    Returns:
        (len(index),) the diagonal coefficients :math:`\\alpha`, as :func:`_orthogonalise_each`.
    """
    rows = basis.shape[0]
    if index.numel() == rows:
        full = w
    else:
        full = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
        full[index] = w
    live = torch.zeros(rows, dtype=torch.float64, device=w.device)
    live[index] = 1.0
    q = basis[:, step]
    a = row_dots(q, full)
    full.sub_(q * a[:, None])
    if step > 0:
        full.sub_(basis[:, step - 1] * (beta[:, step - 1] * live)[:, None])
    before = torch.linalg.vector_norm(full, dim=1)
    earlier = basis[:, : step + 1]
    correction = torch.zeros(rows, step + 1, dtype=torch.float64, device=w.device)
    for _ in range(2):
        coefficients = torch.bmm(earlier, full[:, :, None])  # (R, step + 1, 1)
        full[:, None, :].baddbmm_(coefficients.transpose(1, 2), earlier, alpha=-1.0)
        correction += coefficients[:, :, 0]
        if not bool((torch.linalg.vector_norm(full, dim=1) < _SECOND_PASS_BELOW * before).any()):
            break
    if full is not w:
        w.copy_(full[index])
    return (a + correction[:, step])[index]


@plain_tensors
def batched_lanczos(
    apply: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    steps: int,
    *,
    stop: Callable[[BatchedLanczos], bool] | None = None,
) -> BatchedLanczos:
    """Run ``R`` independent Lanczos recurrences with full re-orthogonalisation, float64.

    Each step: :math:`w = A_r q_j`, :math:`\\alpha_j = q_j^\\top w`, the three-term recurrence
    :math:`w \\leftarrow w - \\alpha_j q_j - \\beta_{j-1} q_{j-1}`, then one Gram-Schmidt pass
    against all earlier :math:`q` of that recurrence (a second only where the first shrank
    :math:`w` by more than :math:`1/\\sqrt 2`), :math:`\\beta_j = \\lVert w \\rVert`,
    :math:`q_{j+1} = w/\\beta_j`. The bases are stored once, (R, steps, P), each vector
    contiguous; no step copies them.

    Args:
        apply: ``apply(V, rows)`` returns the operator of each recurrence in ``rows`` applied to
            the matching row of ``V`` (shape (len(rows), P)); rows may share one batched pass.
        start: (R, P) start vectors (normalised here).
        steps: at most this many steps (capped at P).
        stop: called after each step with the recurrences so far; ``True`` ends early.

    Returns:
        The recurrences' coefficients as a :class:`BatchedLanczos`.
    """
    rows, size = start.shape
    steps = min(steps, size)
    device = start.device
    basis = torch.empty(rows, steps, size, dtype=torch.float64, device=device)  # only written rows are read
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
        vectors = basis[:, step] if index.numel() == rows else basis[index, step]
        w = apply(vectors, index).to(torch.float64).contiguous()
        orthogonalise = _orthogonalise_each if w.device.type == "cpu" else _orthogonalise_batched
        alpha[index, step] = orthogonalise(basis, beta, step, index, w)
        b = torch.linalg.vector_norm(w, dim=1)
        scale[index] = torch.maximum(scale[index], alpha[index, step].abs() + b)
        beta[index, step] = b
        if step + 1 < steps:
            norms = b.clamp_min(1e-300)[:, None]
            if index.numel() == rows:
                torch.div(w, norms, out=basis[:, step + 1])
            else:
                basis[index, step + 1] = w / norms
        ended = b <= _INVARIANT_SUBSPACE * scale[index].clamp_min(1e-300)  # invariant subspace: exact already
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
