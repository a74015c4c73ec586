"""HessianOperator, Lanczos, trace and density against exact float64 Hessians and analytic matrices.

The tiny networks and the exact Hessian are ``helpers.make_cnn``, ``make_mlp`` and ``exact_hessian``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import SquareNet, assert_same_state, exact_hessian, fingerprint, make_cnn, make_mlp
from torch import nn

from lightning_hessian.curvature import (
    HessianOperator,
    MatrixOperator,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the operator


@pytest.mark.parametrize(
    "make",
    [lambda: make_cnn(nn.ReLU()), lambda: make_cnn(nn.Softplus()), make_mlp],
    ids=["cnn-bn-relu", "cnn-bn-softplus", "mlp-softplus"],
)
def test_hvp_equals_exact_hessian_times_v(make) -> None:
    model, x, y = make()
    model.train()
    H = exact_hessian(model, x, y)
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64)  # batches 5,5,3(+...)
    V = torch.randn(op.num_params, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    HV = op.matmat(V)
    assert torch.allclose(HV, H @ V, rtol=1e-10, atol=1e-12)
    for i in range(4):  # matmat == K matvecs
        assert torch.allclose(op.matvec(V[:, i]), HV[:, i], rtol=1e-12, atol=1e-14)
    assert op.hvp_count == 8
    assert model.training  # restored
    op32 = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5)
    HV32 = op32.matmat(V.float()).double()
    assert (HV32 - H @ V).norm() <= 1e-5 * (H @ V).norm()


def test_unequal_batches_are_weighted_by_sample_count() -> None:
    model, x, y = make_mlp()
    H = exact_hessian(model, x, y)
    batches = [(x[:2], y[:2]), (x[2:12], y[2:12]), (x[12:], y[12:])]  # 2, 10, 5 samples
    op = HessianOperator(model, F.cross_entropy, batches, dtype=torch.float64)
    assert op.batch_sizes == [2, 10, 5] and op.num_samples == 17
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_gradient_loss_and_double_backward_mode() -> None:
    model, x, y = make_cnn(nn.Softplus())
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=4, dtype=torch.float64)
    model.eval()
    params = [p.detach().double().requires_grad_() for p in model.parameters()]
    tensors = {
        **{n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()},
        **dict(zip(op.param_names, params, strict=True)),
    }
    loss = F.cross_entropy(torch.func.functional_call(model, tensors, (x.double(),)), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    model.train()
    assert torch.allclose(op.loss(), loss.detach(), rtol=1e-12)
    assert torch.allclose(op.gradient(), grad, rtol=1e-10, atol=1e-13)
    slow = HessianOperator(
        model, F.cross_entropy, (x, y), micro_batch_size=4, dtype=torch.float64, hvp_mode="double_backward"
    )
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    assert torch.allclose(slow.matmat(V), op.matmat(V), rtol=1e-10, atol=1e-13)


def test_batch_loss_dict_batches_param_filter_and_flatten() -> None:
    model, x, y = make_mlp()
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64, param_filter="2.")
    assert op.param_names == ["2.weight", "2.bias"]
    H = exact_hessian(model, x, y, names=op.param_names)

    def batch_loss(module: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(module(batch["input"]), batch["target"])

    data = [{"input": x[:7], "target": y[:7]}, {"input": x[7:], "target": y[7:]}]
    op_dict = HessianOperator(
        model, data=data, batch_loss=batch_loss, dtype=torch.float64, param_filter=lambda n, p: n.startswith("2")
    )
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.allclose(op_dict.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    shaped = op.unflatten(v)
    assert shaped["2.weight"].shape == (4, 12) and torch.equal(op.flatten(shaped), v)
    with pytest.raises(ValueError, match="No parameters"):
        HessianOperator(model, F.cross_entropy, (x, y), param_filter="nothing")


def test_built_and_used_under_inference_mode_without_side_effects() -> None:
    model, x, y = make_cnn(nn.Softplus())
    model.train()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    model.fc.bias.requires_grad_(False)
    torch.manual_seed(123)
    before = fingerprint(model)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        op = HessianOperator(model, F.cross_entropy, (xi, yi), micro_batch_size=6)
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0))
        op.matvec(v)
        op.gradient()
        op.loss()
        top_eigenvalues(op, k=2, tol=1e-3)
        hessian_trace(op, max_probes=12, rel_tol=None, batch_probes=4)
        spectral_density(op, num_probes=2, lanczos_steps=5)
    assert "fc.bias" not in op.param_names
    assert_same_state(before, model)


# ---------------------------------------------------------------------------------- Lanczos


@functools.cache
def softplus_cnn_spectrum() -> tuple[torch.Tensor, torch.Tensor]:
    model, x, y = make_cnn(nn.Softplus())
    H = exact_hessian(model, x, y)
    return H, torch.linalg.eigvalsh(H)


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("k", [1, 5])
def test_top_eigenvalues_match_eigvalsh(which: str, k: int) -> None:
    model, x, y = make_cnn(nn.Softplus())
    H, exact = softplus_cnn_spectrum()
    wanted = exact.flip(0)[:k] if which == "largest" else exact[:k]
    norm = exact.abs().max()
    op64 = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    result = top_eigenvalues(op64, k=k, which=which, tol=1e-8, block_size=k)
    assert result.converged.all()
    assert ((result.eigenvalues - wanted).abs() <= 1e-6 * norm).all()
    assert result.hvp_count == op64.hvp_count
    # honest residuals: ||Hv - lambda v|| recomputed with the exact Hessian
    for value, vector, residual in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        flat = op64.flatten(vector)
        true_residual = (H @ flat - value * flat).norm()
        assert abs(true_residual - residual) <= 1e-9 * norm
    op32 = HessianOperator(model, F.cross_entropy, (x, y))
    result32 = top_eigenvalues(op32, k=k, which=which, tol=1e-5, block_size=4)
    assert ((result32.eigenvalues - wanted).abs() <= 1e-4 * norm).all()
    assert result32.eigenvectors[0]["conv.weight"].dtype == torch.float32


def test_lanczos_restart_warm_start_budget_and_callback() -> None:
    generator = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=generator))
    spectrum = torch.cat([torch.tensor([50.0, 20.0, 19.0, 10.0, 9.5]), torch.linspace(-2, 3, 195)]).double()
    A = Q @ torch.diag(spectrum) @ Q.T
    top = spectrum.sort(descending=True).values[:5]
    progress = []
    cold = top_eigenvalues(MatrixOperator(A), k=5, tol=1e-10, krylov_size=20, callback=progress.append)
    assert cold.converged.all() and torch.allclose(cold.eigenvalues, top, rtol=1e-10)
    assert progress and progress[-1].hvp_count == cold.hvp_count and cold.hvp_count > 20  # restarted
    warm = top_eigenvalues(MatrixOperator(A), k=5, tol=1e-10, init=cold.eigenvectors, seed=1)
    assert warm.converged.all() and warm.hvp_count < cold.hvp_count
    blocked = top_eigenvalues(MatrixOperator(A), k=5, tol=1e-10, block_size=4)
    assert torch.allclose(blocked.eigenvalues, top, rtol=1e-10)
    cut = top_eigenvalues(MatrixOperator(A), k=5, tol=1e-12, time_budget=0.0)
    assert cut.hvp_count == 1 and not cut.converged.all()
    smallest = top_eigenvalues(MatrixOperator(A), k=2, which="smallest", tol=1e-10)
    assert torch.allclose(smallest.eigenvalues, spectrum.sort().values[:2], rtol=1e-8)


# ------------------------------------------------------------------------- trace and density


def decaying_matrix(size: int = 300) -> tuple[torch.Tensor, float]:
    generator = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
    spectrum = 100.0 / torch.arange(1, size + 1, dtype=torch.float64) ** 1.5
    return Q @ torch.diag(spectrum) @ Q.T, float(spectrum.sum())


def test_trace_is_within_three_standard_errors() -> None:
    A, exact = decaying_matrix()
    for method in ("hutchinson", "hutch++"):
        outside = 0
        for seed in range(10):
            result = hessian_trace(
                MatrixOperator(A), method=method, rel_tol=None, max_probes=60, batch_probes=20, seed=seed
            )
            assert result.hvp_count == 60 and result.stderr > 0
            outside += abs(result.estimate - exact) > 3 * result.stderr
        assert outside <= 1, method


def test_hutchplusplus_beats_hutchinson_at_equal_products() -> None:
    A, exact = decaying_matrix()
    errors = {}
    for method in ("hutchinson", "hutch++"):
        errors[method] = sum(
            abs(hessian_trace(MatrixOperator(A), method=method, rel_tol=None, max_probes=30, seed=s).estimate - exact)
            for s in range(10)
        )
    assert errors["hutch++"] < 0.5 * errors["hutchinson"]


def test_adaptive_trace_on_a_network_meets_its_tolerance() -> None:
    model, x, y = make_mlp()
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    exact = float(torch.trace(exact_hessian(model, x, y)))
    result = hessian_trace(op, rel_tol=0.05, max_probes=5000, batch_probes=8)
    assert result.converged and abs(result.estimate - exact) <= max(4 * result.stderr, 1e-9 * abs(exact))


def test_density_integrates_to_one_and_its_mean_is_the_trace() -> None:
    model, x, y = make_cnn(nn.Softplus())
    H, eigenvalues = softplus_cnn_spectrum()
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    result = spectral_density(op, num_probes=6, lanczos_steps=30, grid_size=800, seed=0)
    assert result.hvp_count == 6 * 30 == op.hvp_count
    assert math.isclose(float(torch.trapezoid(result.density, result.grid)), 1.0, abs_tol=1e-6)
    assert torch.allclose(result.weights.sum(dim=1), torch.ones(6, dtype=torch.float64))
    exact_trace = float(torch.trace(H))
    scale = float(H.norm())  # Hutchinson std of one probe is about sqrt(2) ||H||_F
    assert abs(result.trace_estimate - exact_trace) <= 3 * math.sqrt(2) * scale / math.sqrt(6)
    nodes = result.nodes[~result.nodes.isnan()]
    assert nodes.max() <= eigenvalues.max() + 1e-9 and nodes.min() >= eigenvalues.min() - 1e-9
    assert abs(nodes.max() - eigenvalues.max()) <= 1e-6 * eigenvalues.abs().max()  # extremes converge


# ----------------------------------------------------------------------------- PyHessian


def test_pyhessian_backend_agrees_on_top_eigenvalue_and_restores_state() -> None:
    pytest.importorskip("pyhessian")
    model, x, y = make_mlp(nn.Tanh())
    model.train()
    torch.manual_seed(7)
    before = fingerprint(model)
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=9)
    ours = top_eigenvalues(op, k=1, tol=1e-6)
    products_before = op.hvp_count
    theirs = top_eigenvalues(op, k=1, tol=1e-7, max_iter=500, backend="pyhessian")
    assert abs(theirs.eigenvalues[0] - ours.eigenvalues[0]) <= 1e-3 * ours.eigenvalues[0]
    assert op.hvp_count == products_before + 1  # the residual check's product is counted, never hidden
    assert theirs.hvp_count > 1  # PyHessian's own products plus that one
    trace = hessian_trace(op, backend="pyhessian", max_probes=50, rel_tol=1e-3)
    assert trace.hvp_count == trace.num_probes > 0

    def batch_loss(module: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(module(batch["x"]), batch["y"])

    dict_op = HessianOperator(model, data=[{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}], batch_loss=batch_loss)
    dict_theirs = top_eigenvalues(dict_op, k=1, tol=1e-7, max_iter=500, backend="pyhessian")
    assert abs(dict_theirs.eigenvalues[0] - ours.eigenvalues[0]) <= 1e-3 * ours.eigenvalues[0]
    assert_same_state(before, model)


# ------------------------------------------------------------------- robustness of the engine


def test_falls_back_to_double_backward_where_torch_func_fails() -> None:
    torch.manual_seed(0)
    model = SquareNet()
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="double backward"):
        HV = op.matmat(V)
    assert op.hvp_mode == "auto" and op.selected_hvp_mode == "retained_graph"  # the setting is not mutated
    assert torch.allclose(HV, exact_hessian(model, x, y) @ V, rtol=1e-10, atol=1e-12)


def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = make_mlp()
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64, max_chunk=8)
    V = torch.randn(op.num_params, 7, dtype=torch.float64)
    expected = op.matmat(V)
    original = HessianOperator._func_hvp
    sizes = []

    def limited(self, loss, primals, chunk):
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, loss, primals, chunk)

    monkeypatch.setattr(HessianOperator, "_func_hvp", limited)
    assert torch.allclose(op.matmat(V), expected, rtol=1e-12, atol=1e-14)
    assert op._chunk == 2 and sizes[:3] == [7, 4, 2]


def test_low_precision_model_is_analysed_in_float32() -> None:
    model, x, y = make_mlp()
    H = exact_hessian(model, x, y)
    half = make_mlp()[0].to(torch.bfloat16)
    op = HessianOperator(half, F.cross_entropy, (x.to(torch.bfloat16), y))
    assert op.dtype == torch.float32 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    v = torch.randn(op.num_params)
    # bf16 weights differ from the float32 ones by rounding only: close, not equal
    assert (op.matvec(v).double() - H @ v.double()).norm() <= 5e-2 * (H @ v.double()).norm()


def test_tied_weights_get_both_contributions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight  # tied: one parameter used twice
    x, y = torch.randn(11, 6), torch.randint(0, 6, (11,))
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    assert op.param_names == ["0.weight", "0.bias", "2.bias"]

    def loss(weight: torch.Tensor, bias0: torch.Tensor, bias2: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.tanh(x.double() @ weight.T + bias0) @ weight.T + bias2, y)

    params = tuple(p.detach().double() for p in (model[0].weight, model[0].bias, model[2].bias))
    blocks = torch.autograd.functional.hessian(loss, params)
    sizes = [p.numel() for p in params]
    H = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(3)], 1) for i in range(3)])
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.allclose(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def _graph_names(output: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``output``."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(
    "norm, shape",
    [(nn.BatchNorm1d(4), (6, 4)), (nn.BatchNorm1d(4, affine=False), (6, 4, 3)), (nn.BatchNorm2d(4), (6, 4, 3, 3))],
    ids=["1d", "1d-no-affine-3d-input", "2d"],
)
def test_batch_norm_on_running_statistics_is_computed_as_an_affine_map(norm: nn.Module, shape: tuple) -> None:
    """Under ``affine_batch_norm`` an eval-mode BatchNorm is the same function (and Hessian) as
    PyTorch's, recorded as multiply-add instead of ``native_batch_norm``; training mode (batch
    statistics, running-statistics update) is left alone."""
    from lightning_hessian.curvature.context import affine_batch_norm, batch_norm_as_affine

    generator = torch.Generator().manual_seed(11)
    norm = norm.double()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(4, dtype=torch.float64, generator=generator))
        norm.running_var.copy_(torch.rand(4, dtype=torch.float64, generator=generator) + 0.5)
        if norm.affine:
            norm.weight.copy_(torch.randn(4, dtype=torch.float64, generator=generator))
            norm.bias.copy_(torch.randn(4, dtype=torch.float64, generator=generator))
    x = torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    norm.eval()
    native = norm(x)
    with affine_batch_norm():
        affine = norm(x)
    torch.testing.assert_close(affine, native, rtol=1e-13, atol=1e-13)
    assert any("BatchNorm" in name for name in _graph_names(native))
    assert not any("BatchNorm" in name for name in _graph_names(affine))

    def loss(inputs: torch.Tensor) -> torch.Tensor:
        return (norm(inputs).sin() * 3).sum()

    point = x.detach()
    exact = torch.autograd.functional.hessian(loss, point)
    with affine_batch_norm():
        torch.testing.assert_close(torch.autograd.functional.hessian(loss, point), exact, rtol=1e-12, atol=1e-12)

    assert batch_norm_as_affine(nn.Sequential(nn.Linear(4, 4), norm)) is affine_batch_norm
    assert batch_norm_as_affine(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))) is (
        contextlib.nullcontext
    )

    norm.train()
    reference = copy.deepcopy(norm)
    with affine_batch_norm():
        trained = norm(x)
    assert torch.equal(trained, reference(x))
    assert torch.equal(norm.running_mean, reference.running_mean)
    assert any("BatchNorm" in name for name in _graph_names(trained))
