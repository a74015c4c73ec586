"""The stability monitor on a quadratic, where the limit is known in closed form.

Loss ``0.5 w^T A w`` with a fixed symmetric positive definite ``A``: the Hessian is ``A`` at every
point, so ``hessian/eig_1`` is ``lambda_max(A)`` and the SGD ratio is
``lambda_max(A) lr / (2 (1 + momentum))``. For Adam the preconditioned sharpness is the top
eigenvalue of ``P^-1/2 A P^-1/2`` with ``P`` rebuilt here from the optimizer's own state.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import QUIET_TRAINER
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrumCallback
from lightning_hessian.curvature import MatrixOperator, top_eigenvalues
from lightning_hessian.curvature.preconditioned import DiagonallyScaledOperator

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 6


def _matrix() -> Tensor:
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    return (q * torch.linspace(0.5, 8.0, DIM, dtype=torch.float64)) @ q.T


class Quadratic(pl.LightningModule):
    def __init__(self, optimizer: str, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, DIM))
        self.register_buffer("A", _matrix().float())
        self.optimizer, self.lr, self.momentum, self.nesterov = optimizer, lr, momentum, nesterov

    def hessian_loss(self, batch: Tensor) -> Tensor:
        return 0.5 * self.w @ self.A @ self.w + 0.0 * batch.sum()  # the batch does not matter

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.hessian_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)


def _fit(module: Quadratic) -> tuple[dict[str, float], pl.Trainer]:
    spectrum = HessianSpectrumCallback(num_samples=4, eig_tol=1e-8, analyse_on_train_end=False)
    loader = DataLoader(torch.zeros(8, 1), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[spectrum],
        **QUIET_TRAINER,
    )
    trainer.fit(module, loader)
    return spectrum.last_metrics, trainer


@pytest.mark.parametrize(
    ("momentum", "nesterov", "factor"), [(0.0, False, 2.0), (0.9, False, 3.8), (0.9, True, 3.8 / 2.8)]
)
def test_sgd_ratio_is_the_closed_form(momentum: float, nesterov: bool, factor: float) -> None:
    metrics, _ = _fit(Quadratic("sgd", lr=0.05, momentum=momentum, nesterov=nesterov))
    top = float(torch.linalg.eigvalsh(_matrix().float().double())[-1])
    assert metrics["hessian/eig_1"] == pytest.approx(top, rel=1e-5)
    assert metrics["hessian/eig_1_x_lr"] == pytest.approx(top * 0.05, rel=1e-5)
    assert metrics["hessian/stability"] == pytest.approx(top * 0.05 / factor, rel=1e-5)


def test_adam_uses_the_preconditioned_sharpness() -> None:
    module = Quadratic("adam", lr=0.01)
    metrics, trainer = _fit(module)
    optimizer = trainer.optimizers[0]
    state = optimizer.state[module.w]
    step = float(state["step"])
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    eps = optimizer.param_groups[0]["eps"]
    p = (1 - beta1**step) * ((state["exp_avg_sq"].double() / (1 - beta2**step)).sqrt() + eps)
    scaled = _matrix().float().double() / torch.sqrt(p[:, None] * p[None, :])  # P^-1/2 A P^-1/2
    expected = float(torch.linalg.eigvalsh(scaled)[-1])
    assert metrics["hessian/preconditioned_eig_1"] == pytest.approx(expected, rel=1e-4)
    assert metrics["hessian/stability"] == pytest.approx(expected * 0.01 * (1 - beta1) / (2 + 2 * beta1), rel=1e-4)


def test_scaled_operator_matches_the_dense_product() -> None:
    matrix = _matrix()
    scale = torch.linspace(0.5, 2.0, DIM, dtype=torch.float64)
    operator = DiagonallyScaledOperator(MatrixOperator(matrix), scale)
    dense = scale[:, None] * matrix * scale[None, :]
    result = top_eigenvalues(operator, k=2, tol=1e-10)
    assert [float(v) for v in result.eigenvalues] == pytest.approx(
        torch.linalg.eigvalsh(dense)[-2:].flip(0).tolist(), rel=1e-8
    )
    with pytest.raises(ValueError, match="positive"):
        DiagonallyScaledOperator(MatrixOperator(matrix), -scale)


def test_other_optimizers_log_nan_not_a_guess() -> None:
    class RMSprop(Quadratic):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    metrics, _ = _fit(RMSprop("rmsprop", lr=0.01))
    assert metrics["hessian/eig_1"] > 0
    assert all(torch.isnan(torch.tensor(metrics[k])) for k in ("hessian/stability", "hessian/eig_1_x_lr"))
