"""Lanczos: what ``converged`` guarantees on known spectra, the re-orthogonalisation, invariant
subspaces, blocks, the batched recurrences, and the curvature package's import graph.

Oracles: dense float64 matrices with chosen spectra in a random orthonormal basis
(``torch.linalg.eigvalsh`` of the matrix itself for the exact eigenvalues), and explicit
Gram-Schmidt / moment identities.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

import lightning_hessian.curvature.lanczos as lanczos
from lightning_hessian.curvature import EigenResult, LanczosProgress, MatrixOperator, top_eigenvalues
from lightning_hessian.curvature.lanczos import batched_lanczos
from lightning_hessian.curvature.linear import operator_rows
from lightning_hessian.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 300


def rotated(spectrum: torch.Tensor, seed: int = 1000) -> torch.Tensor:
    """``Q diag(spectrum) Q^T`` for a random orthonormal ``Q``, symmetrised, float64.

    The basis seeds stay away from the Lanczos seeds (0-9): the start vector of seed s is the
    first row of the Gaussian matrix of seed s, which would correlate it with ``Q``.
    """
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(spectrum.numel(), spectrum.numel(), dtype=torch.float64, generator=generator))
    A = (Q * spectrum) @ Q.T
    return (A + A.T) / 2


def bulk(count: int, low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, dtype=torch.float64, generator=generator)


SPECTRA = {
    # 12 eigenvalues 0.5 % apart above a bulk: tight, Hessian-like outliers
    "clustered": torch.cat([10 - 0.05 * torch.arange(12, dtype=torch.float64), bulk(SIZE - 12, 0.0, 5.0, 1)]),
    # near-degenerate pairs (relative gaps 1e-4 and 1.1e-5)
    "close_gaps": torch.cat(
        [torch.tensor([10.0, 10 - 1e-3, 9.0, 9 - 1e-4, 8.0], dtype=torch.float64), bulk(SIZE - 5, 0.0, 6.0, 2)]
    ),
    # outliers of both signs around an indefinite bulk
    "indefinite": torch.cat(
        [torch.tensor([-9.0, 8.5, -8.0, 7.5, -7.0, 6.5], dtype=torch.float64), bulk(SIZE - 6, -3.0, 3.0, 3)]
    ),
}


def relative_spacing(values: torch.Tensor) -> float:
    """Smallest gap between consecutive entries of ``values``, relative to their magnitude."""
    return float(((values[:-1] - values[1:]).abs() / values[1:].abs()).min())


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-6])
@pytest.mark.parametrize(
    ("name", "which", "k", "outliers"),
    [
        ("clustered", "largest", 5, True),
        ("close_gaps", "largest", 4, True),
        ("indefinite", "largest", 3, True),
        ("indefinite", "smallest", 3, True),
        ("indefinite", "largest", 6, False),
    ],
)
def test_converged_eigenvalues_keep_the_documented_guarantee(
    name: str, which: str, k: int, outliers: bool, tol: float
) -> None:
    """Every converged pair, over several seeds: its residual is its true residual and at most
    ``tol * |theta|``; an eigenvalue lies within it; the value never overshoots the i-th
    eigenvalue. Where the wanted eigenvalues are outliers spaced by more than ``tol`` (relative),
    each value is within ``tol`` relative of the i-th eigenvalue itself. (The last case reaches
    into the bulk, where only the first guarantees hold: see ``top_eigenvalues``.)"""
    A = rotated(SPECTRA[name])
    exact = torch.linalg.eigvalsh(A)
    norm = float(exact.abs().max())
    ordered = exact.flip(0) if which == "largest" else exact
    resolvable = outliers and tol < relative_spacing(ordered[: k + 1])
    for seed in range(4):
        result = top_eigenvalues(MatrixOperator(A), k=k, which=which, tol=tol, seed=seed, max_iter=3000)
        assert result.converged.all(), (name, seed)  # not vacuous: everything is checked below
        for i, (value, vector, residual) in enumerate(
            zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True)
        ):
            true_residual = float(torch.linalg.vector_norm(A @ vector - value * vector))
            assert abs(true_residual - float(residual)) <= 1e-9 * norm
            assert float(residual) <= tol * abs(float(value)) + 1e-13 * norm
            assert float((exact - value).abs().min()) <= float(residual) + 1e-12 * norm  # some eigenvalue
            if which == "largest":
                assert value <= ordered[i] + 1e-12 * norm  # interlacing
            else:
                assert value >= ordered[i] - 1e-12 * norm
            if resolvable:
                assert abs(float(value - ordered[i])) <= tol * abs(float(ordered[i])), (name, seed, i)


def test_tolerance_is_relative_to_each_eigenvalue_not_to_the_norm() -> None:
    """The 2nd eigenvalue is 100 times smaller than the 1st: it must still meet ``tol`` relative
    to itself (a test against ``tol * ||H||`` would accept a 10 % error here)."""
    spectrum = torch.cat([torch.tensor([100.0, 1.0], dtype=torch.float64), bulk(SIZE - 2, -0.8, 0.8, 4)])
    A = rotated(spectrum, seed=1005)
    for seed in range(4):
        result = top_eigenvalues(MatrixOperator(A), k=2, tol=1e-3, seed=seed)
        assert result.converged.all()
        assert abs(float(result.eigenvalues[1]) - 1.0) <= 1e-3
        assert float(result.residuals[1]) <= 1e-3 * float(result.eigenvalues[1])


def test_eigenvectors_are_orthonormal_and_block_runs_agree_after_restarts() -> None:
    A = rotated(SPECTRA["indefinite"], seed=1006)
    exact = torch.linalg.eigvalsh(A).flip(0)[:3]
    single = top_eigenvalues(MatrixOperator(A), k=3, tol=1e-10, krylov_size=10)
    blocked = top_eigenvalues(MatrixOperator(A), k=3, tol=1e-10, krylov_size=10, block_size=3)
    for result in (single, blocked):
        assert result.converged.all() and result.hvp_count > 10  # restarted at least once
        assert torch.allclose(result.eigenvalues, exact, rtol=1e-9)
        vectors = torch.stack(result.eigenvectors)
        assert torch.allclose(vectors @ vectors.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
        assert result.vectors is not None and result.vectors.shape == (SIZE, 3)


@pytest.mark.parametrize("block_size", [1, 2])
def test_invariant_subspaces_continue_with_fresh_directions(block_size: int) -> None:
    """Three distinct eigenvalues: the recurrence spans an invariant subspace after three
    steps and must continue with orthogonal fresh directions, without breaking down. The pairs
    it returns are exact (the documented limit: it cannot tell how often 5 repeats)."""
    spectrum = torch.tensor([5.0] * 10 + [3.0] * 10 + [1.0] * 10, dtype=torch.float64)
    A = rotated(spectrum, seed=1007)
    result = top_eigenvalues(MatrixOperator(A), k=4, tol=1e-10, block_size=block_size)
    assert result.converged.all() and len(result.eigenvalues) == 4
    assert float(result.eigenvalues[0]) == pytest.approx(5.0, rel=1e-12)
    assert bool((result.eigenvalues[:-1] >= result.eigenvalues[1:]).all())
    assert (
        float(
            (result.eigenvalues[:, None] - torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)).abs().amin(dim=1).max()
        )
        < 1e-10
    )
    vectors = torch.stack(result.eigenvectors)
    assert torch.allclose(vectors @ vectors.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert float(torch.linalg.matrix_norm(A @ vectors.T - vectors.T * result.eigenvalues)) < 1e-9


def test_exact_double_eigenvalue_needs_a_block() -> None:
    """The documented limit: a block of 2 finds both copies of a double top eigenvalue."""
    spectrum = torch.cat([torch.tensor([7.0, 7.0], dtype=torch.float64), bulk(SIZE - 2, 0.0, 3.0, 8)])
    A = rotated(spectrum, seed=1009)
    result = top_eigenvalues(MatrixOperator(A), k=2, tol=1e-9, block_size=2)
    assert result.converged.all() and torch.allclose(
        result.eigenvalues, torch.full((2,), 7.0, dtype=torch.float64), rtol=1e-9
    )


def test_second_gram_schmidt_pass_runs_when_cancellation_costs_orthogonality() -> None:
    """A vector almost inside the basis: one classical Gram-Schmidt pass leaves it visibly
    non-orthogonal (rounding of the removed part over the tiny remainder); the norm-drop test
    triggers the second pass, which restores orthogonality to rounding level."""
    generator = torch.Generator().manual_seed(10)
    basis = torch.linalg.qr(torch.randn(2000, 20, dtype=torch.float64, generator=generator)).Q.T.contiguous()
    inside = torch.randn(1, 20, dtype=torch.float64, generator=generator) @ basis
    W = inside + 1e-10 * torch.randn(1, 2000, dtype=torch.float64, generator=generator)
    once = W.clone()
    lanczos._project_out(basis, once)
    loss_once = float((basis @ once[0]).abs().max() / once.norm())
    Q = torch.zeros(24, 2000, dtype=torch.float64)
    Q[:20] = basis
    coefficients = lanczos._orthogonalise(Q, 20, slice(18, 20), W)
    loss = float((basis @ W[0]).abs().max() / W.norm())
    assert loss_once > 1e-9  # one pass is not enough here ...
    assert loss < 1e-13  # ... the test asked for the second
    assert torch.allclose(coefficients[:, 0], basis @ inside[0], atol=1e-12)


def test_one_pass_suffices_in_an_ordinary_step() -> None:
    """Without cancellation (the three-term part removed first) the second pass is skipped."""
    generator = torch.Generator().manual_seed(11)
    basis = torch.linalg.qr(torch.randn(500, 10, dtype=torch.float64, generator=generator)).Q.T.contiguous()
    W = torch.randn(1, 500, dtype=torch.float64, generator=generator)
    Q = torch.zeros(12, 500, dtype=torch.float64)
    Q[:10] = basis
    passes = []
    original = lanczos._project_out

    def counting(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        passes.append(rows.shape[0])
        return original(rows, vectors)

    lanczos._project_out = counting
    try:
        lanczos._orthogonalise(Q, 10, slice(8, 10), W)
    finally:
        lanczos._project_out = original
    assert passes == [2, 10]  # the local rows, then one full pass
    assert float((basis @ W[0]).abs().max() / W.norm()) < 1e-14


def diagonal_apply(diagonals: torch.Tensor):
    """``apply(V, rows)`` for recurrence ``r`` on ``diag(diagonals[r])``."""

    def apply(vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return vectors * diagonals[rows]

    return apply


def test_batched_lanczos_quadrature_is_exact_for_low_moments() -> None:
    """Gauss quadrature with m nodes is exact for polynomials of degree < 2m:
    sum_i w_i theta_i^p = q^T A^p q / |q|^2 for p <= 2m - 1, per recurrence."""
    generator = torch.Generator().manual_seed(12)
    diagonals = torch.rand(3, 400, dtype=torch.float64, generator=generator) * 4 - 1
    start = torch.randn(3, 400, dtype=torch.float64, generator=generator)
    run = batched_lanczos(diagonal_apply(diagonals), start, 8)
    nodes, weights, _ = run.ritz()
    unit = start / start.norm(dim=1, keepdim=True)
    for power in range(1, 16):
        quadrature = (weights * nodes**power).sum(dim=1)
        moment = (unit**2 * diagonals**power).sum(dim=1)
        assert torch.allclose(quadrature, moment, rtol=1e-9, atol=1e-12), power


def test_batched_paths_agree_and_finished_recurrences_stay_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-recurrence (CPU) and batched (accelerator) orthogonalisation give the same
    recurrences, also when one recurrence ends early at an invariant subspace."""
    generator = torch.Generator().manual_seed(13)
    diagonals = torch.rand(3, 300, dtype=torch.float64, generator=generator) + 1
    diagonals[1] = torch.tensor([2.0, 5.0]).repeat(150).double()  # two eigenvalues: ends after 2 steps
    start = torch.randn(3, 300, dtype=torch.float64, generator=generator)
    each = batched_lanczos(diagonal_apply(diagonals), start, 12)
    monkeypatch.setattr(lanczos, "_orthogonalise_each", lanczos._orthogonalise_batched)
    batched = batched_lanczos(diagonal_apply(diagonals), start, 12)
    assert each.lengths.tolist() == batched.lengths.tolist() == [12, 2, 12]
    assert torch.allclose(each.alpha, batched.alpha, rtol=1e-10, atol=1e-12)
    assert torch.allclose(each.beta, batched.beta, rtol=1e-10, atol=1e-12)
    nodes, _, _ = each.ritz()
    assert torch.allclose(nodes[1, :2], torch.tensor([2.0, 5.0], dtype=torch.float64), rtol=1e-10)


def test_rows_reach_the_operator_without_transposing_copies() -> None:
    """``operator_rows`` passes the transpose of contiguous rows; ``MatrixOperator`` answers with
    the transpose of a row-major result; the product is the same as ``A @ V``."""
    generator = torch.Generator().manual_seed(14)
    A = torch.randn(50, 50, dtype=torch.float64, generator=generator)
    rows = torch.randn(3, 50, dtype=torch.float64, generator=generator)
    op = MatrixOperator(A)
    product = op.matmat(rows.T)
    assert product.T.is_contiguous() and torch.allclose(product, A @ rows.T, rtol=1e-12, atol=1e-12)
    out = operator_rows(op, rows)
    assert (
        out.is_contiguous() and out.dtype == torch.float64 and torch.allclose(out, rows @ A.T, rtol=1e-12, atol=1e-12)
    )
    assert op.hvp_count == 6
    strided = torch.randn(50, 3, dtype=torch.float64, generator=generator)  # column layout: the plain product
    assert torch.allclose(op.matmat(strided), A @ strided, rtol=1e-12, atol=1e-12)


def test_bad_settings_are_user_errors() -> None:
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    for kwargs, match in [
        ({"k": 5}, "k=5"),
        ({"which": "top"}, "which='top'"),
        ({"tol": 0.0}, "tol=0.0"),
        ({"block_size": 0}, "block_size=0"),
        ({"backend": "arpack"}, "backend='arpack'"),
    ]:
        with pytest.raises(UserInputError, match=match):
            top_eigenvalues(op, **kwargs)
    with pytest.raises(UserInputError, match="square"):
        MatrixOperator(torch.zeros(2, 3))


# ------------------------------------------------------------------------------ import graph

PACKAGE = Path(lanczos.__file__).resolve().parents[1]  # .../lightning_hessian


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> package modules it imports anywhere in its source, function bodies included
    (a lazy import closes a cycle as surely as one at the top). A module's own parent packages
    are imported before it anyway and are left out."""
    sources = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in sources and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle_and_results_import_no_algorithm() -> None:
    """design.md: each layer imports only the layers before it. The result types sit below the
    algorithms, so the PyHessian adapter and the algorithms never import each other back."""
    graph = import_graph()
    assert find_cycle(graph) is None, find_cycle(graph)
    assert graph["lightning_hessian.curvature.results"] == set()
    for module in ("lanczos", "trace", "density", "pyhessian_backend"):
        assert "lightning_hessian.curvature.results" in graph[f"lightning_hessian.curvature.{module}"]
    # the operator's parts sit below it: the "auto" mode choice and the retained graph reach no operator
    operator = "lightning_hessian.curvature.operator"
    parts = {"lightning_hessian.curvature.hvp_tuning", "lightning_hessian.curvature.retained_graph"}
    assert parts <= graph[operator]
    for part in parts:
        reached, frontier = set(), {part}
        while frontier:
            reached |= frontier
            frontier = {t for m in frontier for t in graph[m]} - reached
        assert operator not in reached, part
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_result_types_keep_their_old_import_locations() -> None:
    results = importlib.import_module("lightning_hessian.curvature.results")
    for module, names in [
        ("lanczos", ["EigenResult", "LanczosProgress"]),
        ("trace", ["TraceResult"]),
        ("density", ["DensityResult"]),
        ("", ["EigenResult", "LanczosProgress", "TraceResult", "DensityResult"]),
    ]:
        source = importlib.import_module("lightning_hessian.curvature" + (f".{module}" if module else ""))
        for name in names:
            assert getattr(source, name) is getattr(results, name)
    assert EigenResult is results.EigenResult and LanczosProgress is results.LanczosProgress
