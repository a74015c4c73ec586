"""Adaptive trace estimation against exact traces: a float64 network Hessian and matrices with
known spectra (flat, dominated by a few large eigenvalues, indefinite, tiny)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import exact_hessian, make_mlp

import lightning_hessian.curvature.trace as trace_module
from lightning_hessian.curvature import HessianOperator, MatrixOperator, hessian_trace, top_eigenvalues
from lightning_hessian.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def rotated(spectrum: torch.Tensor, seed: int = 1000) -> torch.Tensor:
    """``Q diag(spectrum) Q^T`` for a random orthonormal ``Q`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(spectrum.numel(), spectrum.numel(), dtype=torch.float64, generator=generator))
    return (Q * spectrum) @ Q.T


def uniform(count: int, low: float, high: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, dtype=torch.float64, generator=generator)


FLAT = rotated(uniform(2000, 1.0, 2.0, 1))  # Hutchinson's relative std per probe ~0.03
DOMINATED = rotated(torch.cat([torch.full((5,), 100.0, dtype=torch.float64), uniform(995, 0.01, 0.02, 2)]))


def counted(A: torch.Tensor, **kwargs: object) -> tuple[trace_module.TraceResult, int]:
    """The result and the products the operator itself counted."""
    op = MatrixOperator(A)
    result = hessian_trace(op, **kwargs)  # type: ignore[arg-type]
    return result, op.hvp_count


def test_flat_spectrum_stops_after_the_pilot() -> None:
    """A flat spectrum needs no sketch: Hutchinson, 8 products (never a fixed minimum of 64)."""
    exact = float(torch.trace(FLAT))
    for seed in range(5):
        result, products = counted(FLAT, rel_tol=0.02, seed=seed)
        assert result.method == "hutchinson" and result.converged
        assert result.hvp_count == products == result.num_probes == 8
        assert result.relative_stderr <= 0.02
        assert abs(result.estimate - exact) <= 4 * result.stderr
    forced, _ = counted(FLAT, method="hutch++", rel_tol=0.02)
    assert forced.hvp_count > 8  # a sketch costs products a flat spectrum does not repay


def test_dominant_eigenvalues_choose_hutchplusplus_and_cut_the_variance() -> None:
    """Five eigenvalues carry the trace's variance: the pilot predicts that a sketch pays, and
    Hutch++'s remainder variance per probe is orders of magnitude below Hutchinson's, so it
    reaches the same relative standard error with far fewer products."""
    exact = float(torch.trace(DOMINATED))
    for seed in range(5):
        auto, auto_products = counted(DOMINATED, rel_tol=0.05, seed=seed)
        plain, plain_products = counted(DOMINATED, method="hutchinson", rel_tol=0.05, seed=seed)
        assert auto.method == "hutch++" and plain.method == "hutchinson"
        assert auto.converged and plain.converged
        assert auto.hvp_count == auto_products and plain.hvp_count == plain_products
        assert auto.hvp_count * 2 < plain.hvp_count
        for result in (auto, plain):
            assert abs(result.estimate - exact) <= 4 * result.stderr
        remainder = auto.num_probes - 16  # 16 sketch rows (8 of them the pilot's)
        auto_variance = auto.stderr**2 * remainder
        plain_variance = plain.stderr**2 * plain.num_probes
        assert auto_variance < 1e-3 * plain_variance


def test_auto_matches_exact_network_trace() -> None:
    model, x, y = make_mlp()
    exact = float(torch.trace(exact_hessian(model, x, y)))
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    outside = 0
    for seed in range(6):
        before = op.hvp_count
        result = hessian_trace(op, rel_tol=0.1, seed=seed)
        assert result.hvp_count == op.hvp_count - before
        assert result.converged
        outside += abs(result.estimate - exact) > 3 * result.stderr + 1e-9 * abs(exact)
    assert outside <= 1


def test_more_samples_needed_than_dimensions_gives_the_exact_trace() -> None:
    """A 40-dimensional indefinite matrix whose trace is near zero: unit vectors are cheaper,
    and every product (the pilot's too) is counted."""
    A = rotated(torch.cat([torch.tensor([5.0, -5.0], dtype=torch.float64), uniform(38, -0.1, 0.1, 3)]))
    result, products = counted(A, rel_tol=0.01)
    assert result.method == "exact" and result.stderr == 0.0 and result.converged
    assert result.estimate == pytest.approx(float(torch.trace(A)), abs=1e-12)
    assert result.hvp_count == products == 8 + 40


@pytest.mark.parametrize("method", ["auto", "hutchinson", "hutch++"])
def test_fixed_budget_spends_exactly_max_probes(method: str) -> None:
    result, products = counted(DOMINATED, method=method, rel_tol=None, max_probes=60, seed=3)
    assert result.hvp_count == products == 60 and not result.converged and result.stderr > 0
    assert abs(result.estimate - float(torch.trace(DOMINATED))) <= 4 * result.stderr


def test_unreachable_tolerance_stops_at_the_budget_unconverged() -> None:
    A = rotated(torch.cat([torch.tensor([1.0, -1.0], dtype=torch.float64), uniform(498, -1.0, 1.0, 4)]))
    result, products = counted(A, method="hutchinson", rel_tol=1e-6, max_probes=50)
    assert result.hvp_count == products == 50 and not result.converged


def test_leave_one_out_tail_is_the_distance_to_the_other_products() -> None:
    generator = torch.Generator().manual_seed(5)
    Y = torch.randn(6, 50, dtype=torch.float64, generator=generator)
    expected = []
    for j in range(6):
        others = torch.cat([Y[:j], Y[j + 1 :]]).T
        coefficients = torch.linalg.lstsq(others, Y[j]).solution
        expected.append(float((Y[j] - others @ coefficients).square().sum()))
    assert trace_module._leave_one_out_tail(Y) == pytest.approx(sum(expected) / 6, rel=1e-9)


def test_hutchinson_variance_estimate_is_unbiased() -> None:
    """Averaged over many 8-probe pilots, the estimate of 2(||A||_F^2 - sum A_ii^2) is right,
    also for a matrix with a heavy diagonal (where 2 ||A||_F^2 alone would be far off)."""
    generator = torch.Generator().manual_seed(6)
    B = torch.randn(60, 60, dtype=torch.float64, generator=generator)
    A = (B + B.T) / 10 + torch.diag(torch.linspace(5.0, 10.0, 60, dtype=torch.float64))
    exact = 2 * (float(A.square().sum()) - float(A.diagonal().square().sum()))
    estimates = []
    for _ in range(400):
        Z = torch.randint(0, 2, (8, 60), generator=generator).double() * 2 - 1
        estimates.append(trace_module._hutchinson_variance(Z, Z @ A))
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.05)
    assert exact < 0.1 * 2 * float(A.square().sum())


def test_heavy_diagonal_keeps_hutchinson() -> None:
    """Rademacher probes see a diagonal exactly; a sketch would project that advantage away, so
    auto must not choose Hutch++ for a diagonally dominated matrix with a few large entries."""
    generator = torch.Generator().manual_seed(7)
    B = torch.randn(500, 500, dtype=torch.float64, generator=generator)
    A = torch.diag(torch.cat([torch.full((5,), 100.0), torch.ones(495)]).double()) + 0.02 * (B + B.T)
    exact = float(torch.trace(A))
    for seed in range(3):
        result, _ = counted(A, rel_tol=0.005, seed=seed)
        forced, _ = counted(A, method="hutch++", rel_tol=0.005, seed=seed)
        assert result.method == "hutchinson" and result.converged and result.hvp_count > 8  # decided after the pilot
        assert result.hvp_count < forced.hvp_count
        assert abs(result.estimate - exact) <= 4 * result.stderr


OUTLIERS_AND_BULK = rotated(
    torch.cat([torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0], dtype=torch.float64), uniform(995, -0.5, 1.0, 8)])
)


def test_deflation_by_top_eigenpairs_is_unbiased_and_needs_far_fewer_products() -> None:
    """Deflating the top-5 Ritz pairs of the same operator leaves the bulk, whose variance is
    tiny: the pilot alone (or nearly) reaches 2 %, where plain auto (Hutch++ with its own sketch)
    spends several times more. The estimates scatter around the exact trace as their standard
    errors say, with converged pairs and with rough ones from a 6-product Lanczos run alike."""
    exact = float(torch.trace(OUTLIERS_AND_BULK))
    op = MatrixOperator(OUTLIERS_AND_BULK)
    converged_pairs = top_eigenvalues(op, k=5, tol=1e-6)
    rough_pairs = top_eigenvalues(op, k=5, tol=1e-6, max_iter=6)
    assert bool(converged_pairs.converged.all()) and not bool(rough_pairs.converged.all())
    for pairs in (converged_pairs, rough_pairs):
        z_scores = []
        for seed in range(12):
            before = op.hvp_count
            deflated = hessian_trace(op, rel_tol=0.02, seed=seed, deflate_with=pairs)
            assert deflated.hvp_count == op.hvp_count - before and deflated.converged
            plain, _ = counted(OUTLIERS_AND_BULK, rel_tol=0.02, seed=seed)
            if pairs is converged_pairs:
                assert deflated.hvp_count * 3 <= plain.hvp_count
            z_scores.append((deflated.estimate - exact) / deflated.stderr)
        assert max(abs(z) for z in z_scores) <= 4
        assert abs(sum(z_scores) / len(z_scores)) <= 4 / math.sqrt(len(z_scores))


def test_deflation_matches_exact_network_trace() -> None:
    """On a float64 network Hessian, deflated by its own top-3 pairs, the estimate is within its
    standard errors of the exact trace."""
    model, x, y = make_mlp()
    exact = float(torch.trace(exact_hessian(model, x, y)))
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    pairs = top_eigenvalues(op, k=3, tol=1e-3)
    outside = sum(
        abs(result.estimate - exact) > 3 * result.stderr + 1e-9 * abs(exact)
        for result in (hessian_trace(op, rel_tol=0.1, seed=seed, deflate_with=pairs) for seed in range(6))
    )
    assert outside <= 1


def test_deflation_needs_eigenvectors_of_the_operator() -> None:
    op = MatrixOperator(torch.eye(6, dtype=torch.float64))
    other = top_eigenvalues(MatrixOperator(torch.eye(5, dtype=torch.float64)), k=1)
    with pytest.raises(UserInputError, match=r"deflate_with needs the eigenvectors of this operator as a \(6, k\)"):
        hessian_trace(op, deflate_with=other)
    other.vectors = None
    with pytest.raises(UserInputError, match="got None"):
        hessian_trace(op, deflate_with=other)


def test_bad_settings_are_user_errors() -> None:
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    for kwargs, match in [
        ({"method": "xtrace"}, "method='xtrace'"),
        ({"rel_tol": 0.0}, "rel_tol=0.0"),
        ({"min_probes": 1}, "min_probes=1"),
        ({"backend": "other"}, "backend='other'"),
    ]:
        with pytest.raises(UserInputError, match=match):
            hessian_trace(op, **kwargs)  # type: ignore[arg-type]
    assert math.isinf(trace_module.TraceResult(0.0, 1.0, 2, 2, 0.0).relative_stderr)
