"""HessianSpectrumCallback on CPU: numbers against exact float64 Hessians, logging, stages,
precision, resume, no side effects on training, and bad input."""

from __future__ import annotations

import copy
import csv
import functools
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import (
    QUICKSTART,
    HessianLossRegressor,
    PlainClassifier,
    exact_batch_hessian,
    exact_input_quantities,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from lightning_hessian.callbacks.spectrum import QUANTITIES, HessianSpectrumCallback
from lightning_hessian.curvature import HessianOperator, hessian_trace, top_eigenvalues

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*GPU available but not used.*",
    "ignore:.*The number of training batches.*",
)


def _trainer(tmp_path: Path, callbacks: list, logger=None, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _event_tags(log_dir: Path) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(
        str(log_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator.Tags(), accumulator


# ------------------------------------------------------------------------------ numbers vs oracle


def test_plain_module_numbers_match_exact_hessian_and_engine(tmp_path: Path) -> None:
    """A plain Lightning module trained 2 epochs: every logged number against the float64 exact
    Hessian of the same samples at the same weights, and equal to the engine called directly."""
    pl.seed_everything(0)
    model = PlainClassifier()
    spectrum = HessianSpectrumCallback(
        top_k=3,
        quantities=QUANTITIES,
        num_samples=56,
        analysis_batch_size=32,  # unequal micro-batches: 32 + 24
        eig_tol=1e-6,
        trace_rel_tol=1e-3,
        trace_max_probes=40,
        density_probes=2,
        density_steps=12,
        density_grid=128,
        layers=["net.3"],
        layer_top_k=2,
    )
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = _trainer(tmp_path, [spectrum], logger=logger, max_epochs=2)
    trainer.fit(model)

    samples = spectrum._samples["train"]
    assert samples.num_global == 56
    metrics = spectrum.last_metrics
    hessian = exact_batch_hessian(model, samples.batch)
    exact = torch.linalg.eigvalsh(hessian)
    torch.testing.assert_close(
        torch.tensor([metrics[f"hessian/eig_{i}"] for i in (1, 2, 3)], dtype=torch.float64),
        exact.flip(0)[:3],
        rtol=1e-4,
        atol=1e-6,
    )
    assert metrics["hessian/eig_min"] == pytest.approx(float(exact[0]), rel=1e-4, abs=1e-6)
    exact_trace = float(hessian.trace())
    assert abs(metrics["hessian/trace"] - exact_trace) <= 4 * metrics["hessian/trace_stderr"] + 1e-6 * abs(exact_trace)
    layer_names = [n for n, _ in model.named_parameters() if n.startswith("net.3.")]
    layer_exact = torch.linalg.eigvalsh(exact_batch_hessian(model, samples.batch, names=layer_names)).flip(0)[:2]
    torch.testing.assert_close(
        torch.tensor([metrics["hessian/layer/net.3/eig_1"], metrics["hessian/layer/net.3/eig_2"]], dtype=torch.float64),
        layer_exact,
        rtol=1e-4,
        atol=1e-6,
    )
    input_eigs, input_norms = exact_input_quantities(model, samples.batch[0], samples.batch[1])
    assert metrics["hessian/input_eig_1"] == pytest.approx(float(input_eigs.mean()), rel=1e-3)
    assert metrics["hessian/input_grad_norm"] == pytest.approx(float(input_norms.mean()), rel=1e-5)
    assert metrics["hessian/converged"] == 1.0
    assert metrics["hessian/budget_exhausted"] == 0.0
    assert metrics["hessian/hvps"] > 0 and metrics["hessian/seconds"] > 0

    # The engine, called directly on the same samples and weights, gives the same numbers.
    operator = HessianOperator(model, torch.nn.functional.cross_entropy, samples.batch, micro_batch_size=32)
    direct = top_eigenvalues(operator, k=3, tol=1e-6, seed=0)
    torch.testing.assert_close(
        torch.tensor([metrics[f"hessian/eig_{i}"] for i in (1, 2, 3)], dtype=torch.float64),
        direct.eigenvalues.double(),
        rtol=1e-6,
        atol=1e-9,
    )
    # the callback's adaptive trace, deflated by its top eigenpairs (here warm-started, so equal
    # to the direct ones to the eigensolver's accuracy, not bit for bit)
    trace = hessian_trace(operator, method="auto", rel_tol=1e-3, max_probes=40, seed=0, deflate_with=direct)
    assert metrics["hessian/trace"] == pytest.approx(float(trace.estimate), rel=1e-4)

    # eigenvectors: unit norm, keyed by parameter name, eigenvectors of the exact Hessian
    vectors = spectrum.eigenvectors
    assert vectors is not None and len(vectors) == 3
    assert set(vectors[0]) == {n for n, _ in model.named_parameters()}
    flat = torch.cat([vectors[0][n].reshape(-1) for n, _ in model.named_parameters()]).double()
    assert float(flat.norm()) == pytest.approx(1.0, rel=1e-5)
    assert float(torch.linalg.vector_norm(hessian @ flat - exact[-1] * flat)) < 1e-3 * float(exact[-1])

    # TensorBoard: scalars per epoch, the density histogram and figure, the custom-scalars layout
    tags, accumulator = _event_tags(Path(logger.log_dir))
    for name in (
        "hessian/eig_1",
        "hessian/eig_3",
        "hessian/eig_min",
        "hessian/trace",
        "hessian/trace_stderr",
        "hessian/input_eig_1",
        "hessian/input_grad_norm",
        "hessian/hvps",
        "hessian/seconds",
        "hessian/converged",
        "hessian/layer/net.3/eig_1",
    ):
        assert name in tags["scalars"], name
    assert [e.step for e in accumulator.Scalars("hessian/eig_1")] == [6, 12]  # 96 samples / 16 per step
    assert [e.step for e in accumulator.Histograms("hessian/density")] == [6, 12]
    histogram = accumulator.Histograms("hessian/density")[-1].histogram_value
    assert histogram.num == pytest.approx(operator.num_params)
    assert "hessian/density_plot" in tags["images"]
    layout_tags = [t for t in tags["tensors"] if "custom_scalars" in t]
    assert layout_tags, tags["tensors"]


def test_module_with_hessian_loss_under_validate_and_test(tmp_path: Path) -> None:
    """``hessian_loss(batch)`` with dict batches; runs under trainer.validate (val split) and
    trainer.test (test split), i.e. under inference mode, with numbers equal to the oracle."""
    pl.seed_everything(1)
    model = HessianLossRegressor()
    spectrum = HessianSpectrumCallback(
        top_k=2, quantities=["eigenvalues", "smallest_eigenvalue"], num_samples=32, split="val", eig_tol=1e-6
    )
    trainer = _trainer(tmp_path, [spectrum], logger=CSVLogger(tmp_path, name="csv"))
    trainer.validate(model)
    val = spectrum._samples["val"]
    assert val.num_global == 32 and set(val.batch) == {"features", "response"}
    exact = torch.linalg.eigvalsh(exact_batch_hessian(model, val.batch))
    # under validate/test the tags name the split of the samples (metrics.split_tag)
    assert spectrum.last_metrics["hessian/val/eig_1"] == pytest.approx(float(exact[-1]), rel=1e-4)
    assert spectrum.last_metrics["hessian/val/eig_2"] == pytest.approx(float(exact[-2]), rel=1e-4)
    assert spectrum.last_metrics["hessian/val/eig_min"] == pytest.approx(float(exact[0]), rel=1e-4, abs=1e-7)
    assert trainer.callback_metrics["hessian/val/eig_1"] == pytest.approx(float(exact[-1]), rel=1e-4)
    assert "hessian/eig_1" not in trainer.callback_metrics

    trainer.test(model)
    test = spectrum._samples["test"]
    assert test.num_global == 32
    exact = torch.linalg.eigvalsh(exact_batch_hessian(model, test.batch))
    assert spectrum.last_metrics["hessian/test/eig_1"] == pytest.approx(float(exact[-1]), rel=1e-4)


def test_a_test_from_the_checkpoint_keeps_the_fits_training_sample_analysis(tmp_path: Path) -> None:
    """What ``hessian-sweep`` does: fit, then ``trainer.test`` from the last checkpoint into the same
    TensorBoard run. The test logs at the checkpoint's step, the step of the fit's last analysis, under
    split-qualified tags; the report reads back the training-sample value (unqualified) and the
    test-sample value (``hessian/test/...``), the density of both and the figures of both."""
    from lightning_hessian.report import load_runs
    from lightning_hessian.report.events import read_events
    from lightning_hessian.report.tables import report_columns

    pl.seed_everything(4)
    spectrum = HessianSpectrumCallback(top_k=2, quantities=["eigenvalues", "density"], num_samples=40, eig_tol=1e-6,
                                       density_probes=1, density_steps=8)  # fmt: skip
    logger = TensorBoardLogger(tmp_path, name="run", version="bs16_seed0")
    trainer = _trainer(tmp_path, [spectrum], logger=logger, max_epochs=2, enable_checkpointing=True)
    trainer.fit(PlainClassifier())
    fit_value, fit_step = spectrum.last_metrics["hessian/eig_1"], trainer.global_step
    checkpoint = trainer.checkpoint_callback.best_model_path

    tester = _trainer(tmp_path, [spectrum], logger=TensorBoardLogger(tmp_path, name="run", version="bs16_seed0"))
    tester.test(PlainClassifier(), ckpt_path=checkpoint, verbose=False)
    test_value = spectrum.last_metrics["hessian/test/eig_1"]
    assert "hessian/eig_1" not in spectrum.last_metrics  # what the test logged, named by its split
    test_samples = spectrum._samples["test"].batch
    exact = torch.linalg.eigvalsh(exact_batch_hessian(PlainClassifier.load_from_checkpoint(checkpoint), test_samples))
    assert test_value == pytest.approx(float(exact[-1]), rel=1e-4)
    assert test_value != pytest.approx(fit_value, rel=1e-3)

    events = read_events(tmp_path / "run" / "bs16_seed0")
    assert [p.step for p in events.scalars["hessian/test/eig_1"]] == [fit_step]  # the checkpoint's step ...
    assert events.scalars["hessian/eig_1"][-1].step == fit_step  # ... where the fit's last analysis is, kept
    assert events.final("hessian/eig_1") == pytest.approx(fit_value, rel=1e-6)
    assert events.final("hessian/test/eig_1") == pytest.approx(test_value, rel=1e-6)
    assert {"hessian/density", "hessian/test/density"} <= set(events.histograms)
    (run,), _ = load_runs([tmp_path / "run"])
    titles = {column.key: column.title for column in report_columns([run])}
    assert titles["hessian/eig_1"] == "λ₁(θ), train" and titles["hessian/test/eig_1"] == "λ₁(θ), test"
    tags, _ = _event_tags(tmp_path / "run" / "bs16_seed0")
    assert {"hessian/density_plot", "hessian/test/density_plot"} <= set(tags["images"])


def test_evaluation_stages_choose_where_the_callback_analyses_outside_fit(tmp_path: Path) -> None:
    """``evaluation_stages=()`` analyses during fit only; ``["test"]`` under trainer.test only."""
    fit_only = HessianSpectrumCallback(num_samples=16, evaluation_stages=())
    test_only = HessianSpectrumCallback(num_samples=16, every_n_epochs=None, analyse_on_train_end=False,
                                        evaluation_stages=["test"])  # fmt: skip
    trainer = _trainer(tmp_path, [fit_only, test_only], max_epochs=1)
    model = PlainClassifier()
    trainer.fit(model)
    assert "hessian/eig_1" in fit_only.last_metrics and test_only.last_metrics == {}
    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    assert set(fit_only._samples) == {"train"} and "hessian/eig_1" in fit_only.last_metrics  # not re-run
    assert set(test_only._samples) == {"test"} and "hessian/test/eig_1" in test_only.last_metrics
    with pytest.raises(ValueError, match=r"evaluation_stages \['fit'\]"):
        HessianSpectrumCallback(evaluation_stages=["fit"])


def test_image_classifier_with_batch_norm(tmp_path: Path) -> None:
    """Our own ImageClassifier (BatchNorm, Normalize inside, LR schedule) works unchanged; the logged
    numbers equal the engine's on the same samples in eval mode."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_hessian.models import ImageClassifier

    pl.seed_everything(8)
    generator = torch.Generator().manual_seed(8)
    images = torch.rand(64, 1, 2, 2, generator=generator)
    labels = (images.flatten(1).sum(dim=1) > 2).long()
    model = ImageClassifier(
        arch="mlp", num_classes=2, input_shape=(1, 2, 2), batch_size=16, lr=0.05, activation="softplus"
    )
    spectrum = HessianSpectrumCallback(
        top_k=1, num_samples=48, eig_tol=1e-3, quantities=["eigenvalues", "input_hessian"]
    )
    loader = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)
    _trainer(tmp_path, [spectrum], max_epochs=1).fit(model, train_dataloaders=loader)
    samples = spectrum._samples["train"]
    operator = HessianOperator(model, torch.nn.functional.cross_entropy, samples.batch)
    direct = top_eigenvalues(operator, k=1, tol=1e-3, seed=0)
    assert spectrum.last_metrics["hessian/eig_1"] == pytest.approx(float(direct.eigenvalues[0]), rel=1e-6)
    assert model.training  # analysed in eval mode, handed back in train mode
    _, norms = exact_input_quantities(model, samples.batch[0], samples.batch[1])
    assert spectrum.last_metrics["hessian/input_grad_norm"] == pytest.approx(float(norms.mean()), rel=1e-5)


def test_pyhessian_backend_on_the_same_samples(tmp_path: Path) -> None:
    """backend='pyhessian' (power iteration, Hutchinson) on the callback's samples: close to exact."""
    pl.seed_everything(9)
    model = PlainClassifier()
    spectrum = HessianSpectrumCallback(
        backend="pyhessian",
        quantities=["eigenvalues", "trace"],
        num_samples=40,
        eig_tol=1e-4,
        trace_rel_tol=1e-3,
        trace_max_probes=300,
    )
    _trainer(tmp_path, [spectrum], limit_val_batches=0).fit(model)
    hessian = exact_batch_hessian(model, spectrum._samples["train"].batch)
    assert spectrum.last_metrics["hessian/eig_1"] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-2)
    assert spectrum.last_metrics["hessian/trace"] == pytest.approx(float(hessian.trace()), rel=0.2)
    assert spectrum.last_metrics["hessian/hvps"] > 0


# ----------------------------------------------------------------------------- no side effects


def _train(tmp_path: Path, callbacks: list) -> tuple[dict, dict]:
    pl.seed_everything(3)
    model = PlainClassifier(batch_norm=True, dropout=0.3)
    trainer = _trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=1, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(model)
    optimizer = trainer.optimizers[0].state_dict()
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer)


def test_training_is_bit_identical_with_and_without_callback(tmp_path: Path) -> None:
    spectrum = HessianSpectrumCallback(
        top_k=1,
        quantities=QUANTITIES,
        num_samples=32,
        every_n_epochs=1,
        every_n_train_steps=5,
        eig_tol=1e-2,
        density_probes=2,
        density_steps=4,
        density_grid=32,
        trace_max_probes=4,
        trace_rel_tol=0.5,
        layers=["net.0"],
    )
    with_weights, with_optimizer = _train(tmp_path / "with", [spectrum])
    without_weights, without_optimizer = _train(tmp_path / "without", [])
    # it ran every 5 optimizer steps and at each epoch end (6 steps per epoch)
    assert [s for s, _ in _logged(tmp_path / "with", "hessian/eig_1")] == [5, 6, 10, 12]
    assert with_weights.keys() == without_weights.keys()
    for name in with_weights:
        assert torch.equal(with_weights[name], without_weights[name]), name
    for index, state in with_optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, without_optimizer["state"][index][key]), (index, key)


# ---------------------------------------------------------------------------------- precision


def test_bf16_mixed_analyses_in_float32(tmp_path: Path) -> None:
    pl.seed_everything(4)
    model = PlainClassifier()
    spectrum = HessianSpectrumCallback(top_k=1, num_samples=64, eig_tol=1e-6)
    _trainer(tmp_path, [spectrum], precision="bf16-mixed").fit(model)
    samples = spectrum._samples["train"]
    exact = torch.linalg.eigvalsh(exact_batch_hessian(model, samples.batch))
    # a bf16 forward would be ~1e-2 off; the analysis is float32
    assert spectrum.last_metrics["hessian/eig_1"] == pytest.approx(float(exact[-1]), rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused_at_setup(tmp_path: Path, precision: str) -> None:
    model = PlainClassifier()
    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=8)], precision=precision)
    with pytest.raises(ValueError, match="-mixed"):
        trainer.fit(model)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------- resume


def _logged(csv_dir: Path, name: str) -> list[tuple[int, float]]:
    rows = []
    for path in sorted(csv_dir.rglob("metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get(name):
                    rows.append((int(row["step"]), float(row[name])))
    return rows


def test_resume_continues_curves_without_gaps_or_repeats(tmp_path: Path) -> None:
    def run(max_epochs: int, directory: Path, ckpt_path: str | None = None) -> HessianSpectrumCallback:
        pl.seed_everything(5)
        spectrum = HessianSpectrumCallback(
            top_k=2, quantities=["eigenvalues", "trace"], num_samples=64, eig_tol=1e-6, trace_max_probes=30
        )
        checkpoint = ModelCheckpoint(dirpath=directory / "ckpt", save_last=True, save_top_k=0)
        trainer = _trainer(
            directory,
            [spectrum, checkpoint],
            logger=CSVLogger(directory, name="csv"),
            max_epochs=max_epochs,
            enable_checkpointing=True,
            limit_val_batches=0,
        )
        # no shuffling: Lightning checkpoints do not carry the global RNG that orders the batches
        trainer.fit(PlainClassifier(shuffle=False), ckpt_path=ckpt_path)
        return spectrum

    reference = run(4, tmp_path / "straight")
    first = run(2, tmp_path / "first")
    last = tmp_path / "first" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if "HessianSpectrumCallback" in k)
    assert saved["eigenvectors"] is not None and len(saved["eigenvectors"]) == 2
    resumed = run(4, tmp_path / "resumed", ckpt_path=str(last))
    straight = _logged(tmp_path / "straight", "hessian/eig_1")
    pieces = _logged(tmp_path / "first", "hessian/eig_1") + _logged(tmp_path / "resumed", "hessian/eig_1")
    assert [s for s, _ in straight] == [6, 12, 18, 24]
    assert [s for s, _ in pieces] == [6, 12, 18, 24]  # no gap, no repeat
    for (_, a), (_, b) in zip(straight, pieces, strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    assert resumed.last_metrics["hessian/eig_1"] == pytest.approx(reference.last_metrics["hessian/eig_1"], rel=1e-5)
    del first


def test_warm_start_saves_products(tmp_path: Path) -> None:
    """With the weights unchanged (lr=0) the second analysis starts from converged eigenvectors."""
    pl.seed_everything(6)
    spectrum = HessianSpectrumCallback(top_k=2, num_samples=64, eig_tol=1e-6)
    cold = HessianSpectrumCallback(top_k=2, num_samples=64, eig_tol=1e-6, warm_start=False)
    hvps: dict[str, list[float]] = {"warm": [], "cold": []}

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            hvps["warm"].append(spectrum.last_metrics["hessian/hvps"])
            hvps["cold"].append(cold.last_metrics["hessian/hvps"])

    _trainer(tmp_path, [spectrum, cold, Record()], max_epochs=2, limit_val_batches=0).fit(PlainClassifier(lr=0.0))
    assert hvps["cold"][0] == hvps["cold"][1] == hvps["warm"][0]
    assert hvps["warm"][1] < hvps["warm"][0]


def test_smallest_eigenvalue_is_warm_started_and_checkpointed(tmp_path: Path) -> None:
    """The smallest eigenpair starts from the last analysis's vector (fewer products with the
    weights unchanged) and travels in the checkpoint state."""
    pl.seed_everything(7)
    spectrum = HessianSpectrumCallback(quantities=("smallest_eigenvalue",), num_samples=64, eig_tol=1e-6)
    hvps: list[float] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            hvps.append(spectrum.last_metrics["hessian/hvps"])

    _trainer(tmp_path, [spectrum, Record()], max_epochs=2, limit_val_batches=0).fit(PlainClassifier(lr=0.0))
    assert hvps[1] < hvps[0]
    state = spectrum.state_dict()
    vector = state["smallest_eigenvector"][0]
    assert set(vector) == {n for n, _ in PlainClassifier().named_parameters()}
    restored = HessianSpectrumCallback(quantities=("smallest_eigenvalue",), num_samples=64)
    restored.load_state_dict(copy.deepcopy(state))
    for name, tensor in vector.items():
        assert torch.equal(restored._smallest_eigenvector[0][name], tensor)


def test_one_retained_graph_serves_every_parameter_space_quantity(tmp_path: Path, monkeypatch) -> None:
    """Top-k, smallest eigenvalue, trace and density of one analysis share one first-order graph."""
    import lightning_hessian.callbacks.spectrum_engine as engine_module
    import lightning_hessian.curvature.operator as operator_module

    builds: list[int] = []
    build = operator_module.build_retained_graph

    def counting_build(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setattr(operator_module, "build_retained_graph", counting_build)
    # the retained-graph mode pinned: "auto" could choose torch.func for this tiny model
    monkeypatch.setattr(engine_module, "HessianOperator", functools.partial(HessianOperator, hvp_mode="retained_graph"))
    spectrum = HessianSpectrumCallback(
        top_k=2,
        quantities=("eigenvalues", "smallest_eigenvalue", "trace", "density"),
        num_samples=48,
        eig_tol=1e-3,
        density_probes=2,
        density_steps=8,
    )
    _trainer(tmp_path, [spectrum], max_epochs=1, limit_val_batches=0).fit(PlainClassifier())
    assert spectrum.last_metrics["hessian/hvps"] > 20 and len(builds) == 1


def test_final_weights_are_analysed_once(tmp_path: Path) -> None:
    """every_n_epochs=3 with 4 epochs: epoch 3 (step 18) by schedule, the final weights (step 24)
    at the end of fit; with 3 epochs the scheduled analysis already saw the final weights."""
    for epochs, expected in ((4, [18, 24]), (3, [18])):
        spectrum = HessianSpectrumCallback(every_n_epochs=3, num_samples=16, eig_tol=1e-2)
        directory = tmp_path / str(epochs)
        _trainer(
            directory, [spectrum], logger=CSVLogger(directory, name="csv"), max_epochs=epochs, limit_val_batches=0
        ).fit(PlainClassifier(shuffle=False))
        assert [s for s, _ in _logged(directory / "csv", "hessian/eig_1")] == expected


# ------------------------------------------------------------------------ logging and feedback


def test_logger_without_figures_gets_scalars_and_one_warning(tmp_path: Path) -> None:
    spectrum = HessianSpectrumCallback(
        quantities=["eigenvalues", "density"], num_samples=32, density_probes=2, density_steps=12, density_grid=64
    )
    trainer = _trainer(tmp_path, [spectrum], logger=CSVLogger(tmp_path, name="csv"), max_epochs=2, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PlainClassifier())
    figure_warnings = [w for w in caught if "cannot take figures" in str(w.message)]
    assert len(figure_warnings) == 1
    assert [s for s, _ in _logged(tmp_path / "csv", "hessian/eig_1")] == [6, 12]


def test_time_budget_stops_cleanly_with_honest_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A budget spent before the analysis starts: the top eigenvalue still gets one Lanczos step (a
    rough value, flagged unconverged), everything after it is skipped and logged as NaN, with a
    warning; progress lines name the stage, HVPs and seconds."""
    spectrum = HessianSpectrumCallback(
        top_k=2,
        quantities=["eigenvalues", "smallest_eigenvalue", "trace"],
        num_samples=32,
        time_budget=1e-9,
        progress_interval=1e-9,
    )
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match="time budget of 1e-09 s spent"):
        _trainer(tmp_path, [spectrum], limit_val_batches=0).fit(PlainClassifier())
    metrics = spectrum.last_metrics
    assert math.isfinite(metrics["hessian/eig_1"]) and math.isnan(metrics["hessian/eig_2"])
    assert math.isnan(metrics["hessian/eig_min"]) and math.isnan(metrics["hessian/trace"])
    assert metrics["hessian/hvps"] == 1.0
    assert metrics["hessian/converged"] == 0.0 and metrics["hessian/budget_exhausted"] == 1.0
    assert "Lanczos (largest), 0 converged" in caplog.text and "1 HVPs" in caplog.text

    # an ample budget changes nothing
    relaxed = HessianSpectrumCallback(top_k=2, num_samples=32, time_budget=600.0, eig_tol=1e-6)
    free = HessianSpectrumCallback(top_k=2, num_samples=32, eig_tol=1e-6)
    for callback in (relaxed, free):
        pl.seed_everything(0)
        _trainer(tmp_path, [callback], limit_val_batches=0).fit(PlainClassifier())
    # Same seed and data, but not bit-identical: two trainings round differently when the number of
    # threads a reduction gets differs (OpenMP under load). Both Lanczos runs converge to eig_tol =
    # 1e-6; rel=1e-4 is wide for that rounding and narrow for a Lanczos run that a budget cut short.
    for tag in ("hessian/eig_1", "hessian/eig_2"):
        assert relaxed.last_metrics[tag] == pytest.approx(free.last_metrics[tag], rel=1e-4)
    assert relaxed.last_metrics["hessian/converged"] == free.last_metrics["hessian/converged"] == 1.0
    assert relaxed.last_metrics["hessian/budget_exhausted"] == 0.0


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantities": ["eigenvalues", "sharpness"]}, r"unknown quantities \['sharpness'\].*'trace'"),
        ({"top_k": 0}, "top_k"),
        ({"backend": "scipy"}, "backend"),
        ({"backend": "pyhessian", "quantities": ["density"]}, "pyhessian"),
        ({"eig_tol": 0.0}, "eig_tol"),
    ],
)
def test_bad_options_raise_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HessianSpectrumCallback(**kwargs)


def test_bad_setup_raises_before_training(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=1000)])
    with pytest.raises(ValueError, match="num_samples=1000"):
        trainer.fit(PlainClassifier())
    assert trainer.global_step == 0

    frozen = PlainClassifier()
    frozen.net[0].requires_grad_(False)
    frozen.net[-1].requires_grad_(False)
    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=8)])
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        trainer.validate(frozen)

    halved = PlainClassifier().half()
    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=8)])
    with pytest.raises(ValueError, match=r"trainable parameters in \['torch.float16'\]"):
        trainer.validate(halved)

    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=8, top_k=84)])
    with pytest.raises(ValueError, match="top_k=84 exceeds the 83 trainable parameters"):
        trainer.fit(PlainClassifier())

    trainer = _trainer(tmp_path, [HessianSpectrumCallback(num_samples=8, layers=["conv*"])])
    with pytest.raises(ValueError, match=r"match no module.*'net.0'"):
        trainer.fit(PlainClassifier())
    assert trainer.global_step == 0


def test_nan_loss_warns_logs_nan_and_training_goes_on(tmp_path: Path) -> None:
    """NaN inputs in the validation split poison the analysis, not the training."""

    class NaNValidation(PlainClassifier):
        def val_dataloader(self):
            loader = super().val_dataloader()
            loader.dataset.tensors[0][3, 0] = float("nan")
            return loader

    model = NaNValidation()
    spectrum = HessianSpectrumCallback(num_samples=48, split="val", quantities=["eigenvalues", "trace"])
    trainer = _trainer(tmp_path, [spectrum], max_epochs=2, logger=CSVLogger(tmp_path, name="csv"))
    with pytest.warns(UserWarning, match="loss on the 48 analysis samples is nan"):
        trainer.fit(model)
    assert trainer.current_epoch == 2 and trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isnan(spectrum.last_metrics["hessian/eig_1"]) and math.isnan(spectrum.last_metrics["hessian/trace"])
    logged = _logged(tmp_path / "csv", "hessian/eig_1")
    assert len(logged) == 2 and all(math.isnan(v) for _, v in logged)


# ------------------------------------------------------------------------------- quickstart


def test_quickstart_config_logs_the_spectrum_to_tensorboard(in_tmp_dir: Path) -> None:
    """``hessian-train fit --config configs/quickstart.yaml`` (shortened to the first analysis, at
    epoch 10) writes hessian/eig_1 and friends into the TensorBoard event files."""
    from lightning_hessian.cli import main

    main([
        "fit", "--config", str(QUICKSTART), "--trainer.max_epochs=10", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])  # fmt: skip
    tags, accumulator = _event_tags(in_tmp_dir / "runs" / "quickstart" / "version_0")
    assert {"hessian/eig_1", "hessian/eig_2", "hessian/trace", "hessian/hvps", "hessian/seconds"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in accumulator.Scalars("hessian/eig_1")] == [20]  # 10 epochs x 2 steps
    assert math.isfinite(accumulator.Scalars("hessian/eig_1")[0].value)
    assert "hessian/density" in tags["histograms"] and "hessian/density_plot" in tags["images"]
    # the quickstart's other analyses, at the same epoch: robustness and the loss landscape
    assert {"robust/clean_acc", "robust/fgsm/eps_0.05", "robust/linf_pgd/eps_0.05"} <= set(tags["scalars"])
    assert {"robust/fgsm/curve", "landscape/curves", "landscape/contour/eig1_eig2",
            "landscape/surface3d/eig1_eig2"} <= set(tags["images"])  # fmt: skip
    clean = accumulator.Scalars("robust/clean_acc")[0].value
    assert accumulator.Scalars("robust/fgsm/eps_0")[0].value == clean
    assert (
        accumulator.Scalars("robust/linf_pgd/eps_0.1")[0].value <= accumulator.Scalars("robust/fgsm/eps_0.1")[0].value
    )
