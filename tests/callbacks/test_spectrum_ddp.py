"""HessianSpectrumCallback under DDP: 2 gloo processes on CPU (``ddp_spawn``) give the numbers of a
single-process run on the same global samples, identical on both ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import QUIET_TRAINER, PlainClassifier, RecordingSpectrum, exact_batch_hessian

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*",
    "ignore:.*sync_dist=True.*",
)

# 51 samples: shards of 26 and 25 (unequal, the all-reduce must stay exact), micro-batches of 16
SPECTRUM = dict(
    top_k=2,
    quantities=["eigenvalues", "smallest_eigenvalue", "trace", "density", "input_hessian"],
    num_samples=51,
    analysis_batch_size=16,
    eig_tol=1e-6,
    trace_max_probes=12,
    trace_rel_tol=1e-3,
    density_probes=2,
    density_steps=8,
    density_grid=32,
    layers=["net.3"],
    time_budget=600.0,
)


def _run(out_dir: Path, devices: int) -> None:
    out_dir.mkdir()
    pl.seed_everything(11)
    model = PlainClassifier(lr=0.0)  # weights stay put: both runs analyse the same point
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        **QUIET_TRAINER,
        default_root_dir=out_dir,
        callbacks=[RecordingSpectrum(str(out_dir), **SPECTRUM)],
    )
    trainer.fit(model)


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    _run(tmp_path / "single", devices=1)
    _run(tmp_path / "ddp", devices=2)
    single = torch.load(tmp_path / "single" / "rank0_epoch0.pt", weights_only=False)
    rank0 = torch.load(tmp_path / "ddp" / "rank0_epoch0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "ddp" / "rank1_epoch0.pt", weights_only=False)

    assert (rank0["num_local"], rank1["num_local"], rank0["num_global"]) == (26, 25, 51)
    for name, tensor in single["state"].items():  # the same point in weight space
        assert torch.equal(tensor, rank0["state"][name]), name

    # both ranks hold the same numbers (rank 0 logs them)
    for name, value in rank0["metrics"].items():
        if name != "hessian/seconds":
            assert value == rank1["metrics"][name] or (math.isnan(value) and math.isnan(rank1["metrics"][name])), name
    # ... and they equal the single-process run's up to summation order
    for name, value in single["metrics"].items():
        if name in ("hessian/seconds", "hessian/hvps"):
            continue
        if math.isnan(value):  # not computed in either run (e.g. Adam's preconditioned sharpness under SGD)
            assert math.isnan(rank0["metrics"][name]), name
            continue
        assert rank0["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    for left, right in zip(single["eigenvectors"], rank0["eigenvectors"], strict=True):
        overlap = sum(float((left[n] * right[n]).sum()) for n in left)
        assert abs(overlap) == pytest.approx(1.0, abs=1e-5)

    # and the single-process numbers are the exact float64 ones (the global sample is the first
    # 51 indices of the seeded permutation, the same in both runs)
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(96, generator=generator)[:51]
    x, y = PlainClassifier().train_dataloader().dataset.tensors
    model = PlainClassifier()
    model.load_state_dict(single["state"])
    exact = torch.linalg.eigvalsh(exact_batch_hessian(model, (x[indices], y[indices])))
    assert single["metrics"]["hessian/eig_1"] == pytest.approx(float(exact[-1]), rel=1e-5)
    assert single["metrics"]["hessian/eig_min"] == pytest.approx(float(exact[0]), rel=1e-4, abs=1e-7)
