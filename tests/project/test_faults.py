"""Faults that must not end training or give wrong numbers: a diverged (NaN) model, and DDP with
BatchNorm, where each rank ends training with its own running statistics."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import DDP_TWO_CPUS, QUIET_TRAINER, PlainClassifier, RecordingSpectrum, exact_batch_hessian

from lightning_hessian import AdversarialRobustnessCallback, HessianSpectrumCallback, LossLandscapeCallback
from lightning_hessian.attacks import AttackSpec

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*The number of training batches.*"),
]


def test_a_diverged_run_gets_nan_metrics_and_one_warning_not_a_crash(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = PlainClassifier(lr=1e6)  # diverges to non-finite weights within a few steps
    callbacks = [
        HessianSpectrumCallback(top_k=2, quantities=["eigenvalues", "trace"], num_samples=32),
        LossLandscapeCallback(
            curves=["eig1", "gradient"],
            surfaces=[("eig1", "random1")],
            surface_points=3,
            curve_points=3,
            num_samples=32,
            sharpness=True,
            sharpness_steps=2,
        ),
        AdversarialRobustnessCallback(attacks=[AttackSpec("fgsm", [0.0, 0.1])], bounds=(-10.0, 10.0), num_samples=16),
    ]
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=callbacks,
        **QUIET_TRAINER,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert trainer.current_epoch == 3  # trained to the end
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    for tag in (
        "hessian/eig_1",
        "hessian/trace",
        "landscape/loss",
        "landscape/sharpness",
        "robust/clean_acc",
        "robust/fgsm/eps_0.1",
    ):
        assert math.isnan(float(trainer.callback_metrics[tag])), tag
    messages = [str(w.message) for w in caught if "logging NaN" in str(w.message)]
    # one warning per callback, not one per epoch
    assert sorted(m.split(":")[0] for m in messages) == sorted(type(c).__name__ for c in callbacks)


def _ddp_batchnorm_run(out_dir: Path) -> None:
    out_dir.mkdir()
    pl.seed_everything(5)
    model = PlainClassifier(lr=0.2, batch_norm=True, n_train=96)
    spectrum = RecordingSpectrum(str(out_dir), top_k=1, num_samples=51, analysis_batch_size=16, eig_tol=1e-7)
    trainer = pl.Trainer(
        **DDP_TWO_CPUS,
        max_epochs=1,
        limit_val_batches=0,
        **QUIET_TRAINER,
        default_root_dir=out_dir,
        callbacks=[spectrum],
    )
    trainer.fit(model)


def test_ddp_with_batchnorm_analyses_rank_zeros_model(tmp_path: Path) -> None:
    """Trained with BatchNorm, no validation, shards of 26 and 25 samples: both ranks analyse the
    model a checkpoint holds (rank 0's running statistics), and the number is the exact one."""
    _ddp_batchnorm_run(tmp_path / "ddp")
    rank0 = torch.load(tmp_path / "ddp" / "rank0_epoch0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "ddp" / "rank1_epoch0.pt", weights_only=False)
    assert (rank0["num_local"], rank1["num_local"]) == (26, 25)
    for name, tensor in rank0["state"].items():  # during the analysis, rank 1 holds rank 0's buffers
        assert torch.equal(tensor, rank1["state"][name]), name

    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(96, generator=generator)[:51]
    x, y = PlainClassifier().train_dataloader().dataset.tensors
    model = PlainClassifier(batch_norm=True)
    model.load_state_dict(rank0["state"])
    exact = torch.linalg.eigvalsh(exact_batch_hessian(model, (x[indices], y[indices])))[-1].item()
    assert rank0["metrics"]["hessian/eig_1"] == pytest.approx(exact, rel=1e-5)
    assert rank1["metrics"]["hessian/eig_1"] == rank0["metrics"]["hessian/eig_1"]
