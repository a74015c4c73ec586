"""What the tests share: paths, tiny on-disk datasets, tiny models, exact float64 oracles.

Not a test module and not a conftest: every test folder imports it as ``from helpers import ...``
(``pythonpath = ["tests"]`` in pyproject.toml). Fixtures are in ``conftest.py``. The classes are at
module level so that ``ddp_spawn`` can pickle them.

Sections: paths and command lines; Trainer settings; datasets (files in the real formats, sklearn's
digits); tiny networks with the exact Hessian of one batch (the curvature engine's oracle); tiny
LightningModules with the exact Hessian of ``batch_loss`` (the callbacks' oracle); the benchmarks
as modules.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import pickle
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.callbacks.base import batch_loss
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback

# ------------------------------------------------------------------------ paths and command lines

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
BENCHMARKS = REPO_ROOT / "benchmarks"
QUICKSTART = CONFIGS / "quickstart.yaml"

#: ``hessian-train`` options for tests: no progress bar, no model summary, and none of the config's
#: analysis callbacks (each is tested by its own test file; in a CLI test they would only cost time)
QUIET_CLI = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.callbacks=[]"]

#: the input shape of each architecture of ``lightning_hessian.models`` (the data it is built for)
INPUT_SHAPES = {
    "m1": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "c1": (3, 32, 32),
    "c2": (3, 32, 32),
    "resnet20": (3, 32, 32),
    "resnet18": (3, 32, 32),
    "wrn16_4": (3, 32, 32),
    "mlp": (1, 8, 8),
}

# -------------------------------------------------------------------------------- Trainer settings

#: a Trainer that writes and prints nothing: no logger, no checkpoints, no progress bar, no summary
#: (works for ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer`` alike)
QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}

#: data-parallel training in two CPU processes (gloo), as the DDP tests run it
DDP_TWO_CPUS: dict[str, Any] = {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}

#: the callbacks of ``configs/overlays/paper_study.yaml``, in order (the landscape takes the first
#: spectrum's eigenvectors)
PAPER_STUDY_CALLBACKS = [
    "LearningRateMonitor", "HessianSpectrumCallback", "HessianSpectrumCallback", "HessianSpectrumCallback",
    "LossLandscapeCallback", "AdversarialRobustnessCallback",
]  # fmt: skip

# ---------------------------------------------------------------------------------------- datasets


def write_cifar_folder(
    root: Path, *, num_train: int = 100, num_test: int = 40, num_classes: int = 10, seed: int = 0
) -> Path:
    """Write a CIFAR-10 (or, with 100 classes, CIFAR-100) folder in torchvision's pickle format.

    Returns ``root``; the files are under ``root/cifar-10-batches-py`` or ``root/cifar-100-python``.
    """
    rng = np.random.default_rng(seed)

    def entry(count: int, label_key: str) -> dict:
        return {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, num_classes, count).tolist(),
        }

    if num_classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        files = {"train": entry(num_train, "fine_labels"), "test": entry(num_test, "fine_labels")}
    else:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        per_batch = num_train // 5
        files = {f"data_batch_{i}": entry(per_batch, "labels") for i in range(1, 6)}
        files["test_batch"] = entry(num_test, "labels")
    for name, content in files.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle)
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the IDX format (gzipped when ``path`` ends in ``.gz``)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def write_mnist_folder(root: Path, *, num_train: int = 60, num_test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """Write the four (Fashion-)MNIST IDX files with random content into ``root``."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, count, dtype=np.uint8))
    return root


def digits_tensors() -> tuple[Tensor, Tensor]:
    """sklearn's 1797 digits (embedded in sklearn, no download) as images in [0, 1] of shape
    ``(N, 1, 8, 8)`` (float32) and their labels (int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32).view(-1, 1, 8, 8)
    return x, torch.tensor(digits.target)


# ------------------------------------------------ tiny networks and the exact Hessian of one batch


class SmallCNN(nn.Module):
    """Conv, BatchNorm, activation, Linear: 3 classes from 1x6x6 images."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.act = activation
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


def make_cnn(activation: nn.Module | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """A seeded :class:`SmallCNN` (softplus unless ``activation`` is given) with non-trivial BatchNorm
    running statistics, in train mode, and a batch of 13 samples."""
    torch.manual_seed(0)
    model = SmallCNN(activation or nn.Softplus())
    with torch.no_grad():  # non-trivial running statistics, then train mode as during training
        model(torch.randn(32, 1, 6, 6) * 2 + 0.5)
    x = torch.randn(13, 1, 6, 6)
    y = torch.randint(0, 3, (13,))
    return model, x, y


def make_mlp(activation: nn.Module | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """A seeded 6-12-4 MLP (softplus unless ``activation`` is given) and a batch of 17 samples."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), activation or nn.Softplus(), nn.Linear(12, 4))
    x = torch.randn(17, 6)
    y = torch.randint(0, 4, (17,))
    return model, x, y


def exact_hessian(
    model: nn.Module, x: Tensor, y: Tensor, names: list[str] | None = None, loss_of_outputs=F.cross_entropy
) -> Tensor:
    """Dense float64 Hessian of the full-batch mean ``loss_of_outputs(model(x), y)`` (eval mode) with
    respect to the named parameters (all by default; the others stay constant), in the order of
    ``names``: an oracle that shares nothing with the operator (one batch,
    ``torch.autograd.functional.hessian``). The model's mode is restored."""
    training = model.training
    model.eval()
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    names = names or list(params)

    def loss(*values: Tensor) -> Tensor:
        tensors = {**params, **buffers, **dict(zip(names, values, strict=True))}
        return loss_of_outputs(torch.func.functional_call(model, tensors, (x.double(),)), y)

    blocks = torch.autograd.functional.hessian(loss, tuple(params[n] for n in names), vectorize=True)
    model.train(training)
    sizes = [params[n].numel() for n in names]
    return torch.cat(
        [torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1) for i in range(len(names))]
    )


def fingerprint(model: nn.Module) -> dict:
    """Everything an analysis must leave as it found it: parameters, buffers, the gradient tensors
    (identity and value), ``requires_grad``, train/eval modes and the global RNG state."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "grads": [(id(p.grad), None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def assert_same_state(before: dict, model: nn.Module) -> None:
    """The model's :func:`fingerprint` is still ``before``."""
    after = fingerprint(model)
    for key in ("params", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key], strict=True)), key
    for (id_a, a), (id_b, b) in zip(before["grads"], after["grads"], strict=True):
        assert id_a == id_b and ((a is None and b is None) or torch.equal(a, b))
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])


class OldStyleSquare(torch.autograd.Function):
    """A custom function without ``setup_context``: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * grad  # differentiable: double backward works


class SquareNet(nn.Module):
    """Linear, :class:`OldStyleSquare`, Linear (6 -> 5 -> 4): a model torch.func cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(OldStyleSquare.apply(self.fc1(x)))


# ------------------------------------------ tiny LightningModules and the callbacks' exact oracles

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


def exact_batch_hessian(module: nn.Module, batch: Any, names: list[str] | None = None) -> Tensor:
    """The float64 Hessian (eval mode) of ``batch_loss(module, batch)`` w.r.t. the named parameters,
    by ``torch.autograd.functional.hessian`` on a float64 copy: the callbacks' oracle."""
    model = copy.deepcopy(module).double().eval()
    wrapper = _LossOf(model)
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    sizes = [p.numel() for _, p in named]
    constants = {"inner." + n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())}
    batch = _to_double(batch)

    def loss(flat: Tensor) -> Tensor:
        tensors = dict(constants)
        for (name, param), piece in zip(named, flat.split(sizes), strict=True):
            tensors["inner." + name] = piece.view_as(param)
        return torch.func.functional_call(wrapper, tensors, (batch,))

    flat = torch.cat([p.reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(loss, flat)


def exact_input_quantities(module: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample top eigenvalue of the input Hessian of the cross-entropy and per-sample
    input-gradient norm, float64, exact."""
    model = copy.deepcopy(module).double().eval()
    eigs, norms = [], []
    for xi, yi in zip(x.double(), y, strict=True):

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


# ------------------------------------------------------------------------- benchmarks as modules


def load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name``, registered in ``sys.modules`` until
    ``monkeypatch`` undoes it (dataclasses look their module up while the class is built)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
