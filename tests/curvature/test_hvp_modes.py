"""Hessian-vector product modes: the retained first-order graph, the robust ``"auto"`` choice, and
the operator's public API for outside engines; against exact float64 Hessians
(``torch.autograd.functional.hessian``)."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import SquareNet, assert_same_state, exact_hessian, fingerprint, load_benchmark, make_cnn, make_mlp
from torch import nn

import lightning_hessian.curvature.operator as operator_module
from lightning_hessian.curvature import HessianOperator, top_eigenvalues
from lightning_hessian.curvature.hvp_tuning import ModeTrial, k_bucket
from lightning_hessian.curvature.operator import HVP_MODES
from lightning_hessian.curvature.retained_graph import RetainedGraph
from lightning_hessian.errors import UserInputError

pytestmark = pytest.mark.usefixtures("one_thread")

FIXED_MODES = [mode for mode in HVP_MODES if mode != "auto"]


# ----------------------------------------------------------------------------------- fixtures


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the retained graph's build (a list that grows by one per build)."""
    builds: list[int] = []
    original = operator_module.build_retained_graph

    def counting(*args, **kwargs) -> RetainedGraph:
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(operator_module, "build_retained_graph", counting)
    return builds


# --------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("make", [make_cnn, make_mlp], ids=["cnn-batchnorm", "mlp"])
def test_every_mode_is_exact_with_unequal_micro_batches(make, mode: str) -> None:
    model, x, y = make()
    model.train()
    H = exact_hessian(model, x, y)
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64, hvp_mode=mode)
    assert op.batch_sizes[-1] < 5  # the last micro-batch is smaller
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with op.analysis():  # many calls in one context: the retained graph is reused
        for _ in range(4):
            assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
            assert torch.allclose(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)  # and alone
    assert op.hvp_count == 4 * 4 + 3
    assert model.training
    op32 = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, hvp_mode=mode)
    with op32.analysis():
        HV32 = op32.matmat(V.float()).double()
    assert (HV32 - H @ V).norm() <= 1e-5 * (H @ V).norm()


@pytest.mark.parametrize("mode", FIXED_MODES)
def test_parameters_with_constant_gradient_have_zero_hessian_rows(mode: str) -> None:
    """A loss linear in the last layer's bias has a gradient there that depends on nothing: its
    Hessian rows are zero (the retained graph keeps no output for it)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(9, 4), torch.zeros(9)

    def summed(outputs: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return outputs.sum(dim=1).mean()

    H = exact_hessian(model, x, y, loss_of_outputs=summed)
    op = HessianOperator(model, summed, (x, y), dtype=torch.float64, hvp_mode=mode)
    V = torch.randn(op.num_params, 2, dtype=torch.float64)
    with op.analysis():
        assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
        if mode.startswith("retained"):
            assert 3 not in op._retained.active  # "2.bias"

    linear = nn.Linear(4, 2)  # loss linear in every parameter: H = 0
    zero = HessianOperator(linear, summed, (x, y), dtype=torch.float64, hvp_mode=mode)
    assert torch.equal(
        zero.matvec(torch.randn(zero.num_params, dtype=torch.float64)),
        torch.zeros(zero.num_params, dtype=torch.float64),
    )


def test_all_reduce_sums_retained_graph_products_and_counts() -> None:
    """Two identical ranks, simulated by an all_reduce that doubles: sums and counts both double,
    so the product is unchanged; the reduce runs once per matmat in every mode."""
    model, x, y = make_mlp()
    H = exact_hessian(model, x, y)
    calls = []

    def twice(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor.numel())
        return tensor * 2

    op = HessianOperator(
        model,
        F.cross_entropy,
        (x, y),
        micro_batch_size=6,
        dtype=torch.float64,
        all_reduce=twice,
        hvp_mode="retained_graph",
    )
    assert op.num_samples == 2 * 17
    V = torch.randn(op.num_params, 2, dtype=torch.float64)
    with op.analysis():
        assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert calls == [1, 2 * op.num_params, 2 * op.num_params]


# --------------------------------------------------------------------- the retained graph's life


def test_retained_graph_is_built_once_per_context_and_released(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = count_builds(monkeypatch)
    model, x, y = make_cnn()
    op = HessianOperator(
        model, F.cross_entropy, (x, y), micro_batch_size=4, dtype=torch.float64, hvp_mode="retained_graph"
    )
    v = torch.randn(op.num_params, dtype=torch.float64)
    with op.analysis():
        first = op.matvec(v)
        with op.analysis():  # nested: the same graph
            for _ in range(3):
                assert torch.equal(op.matvec(v), first)
        graph_output = weakref.ref(op._retained.outputs[0])
        graph_leaf = weakref.ref(op._retained.leaves[0])
    assert builds == [1]
    assert op._retained is None
    gc.collect()
    assert graph_output() is None and graph_leaf() is None  # nothing of the graph outlives the context

    with op.analysis():  # a new analysis builds a new graph
        op.matvec(v)
    assert builds == [1, 1]
    for _ in range(2):  # without a context every call is its own analysis
        op.matvec(v)
    assert builds == [1, 1, 1, 1] and op._retained is None

    with pytest.raises(RuntimeError, match="inside"), op.analysis():  # an error ends the context too
        op.matvec(v)
        graph_output = weakref.ref(op._retained.outputs[0])
        raise RuntimeError("inside")
    gc.collect()
    assert op._retained is None and graph_output() is None


def test_a_changed_parameter_or_buffer_rebuilds_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = count_builds(monkeypatch)
    model, x, y = make_cnn()
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64, hvp_mode="retained_graph")
    v = torch.randn(op.num_params, dtype=torch.float64)
    saved = {k: t.clone() for k, t in model.state_dict().items()}
    try:
        with op.analysis():
            op.matvec(v)
            with torch.no_grad():
                model.fc.weight.mul_(1.5)  # e.g. an optimizer step between two products
            assert torch.allclose(op.matvec(v), exact_hessian(model, x, y) @ v, rtol=1e-10, atol=1e-12)
            assert len(builds) == 2
            model.bn.running_var.mul_(2.0)  # BatchNorm statistics (eval mode uses them)
            assert torch.allclose(op.matvec(v), exact_hessian(model, x, y) @ v, rtol=1e-10, atol=1e-12)
            assert len(builds) == 3
            op.matvec(v)
            assert len(builds) == 3  # nothing changed: reused
    finally:
        model.load_state_dict(saved)


def test_retained_graph_under_inference_mode_keeps_the_model_state() -> None:
    model, x, y = make_cnn()
    model.train()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    model.fc.bias.requires_grad_(False)
    torch.manual_seed(123)
    before = fingerprint(model)
    H = exact_hessian(model, x, y)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        op = HessianOperator(
            model, F.cross_entropy, (xi, yi), micro_batch_size=6, dtype=torch.float64, hvp_mode="retained_graph"
        )
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with op.analysis():
            assert not model.training  # BatchNorm uses its running statistics
            hv = op.matvec(v)
            result = top_eigenvalues(op, k=2, tol=1e-6)
    assert "fc.bias" not in op.param_names
    keep = [i for i, (n, _) in enumerate(model.named_parameters()) if n != "fc.bias"]
    sizes = [p.numel() for p in model.parameters()]
    index = torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in keep])
    block = H[index][:, index]
    assert torch.allclose(hv, block @ v, rtol=1e-10, atol=1e-12)
    assert abs(float(result.eigenvalues[0]) - float(torch.linalg.eigvalsh(block)[-1])) <= 1e-5 * float(block.norm())
    assert_same_state(before, model)


# ------------------------------------------------------------------------------- fallbacks


def test_retained_graph_that_does_not_fit_falls_back_to_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = make_mlp()
    H = exact_hessian(model, x, y)

    def out_of_memory(*args, **kwargs) -> RetainedGraph:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(operator_module, "build_retained_graph", out_of_memory)
    op = HessianOperator(
        model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64, hvp_mode="retained_graph"
    )
    V = torch.randn(op.num_params, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="double_backward"):
        assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert op.hvp_mode == "retained_graph" and op.selected_hvp_mode == "double_backward"

    auto = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64)
    with auto.analysis():
        for _ in range(12):
            assert torch.allclose(auto.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    assert auto.selected_hvp_mode in ("double_backward", "func")
    monkeypatch.undo()

    original = HessianOperator._retained_product

    def out_of_memory_in_second_product(self: HessianOperator, vectors: torch.Tensor, *, batched: bool) -> torch.Tensor:
        if self._retained is not None:  # the graph was built by an earlier call: this one is out of memory
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, vectors, batched=batched)

    monkeypatch.setattr(HessianOperator, "_retained_product", out_of_memory_in_second_product)
    late = HessianOperator(
        model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64, hvp_mode="retained_graph"
    )
    with late.analysis():
        assert torch.allclose(late.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
        assert late._retained is not None
        with pytest.warns(UserWarning, match="Out of memory in a product"):
            assert torch.allclose(late.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
        assert late._retained is None and late.selected_hvp_mode == "double_backward"  # freed


def test_vmap_over_the_retained_graph_halves_chunks_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = make_cnn()
    H = exact_hessian(model, x, y)
    op = HessianOperator(
        model, F.cross_entropy, (x, y), dtype=torch.float64, max_chunk=8, hvp_mode="retained_graph_vmap"
    )
    V = torch.randn(op.num_params, 7, dtype=torch.float64)
    original = operator_module.retained_products_vmap
    sizes = []

    def limited(graph: RetainedGraph, chunk: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(graph, chunk, *args, **kwargs)

    monkeypatch.setattr(operator_module, "retained_products_vmap", limited)
    assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert sizes[:3] == [7, 4, 2] and op._chunk == 2

    def unsupported(graph: RetainedGraph, chunk: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError("Batching rule not implemented (simulated)")

    monkeypatch.setattr(operator_module, "retained_products_vmap", unsupported)
    fresh_model = make_cnn()[0]  # the failure is remembered per model
    fixed = HessianOperator(fresh_model, F.cross_entropy, (x, y), dtype=torch.float64, hvp_mode="retained_graph_vmap")
    with pytest.warns(UserWarning, match="looping"):
        assert torch.allclose(fixed.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert fixed.selected_hvp_mode == "retained_graph" and fixed.hvp_mode == "retained_graph_vmap"


def test_auto_without_torch_func_uses_the_retained_graph_and_warns_once_per_model() -> None:
    torch.manual_seed(0)
    model = SquareNet()
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    H = exact_hessian(model, x, y)
    op = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="torch.func cannot run this model"):
        assert torch.allclose(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    assert op.hvp_mode == "auto" and op.selected_hvp_mode == "retained_graph"
    again = HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered for the model: no second attempt, no warning
        assert torch.allclose(again.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="setup_context"):  # a fixed mode does not hide the failure
        HessianOperator(model, F.cross_entropy, (x, y), dtype=torch.float64, hvp_mode="func").matvec(V[:, 0])


# ---------------------------------------------------------------------------- "auto" choice


def test_mode_trial_keeps_the_default_unless_another_mode_is_clearly_faster() -> None:
    def trial(samples: dict[str, list[float]]) -> ModeTrial:
        result = ModeTrial()
        for mode, values in samples.items():
            result.record(mode, 99.0)  # warm-up, not kept
            for value in values:
                result.record(mode, value)
        return result

    candidates, default = ["retained_graph", "func"], "retained_graph"
    assert trial({"retained_graph": [1.0], "func": [0.1]}).decision(candidates, default) is None  # too few calls
    assert trial({"retained_graph": [1.0, 1.1], "func": [0.9, 0.95]}).decision(candidates, default) is None  # unclear
    assert (
        trial({"retained_graph": [1.0, 1.1], "func": [0.6, 0.65]}).decision(candidates, default) == "func"
    )  # 1.5x: early
    assert (
        trial({"retained_graph": [1.0, 1.1], "func": [0.6, 0.7]}).decision(candidates, default) is None
    )  # 1.43x: wait
    assert trial({"retained_graph": [1.0, 1.0, 1.0], "func": [0.9, 0.9, 0.9]}).decision(candidates, default) == default
    assert trial({"retained_graph": [1.0, 1.0, 1.0], "func": [0.8, 0.8, 0.8]}).decision(candidates, default) == "func"
    assert trial({"retained_graph": [0.8, 0.8, 0.8], "func": [1.0, 1.0, 1.0]}).decision(candidates, default) == default
    # one outlier (a busy moment) does not move the median
    assert (
        trial({"retained_graph": [1.0, 5.0, 1.0], "func": [0.95, 0.9, 0.95]}).decision(candidates, default) == default
    )
    assert "99.0" not in repr(trial({"func": [1.0]}).seconds)

    schedule = ModeTrial()
    order = []
    for _ in range(8):
        mode = schedule.next_mode(candidates)
        order.append(mode)
        schedule.record(mode, 1.0)
    # torch.func first (its first call finds out whether it runs), warm-up then timed, then alternating
    assert order == [
        "func",
        "func",
        "retained_graph",
        "retained_graph",
        "func",
        "retained_graph",
        "func",
        "retained_graph",
    ]


def test_auto_counts_every_product_and_keeps_its_choice_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = make_cnn()
    H = exact_hessian(model, x, y)
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64)
    assert op.selected_hvp_mode is None  # not tuned yet
    V = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calls = 0
    with op.analysis():
        while op.selected_hvp_mode is None:
            assert torch.allclose(op.matvec(V[:, calls % 3]), H @ V[:, calls % 3], rtol=1e-10, atol=1e-12)
            calls += 1
            assert calls <= 2 * (1 + 3)  # a warm-up and three timed calls per candidate at most
    assert op.hvp_count == calls  # the trial's products are the caller's, all counted
    chosen = op.selected_hvp_mode
    assert chosen in ("retained_graph", "func")
    assert op.selected_hvp_modes["2-4"] is None  # K ranges are tuned separately
    assert op.hvp_mode == "auto"
    with pytest.raises(AttributeError):
        op.hvp_mode = "func"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        op.selected_hvp_mode = "func"  # type: ignore[misc]

    # A new operator on the same model and sample size reuses the choice: its first call runs it.
    ran = []
    for name in ("_retained_product", "_product"):
        original = getattr(HessianOperator, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            ran.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(HessianOperator, name, spy)
    second = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64)
    assert second.selected_hvp_mode == chosen
    for column in range(3):
        second.matvec(V[:, column])
    assert ran == ["_retained_product" if chosen == "retained_graph" else "_product"] * 3
    assert second.hvp_count == 3

    other = HessianOperator(make_cnn()[0], F.cross_entropy, (x, y), micro_batch_size=5, dtype=torch.float64)
    assert other.selected_hvp_mode is None  # another model object is tuned on its own
    assert k_bucket(1) == "1" and k_bucket(4) == "2-4" and k_bucket(16) == "5-16" and k_bucket(17) == "17+"


def test_settings_are_validated_with_the_fix() -> None:
    model, x, y = make_mlp()
    with pytest.raises(UserInputError, match=r"hvp_mode='fastest'.*'auto'"):
        HessianOperator(model, F.cross_entropy, (x, y), hvp_mode="fastest")
    with pytest.raises(UserInputError, match="max_chunk=0"):
        HessianOperator(model, F.cross_entropy, (x, y), max_chunk=0)


# ------------------------------------------------------------- API for outside engines (PyHessian)


def test_public_api_for_outside_engines() -> None:
    model, x, y = make_mlp()
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=7)
    assert op.batch_sizes == [7, 7, 3]
    batches = op.batches
    batches.clear()
    op.batch_sizes.append(1)
    assert len(op.batches) == 3 and op.batch_sizes == [7, 7, 3]  # copies: the operator is unchanged
    with op.analysis():
        losses = [op.loss_module(batch) for batch in op.batches]
    assert all(loss.requires_grad for loss in losses)  # differentiable with respect to model's parameters
    assert {id(p) for p in op.loss_module.parameters()} == {id(p) for p in model.parameters()}
    weighted = sum(n * float(loss.detach()) for n, loss in zip(op.batch_sizes, losses, strict=True)) / op.num_samples
    assert math.isclose(weighted, float(op.loss()), rel_tol=1e-6)

    op.matvec(torch.randn(op.num_params))
    op.count_products(5)
    assert op.hvp_count == 6
    with pytest.raises(AttributeError):
        op.hvp_count = 0  # type: ignore[misc]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="count_products"):
            op.count_products(bad)  # type: ignore[arg-type]
    assert op.hvp_count == 6


# -------------------------------------------------------------------------------- benchmark


def test_hvp_cost_benchmark_smoke(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_benchmark("hvp_cost", monkeypatch)
    threads = torch.get_num_threads()
    try:
        results = module.main(["--smoke", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for name in ("cnn", "mlp"):
        case = results["cases"][name]
        table = case["per_product_in_gradient_passes"]
        assert set(table) == set(FIXED_MODES)
        for mode in FIXED_MODES:
            assert all(math.isfinite(value) and value > 0 for value in table[mode].values()), mode
        assert case["auto"][1]["mode"] in FIXED_MODES and case["auto"]["hvp_count"] > 0
        assert f"## {name}:" in printed
    assert "| retained_graph |" in printed
