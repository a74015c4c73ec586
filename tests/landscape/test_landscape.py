"""Tests of the landscape layer: directions, batched evaluation, interpolation, sharpness, export.

Oracles: closed forms on exactly quadratic losses (least squares: the Hessian is X^T X / N),
numpy eigh, one-by-one evaluation with the weights written into a copy of the model.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.landscape import (
    StateMismatchError,
    check_state_matches,
    direction_dot,
    direction_norm,
    eigenvector_directions,
    epsilon_sharpness,
    evaluate_points,
    filter_normalize,
    gradient_direction,
    interpolate_state,
    interpolation_path,
    load_landscape,
    loss_curve,
    loss_surface,
    random_direction,
    save_landscape,
    trainable_parameters,
)


def _mse_loss(module: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((module(x).squeeze(-1) - y) ** 2).mean()


@pytest.fixture
def least_squares():
    """Linear regression in float64: L(w) = |Xw - y|^2 / (2N), H = X^T X / N, exactly quadratic."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3.0, 6, dtype=torch.float64)
    y = torch.randn(60, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 6, generator=generator, dtype=torch.float64))
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]  # unequal micro-batches: weighting must be exact
    hessian = (x.T @ x / len(x)).numpy()
    return model, batches, x, y, hessian


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _images(n: int = 40, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, 5, (n,), generator=generator)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def _reference_point(model: nn.Module, params: dict[str, torch.Tensor], batches) -> tuple[float, float]:
    """Loss and accuracy with ``params`` written into a copy of ``model``: the naive way."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name in params:
                p.copy_(params[name])
        loss = correct = count = 0.0
        for x, y in batches:
            logits = clone(x)
            loss += F.cross_entropy(logits, y).item() * len(x)
            correct += (logits.argmax(-1) == y).sum().item()
            count += len(x)
    return loss / count, correct / count


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_bit_identical(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict(keep_vars=True).items():
        assert torch.equal(tensor.detach(), snapshot[name]), name


# ----------------------------------------------------------------------------------- curves


def test_curve_along_eigenvector_is_half_lambda_t_squared_plus_gradient_term(least_squares):
    model, batches, x, y, hessian = least_squares
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    weight = model.weight.detach()
    residual = x @ weight[0] - y
    gradient = (x.T @ residual / len(x)).numpy()
    loss0 = float(0.5 * (residual**2).mean())
    steps = np.linspace(-2.0, 2.0, 9)
    for index in (-1, -2, 0):  # top, second, smallest eigenvector
        v = eigenvectors[:, index]
        direction = {"weight": torch.from_numpy(v).reshape(1, 6)}
        curve = loss_curve(model, direction, steps, batches, batch_loss=_mse_loss, accuracy=False)
        expected = loss0 + steps * (gradient @ v) + 0.5 * eigenvalues[index] * steps**2
        np.testing.assert_allclose(curve.loss, expected, rtol=1e-10, atol=1e-12)
        # the second difference recovers lambda exactly on a quadratic
        h = steps[1] - steps[0]
        second = (curve.loss[2:] - 2 * curve.loss[1:-1] + curve.loss[:-2]) / h**2
        np.testing.assert_allclose(second, eigenvalues[index], rtol=1e-8)
    assert np.isnan(curve.accuracy).all()


def test_gradient_direction_gives_linear_term(least_squares):
    model, batches, x, y, hessian = least_squares
    residual = x @ model.weight.detach()[0] - y
    gradient = (x.T @ residual / len(x)).numpy()
    direction = gradient_direction(model, batches, batch_loss=_mse_loss)
    assert direction_norm(direction) == pytest.approx(1.0, abs=1e-12)
    g_hat = gradient / np.linalg.norm(gradient)
    np.testing.assert_allclose(direction["weight"].numpy().ravel(), g_hat, rtol=1e-10)
    steps = np.array([-0.5, 0.0, 0.5, 1.0])
    curve = loss_curve(model, direction, steps, batches, batch_loss=_mse_loss, accuracy=False)
    loss0 = float(0.5 * (residual**2).mean())
    expected = loss0 + steps * np.linalg.norm(gradient) + 0.5 * (g_hat @ hessian @ g_hat) * steps**2
    np.testing.assert_allclose(curve.loss, expected, rtol=1e-10)
    assert model.weight.grad is None


def test_eigenvector_directions_match_eigh(least_squares):
    model, batches, _, _, hessian = least_squares
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    values, vectors = eigenvector_directions(model, batches, 2, batch_loss=_mse_loss, tol=1e-10)
    np.testing.assert_allclose(values, eigenvalues[::-1][:2], rtol=1e-8)
    for vector, index in zip(vectors, (-1, -2), strict=True):
        assert abs(
            abs(float(vector["weight"].double().ravel() @ torch.from_numpy(eigenvectors[:, index])))
        ) == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------ directions


def test_filter_normalised_random_direction():
    model = _cnn()
    params = trainable_parameters(model)
    direction = random_direction(params, seed=3)
    assert set(direction) == set(params)
    for name, d in direction.items():
        if d.dim() <= 1:  # biases and BatchNorm parameters are left out (zero)
            assert torch.count_nonzero(d) == 0, name
        else:
            dims = tuple(range(1, d.dim()))
            torch.testing.assert_close(
                torch.linalg.vector_norm(d, dim=dims),
                torch.linalg.vector_norm(params[name], dim=dims),
                rtol=1e-5,
                atol=0,
            )
    again = random_direction(params, seed=3)
    other = random_direction(params, seed=4)
    assert all(torch.equal(direction[n], again[n]) for n in direction)
    assert abs(direction_dot(direction, other)) < 0.5 * direction_norm(direction) * direction_norm(other)
    # a zero filter of the weights gives a zero filter of the direction, without NaN
    weights = {"w": torch.zeros(2, 3)}
    weights["w"][1] = 2.0
    normalized = filter_normalize({"w": torch.ones(2, 3)}, weights)
    assert torch.equal(normalized["w"][0], torch.zeros(3))
    torch.testing.assert_close(torch.linalg.vector_norm(normalized["w"][1]), torch.tensor(2.0 * math.sqrt(3)))


# ----------------------------------------------------------------------------- evaluation


def test_vmap_equals_one_by_one_and_grid_orientation():
    model = _cnn()
    batches = _images()
    params = trainable_parameters(model)
    d1, d2 = random_direction(params, seed=1), random_direction(params, seed=2)
    alphas, betas = np.linspace(-1.0, 1.0, 5), np.array([-0.5, 0.0, 0.25])
    before = _snapshot(model)
    surface = loss_surface(model, d1, d2, alphas, betas, batches, names=("r1", "r2"), method="vmap", chunk_size=4)
    sequential = loss_surface(model, d1, d2, alphas, betas, batches, method="sequential")
    _assert_bit_identical(model, before)
    assert surface.loss.shape == surface.accuracy.shape == (5, 3)
    np.testing.assert_allclose(surface.loss, sequential.loss, rtol=1e-5)
    np.testing.assert_allclose(surface.accuracy, sequential.accuracy, atol=1e-6)
    for i, j in ((0, 0), (4, 2), (1, 2), (3, 0)):
        point = {n: params[n] + alphas[i] * d1[n] + betas[j] * d2[n] for n in params}
        loss, accuracy = _reference_point(model, point, batches)
        assert surface.loss[i, j] == pytest.approx(loss, rel=1e-5)
        assert surface.accuracy[i, j] == pytest.approx(accuracy, abs=1e-6)
    centre, _ = _reference_point(model, params, batches)
    assert surface.loss[2, 1] == pytest.approx(centre, rel=1e-6)


def test_vmap_failure_falls_back_to_sequential():
    class ItemInForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            # control flow on a (batched) weight's value: vmap cannot batch .item()
            if self.linear.weight.abs().max().item() > 0:
                return self.linear(x)
            return self.linear(x) * 0

    torch.manual_seed(0)
    model = ItemInForward().eval()
    batches = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    direction = random_direction(trainable_parameters(model), seed=0, normalization="unit")
    with pytest.warns(RuntimeWarning, match="falling back"):
        loss, _ = evaluate_points(model, [direction], np.linspace(-1, 1, 3), batches, method="auto")
    reference, _ = evaluate_points(model, [direction], np.linspace(-1, 1, 3), batches, method="sequential")
    np.testing.assert_allclose(loss, reference, rtol=1e-6)
    with pytest.raises(RuntimeError, match=r"\.item\(\)"):  # vmap cannot batch it, and "vmap" does not fall back
        evaluate_points(model, [direction], np.linspace(-1, 1, 3), batches, method="vmap")


def test_evaluate_points_rejects_bad_input():
    model = _cnn()
    direction = random_direction(trainable_parameters(model))
    with pytest.raises(ValueError, match="coordinates must have shape"):
        evaluate_points(model, [direction, direction], np.zeros((3, 3)), _images())
    with pytest.raises(KeyError, match="does not have"):
        evaluate_points(model, [{"nope": torch.zeros(1)}], np.zeros(2), _images())
    with pytest.raises(ValueError, match="method="):
        evaluate_points(model, [direction], np.zeros(2), _images(), method="fast")


# ---------------------------------------------------------------------------- interpolation


def test_interpolation_endpoints_equal_each_models_loss_with_batchnorm_buffers():
    model_a = _cnn()
    model_b = _cnn()
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model_b[1].running_mean.uniform_(-1.0, 1.0)
        model_b[1].running_var.uniform_(0.2, 3.0)
        model_b[1].running_var[0] = 10 * model_a[1].running_var[0]  # alpha = -0.5 extrapolates below 0
        model_b[1].num_batches_tracked.fill_(7)
    data = {"train": _images(seed=1), "test": _images(n=24, seed=2)}
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    target = _cnn()  # a third instance whose own values must not leak in nor change
    target.train()
    before = _snapshot(target)
    result = interpolation_path(target, state_a, state_b, [-0.5, 0.0, 0.5, 1.0, 1.5], data, chunk_size=2)
    _assert_bit_identical(target, before)
    assert target.training and target[1].training
    for split, batches in data.items():
        loss_a, acc_a = _reference_point(model_a, dict(model_a.named_parameters()), batches)
        loss_b, acc_b = _reference_point(model_b, dict(model_b.named_parameters()), batches)
        assert result.loss[split][1] == pytest.approx(loss_a, rel=1e-6)
        assert result.loss[split][3] == pytest.approx(loss_b, rel=1e-6)
        assert result.accuracy[split][1] == pytest.approx(acc_a) and result.accuracy[split][3] == pytest.approx(acc_b)
        # the midpoint uses interpolated running statistics too
        middle = _cnn()
        middle.load_state_dict(interpolate_state(state_a, state_b, 0.5))
        middle.eval()
        loss_mid, _ = _reference_point(middle, dict(middle.named_parameters()), batches)
        assert result.loss[split][2] == pytest.approx(loss_mid, rel=1e-5)
    assert interpolate_state(state_a, state_b, 0.5)["1.num_batches_tracked"] == state_a["1.num_batches_tracked"]
    # a variance extrapolated below zero is clamped, not NaN
    assert interpolate_state(state_a, state_b, -0.5)["1.running_var"][0] == 0
    assert all(np.isfinite(v).all() for v in result.loss.values())


def test_interpolation_curvature_along_the_path(least_squares):
    model, batches, _, _, hessian = least_squares
    state_b = {"weight": model.weight.detach() + 1.0}
    result = interpolation_path(
        model,
        model.state_dict(),
        state_b,
        [0.0, 1.0],
        {"train": batches},
        batch_loss=_mse_loss,
        accuracy=False,
        eigenvalues=True,
        eigen_kwargs={"tol": 1e-10},
    )
    # least squares: the Hessian does not depend on the weights
    np.testing.assert_allclose(result.top_eigenvalue, np.linalg.eigvalsh(hessian)[-1], rtol=1e-8)
    assert {"alpha", "train_loss", "train_accuracy", "top_eigenvalue"} == set(result.rows()[0])


def test_state_mismatch_names_the_difference():
    model = _cnn()
    state = dict(model.state_dict())
    state["4.weight"] = torch.zeros(7, 144)
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(StateMismatchError) as error:
        check_state_matches(model, state, source="b.ckpt")
    message = str(error.value)
    assert "b.ckpt" in message and "0.bias" in message and "extra.weight" in message
    assert "4.weight: (7, 144) in b.ckpt vs (5, 144)" in message


# -------------------------------------------------------------------------------- sharpness


def test_epsilon_sharpness_on_separable_quadratic():
    """L(w) = sum a_i (w_i - c_i)^2 / 2: the box maximum is the vertex away from c, known exactly."""

    class Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=torch.float64))

    a = torch.tensor([1.0, 4.0, 0.5, 2.0], dtype=torch.float64)
    c = torch.tensor([0.0, -1.0, 1.0, 3.5], dtype=torch.float64)

    def quadratic(module, batch):
        return 0.5 * (a * (module.w - c) ** 2).sum() + 0 * batch[0].sum()

    model = Weights()
    batches = [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3))]
    epsilon = 1e-2
    w = model.w.detach()
    bound = epsilon * (w.abs() + 1)
    worst = w + torch.sign(w - c) * bound
    base = float(0.5 * (a * (w - c) ** 2).sum())
    top = float(0.5 * (a * (worst - c) ** 2).sum())
    before = _snapshot(model)
    result = epsilon_sharpness(model, batches, epsilon=epsilon, steps=5, batch_loss=quadratic)
    _assert_bit_identical(model, before)
    assert model.w.grad is None
    assert result.loss == pytest.approx(base, rel=1e-12)
    assert result.max_loss == pytest.approx(top, rel=1e-12)
    assert result.sharpness == pytest.approx(100 * (top - base) / (1 + base), rel=1e-10)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_sharpness(model, batches, epsilon=0.0, batch_loss=quadratic)


def test_sharpness_grows_with_curvature():
    torch.manual_seed(0)
    model = _cnn()
    batches = _images()
    small = epsilon_sharpness(model, batches, epsilon=1e-3, steps=3).sharpness
    large = epsilon_sharpness(model, batches, epsilon=1e-2, steps=3).sharpness
    assert 0 < small < large


# ----------------------------------------------------------------------------------- export


def test_save_and_load_round_trip(tmp_path):
    model = _cnn()
    batches = _images()
    params = trainable_parameters(model)
    d1, d2 = random_direction(params, seed=1), random_direction(params, seed=2)
    curve = loss_curve(model, d1, np.linspace(-1, 1, 7), batches, name="random1")
    surface = loss_surface(
        model, d1, d2, np.linspace(-1, 1, 4), np.linspace(-1, 1, 3), batches, names=("random1", "random2")
    )
    paths = save_landscape(tmp_path / "landscape" / "epoch_000", [curve], [surface], {"sharpness": 1.5})
    assert [p.name for p in paths] == ["epoch_000.npz", "epoch_000_curves.csv", "epoch_000_surface_random1_random2.csv"]
    curves, surfaces, extra = load_landscape(paths[0])
    np.testing.assert_array_equal(curves[0].loss, curve.loss)
    assert surfaces[0].names == ("random1", "random2")
    np.testing.assert_array_equal(surfaces[0].loss, surface.loss)
    assert float(extra["sharpness"]) == 1.5
    rows = paths[2].read_text().strip().splitlines()
    assert rows[0] == "alpha,beta,loss,accuracy" and len(rows) == 1 + 12
    alpha, beta, loss, _ = (float(v) for v in rows[1 + 1 * 3 + 2].split(","))  # i = 1, j = 2
    assert (alpha, beta, loss) == (surface.alphas[1], surface.betas[2], surface.loss[1, 2])


def test_gradient_and_sharpness_accept_inference_mode_samples(least_squares):
    """Samples collated under trainer.validate/test are inference tensors."""
    model, batches, _, _, _ = least_squares
    with torch.inference_mode():
        frozen = [(x.clone(), y.clone()) for x, y in batches]
    assert frozen[0][0].is_inference()
    expected = gradient_direction(model, batches, batch_loss=_mse_loss)
    got = gradient_direction(model, frozen, batch_loss=_mse_loss)
    torch.testing.assert_close(got["weight"], expected["weight"])
    assert epsilon_sharpness(model, frozen, steps=2, batch_loss=_mse_loss).sharpness == pytest.approx(
        epsilon_sharpness(model, batches, steps=2, batch_loss=_mse_loss).sharpness
    )


def _ddp_worker(rank: int, world: int, directory: str) -> None:
    """One gloo rank; its results go to ``directory/rank<r>.pt`` (written atomically), not through a
    queue: a tensor sent through a multiprocessing queue is fetched from the sending process's
    resource sharer, which is gone once the worker has exited (ConnectionResetError under load)."""
    import torch.distributed as dist

    # A file rendezvous: no port to pick (and lose to another process) in advance.
    init = Path(directory, "rendezvous").as_uri()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _cnn()
        x = torch.cat([b[0] for b in _images()])
        y = torch.cat([b[1] for b in _images()])
        shard = slice(0, 25) if rank == 0 else slice(25, 40)  # unequal shards

        def all_reduce(tensor):
            dist.all_reduce(tensor)
            return tensor

        batches = [(x[shard][:10], y[shard][:10]), (x[shard][10:], y[shard][10:])]
        params = trainable_parameters(model)
        d1 = random_direction(params, seed=1)
        gradient = gradient_direction(model, batches, all_reduce=all_reduce)
        surface = loss_surface(model, d1, gradient, [-0.5, 0.0, 0.5], [0.0, 1.0], batches, all_reduce=all_reduce)
        sharp = epsilon_sharpness(model, batches, steps=2, all_reduce=all_reduce).sharpness
        result = (rank, surface.loss, surface.accuracy, gradient["4.weight"].clone(), sharp)
        torch.save(result, Path(directory, f"rank{rank}.pt.tmp"))
        os.replace(Path(directory, f"rank{rank}.pt.tmp"), Path(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_unequal_shards_equals_one_process(tmp_path: Path):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    processes = [context.Process(target=_ddp_worker, args=(rank, 2, str(tmp_path))) for rank in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    for p in processes:
        if p.is_alive():  # a hung rendezvous: end it, then fail
            p.kill()
            p.join()
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    model = _cnn()
    batches = _images()
    params = trainable_parameters(model)
    gradient = gradient_direction(model, batches)
    surface = loss_surface(model, random_direction(params, seed=1), gradient, [-0.5, 0.0, 0.5], [0.0, 1.0], batches)
    sharp = epsilon_sharpness(model, batches, steps=2).sharpness
    for _, loss, accuracy, grad_weight, rank_sharp in results:  # every rank holds the global result
        np.testing.assert_allclose(loss, surface.loss, rtol=1e-5)
        np.testing.assert_allclose(accuracy, surface.accuracy, atol=1e-6)
        torch.testing.assert_close(grad_weight, gradient["4.weight"], rtol=1e-4, atol=1e-6)
        assert rank_sharp == pytest.approx(sharp, rel=1e-4)
