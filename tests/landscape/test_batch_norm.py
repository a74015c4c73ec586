"""BatchNorm running statistics recomputed for weights off the training trajectory, and the
interpolation path that uses them, against PyTorch's own ``update_bn`` and a by-hand oracle."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_hessian.landscape import (
    has_running_statistics,
    interpolate_state,
    interpolation_path,
    recompute_batch_norm_statistics,
)
from lightning_hessian.models.ghost_batch_norm import convert_to_ghost_batch_norm


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8),
        nn.ReLU(), nn.Linear(8, 5),
    )  # fmt: skip
    with torch.no_grad():  # statistics unlike the data's, as a model's saved ones would be
        for layer in (model[1], model[5]):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches(n: int = 48, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = 1.5 + 2.0 * torch.randn(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, 5, (n,), generator=generator)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _with_dropout(model: nn.Module) -> nn.Sequential:
    """``model`` with a dropout layer (eval mode) in front of its BatchNorm1d."""
    layers = list(model.children())
    return nn.Sequential(*layers[:4], nn.Dropout(0.5), *layers[4:]).eval()


def test_recomputed_statistics_are_pytorchs_update_bn_and_leave_the_rest_alone() -> None:
    model = _with_dropout(_cnn())
    # the oracle: PyTorch's own recomputation (cumulative average, batch by batch) on the same
    # network without the dropout, which update_bn would switch on and which must stay off here
    reference = copy.deepcopy(model)
    reference[4] = nn.Identity()
    batches = _batches()
    bn2d, bn1d = model[1], model[6]
    momenta = [bn2d.momentum, bn1d.momentum]

    assert recompute_batch_norm_statistics(model, batches) == 2
    update_bn([(x,) for x, _ in batches], reference)
    for name, value in _statistics(reference).items():
        torch.testing.assert_close(_statistics(model)[name], value, rtol=1e-6, atol=1e-7)
    assert [bn2d.momentum, bn1d.momentum] == momenta
    assert not model.training and not bn2d.training and not model[4].training
    assert int(bn2d.num_batches_tracked) == len(batches)
    assert has_running_statistics(model) and not has_running_statistics(nn.Sequential(nn.Linear(2, 2)))
    assert recompute_batch_norm_statistics(nn.Sequential(nn.Linear(2, 2)), batches) == 0
    with pytest.raises(ValueError, match="no batches"):
        recompute_batch_norm_statistics(model, [])


def test_ghost_batch_norm_averages_over_its_virtual_batches() -> None:
    """Under Ghost BatchNorm a batch of 16 is two virtual batches of 8, as in training: the
    statistics equal those of plain BatchNorm fed the 8-sample halves one after the other."""
    ghost = convert_to_ghost_batch_norm(_cnn(), 8)
    plain = _cnn()
    batches = _batches()
    halves = [(x[i : i + 8], y[i : i + 8]) for x, y in batches for i in (0, 8)]
    recompute_batch_norm_statistics(ghost, batches)
    recompute_batch_norm_statistics(plain, halves)
    for name, value in _statistics(plain).items():
        torch.testing.assert_close(_statistics(ghost)[name], value, rtol=1e-5, atol=1e-6)


def test_interpolation_with_recomputed_statistics_is_each_points_own_model() -> None:
    """At every alpha (inside and outside [0, 1]) the path's loss is that of a model holding the
    interpolated weights and the statistics recomputed for them on the training batches."""
    model_a, model_b = _cnn(0), _cnn(1)
    with torch.no_grad():
        model_b[5].running_var[0] = 20 * model_a[5].running_var[0]  # interpolation would clamp it beyond 1
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    data = {"train": _batches(seed=1), "test": _batches(n=32, seed=2)}
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.5]
    target = _cnn(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    result = interpolation_path(target, state_a, state_b, alphas, data, chunk_size=2, batch_norm="recompute")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # left as it was
    interpolated = interpolation_path(target, state_a, state_b, alphas, data, chunk_size=2)
    for i, alpha in enumerate(alphas):
        point = _cnn(3)
        point.load_state_dict(interpolate_state(state_a, state_b, alpha))
        update_bn([(x,) for x, _ in data["train"]], point)  # the oracle: PyTorch's own recomputation
        point.eval()
        for split, batches in data.items():
            with torch.no_grad():
                losses = [F.cross_entropy(point(x), y, reduction="sum") for x, y in batches]
            expected = float(sum(losses)) / sum(len(y) for _, y in batches)
            assert result.loss[split][i] == pytest.approx(expected, rel=1e-5), (alpha, split)
    # the saved statistics are not the data's: interpolating them gives another path
    assert not np.allclose(result.loss["train"], interpolated.loss["train"], rtol=1e-3)
    with pytest.raises(ValueError, match="batch_norm='mean'"):
        interpolation_path(target, state_a, state_b, alphas, data, batch_norm="mean")  # type: ignore[arg-type]


def test_the_top_eigenvalue_along_the_path_uses_the_recomputed_statistics() -> None:
    """Beyond alpha = 1, where interpolated statistics would differ most: the path's top eigenvalue
    is that of the point's own model (recomputed statistics, eval mode) by the engine's Lanczos."""
    from lightning_hessian.landscape import eigenvector_directions

    model_a, model_b = _cnn(0), _cnn(1)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    data = {"train": _batches(seed=1)}
    result = interpolation_path(
        _cnn(2), state_a, state_b, [0.0, 1.0, 1.5], data, batch_norm="recompute", eigenvalues=True,
        eigen_kwargs={"tol": 1e-8, "seed": 0},
    )  # fmt: skip
    interpolated = interpolation_path(
        _cnn(2), state_a, state_b, [1.5], data, eigenvalues=True, eigen_kwargs={"tol": 1e-8, "seed": 0}
    )
    point = _cnn(3)
    point.load_state_dict(interpolate_state(state_a, state_b, 1.5))
    update_bn([(x,) for x, _ in data["train"]], point)
    point.eval()
    (expected,), _ = eigenvector_directions(point, data["train"], 1, tol=1e-8, seed=0)
    assert result.top_eigenvalue is not None and interpolated.top_eigenvalue is not None
    assert result.top_eigenvalue[2] == pytest.approx(expected, rel=1e-4)
    assert interpolated.top_eigenvalue[0] != pytest.approx(expected, rel=1e-2)  # the other statistics
