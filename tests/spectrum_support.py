"""Tiny models, data and exact-Hessian oracles shared by the spectrum-callback tests.

Not a test module (pytest collects ``test_*.py`` only): ``test_spectrum_callback*.py``,
``test_conformance.py`` and ``test_faults.py`` import from it. Module-level classes so that
``ddp_spawn`` can pickle them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.callbacks.base import batch_loss
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback

IN_FEATURES, HIDDEN, CLASSES = 6, 8, 3


def classification_data(n: int, seed: int) -> TensorDataset:
    """Inputs from a Gaussian, labels from a random linear teacher with label noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=generator)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    y = (x @ teacher + 0.5 * torch.randn(n, CLASSES, generator=generator)).argmax(dim=1)
    return TensorDataset(x, y)


class PlainClassifier(pl.LightningModule):
    """A LightningModule written the plain Lightning way, with nothing from this package."""

    def __init__(
        self, lr: float = 0.2, n_train: int = 96, batch_norm: bool = False, dropout: float = 0.0, shuffle: bool = True
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(IN_FEATURES, HIDDEN)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(HIDDEN, CLASSES)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.n_train = n_train
        self.shuffle = shuffle

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(self.n_train, seed=0), batch_size=16, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(48, seed=1), batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(40, seed=2), batch_size=16)


class DictRegressionData(Dataset):
    """Batches that are dicts with non-standard keys: only ``hessian_loss`` knows the loss."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(n, IN_FEATURES, generator=generator)
        self.response = torch.sin(self.features[:, :2].sum(dim=1, keepdim=True))

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.features[i], "response": self.response[i]}


class HessianLossRegressor(pl.LightningModule):
    """A regression module that defines ``hessian_loss(batch)`` (mean squared error)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 5), nn.Softplus(), nn.Linear(5, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def hessian_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(self(batch["features"]), batch["response"])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.hessian_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_mse", self.hessian_loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_mse", self.hessian_loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictRegressionData(64, seed=0), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DictRegressionData(40, seed=1), batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(DictRegressionData(36, seed=2), batch_size=16)


class _LossOf(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: Any) -> Tensor:
        return batch_loss(self.inner, batch)


def _to_double(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_double(v) for v in batch)
    return batch


def exact_hessian(module: nn.Module, batch: Any, names: list[str] | None = None) -> Tensor:
    """The float64 Hessian (eval mode) of ``batch_loss(module, batch)`` w.r.t. the named parameters,
    by ``torch.autograd.functional.hessian`` on a float64 copy: the oracle."""
    model = copy.deepcopy(module).double().eval()
    wrapper = _LossOf(model)
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    sizes = [p.numel() for _, p in named]
    constants = {"inner." + n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())}
    batch = _to_double(batch)

    def loss(flat: Tensor) -> Tensor:
        tensors = dict(constants)
        for (name, param), piece in zip(named, flat.split(sizes)):
            tensors["inner." + name] = piece.view_as(param)
        return torch.func.functional_call(wrapper, tensors, (batch,))

    flat = torch.cat([p.reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(loss, flat)


def exact_input_quantities(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample top eigenvalue of the input Hessian of the cross-entropy and per-sample
    input-gradient norm, float64, exact."""
    model = copy.deepcopy(module).double().eval()
    eigs, norms = [], []
    for xi, yi in zip(x.double(), y):

        def loss(v: Tensor, target: Tensor = yi) -> Tensor:
            return F.cross_entropy(model(v.unsqueeze(0)), target.unsqueeze(0))

        eigs.append(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, xi))[-1])
        norms.append(torch.func.grad(loss)(xi).detach().norm())
    return torch.stack(eigs).detach(), torch.stack(norms).detach()


class RecordingSpectrum(HessianSpectrumCallback):
    """Writes each rank's metrics and eigenvectors to ``out_dir`` (for ``ddp_spawn`` tests, whose
    callback objects live in the child processes)."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, samples: Any) -> dict[str, float]:
        metrics = super().analyse(trainer, pl_module, samples)
        record = {
            "metrics": metrics,
            "num_local": samples.num_local,
            "num_global": samples.num_global,
            "eigenvectors": None
            if self.eigenvectors is None
            else [{k: v.cpu() for k, v in e.items()} for e in self.eigenvectors],
            "state": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt")
        return metrics
