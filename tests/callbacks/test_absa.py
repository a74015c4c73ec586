"""AdaptiveBatchSizeCallback (ABSA): when the batch and learning rate grow, resume, DDP data
coverage, the adversarial switch-off and bad settings.

The eigenvalues come from a real ``HessianSpectrumCallback`` whose ``analyse`` follows a script
(``ScriptedSpectrum``), so the callbacks talk through the real ``last_metrics`` path. Module-level
classes so that ``ddp_spawn`` can pickle them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import DDP_TWO_CPUS, QUIET_TRAINER
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import AdaptiveBatchSizeCallback, HessianSpectrumCallback, ImageClassifier, UserInputError
from lightning_hessian.data.base import ImageDataModule
from lightning_hessian.models.optim import lr_multiplier
from lightning_hessian.resume import RNGStateCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    "ignore:.*sync_dist=True.*",
    "ignore:.*reload_dataloaders_every_n_epochs.*",
    "ignore:.*Checkpoint directory.*exists and is not empty.*",
)

NUM_IMAGES = 80  # 64 training images after the 20 % validation split


class TinyImages(ImageDataModule):
    """80 random 1x4x4 images, 3 classes; pixel (0, 0, 0) holds the image's index (``index / 255``)."""

    num_classes = 3
    input_shape = (1, 4, 4)

    def __init__(self, batch_size: int = 8, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, augment=False, normalize=False, val_fraction=0.2, **kwargs)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(0 if train else 1)
        images = torch.randint(0, 256, (NUM_IMAGES, 1, 4, 4), dtype=torch.uint8, generator=generator)
        images[:, 0, 0, 0] = torch.arange(NUM_IMAGES, dtype=torch.uint8)
        labels = torch.randint(0, 3, (NUM_IMAGES,), generator=generator)
        return images, labels


def train_indices() -> list[int]:
    data = TinyImages()
    data.setup("fit")
    return sorted(data.train_dataset.images[:, 0, 0, 0].tolist())  # uint8 indices


class ScriptedSpectrum(HessianSpectrumCallback):
    """A spectrum callback whose top eigenvalue at the end of epoch ``e`` is ``script[e]``."""

    def __init__(self, script: list[float], **kwargs: Any) -> None:
        super().__init__(num_samples=8, analysis_batch_size=8, analyse_on_train_end=False, **kwargs)
        self.script = list(script)

    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, samples: Any) -> dict[str, float]:
        value = self.script[min(trainer.current_epoch, len(self.script) - 1)]
        return {"hessian/eig_1": float(value)}


class Recorder(pl.Callback):
    """Per training batch: epoch, global step, per-device batch length, the learning rate used,
    the module's adversarial method; per epoch: the datamodule's batch_size and the loader's."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.out_dir = out_dir
        self.steps: list[tuple[int, int, int, float, str]] = []
        self.indices: dict[int, list[int]] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        adversarial = getattr(getattr(pl_module, "adversarial", None), "method", "")
        self.steps.append((trainer.current_epoch, trainer.global_step, len(x), lr, adversarial))
        self.indices.setdefault(trainer.current_epoch, []).extend(x[:, 0, 0, 0].mul(255).round().long().tolist())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is not None:  # ddp_spawn: the records live in the child processes
            epoch = trainer.current_epoch
            torch.save(
                {"indices": self.indices.get(epoch, []), "steps": [s for s in self.steps if s[0] == epoch]},
                Path(self.out_dir) / f"rank{trainer.global_rank}_epoch{epoch}.pt",
            )

    def per_epoch(self) -> dict[int, tuple[set[int], set[float]]]:
        """epoch -> (per-device batch lengths, learning rates) seen in it."""
        out: dict[int, tuple[set[int], set[float]]] = {}
        for epoch, _step, size, lr, _adv in self.steps:
            sizes, lrs = out.setdefault(epoch, (set(), set()))
            sizes.add(size)
            lrs.add(round(lr, 12))
        return out


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, m[name]) for step, m in self.records if name in m]


def classifier(**kwargs: Any) -> ImageClassifier:
    options = dict(
        arch="mlp",
        num_classes=3,
        input_shape=(1, 4, 4),
        lr=0.05,
        base_batch_size=8,
        batch_size=8,
        lr_scaling="linear",
        momentum=0.9,
        weight_decay=0.0,
        lr_schedule="constant",
    )
    options.update(kwargs)
    return ImageClassifier(**options)


def trainer(callbacks: list, tmp_path: Path, max_epochs: int, **kwargs: Any) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        **QUIET_TRAINER,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


# --------------------------------------------------------------------------------------------
# (a) when the batch and learning rate grow


def test_grows_on_halved_eigenvalue_and_after_max_epochs(tmp_path: Path) -> None:
    pl.seed_everything(0)
    # epoch: 0  1  2    3  4  5    6    7    8
    script = [10, 8, 4.9, 4, 3, 2.5, 2.4, 1.2, 0.1]
    absa = AdaptiveBatchSizeCallback(max_batch_size=64, max_epochs_per_size=3)
    recorder, logger = Recorder(), MemoryLogger()
    fit = trainer([ScriptedSpectrum(script), absa, recorder], tmp_path, max_epochs=9, logger=logger)
    fit.fit(classifier(), datamodule=TinyImages(batch_size=8))

    # 4.9 <= 10/2 after epoch 2; 3 epochs at 16 after epoch 5; 1.2 <= 2.5/2 after epoch 7; then at the cap
    assert [(h["epoch"], h["batch_size"], h["reason"]) for h in absa.history] == [
        (2, 16, "eigenvalue"),
        (5, 32, "epochs"),
        (7, 64, "eigenvalue"),
    ]
    sizes = [8, 8, 8, 16, 16, 16, 32, 32, 64]
    seen = recorder.per_epoch()
    assert [seen[e][0] for e in range(9)] == [{s} for s in sizes]  # every batch of the epoch (1 device)
    assert [seen[e][1] for e in range(9)] == [{round(0.05 * s / 8, 12)} for s in sizes]  # linear lr
    assert absa.batch_size == 64 and absa.lr_factor == 8 and absa.reference_eigenvalue == 1.2

    # logged: the start at step 0, then after each epoch what the next epoch starts with
    steps = [0, *torch.tensor([64 // s for s in sizes]).cumsum(0).tolist()]
    assert logger.series("absa/batch_size") == list(
        zip(steps, [8.0, *(float(s) for s in sizes[1:]), 64.0], strict=True)
    )
    assert logger.series("absa/steps") == [(s, float(s)) for s in steps]
    assert [v for _, v in logger.series("absa/lr")] == pytest.approx([0.05 * s / 8 for s in [8, *sizes[1:], 64]])
    assert fit.callback_metrics["absa/batch_size"] == 64


def test_step_schedule_composes_with_growth(tmp_path: Path) -> None:
    """ImageClassifier's LambdaLR (warm-up + step decay): lr(t) = lr * factor(epoch) * m(t)."""
    pl.seed_everything(0)
    absa = AdaptiveBatchSizeCallback(max_batch_size=64, eigenvalue_factor=None, max_epochs_per_size=1)
    recorder = Recorder()
    model = classifier(lr_schedule="step", lr_milestones=[1], lr_gamma=0.1, warmup_epochs=0.5)
    trainer([absa, recorder], tmp_path, max_epochs=4).fit(model, datamodule=TinyImages(batch_size=8))

    # 8 steps per epoch at the start: warm-up over 4 steps, decay at step 8 (milestone epoch 1)
    factors = {0: 1, 1: 2, 2: 4, 3: 8}
    assert len(recorder.steps) == 8 + 4 + 2 + 1
    for epoch, step, size, lr, _ in recorder.steps:
        assert size == 8 * factors[epoch]
        expected = (
            0.05
            * factors[epoch]
            * lr_multiplier(step, total_steps=math.inf, warmup_steps=4, schedule="step", milestones=[8], gamma=0.1)
        )
        assert lr == pytest.approx(expected, rel=1e-9), (epoch, step)


def test_spectrum_every_other_epoch_and_nan_eigenvalue(tmp_path: Path) -> None:
    """every_n_epochs=2: the eigenvalue rule only at analysed epochs (1, 3, 5), with a warning;
    a NaN eigenvalue (epoch 3) is skipped with a warning."""
    pl.seed_everything(0)
    script = [0.0, 10, 0.0, math.nan, 0.0, 4.9]  # only the odd epochs are analysed
    absa = AdaptiveBatchSizeCallback(max_batch_size=64, max_epochs_per_size=None)
    callbacks = [ScriptedSpectrum(script, every_n_epochs=2), absa]
    with pytest.warns(UserWarning) as warned:
        trainer(callbacks, tmp_path, max_epochs=6).fit(classifier(), datamodule=TinyImages(batch_size=8))
    messages = " ".join(str(w.message) for w in warned)
    assert "analyses every 2 epochs" in messages and "hessian/eig_1 = nan at epoch 3" in messages
    assert [(h["epoch"], h["reason"], h["eigenvalue"]) for h in absa.history] == [(5, "eigenvalue", 4.9)]


def test_per_device_batch_size_contract(tmp_path: Path) -> None:
    """A plain datamodule (lightning.pytorch) whose batch_size is the micro-batch of one device:
    with accumulate_grad_batches=2 the global batch is twice it."""
    L = pytest.importorskip("lightning.pytorch")

    class Data(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 4
            generator = torch.Generator().manual_seed(0)
            x = torch.rand(64, 1, 4, 4, generator=generator)
            self.data = TensorDataset(x, torch.randint(0, 3, (64,), generator=generator))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    sizes: list[int] = []

    class Sizes(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            sizes.append(len(batch[0]))

    absa = AdaptiveBatchSizeCallback(max_batch_size=32, max_epochs_per_size=1, lr_scaling="sqrt")
    data = Data()
    fit = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        accumulate_grad_batches=2,
        reload_dataloaders_every_n_epochs=1,
        **QUIET_TRAINER,
        callbacks=[ScriptedSpectrum([1.0]), absa, Sizes()],
        default_root_dir=tmp_path,
    )
    fit.fit(Net(), datamodule=data)
    assert sizes == [4] * 16 + [8] * 8 + [16] * 4  # global 8 -> 16 -> 32, two micro-batches per step
    assert absa.history[-1]["batch_size"] == 32 and absa.lr_factor == pytest.approx(2.0)  # sqrt(4)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2)
    assert data.batch_size == 4  # given back when fit ends


# --------------------------------------------------------------------------------------------
# (b) resume


def _resume_run(
    tmp_path: Path, max_epochs: int, ckpt_path: str | None = None, **model_options: Any
) -> tuple[Recorder, AdaptiveBatchSizeCallback, ImageClassifier]:
    pl.seed_everything(3)
    absa = AdaptiveBatchSizeCallback(max_batch_size=64, max_epochs_per_size=3)
    recorder = Recorder()
    model = classifier(**model_options)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callbacks = [RNGStateCallback(), ScriptedSpectrum([10, 4, 3, 1.9]), absa, recorder, checkpoint]
    fit = trainer(callbacks, tmp_path, max_epochs=max_epochs, enable_checkpointing=True)
    fit.fit(model, datamodule=TinyImages(batch_size=8), ckpt_path=ckpt_path)
    return recorder, absa, model


def test_resume_continues_the_trajectory(tmp_path: Path) -> None:
    whole, whole_absa, whole_model = _resume_run(tmp_path / "whole", max_epochs=4)
    first, _, _ = _resume_run(tmp_path / "split", max_epochs=2)
    checkpoint = torch.load(tmp_path / "split" / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("AdaptiveBatchSizeCallback"))
    assert (state["batch_size"], state["reference_eigenvalue"], state["epochs_at_size"]) == (16, 4.0, 0)
    last = str(tmp_path / "split" / "ckpt" / "last.ckpt")
    second, second_absa, second_model = _resume_run(tmp_path / "split", max_epochs=4, ckpt_path=last)

    # 4 <= 10/2 after epoch 1 -> 16; 1.9 <= 4/2 after epoch 3 -> 32 (with the reference lost, 1.9 > 3/2)
    assert [(h["epoch"], h["batch_size"]) for h in whole_absa.history] == [(1, 16), (3, 32)]
    assert first.steps + second.steps == whole.steps  # epoch, step, batch length, lr, per batch
    assert second.steps[0][2] == 16  # the first resumed loader already has the restored size
    assert second_absa.state_dict() == whole_absa.state_dict()
    for name, tensor in whole_model.state_dict().items():  # the same run, bit for bit on the CPU
        assert torch.equal(tensor, second_model.state_dict()[name]), name


# --------------------------------------------------------------------------------------------
# (c) DDP: every sample once per epoch at every size


def _ddp_fit(out_dir: str) -> None:
    pl.seed_everything(5)
    absa = AdaptiveBatchSizeCallback(max_batch_size=32, eigenvalue_factor=None, max_epochs_per_size=1)
    fit = pl.Trainer(
        **DDP_TWO_CPUS,
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
        limit_val_batches=0,
        **QUIET_TRAINER,
        default_root_dir=out_dir,
        num_sanity_val_steps=0,
        callbacks=[ScriptedSpectrum([1.0]), absa, Recorder(out_dir)],
    )
    fit.fit(classifier(), datamodule=TinyImages(batch_size=8))


def test_ddp_sees_every_sample_once_per_epoch(tmp_path: Path) -> None:
    _ddp_fit(str(tmp_path))
    expected = train_indices()
    assert len(expected) == 64
    for epoch, global_size in enumerate([8, 16, 32]):
        ranks = [torch.load(tmp_path / f"rank{r}_epoch{epoch}.pt", weights_only=False) for r in (0, 1)]
        for record in ranks:
            assert {size for _, _, size, _, _ in record["steps"]} == {global_size // 2}
            assert len(record["steps"]) == 64 // global_size
            assert {round(lr, 12) for *_, lr, _ in record["steps"]} == {round(0.05 * global_size / 8, 12)}
        assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == expected  # each sample exactly once


# --------------------------------------------------------------------------------------------
# adversarial training switched off at half the epochs


def test_switches_adversarial_training_off(tmp_path: Path) -> None:
    pl.seed_everything(0)
    absa = AdaptiveBatchSizeCallback(max_batch_size=16, max_epochs_per_size=10, stop_adversarial_at=0.5)
    recorder, logger = Recorder(), MemoryLogger()
    model = classifier(adversarial={"method": "fgsm", "epsilon": 0.005, "ratio": 0.2})
    trainer([ScriptedSpectrum([1.0]), absa, recorder], tmp_path, max_epochs=3, logger=logger).fit(
        model, datamodule=TinyImages(batch_size=8)
    )
    methods = {epoch: {s[4] for s in recorder.steps if s[0] == epoch} for epoch in range(3)}
    assert methods == {0: {"fgsm"}, 1: {"fgsm"}, 2: {"none"}}  # ceil(0.5 x 3) = 2
    assert [v for _, v in logger.series("absa/adversarial")] == [1.0, 1.0, 0.0, 0.0]
    assert model.adversarial.method == "fgsm"  # the module's own setting, given back


# --------------------------------------------------------------------------------------------
# bad settings fail before training


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(growth_factor=1), "growth_factor"),
        (dict(growth_factor=0.5), "growth_factor"),
        (dict(eigenvalue_factor=1.0), "eigenvalue_factor"),
        (dict(max_epochs_per_size=0), "max_epochs_per_size"),
        (dict(eigenvalue_factor=None, max_epochs_per_size=None), "never grow"),
        (dict(lr_scaling="cubic"), "lr_scaling"),
        (dict(stop_adversarial_at=2), "stop_adversarial_at"),
        (dict(batch_size_scope="local"), "batch_size_scope"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        AdaptiveBatchSizeCallback(**{"max_batch_size": 64, **options})


class NoBatchSize(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))), batch_size=8)


@pytest.mark.parametrize(
    "case, match",
    [
        ("max_below_start", r"max_batch_size=4 is smaller than the starting global batch 8"),
        ("no_batch_size", "has no integer attribute `batch_size`"),
        ("no_datamodule", "no datamodule"),
        ("no_spectrum", "has none; add HessianSpectrumCallback"),
        ("spectrum_after", "put the HessianSpectrumCallback first"),
        ("spectrum_by_steps", "every_n_epochs=1"),
        ("no_reload", r"reload_dataloaders_every_n_epochs=1\) \(got 0\)"),
        ("not_divisible", r"global batch 12 .* not a multiple of world_size x accumulate_grad_batches = 1 x 8 = 8"),
        ("no_adversarial", "switch it on"),
    ],
)
def test_bad_settings_fail_before_training(case: str, match: str, tmp_path: Path) -> None:
    spectrum = ScriptedSpectrum([1.0])
    absa = AdaptiveBatchSizeCallback(max_batch_size=4 if case == "max_below_start" else 64)
    callbacks: list = [spectrum, absa]
    options: dict[str, Any] = {}
    data: Any = TinyImages(batch_size=8)
    fit_args: dict[str, Any] = {}
    if case == "no_batch_size":
        data = NoBatchSize()
    elif case == "no_datamodule":
        data = None
        fit_args = {"train_dataloaders": NoBatchSize().train_dataloader()}
    elif case == "no_spectrum":
        callbacks = [absa]
    elif case == "spectrum_after":
        callbacks = [absa, spectrum]
    elif case == "spectrum_by_steps":
        callbacks = [ScriptedSpectrum([1.0], every_n_epochs=0, every_n_train_steps=2), absa]
    elif case == "no_reload":
        options["reload_dataloaders_every_n_epochs"] = 0
    elif case == "not_divisible":
        absa = AdaptiveBatchSizeCallback(max_batch_size=12)  # 8 -> 12 (the cap)
        callbacks = [spectrum, absa]
        options["accumulate_grad_batches"] = 8
    elif case == "no_adversarial":
        absa = AdaptiveBatchSizeCallback(max_batch_size=64, stop_adversarial_at=0.5)
        callbacks = [spectrum, absa]
    recorder = Recorder()
    fit = trainer([*callbacks, recorder], tmp_path, max_epochs=1, **options)
    with pytest.raises(UserInputError, match=match):
        if data is None:
            fit.fit(classifier(), **fit_args)
        else:
            fit.fit(classifier(), datamodule=data)
    assert recorder.steps == []  # nothing trained


def test_step_decay_lands_at_its_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    """Milestones count epochs even when ABSA shortens them, and a resumed run keeps the clock."""
    step_decay = dict(lr_schedule="step", lr_milestones=[3], lr_gamma=0.1)
    whole, _, whole_model = _resume_run(tmp_path / "whole", max_epochs=4, **step_decay)
    _resume_run(tmp_path / "split", max_epochs=2, **step_decay)
    last = str(tmp_path / "split" / "ckpt" / "last.ckpt")
    second, _, second_model = _resume_run(tmp_path / "split", max_epochs=4, ckpt_path=last, **step_decay)
    lr_by_epoch = {}
    for epoch, _, _, lr, _ in whole.steps:
        lr_by_epoch.setdefault(epoch, set()).add(round(lr, 12))
    # batch 8 -> 16 after epoch 1 (lr x2), decay x0.1 from epoch 3 on: the configured epoch
    assert lr_by_epoch == {0: {0.05}, 1: {0.05}, 2: {0.1}, 3: {0.01}}
    assert second.steps == [s for s in whole.steps if s[0] >= 2]
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(tensor, second_model.state_dict()[name]), name
