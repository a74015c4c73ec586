"""Input-space curvature against per-sample exact float64 Hessians; the paper's PSD claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.curvature import input_curvature, input_gradient_norms, input_hessian_eigenvalues

pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(activation: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        activation,
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        activation,
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        model(torch.randn(16, 1, 6, 6))  # running statistics
    return model, torch.randn(7, 1, 6, 6), torch.randint(0, 5, (7,))


def per_sample_exact(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact float64 (largest, smallest, gradient norm) per sample, one sample at a time."""
    model = model.eval()
    tensors = {
        n: t.detach().double() if t.is_floating_point() else t
        for n, t in (*model.named_parameters(), *model.named_buffers())
    }
    largest, smallest, norms = [], [], []
    for i in range(x.shape[0]):

        def loss(xi: torch.Tensor, i: int = i) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, tensors, (xi[None],)), y[i : i + 1])

        xi = x[i].double()
        H = torch.autograd.functional.hessian(loss, xi, vectorize=True).reshape(xi.numel(), xi.numel())
        values = torch.linalg.eigvalsh(H)
        largest.append(values[-1])
        smallest.append(values[0])
        norms.append(torch.autograd.functional.jacobian(loss, xi).norm())
    return torch.stack(largest), torch.stack(smallest), torch.stack(norms)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Softplus(beta=3.0)], ids=["relu", "softplus"])
def test_input_curvature_matches_exact_per_sample_hessians(activation: nn.Module) -> None:
    model, x, y = make_net(activation)
    model.train()
    largest, smallest, norms = per_sample_exact(model, x, y)
    model.train()
    result = input_curvature(model, F.cross_entropy, x, y, smallest=True, dtype=torch.float64, tol=1e-10, batch_size=3)
    assert model.training
    scale = largest.abs().max()
    assert torch.allclose(result.largest.eigenvalues, largest, rtol=0, atol=1e-8 * scale)
    assert torch.allclose(result.smallest.eigenvalues, smallest, rtol=0, atol=1e-8 * scale)
    assert torch.allclose(result.gradient_norms, norms, rtol=1e-10)
    assert result.largest.converged.all() and result.smallest.converged.all()
    assert result.metrics()["input_lambda_max"] == pytest.approx(float(largest.mean()))


def test_relu_cross_entropy_input_hessian_is_psd_softplus_is_not() -> None:
    relu, x, y = make_net(nn.ReLU())
    smallest_relu = input_hessian_eigenvalues(
        relu, F.cross_entropy, x, y, which="smallest", dtype=torch.float64, tol=1e-8
    )
    largest_relu = input_hessian_eigenvalues(relu, F.cross_entropy, x, y, dtype=torch.float64, tol=1e-8)
    assert (smallest_relu.eigenvalues >= -1e-6).all()
    assert (largest_relu.eigenvalues > 1e-4).all()
    softplus, x, y = make_net(nn.Softplus(beta=3.0))
    smallest_soft = input_hessian_eigenvalues(softplus, F.cross_entropy, x, y, which="smallest", tol=1e-6)
    assert smallest_soft.eigenvalues.min() < -1e-3
    assert smallest_soft.eigenvalues.dtype == torch.float64


def test_float32_inference_tensors_and_state_are_handled() -> None:
    model, x, y = make_net(nn.Softplus())
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 2.0)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    exact_largest, _, exact_norms = per_sample_exact(model, x, y)
    model.train()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        norms = input_gradient_norms(model, F.cross_entropy, xi, yi, batch_size=4)
        top = input_hessian_eigenvalues(model, F.cross_entropy, xi, yi, batch_size=4, tol=1e-5)
    assert torch.allclose(norms, exact_norms, rtol=1e-5)
    assert torch.allclose(top.eigenvalues, exact_largest, rtol=1e-4, atol=1e-6)
    assert model.training and all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 2.0))
    assert torch.equal(rng, torch.get_rng_state())

    def batch_loss(module: nn.Module, batch: tuple) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    again = input_gradient_norms(model, None, x, y, batch_loss=batch_loss)
    assert torch.allclose(again, norms, rtol=1e-6)
