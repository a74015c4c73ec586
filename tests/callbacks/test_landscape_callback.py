"""LossLandscapeCallback in real (tiny, CPU) Lightning runs: figures in the TensorBoard event
files, raw grids on disk, the spectrum callback's eigenvectors reused, training unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.landscape import LossLandscapeCallback
from lightning_hessian.landscape import load_landscape


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=generator)
    y = (x[:, 0, :4].sum(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, 4:].sum(dim=(1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def _fit(tmp_path, callbacks, epochs: int = 2, logger: bool = True) -> tuple[pl.Trainer, TinyClassifier]:
    pl.seed_everything(0, workers=True)
    model = TinyClassifier()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run") if logger else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tmp_path,  # without a logger the raw grids go there
    )
    trainer.fit(model, train_dataloaders=_loader())
    return trainer, model


def test_callback_logs_figures_and_raw_grids_without_changing_training(tmp_path):
    landscape = LossLandscapeCallback(
        curves=["eig1", "gradient", "random1"],
        surfaces=[("eig1", "random1")],
        curve_range=0.02,
        curve_points=5,
        surface_range=0.5,
        surface_points=5,
        num_samples=64,
        analysis_batch_size=64,
        sharpness=True,
        sharpness_steps=2,
        eig_tol=1e-3,
    )
    trainer, model = _fit(tmp_path, [landscape])
    _, reference = _fit(tmp_path / "plain", [], logger=False)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"attaching the callback changed {name}"

    log_dir = trainer.logger.log_dir
    events = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Tags()["images"]
    for tag in ("landscape/curves", "landscape/contour/eig1_random1", "landscape/surface3d/eig1_random1"):
        assert tag in images
        assert [e.step for e in events.Images(tag)] == [3, 6]  # one per epoch (3 steps each)
        assert events.Images(tag)[0].encoded_image_string.startswith(b"\x89PNG")
    scalars = events.Tags()["scalars"]
    for tag in (
        "landscape/sharpness",
        "landscape/loss",
        "landscape/eig_1",
        "landscape/curvature/eig1",
        "landscape/rise/random1",
    ):
        assert tag in scalars, tag

    metrics = landscape.last_metrics
    # along a unit eigenvector the second difference at t = 0 is its eigenvalue (h = 0.01)
    assert metrics["landscape/curvature/eig1"] == pytest.approx(metrics["landscape/eig_1"], rel=2e-2)
    assert metrics["landscape/sharpness"] > 0
    # the curve's centre is the model's own loss on the analysis sample
    samples = landscape._samples["train"]
    with torch.no_grad():
        model.eval()
        own = F.cross_entropy(model(samples.batch[0]), samples.batch[1]).item()
    assert metrics["landscape/loss"] == pytest.approx(own, rel=1e-5)

    for epoch in (0, 1):
        curves, surfaces, extra = load_landscape(f"{log_dir}/landscape/epoch_{epoch:03d}.npz")
        assert [c.name for c in curves] == ["eig1", "gradient", "random1"]
        assert all(c.loss.shape == (5,) for c in curves)
        assert surfaces[0].names == ("eig1", "random1") and surfaces[0].loss.shape == (5, 5)
        assert "landscape__sharpness" in extra
        rows = open(f"{log_dir}/landscape/epoch_{epoch:03d}_surface_eig1_random1.csv").read().splitlines()
        assert len(rows) == 1 + 25
    np.testing.assert_allclose(surfaces[0].loss, landscape.last_surfaces[0].loss)


def test_uses_the_spectrum_callbacks_eigenvectors(tmp_path):
    from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback

    spectrum = HessianSpectrumCallback(top_k=2, num_samples=64, eig_tol=1e-3)
    landscape = LossLandscapeCallback(
        curves=["eig2"],
        surfaces=[],
        curve_points=3,
        curve_range=0.01,
        num_samples=64,
        log_figures=False,
        save_raw=False,
    )
    _fit(tmp_path, [spectrum, landscape], epochs=1, logger=False)
    assert landscape._eigenvectors is None  # nothing computed here
    assert "landscape/eig_1" not in landscape.last_metrics
    # the curve's curvature is that of the spectrum's second eigenvector
    assert landscape.last_metrics["landscape/curvature/eig2"] == pytest.approx(
        spectrum.last_metrics["hessian/eig_2"], rel=5e-2
    )


def test_validate_runs_once_with_its_own_file(tmp_path):
    # gradient and sharpness need autograd on samples collated under inference mode
    landscape = LossLandscapeCallback(
        curves=["gradient", "random1"], surfaces=[], curve_points=3, num_samples=32, sharpness=True, sharpness_steps=1
    )
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="val"),
        callbacks=[landscape],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(TinyClassifier(), dataloaders=_loader())
    assert (tmp_path / "val" / "version_0" / "landscape" / "validate_epoch_000_curves.csv").exists()
    assert landscape.last_metrics["landscape/val/sharpness"] > 0  # split-qualified under validate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"curves": ["eigen1"]}, "unknown direction"),
        ({"surfaces": [("eig1", "eig1")]}, "two different directions"),
        ({"curve_points": 10}, "odd number"),
        ({"surface_range": 0.0}, "surface_range"),
        ({"normalization": "layer"}, "normalization"),
        ({"curves": [], "surfaces": []}, "nothing to compute"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossLandscapeCallback(**kwargs)


def test_too_many_samples_fail_before_training(tmp_path):
    landscape = LossLandscapeCallback(num_samples=1000)
    with pytest.raises(ValueError, match="num_samples=1000"):
        _fit(tmp_path, [landscape], epochs=1, logger=False)


def test_time_budget_skips_what_no_longer_fits_with_a_warning(tmp_path):
    """A spent budget (checked between curves, surfaces and the sharpness) skips the rest of the
    analysis with a warning; what is skipped is not logged, the model's cost still is."""
    landscape = LossLandscapeCallback(
        curves=["random1", "random2"], surfaces=[("random1", "random2")], sharpness=True, curve_points=3,
        surface_points=3, num_samples=32, time_budget=1e-9,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"time_budget=1e-09 s spent; skipping curve random1 and what follows"):
        _fit(tmp_path, [landscape], epochs=1, logger=False)
    metrics = landscape.last_metrics
    assert set(metrics) == {"landscape/seconds"} and landscape.last_curves == [] == landscape.last_surfaces

    ample = LossLandscapeCallback(curves=["random1"], surfaces=[], curve_points=3, num_samples=32, time_budget=600.0)
    _fit(tmp_path / "ample", [ample], epochs=1, logger=False)
    assert {"landscape/loss", "landscape/rise/random1", "landscape/curvature/random1"} <= set(ample.last_metrics)
    assert (tmp_path / "ample" / "landscape" / "epoch_000.npz").is_file()


def test_analyse_on_train_end_gives_one_landscape_of_the_final_weights_with_its_split(tmp_path):
    """``every_n_epochs=None, analyse_on_train_end=True``: one analysis, after the last epoch, on the
    training samples; under trainer.test one more on the test samples, its tags and file named so.
    The report reads both per split."""
    from lightning_hessian.report.artifacts import latest_landscapes
    from lightning_hessian.report.runs import load_run

    landscape = LossLandscapeCallback(
        curves=["random1"], surfaces=[], curve_points=5, num_samples=32, every_n_epochs=None, analyse_on_train_end=True
    )
    trainer, model = _fit(tmp_path, [landscape], epochs=3)
    run_dir = tmp_path / "run" / "version_0"
    files = sorted(p.name for p in (run_dir / "landscape").glob("*.npz"))
    assert files == ["epoch_003.npz"]  # after the 3 epochs, once
    _, _, extra = load_landscape(run_dir / "landscape" / "epoch_003.npz")
    assert str(extra["split"]) == "train"
    fit_loss = landscape.last_metrics["landscape/loss"]
    with torch.no_grad():
        x, y = landscape._samples["train"].batch
        assert fit_loss == pytest.approx(float(F.cross_entropy(model.eval()(x), y)), rel=1e-5)  # the final weights

    trainer.test(model, dataloaders=_loader(), verbose=False)
    assert set(landscape.last_metrics) >= {"landscape/test/loss", "landscape/test/rise/random1"}
    _, _, extra = load_landscape(run_dir / "landscape" / "test_epoch_003.npz")
    assert str(extra["split"]) == "test"
    curves, _ = latest_landscapes(load_run(run_dir, read=False))
    assert set(curves) == {"train", "test"} and set(curves["train"]) == {"random1"}

    # resumed from a state that already analysed the final step: no second analysis
    again = LossLandscapeCallback(curves=["random1"], surfaces=[], curve_points=5, num_samples=32, every_n_epochs=None,
                                  analyse_on_train_end=True)  # fmt: skip
    again.load_state_dict(landscape.state_dict())
    assert again._analysed_step == trainer.global_step
