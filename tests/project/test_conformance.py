"""Conformance: the three callbacks on Lightning projects no one here wrote.

Every case runs ``HessianSpectrumCallback``, ``LossLandscapeCallback`` and (for classifiers with
float inputs) ``AdversarialRobustnessCallback`` in ``fit``, ``validate`` and ``test`` on

* Lightning's own demo models: ``BoringModel`` (bare-tensor batches, module-defined loaders),
  ``DemoModel``, ``LightningTransformer`` (``forward(inputs, target)``, token batches) and the
  demos' MNIST network ``Net`` (synthetic 28x28 images);
* typical user models: an autoencoder with bare-tensor batches, a regressor with dict batches and
  a classifier with dropout and BatchNorm;

under both ``pytorch_lightning`` and ``lightning.pytorch``, with data passed as a datamodule and
as loaders given to ``fit``/``validate``/``test``. Each case checks the logged numbers against
independent computations (``hessian/eig_1`` against the exact float64 Hessian for the small
models, ``landscape/loss`` and ``robust/clean_acc`` against the module itself), the TensorBoard
figures of either package's logger, and that training is bit-identical with and without the
callbacks.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import QUIET_TRAINER, exact_batch_hessian
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_hessian import AdversarialRobustnessCallback, HessianSpectrumCallback, LossLandscapeCallback
from lightning_hessian.attacks import AttackSpec
from lightning_hessian.curvature.objective import batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")

NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]
NUM_SAMPLES = 24
MICRO_BATCH = 16  # two micro-batches per analysis: slicing keeps each batch's structure


def _namespace(name: str) -> ModuleType:
    return pytest.importorskip(name) if name == "lightning.pytorch" else importlib.import_module(name)


# ------------------------------------------------------------------------------------------------
# data: tensors of each model's batch structure


class DictData(Dataset):
    """Samples ``{"features": x, "target": y}``: a regression dataset with dict batches."""

    def __init__(self, features: Tensor, target: Tensor) -> None:
        self.features, self.target = features, target

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index], "target": self.target[index]}


class BareTensors(Dataset):
    """Bare tensors per sample, as Lightning's ``RandomDataset``: batches are tensors."""

    def __init__(self, data: Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]


def _datasets(kind: str) -> dict[str, Dataset]:
    generator = torch.Generator().manual_seed(0)
    sizes = {"train": 48, "val": 32, "test": 32}
    out: dict[str, Dataset] = {}
    for split, n in sizes.items():
        if kind == "vector":  # BoringModel, DemoModel, autoencoder
            out[split] = BareTensors(torch.randn(n, 32, generator=generator))
        elif kind == "tokens":  # LightningTransformer: (inputs, target) token ids
            tokens = torch.randint(0, 33, (n, 9), generator=generator)
            out[split] = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        elif kind == "mnist":  # the demos' Net
            out[split] = TensorDataset(
                torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)
            )
        elif kind == "dict":
            x = torch.randn(n, 6, generator=generator)
            out[split] = DictData(
                x, x @ torch.linspace(-1, 1, 6)[:, None] + 0.1 * torch.randn(n, 1, generator=generator)
            )
        elif kind == "images":  # dropout + BatchNorm classifier
            out[split] = TensorDataset(
                torch.rand(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)
            )
    return out


# ------------------------------------------------------------------------------------------------
# the models: Lightning's demos (subclassed only to add the documented hook), and user-style ones


def _models(ns: ModuleType) -> dict[str, tuple[type, str, bool]]:
    """name -> (LightningModule class, data kind, is a classifier with float inputs)."""
    demos = importlib.import_module(f"{ns.__name__}.demos.boring_classes")
    transformer = importlib.import_module(f"{ns.__name__}.demos.transformer")

    class Boring(demos.BoringModel):
        def hessian_loss(self, batch: Tensor) -> Tensor:
            return self.step(batch)

    class Demo(demos.DemoModel):
        def __init__(self) -> None:
            super().__init__(out_dim=4)

        def hessian_loss(self, batch: Tensor) -> Tensor:
            return self(batch).sum(dim=1).mean()  # training_step's sum, per sample

    class Transformer(transformer.LightningTransformer):
        def __init__(self) -> None:
            super().__init__(vocab_size=33)
            self.model = transformer.Transformer(vocab_size=33, ninp=8, nhead=2, nhid=16, nlayers=1)

        def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; tests use synthetic tokens
            pass

        def hessian_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
            inputs, target = batch
            return F.nll_loss(self(inputs, target), target.reshape(-1))

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/loss", self.hessian_loss(batch))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test/loss", self.hessian_loss(batch))

    class MNISTClassifier(ns.LightningModule):
        """The LightningModule of Lightning's MNIST example around the demos' ``Net``."""

        def __init__(self) -> None:
            super().__init__()
            self.net = demos.Net()

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.nll_loss(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/loss", F.nll_loss(self(batch[0]), batch[1]))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test/loss", F.nll_loss(self(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adadelta(self.parameters(), lr=0.1)

    class AutoEncoder(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(32, 6), nn.Tanh())
            self.decoder = nn.Linear(6, 32)

        def forward(self, x: Tensor) -> Tensor:
            return self.decoder(self.encoder(x))

        def hessian_loss(self, batch: Tensor) -> Tensor:
            return F.mse_loss(self(batch), batch)

        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            return self.hessian_loss(batch)

        def validation_step(self, batch: Tensor, batch_idx: int) -> None:
            self.log("val/loss", self.hessian_loss(batch))

        def test_step(self, batch: Tensor, batch_idx: int) -> None:
            self.log("test/loss", self.hessian_loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class DictRegressor(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def hessian_loss(self, batch: dict[str, Tensor]) -> Tensor:
            return F.mse_loss(self(batch["features"]), batch["target"])

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self.hessian_loss(batch)

        def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
            self.log("val/loss", self.hessian_loss(batch))

        def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
            self.log("test/loss", self.hessian_loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    class DropoutBatchNormClassifier(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(48, 3)
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    return {
        "BoringModel": (Boring, "vector", False),
        "DemoModel": (Demo, "vector", False),
        "LightningTransformer": (Transformer, "tokens", False),
        "demos.Net (MNIST)": (MNISTClassifier, "mnist", True),
        "autoencoder": (AutoEncoder, "vector", False),
        "dict regressor": (DictRegressor, "dict", False),
        "dropout+BatchNorm": (DropoutBatchNormClassifier, "images", True),
    }


MODELS = list(_models(importlib.import_module("pytorch_lightning")))
EXACT = {"BoringModel", "DemoModel", "autoencoder", "dict regressor", "dropout+BatchNorm"}


def _datamodule(ns: ModuleType, datasets: dict[str, Dataset]) -> Any:
    class DataModule(ns.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(datasets["train"], batch_size=16, shuffle=True)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(datasets["val"], batch_size=16)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(datasets["test"], batch_size=16)

    return DataModule()


def _callbacks(classifier: bool, exact: bool) -> list[Any]:
    # a tight tolerance where the exact Hessian is the oracle; the default (faster) elsewhere
    tolerance = {"eig_tol": 1e-6} if exact else {}
    callbacks = [
        HessianSpectrumCallback(top_k=2, num_samples=NUM_SAMPLES, analysis_batch_size=MICRO_BATCH, **tolerance),
        LossLandscapeCallback(
            curves=["eig1"], curve_points=3, num_samples=NUM_SAMPLES, analysis_batch_size=MICRO_BATCH
        ),
    ]
    if classifier:
        callbacks.append(
            AdversarialRobustnessCallback(
                attacks=[AttackSpec("fgsm", [0.0, 0.05])], num_samples=NUM_SAMPLES, analysis_batch_size=MICRO_BATCH
            )
        )
    return callbacks


def _trainer(ns: ModuleType, callbacks: list[Any], log_dir: Path | None) -> Any:
    logger = ns.loggers.TensorBoardLogger(str(log_dir), name="", version="") if log_dir is not None else False
    return ns.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )


def _fit(
    ns: ModuleType, model_name: str, passing: str, callbacks: list[Any], log_dir: Path | None
) -> tuple[Any, Any, Any]:
    cls, kind, _ = _models(ns)[model_name]
    ns.seed_everything(0)
    model = cls()
    datasets = _datasets(kind)
    trainer = _trainer(ns, callbacks, log_dir)
    if passing == "datamodule":
        data: Any = _datamodule(ns, datasets)
        trainer.fit(model, datamodule=data)
    else:
        data = {split: DataLoader(ds, batch_size=16, shuffle=split == "train") for split, ds in datasets.items()}
        trainer.fit(model, data["train"], data["val"])
    return trainer, model, data


def _evaluate(trainer: Any, model: Any, data: Any, passing: str, stage: str) -> None:
    run = getattr(trainer, stage)
    if passing == "datamodule":
        run(model, datamodule=data, verbose=False)
    else:
        run(model, dataloaders=data["val" if stage == "validate" else "test"], verbose=False)


def _image_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["images"])


def _check_analyses(callbacks: list[Any], module: nn.Module, trainer: Any, exact: bool) -> None:
    spectrum, landscape = callbacks[0], callbacks[1]
    metrics = trainer.callback_metrics
    # Under validate/test the analyses log with their samples' split in the tag (hessian/test/eig_1).
    tag = lambda callback, name: callback.analysis_tag(trainer, name)  # noqa: E731
    samples = spectrum._samples[spectrum._split_for(trainer)]
    assert samples.num_global == NUM_SAMPLES
    eig_1 = float(metrics[tag(spectrum, "hessian/eig_1")])
    if exact:
        expected = torch.linalg.eigvalsh(exact_batch_hessian(module, samples.batch))[-1].item()
        assert eig_1 == pytest.approx(expected, rel=1e-4, abs=1e-6)
    else:
        assert torch.isfinite(torch.tensor(eig_1))
    # landscape/loss: the module's loss on the same samples, computed here in one pass
    own = landscape._samples[landscape._split_for(trainer)]
    with torch.no_grad():
        loss = batch_loss(module.eval(), own.batch).item()
    assert float(metrics[tag(landscape, "landscape/loss")]) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    if len(callbacks) == 3:
        robust = callbacks[2]._samples[callbacks[2]._split_for(trainer)]
        with torch.no_grad():
            clean = (module.eval()(robust.batch[0]).argmax(1) == robust.batch[1]).double().mean().item()
        assert float(metrics[tag(callbacks[2], "robust/clean_acc")]) == pytest.approx(clean)
        assert float(metrics[tag(callbacks[2], "robust/fgsm/eps_0")]) == pytest.approx(clean)


@pytest.mark.parametrize("passing", ["datamodule", "loaders"])
@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("model_name", MODELS)
def test_callbacks_on_projects_we_did_not_write(model_name: str, namespace: str, passing: str, tmp_path: Path) -> None:
    ns = _namespace(namespace)
    classifier = _models(ns)[model_name][2]
    exact = model_name in EXACT
    callbacks = _callbacks(classifier, exact)
    trainer, model, data = _fit(ns, model_name, passing, callbacks, tmp_path / "run")
    _check_analyses(callbacks, model, trainer, exact)
    images = _image_tags(tmp_path / "run")
    assert "landscape/curves" in images
    if classifier:
        assert "robust/fgsm/curve" in images

    # attaching the callbacks does not change training by one bit
    _, plain, _ = _fit(ns, model_name, passing, [], None)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    for stage in ("validate", "test"):
        if getattr(type(model), f"{'validation' if stage == 'validate' else 'test'}_step") is getattr(
            ns.LightningModule, f"{'validation' if stage == 'validate' else 'test'}_step"
        ):
            continue  # Lightning itself refuses validate/test without the step (DemoModel)
        _evaluate(trainer, model, data, passing, stage)
        _check_analyses(callbacks, model, trainer, exact)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_module_defined_loaders_and_combined_loader(namespace: str, tmp_path: Path) -> None:
    """BoringModel's own ``*_dataloader`` hooks; a ``CombinedLoader`` of a dict of loaders passed to
    ``fit``; ``limit_*_batches``: the samples come from the first loader's dataset."""
    ns = _namespace(namespace)
    boring = _models(ns)["BoringModel"][0]
    # eig_tol bounds the residual relative to the eigenvalue; tight here, as the check is to 1e-4
    spectrum = HessianSpectrumCallback(num_samples=NUM_SAMPLES, analysis_batch_size=MICRO_BATCH, eig_tol=1e-6)
    trainer = ns.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        callbacks=[spectrum],
        **QUIET_TRAINER,
    )
    model = boring()
    trainer.fit(model)
    batch = spectrum._samples["train"].batch
    assert isinstance(batch, Tensor) and batch.shape == (NUM_SAMPLES, 32)
    expected = torch.linalg.eigvalsh(exact_batch_hessian(model, batch))[-1].item()
    assert float(trainer.callback_metrics["hessian/eig_1"]) == pytest.approx(expected, rel=1e-4)

    combined_cls = importlib.import_module(f"{ns.__name__}.utilities").CombinedLoader
    x = torch.randn(40, 32)
    loaders = combined_cls(
        {"a": DataLoader(BareTensors(x), batch_size=8), "b": DataLoader(BareTensors(-x), batch_size=8)}
    )

    class Combined(boring):
        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return self.step(batch["a"])

    spectrum = HessianSpectrumCallback(num_samples=NUM_SAMPLES, analysis_batch_size=MICRO_BATCH)
    trainer = ns.Trainer(
        max_epochs=1,
        callbacks=[spectrum],
        **QUIET_TRAINER,
        limit_val_batches=0,
    )
    model = Combined()
    trainer.fit(model, loaders)
    chosen = spectrum._samples["train"].batch
    assert any(torch.equal(chosen[0], row) for row in x)  # from loader "a"


class Stream(IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(3)
        for _ in range(64):
            yield torch.randn(6, generator=generator), torch.randint(0, 3, (), generator=generator)


def test_iterable_dataset_and_fit_time_errors() -> None:
    """An iterable dataset is read batch by batch; a ``num_samples`` beyond the split fails
    before the first training step, also for loaders passed to ``fit``."""
    ns = importlib.import_module("pytorch_lightning")

    class Classifier(ns.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(6, 3)
            self.steps = 0

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            self.steps += 1
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    spectrum = HessianSpectrumCallback(num_samples=20, analysis_batch_size=8)
    trainer = ns.Trainer(
        max_epochs=1,
        callbacks=[spectrum],
        **QUIET_TRAINER,
    )
    model = Classifier()
    trainer.fit(model, DataLoader(Stream(), batch_size=8))
    assert spectrum._samples["train"].num_local == 20 and "hessian/eig_1" in trainer.callback_metrics

    too_many = HessianSpectrumCallback(num_samples=100)
    trainer = ns.Trainer(
        max_epochs=1,
        callbacks=[too_many],
        **QUIET_TRAINER,
    )
    model = Classifier()
    with pytest.raises(ValueError, match="num_samples=100 is larger than the train split"):
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(30, 6), torch.randint(0, 3, (30,))), batch_size=8))
    assert model.steps == 0

    robust = AdversarialRobustnessCallback(num_samples=8)
    trainer = ns.Trainer(
        max_epochs=1,
        callbacks=[robust],
        **QUIET_TRAINER,
    )
    model = Classifier()
    dict_loader = DataLoader(DictData(torch.rand(16, 6), torch.randint(0, 3, (16,))), batch_size=8)
    with pytest.raises(TypeError, match="hessian_inputs"):
        trainer.fit(model, dict_loader, dict_loader)
    assert model.steps == 0


def test_hooks_name_what_they_need() -> None:
    """``hessian_inputs`` gives the attacks their inputs; ``hessian_accuracy`` the landscape its
    accuracy; a module with ``hessian_loss`` only has no accuracy (NaN), and no crash."""
    from lightning_hessian.curvature.objective import batch_accuracy, inputs_and_targets

    class Keyed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def hessian_loss(self, batch: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(self(batch["pixels"]), batch["class"])

    batch = {"pixels": torch.rand(5, 4), "class": torch.tensor([0, 1, 2, 0, 1])}
    module = Keyed()
    with pytest.raises(TypeError, match=r"hessian_inputs\(self, batch\)"):
        inputs_and_targets(module, batch, needed_by="AdversarialRobustnessCallback")
    assert torch.isnan(batch_accuracy(module, batch))
    module.hessian_inputs = lambda b: (b["pixels"], b["class"])
    module.hessian_accuracy = lambda b: (module(b["pixels"]).argmax(1) == b["class"]).float().mean()
    x, y = inputs_and_targets(module, batch, needed_by="AdversarialRobustnessCallback")
    assert x is batch["pixels"] and y is batch["class"]
    assert batch_accuracy(module, batch) == (module(x).argmax(1) == y).float().mean()


def test_analyses_under_test_from_a_checkpoint_log_at_its_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ns = importlib.import_module("pytorch_lightning")
    boring = _models(ns)["BoringModel"][0]
    trainer = ns.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(boring())
    checkpoint = trainer.checkpoint_callback.best_model_path
    assert trainer.global_step == 6 and checkpoint

    spectrum = HessianSpectrumCallback(num_samples=16)
    tester = ns.Trainer(
        callbacks=[spectrum],
        logger=ns.loggers.TensorBoardLogger(str(tmp_path / "tb"), name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_test_batches=1,
    )
    tester.test(boring(), ckpt_path=checkpoint, verbose=False)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    # Under test the analysis of test samples carries its split in the tag, at the checkpoint's step.
    assert [event.step for event in events.Scalars("hessian/test/eig_1")] == [6]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_package_classes_under_either_lightning_cli(namespace: str, tmp_path: Path) -> None:
    """The package's model, data modules and callbacks run under either package's own
    ``LightningCLI`` (``lightning_hessian.unified`` holds the ``lightning.pytorch`` classes)."""
    ns = _namespace(namespace)
    package = importlib.import_module(
        "lightning_hessian.unified" if namespace == "lightning.pytorch" else "lightning_hessian.data"
    )
    model_class = (
        package.ImageClassifier
        if namespace == "lightning.pytorch"
        else importlib.import_module("lightning_hessian").ImageClassifier
    )
    cli = importlib.import_module(f"{namespace}.cli")
    args = [
        "fit",
        "--data=Digits",
        "--data.batch_size=64",
        "--model.arch=mlp",
        "--model.num_classes=10",
        "--model.input_shape=[1, 8, 8]",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks+=lightning_hessian.HessianSpectrumCallback",
        "--trainer.callbacks.num_samples=64",
    ]
    run = cli.LightningCLI(
        model_class, package.ImageDataModule, subclass_mode_data=True, args=args, save_config_callback=None
    )
    assert isinstance(run.trainer, ns.Trainer) and isinstance(run.datamodule, package.Digits)
    assert float(run.trainer.callback_metrics["hessian/eig_1"]) > 0
    # the callback's state is in the checkpoint that package's trainer wrote
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    states = torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
    (key,) = [k for k in states if k.startswith("HessianSpectrumCallback")]
    assert states[key]["last_epoch"] == 0
