"""hessian-report: tiny runs written with SummaryWriter in the test, read back into the table."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from lightning_hessian.cli.report import main
from lightning_hessian.density_histogram import density_from_histogram, density_histogram
from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import save_landscape
from lightning_hessian.report import load_runs
from lightning_hessian.report.events import find_run_dirs, read_events
from lightning_hessian.report.figures import step_to_epoch, training_trajectory
from lightning_hessian.report.landscape_figures import find_landscape
from lightning_hessian.report.runs import describe_variant, load_run
from lightning_hessian.report.tables import format_cell, summarize_runs

ATTACK_EPSILONS = ("0.0", "0.05", "0.1")


def _final_metrics(batch_size: int, seed: int, robust: bool) -> dict[str, float]:
    """Distinct, seed-dependent values with a known mean and std per batch size: the fit's last
    analyses of the training samples (unqualified tags) and the test's (``hessian/test/...``)."""
    shift = 0.01 * seed + (0.5 if robust else 0.0)
    return {
        "test/acc": 0.9 - batch_size / 10_000 + 0.02 * seed,
        "hessian/eig_1": batch_size / 8 + 3.0 * seed - 10 * robust,
        "hessian/eig_2": batch_size / 16 + seed,
        "hessian/eig_min": -0.5 - shift,
        "hessian/trace": 100.0 + batch_size + 7 * seed,
        "hessian/input_eig_1": 0.1 * batch_size + seed,
        "hessian/input_grad_norm": 2.0 + shift,
        # the same quantities on test samples, different numbers
        "hessian/test/eig_1": batch_size / 4 + 5.0 * seed,
        "hessian/test/input_eig_1": 0.3 * batch_size + seed,
        "hessian/test/input_grad_norm": 3.0 + shift,
        **{
            f"robust/test/fgsm/eps_{eps}": max(0.0, 0.8 - float(eps) * (5 + batch_size / 64) + 0.01 * seed)
            for eps in ATTACK_EPSILONS
        },
        "robust/test/clean_acc": 0.8 + 0.01 * seed,
    }


def _write_run(
    run_dir: Path,
    *,
    batch_size: int,
    seed: int,
    robust: bool = False,
    sweep: dict | None = None,
    hparams: dict | None = None,
    epochs: int = 3,
    test_phase: bool = True,
    landscape: bool = False,
    nan_trace: bool = False,
) -> dict[str, float]:
    """A fake run logged as `hessian-train fit` and then `hessian-train test` log it.

    During fit the analyses of the training samples log unqualified tags after every epoch,
    reaching the returned values at the last epoch. The test phase (a second event file) logs
    `test/acc` at step 0 and its analyses of the test samples under split-qualified tags at the
    checkpoint's step, the fit's last step, as `EpochAnalysisCallback.log_step` does. Without a
    test phase the robustness values are logged during fit, unqualified (the validation split).
    """
    run_dir.mkdir(parents=True)
    final = _final_metrics(batch_size, seed, robust)
    fit_tags = [tag for tag in final if tag.startswith("hessian/") and "/test/" not in tag]
    test_tags = [tag for tag in final if "/test/" in tag]
    if not test_phase:  # robustness during fit instead, on validation samples
        fit_tags += [tag.replace("robust/test/", "robust/") for tag in test_tags if tag.startswith("robust/")]
        final.update(
            {tag.replace("robust/test/", "robust/"): final[tag] for tag in test_tags if tag.startswith("robust/")}
        )
        for tag in [*test_tags, "test/acc"]:
            del final[tag]
    steps_per_epoch = 4096 // batch_size
    writer = SummaryWriter(str(run_dir))
    for epoch in range(epochs):
        step = (epoch + 1) * steps_per_epoch
        # As Lightning logs them: `epoch` with every self.log call at steps e * n ... (e + 1) * n - 1
        # (validation at the last of them), the epoch-end analyses at global_step = (e + 1) * n.
        writer.add_scalar("epoch", epoch, step - steps_per_epoch)
        writer.add_scalar("epoch", epoch, step - 1)
        writer.add_scalar("val/acc", 0.5 + 0.1 * epoch, step - 1)
        writer.add_scalar("train/loss", 1.0 / (epoch + 1) + batch_size / 10_000, step - 1)
        for tag in fit_tags:
            value = math.nan if nan_trace and tag == "hessian/trace" and epoch == epochs - 1 else final[tag]
            writer.add_scalar(tag, _fit_value(value, epoch, epochs), step)
        grid = torch.linspace(-1.0, final["hessian/eig_1"], 32, dtype=torch.float64)
        density = torch.exp(-0.5 * (grid / (1 + epoch)) ** 2)
        writer.add_histogram_raw("hessian/density", global_step=step, **density_histogram(grid, density, 1000))
    writer.close()
    last_step = epochs * steps_per_epoch
    if test_phase:
        test_writer = SummaryWriter(str(run_dir))  # hessian-train test into the same logger version
        test_writer.add_scalar("test/acc", final["test/acc"], 0)
        test_writer.add_scalar("epoch", 0, 0)
        for tag in test_tags:
            test_writer.add_scalar(tag, final[tag], last_step)  # the checkpoint's step
        grid = torch.linspace(-2.0, final["hessian/test/eig_1"], 32, dtype=torch.float64)
        test_writer.add_histogram_raw(
            "hessian/test/density", global_step=last_step, **density_histogram(grid, torch.exp(-grid.abs()), 1000)
        )
        test_writer.close()
    if nan_trace:
        final["hessian/trace"] = math.nan
    if sweep is not None:
        (run_dir / "sweep.json").write_text(json.dumps(sweep))
    if hparams is not None:
        (run_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    if landscape:  # as LossLandscapeCallback saves them
        steps = np.linspace(-1, 1, 5)
        betas = steps[:4]
        curve = LossCurve("random_1", steps, steps**2 * batch_size, 1 - steps**2)
        surface_loss = np.add.outer(steps**2, betas**2)
        surface = LossSurface(("eig_1", "eig_2"), steps, betas, surface_loss, 1 - surface_loss)
        save_landscape(run_dir / "landscape" / "epoch_002", [curve], [surface])
    return final


def _fit_value(final: float, epoch: int, epochs: int) -> float:
    """What the epoch-end analysis logged: growing to `final` at the last epoch."""
    return final * (epoch + 1) / epochs


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Standard training at two batch sizes x two seeds (sweep.json), FGSM training via hparams.yaml."""
    root = tmp_path_factory.mktemp("runs")
    finals: dict = {}
    for batch_size in (64, 256):
        for seed in (0, 1):
            sweep = {"batch_size": batch_size, "seed": seed, "variant": "standard", "status": "finished"}
            finals[("standard", batch_size, seed)] = _write_run(
                root / "sweep" / f"bs{batch_size}_seed{seed}", batch_size=batch_size, seed=seed, sweep=sweep,
                landscape=seed == 0, nan_trace=(batch_size, seed) == (64, 1),
            )  # fmt: skip
    # A run of "another project": Lightning's default layout, metadata only in hparams.yaml.
    hparams = {"batch_size": 256, "arch": "m1", "adversarial": {"method": "fgsm", "epsilon": 0.1}}
    finals[("fgsm", 256, None)] = _write_run(
        root / "lightning_logs" / "version_0", batch_size=256, seed=0, robust=True, hparams=hparams, test_phase=False
    )
    # A failed sweep run: skipped by default.
    _write_run(
        root / "sweep" / "bs1024_seed0", batch_size=1024, seed=0,
        sweep={"batch_size": 1024, "seed": 0, "variant": "standard", "status": "failed"},
    )  # fmt: skip
    return root, finals


def test_report_table_numbers_and_figures(sweep_runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, finals = sweep_runs
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    tables = {table["variant"]: table for table in summary["tables"]}
    assert list(tables) == ["standard", "fgsm ε=0.1"]  # standard first, robust training separately

    standard_rows = {row["batch_size"]: row for row in tables["standard"]["rows"]}
    assert sorted(standard_rows) == [64, 256]  # the failed bs1024 run is skipped
    titles = {}
    for batch_size, row in standard_rows.items():
        assert row["seeds"] == [0, 1]
        # both the training-sample analyses of the fit and the test-sample ones of the test: the
        # test logs at the fit's last step under split-qualified tags and replaces nothing
        tags = ("hessian/eig_1", "hessian/test/eig_1", "hessian/input_eig_1", "hessian/test/input_eig_1",
                "hessian/test/input_grad_norm", "robust/test/fgsm/eps_0.1",
                *(("hessian/trace",) if batch_size != 64 else ()))  # fmt: skip
        for tag in tags:
            expected = [finals[("standard", batch_size, seed)][tag] for seed in (0, 1)]
            metric = row["metrics"][tag]
            assert metric["values"] == pytest.approx(expected, rel=1e-6)  # float32 in event files
            assert metric["mean"] == pytest.approx(np.mean(expected), rel=1e-6)
            assert metric["std"] == pytest.approx(np.std(expected, ddof=1), rel=1e-5)
            titles[tag] = metric["title"]
        # the accuracy column is test/acc (logged from a second event file), not the last val/acc
        expected_acc = [finals[("standard", batch_size, seed)]["test/acc"] for seed in (0, 1)]
        assert row["metrics"]["acc"]["mean"] == pytest.approx(np.mean(expected_acc), rel=1e-6)
        assert row["metrics"]["acc"]["title"] == "test acc (%)"
        # λ_min / λ₁ per run, then mean and std over seeds
        ratios = [
            finals[("standard", batch_size, s)]["hessian/eig_min"]
            / finals[("standard", batch_size, s)]["hessian/eig_1"]
            for s in (0, 1)
        ]
        assert row["metrics"]["ratio:hessian/eig_min:hessian/eig_1"]["mean"] == pytest.approx(np.mean(ratios), rel=1e-5)
        assert row["metrics"]["run/epochs"]["values"] == [3, 3]  # one epoch-mean train/loss per epoch
    # every column names the split of its samples
    assert titles["hessian/eig_1"] == "λ₁(θ), train" and titles["hessian/test/eig_1"] == "λ₁(θ), test"
    assert titles["robust/test/fgsm/eps_0.1"] == "fgsm ε=0.1 (%), test"

    # bs64_seed1 logged NaN as its last trace (time budget): left out of that cell only
    trace_64 = standard_rows[64]["metrics"]["hessian/trace"]
    assert (
        trace_64["values"] == pytest.approx([finals[("standard", 64, 0)]["hessian/trace"]]) and trace_64["std"] is None
    )
    assert trace_64["title"] == "trace, train"

    fgsm_row = tables["fgsm ε=0.1"]["rows"][0]
    assert fgsm_row["batch_size"] == 256 and fgsm_row["seeds"] == [None]
    assert fgsm_row["metrics"]["hessian/eig_1"]["values"] == pytest.approx(
        [finals[("fgsm", 256, None)]["hessian/eig_1"]]
    )
    assert fgsm_row["metrics"]["hessian/eig_1"]["std"] is None
    # robustness logged during fit on validation samples (the callback's default split): named so
    assert fgsm_row["metrics"]["robust/fgsm/eps_0.05"]["title"] == "fgsm ε=0.05 (%), val"
    # no test/acc in that run: the column falls back to the last val/acc and says so
    assert fgsm_row["metrics"]["acc"]["values"] == pytest.approx([0.7])
    assert fgsm_row["metrics"]["acc"]["title"] == "val acc (%)"

    markdown = (out / "report.md").read_text()
    acc_64 = [finals[("standard", 64, seed)]["test/acc"] for seed in (0, 1)]
    assert f"{100 * np.mean(acc_64):.2f} ± {100 * np.std(acc_64, ddof=1):.2f}" in markdown
    eig_256 = [finals[("standard", 256, seed)]["hessian/eig_1"] for seed in (0, 1)]
    assert f"{np.mean(eig_256):.4g} ± {np.std(eig_256, ddof=1):.2g}" in markdown
    test_eig_256 = [finals[("standard", 256, seed)]["hessian/test/eig_1"] for seed in (0, 1)]
    assert f"{np.mean(test_eig_256):.4g} ± {np.std(test_eig_256, ddof=1):.2g}" in markdown
    assert "fgsm ε=0.05 (%), test" in markdown and "No run logged `test/acc`" in markdown
    assert "λ₁(θ), train" in markdown and "λ₁(θ), test" in markdown
    assert "bs1024_seed0" in markdown and "failed" in markdown  # listed as skipped
    html = (out / "report.html").read_text()
    assert "<table>" in html and "Training: fgsm ε=0.1" in html

    expected_figures = [
        "training_vs_batch_size.png",
        "metrics_vs_batch_size.png",
        "top_eigenvalue_vs_epoch.png",
        "spectrum_vs_batch_size.png",
        "topk_spectrum.png",
        "spectral_density.png",
        "robust_accuracy_vs_epsilon.png",
        "landscape_curves_0_standard.png",
        "landscape_surface_0_standard_eig_1_eig_2_train.png",
    ]
    for file_name in expected_figures:
        assert (out / file_name).stat().st_size > 1000, file_name
        assert f"]({file_name})" in markdown and f'src="{file_name}"' in html
    assert (out / "runs.csv").read_text().count("\n") == 6  # header + 5 finished runs


def test_unfinished_runs_on_request(sweep_runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep_runs
    runs, skipped = load_runs([root / "sweep"], include_unfinished=True)
    assert sorted({run.batch_size for run in runs}) == [64, 256, 1024]
    assert not skipped


def test_min_accuracy_leaves_out_and_lists_runs_that_did_not_train(
    sweep_runs: tuple[Path, dict], tmp_path: Path
) -> None:
    root, finals = sweep_runs
    # test/acc: bs64 89.36 / 91.36 %, bs256 87.44 / 89.44 %; the hparams-only fgsm run has val/acc 70 %
    runs, skipped = load_runs([root], min_accuracy=88)
    assert sorted((run.batch_size, run.seed) for run in runs) == [(64, 0), (64, 1), (256, 1)]
    reasons = {path.name: why for path, why in skipped}
    assert reasons["bs256_seed0"] == "test/acc 87.44% is below --min-accuracy 88% (did not train)"
    assert reasons["version_0"] == "val/acc 70.00% is below --min-accuracy 88% (did not train)"
    assert "failed" in reasons["bs1024_seed0"]

    out = tmp_path / "report"
    assert main([str(root), "--out", str(out), "--min-accuracy", "88"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [table["variant"] for table in summary["tables"]] == ["standard"]
    row_256 = next(row for row in summary["tables"][0]["rows"] if row["batch_size"] == 256)
    assert row_256["seeds"] == [1]
    assert row_256["metrics"]["hessian/eig_1"]["values"] == pytest.approx(
        [finals[("standard", 256, 1)]["hessian/eig_1"]]
    )
    assert "bs256_seed0" in (out / "report.md").read_text()  # listed as left out

    with pytest.raises(ValueError, match="min_accuracy is a percentage in \\[0, 100\\], got 150"):
        load_runs([root], min_accuracy=150)


def test_final_value_is_the_last_logged_and_epochs_map(sweep_runs: tuple[Path, dict]) -> None:
    root, finals = sweep_runs
    events = read_events(root / "sweep" / "bs64_seed1")
    final = finals[("standard", 64, 1)]["hessian/eig_1"]
    points = events.scalars["hessian/eig_1"]
    assert [p.step for p in points] == [64, 128, 192]  # the fit's analyses; the test's are elsewhere
    assert events.final("hessian/eig_1") == pytest.approx(final)  # the training samples' last value
    assert [p.step for p in events.scalars["hessian/test/eig_1"]] == [192]  # the checkpoint's step
    assert events.final("hessian/test/eig_1") == pytest.approx(finals[("standard", 64, 1)]["hessian/test/eig_1"])
    assert events.final("no/such/tag") is None
    trajectory = training_trajectory(points)
    assert [p.value for p in trajectory] == pytest.approx([_fit_value(final, e, 3) for e in range(3)])
    # the NaN of the last trace (time budget) is left out of the curve
    assert [p.step for p in training_trajectory(events.scalars["hessian/trace"])] == [64, 128]
    # analyses after epochs 0, 1, 2; step 100 is in epoch 1
    assert step_to_epoch(events, [64, 128, 192, 100, 0]) == [0.0, 1.0, 2.0, 1.0, 0.0]


def test_runs_logged_before_split_qualified_tags_keep_the_test_value(tmp_path: Path) -> None:
    """Earlier runs logged the test's analyses under the fit's tags at step 0: the final value is the
    test's (what those reports showed), and the curve over training leaves that point out."""
    writer = SummaryWriter(str(tmp_path))
    for step, value in ((10, 1.0), (20, 2.0)):
        writer.add_scalar("hessian/eig_1", value, step)
    writer.close()
    legacy = SummaryWriter(str(tmp_path))
    legacy.add_scalar("hessian/eig_1", 7.0, 0)
    legacy.close()
    points = read_events(tmp_path).scalars["hessian/eig_1"]
    assert [p.step for p in points] == [10, 20, 0]
    assert points[-1].value == 7.0 and [p.step for p in training_trajectory(points)] == [10, 20]


def test_tensor_summaries_read_as_scalars(tmp_path: Path) -> None:
    """Writers that log scalars as tensor summaries (new_style) are read like simple values."""
    writer = SummaryWriter(str(tmp_path))
    for step, value in ((1, 3.5), (2, 4.25)):
        writer.add_scalar("hessian/eig_1", value, step, new_style=True)
    writer.close()
    events = read_events(tmp_path)
    assert [(p.step, p.value) for p in events.scalars["hessian/eig_1"]] == [(1, 3.5), (2, 4.25)]


def test_density_histogram_round_trip(sweep_runs: tuple[Path, dict]) -> None:
    """The density the spectrum callback logs as a histogram reads back as the same curve."""
    root, finals = sweep_runs
    events = read_events(root / "sweep" / "bs256_seed0")
    histogram = events.histograms["hessian/density"][-1]
    centres, density = density_from_histogram(histogram.edges, histogram.counts)
    grid = np.linspace(-1.0, finals[("standard", 256, 0)]["hessian/eig_1"], 32)
    expected = np.exp(-0.5 * (grid / 3) ** 2)  # the last epoch's (epoch 2) density
    expected /= expected.sum() * (grid[1] - grid[0])
    assert centres == pytest.approx(grid, rel=1e-5, abs=1e-5)
    assert density == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert float(np.sum(density * np.diff(histogram.edges))) == pytest.approx(1.0)


def test_run_discovery_and_metadata(sweep_runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep_runs
    assert len(find_run_dirs([root])) == 6
    assert find_run_dirs([root / "sweep" / "bs64_seed0"]) == [(root / "sweep" / "bs64_seed0").resolve()]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_run_dirs([tmp_path / "missing"])
    run = load_run(root / "lightning_logs" / "version_0", read=False)
    assert (run.batch_size, run.seed, run.variant) == (256, None, "fgsm ε=0.1")
    assert run.metadata_source == {"batch_size": "hparams.yaml", "variant": "hparams.yaml"}
    # no metadata files at all: the directory name decides
    bare = tmp_path / "old_sweep" / "bs2048_seed3"
    bare.mkdir(parents=True)
    SummaryWriter(str(bare)).close()
    run = load_run(bare)
    assert (run.batch_size, run.seed, run.variant) == (2048, 3, "standard")
    # LightningCLI's config.yaml: seed and batch size from their sections, not from callbacks
    config = {
        "seed_everything": 7,
        "trainer": {"callbacks": [{"class_path": "X", "init_args": {"batch_size": 1}}]},
        "data": {"class_path": "D", "init_args": {"batch_size": 512}},
        "model": {"class_path": "M", "init_args": {"activation": {"name": "softplus", "beta": 5}}},  # a custom module
    }
    (bare / "config.yaml").write_text(yaml.safe_dump(config))
    run = load_run(bare, read=False)
    assert (run.batch_size, run.seed, run.variant) == (512, 7, "standard, softplus(beta=5)")


def test_find_landscape_takes_the_newest_landscape_file(tmp_path: Path) -> None:
    import os

    run_dir = tmp_path / "run"
    steps = np.linspace(-1, 1, 3)
    save_landscape(run_dir / "landscape" / "epoch_000", [LossCurve("eig_1", steps, steps**2, steps)])
    save_landscape(run_dir / "landscape" / "test_epoch_001", [LossCurve("eig_1", steps, 2 * steps**2, steps)])
    os.utime(run_dir / "landscape" / "epoch_000.npz", (1e9, 1e9))  # older
    np.savez(run_dir / "other.npz", weights=np.ones(3))  # not a landscape: ignored
    found = find_landscape(load_run(run_dir, read=False))
    assert found is not None and found.path.name == "test_epoch_001.npz"
    assert found.curves[0].loss == pytest.approx(2 * steps**2)
    assert find_landscape(load_run(tmp_path, read=False)) is not None  # searched recursively
    (tmp_path / "empty").mkdir()
    assert find_landscape(load_run(tmp_path / "empty", read=False)) is None


def test_describe_variant() -> None:
    assert describe_variant({"adversarial": {"method": "none", "epsilon": 0.1}}) == "standard"
    assert (
        describe_variant({"adversarial": {"method": "pgd", "epsilon": 8 / 255}, "activation": "relu"})
        == "pgd ε=0.03137"
    )
    assert describe_variant({"adversarial": {"method": "none"}, "activation": "softplus", "softplus_beta": 5.0}) == (
        "standard, softplus β=5"
    )
    assert describe_variant({"adversarial": "gaussian_noise", "activation": "elu"}) == "gaussian_noise, elu"
    assert describe_variant({"arch": "m1"}) is None


def test_format_cell_and_empty_inputs(tmp_path: Path) -> None:
    from lightning_hessian.report.tables import Cell, Column

    assert format_cell(Cell((0.5, 0.7)), Column("acc", "acc", percent=True)) == "60.00 ± 14.14"
    assert format_cell(Cell((12.345678,)), Column("hessian/eig_1", "l")) == "12.35"
    assert format_cell(Cell(()), Column("hessian/eig_1", "l")) == "–"
    assert math.isnan(float(format_cell(Cell((math.nan,)), Column("x", "x"))))
    assert summarize_runs([]) == []
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2


def _record_offsets(path: Path) -> list[int]:
    """Byte offsets of the records of an event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    data, offsets, position = path.read_bytes(), [], 0
    while position < len(data):
        offsets.append(position)
        position += 16 + struct.unpack("<Q", data[position : position + 8])[0]
    return offsets


def test_damaged_event_files_are_reported_and_read_up_to_the_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lightning_hessian.report.events import DamagedEventFileWarning, check_event_file

    sweep = {"batch_size": 64, "seed": 0, "variant": "standard", "status": "finished"}
    damaged_run = tmp_path / "sweep" / "bs64_seed0"
    final = _write_run(damaged_run, batch_size=64, seed=0, sweep=sweep)
    _fit_file, test_file = sorted(damaged_run.glob("events.out.tfevents.*"))
    assert check_event_file(test_file) is None
    # Corrupt the test phase's 4th record (file version, test/acc and epoch come first): TensorBoard
    # alone drops it and everything after it, the test split's hessian/* values, without a word.
    start = _record_offsets(test_file)[3]
    content = bytearray(test_file.read_bytes())
    content[start + 14] ^= 0xFF
    test_file.write_bytes(bytes(content))
    # A run whose only event file is cut inside its first record: nothing to read.
    empty_run = tmp_path / "sweep" / "bs256_seed0"
    _write_run(empty_run, batch_size=256, seed=0, sweep={**sweep, "batch_size": 256}, test_phase=False)
    (only_file,) = empty_run.glob("events.out.tfevents.*")
    only_file.write_bytes(only_file.read_bytes()[:20])

    assert "corrupt after 3 intact records" in check_event_file(test_file)
    assert "truncated after 0 intact records" in check_event_file(only_file)
    with pytest.warns(DamagedEventFileWarning, match=re.escape(str(test_file))):
        events = read_events(damaged_run)
    assert events.final("test/acc") == pytest.approx(final["test/acc"])  # before the damage: kept
    assert events.final("val/acc") is not None  # the intact fit file: kept
    assert events.final("hessian/eig_1") == pytest.approx(final["hessian/eig_1"])  # the fit's file is intact
    assert events.final("hessian/test/eig_1") is None  # lost with the damage ...
    assert len(events.problems) == 1 and str(test_file) in events.problems[0]  # ... and said so

    out = tmp_path / "report"
    assert main([str(tmp_path / "sweep"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings_printed = [line for line in err.splitlines() if line.startswith("hessian-report: warning: ")]
    assert len(warnings_printed) == 2
    assert any(str(test_file) in line for line in warnings_printed)
    assert any(str(only_file) in line for line in warnings_printed)
    summary = json.loads((out / "summary.json").read_text())
    markdown = (out / "report.md").read_text()
    assert "Damaged event files" in markdown and str(test_file) in markdown
    runs, skipped = load_runs([tmp_path / "sweep"])
    assert [run.batch_size for run in runs] == [64]
    assert skipped[0][0] == empty_run.resolve() and skipped[0][1].startswith("nothing readable")
    assert summary  # the report was written from what could be read


def test_runs_of_unrelated_projects_are_never_pooled(tmp_path):
    """Two projects logged with the callbacks, no batch size known: one row each, no accuracy
    note for runs without any accuracy, and a run that logged nothing is skipped, not a row."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_hessian.report import load_runs, summarize_runs

    for project, eig, extra in (("cnn", 5.0, {"val/acc": 0.8}), ("regressor", 50.0, {})):
        writer = SummaryWriter(str(tmp_path / project / "version_0"))
        writer.add_scalar("hessian/eig_1", eig, 10)
        for tag, value in extra.items():
            writer.add_scalar(tag, value, 10)
        writer.close()
    SummaryWriter(str(tmp_path / "crashed" / "version_0")).close()  # failed before training: no scalars

    runs, skipped = load_runs([tmp_path])
    assert sorted(run.variant for run in runs) == ["cnn", "regressor"]
    assert [path.parts[-2] for path, _ in skipped] == ["crashed"]
    tables = summarize_runs(runs)
    eigenvalues = sorted(row.cells["hessian/eig_1"].mean for table in tables for row in table.rows)
    assert eigenvalues == [5.0, 50.0]
    assert not any("runs without" in note for table in tables for note in table.notes)


def test_the_old_module_path_still_writes_the_report_with_a_deprecation_warning(
    sweep_runs: tuple[Path, dict], tmp_path: Path
) -> None:
    """``python -m lightning_hessian.report.report`` warns and runs ``hessian-report`` unchanged."""
    import subprocess
    import sys

    root, _ = sweep_runs
    out = tmp_path / "old_path_report"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_hessian.report.report", str(root / "sweep"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lightning_hessian.report.report is deprecated" in result.stderr
    assert "lightning_hessian.cli.report" in result.stderr
    assert (out / "report.md").is_file() and "Read 4 runs" in result.stdout


def test_the_report_reads_the_tags_the_callbacks_write() -> None:
    """The report's columns and figures name the tags of :mod:`lightning_hessian.metrics`, the
    module the callbacks log with: writer and reader cannot drift apart."""
    from lightning_hessian import metrics
    from lightning_hessian.report import robustness_figures, spectrum_figures, tables

    assert [column.key for column in tables._FIXED_COLUMNS] == [
        "hessian/eig_1", "hessian/trace", "hessian/input_eig_1", "hessian/input_grad_norm", "landscape/sharpness",
    ]  # fmt: skip
    assert (tables.TEST_ACC_TAG, tables.VAL_ACC_TAG) == (metrics.accuracy_tag("test"), metrics.accuracy_tag("val"))
    assert spectrum_figures.DENSITY_TAG == metrics.DENSITY
    assert robustness_figures.CLEAN_ACCURACY_TAG == metrics.CLEAN_ACC
    tag = metrics.robust_accuracy_tag("linf_pgd", 8 / 255)
    assert tag == "robust/linf_pgd/eps_0.0313725"
    assert tables.robust_tags([tag, metrics.median_norm_tag("l2_cw"), "robust/clean_acc"]) == [
        (tag, "linf_pgd", "0.0313725")
    ]
    assert tables.epsilon_value("0.0313725") == pytest.approx(8 / 255, rel=1e-5)
    assert spectrum_figures.EIGENVALUE_TAG.match(metrics.eigenvalue_tag(12)).group(1) == "12"
    assert metrics.MEDIAN_NORM_PATTERN.match(metrics.median_norm_tag("l2_cw")).group("attack") == "l2_cw"


def test_the_report_says_which_machines_made_the_runs(tmp_path: Path) -> None:
    """A study continued on another machine: the report names both machines, counts their runs, and
    a run resumed across machines is listed under both (runs.csv has each run's machines)."""
    here = {"host": "vm", "cpu": "Xeon", "cpu_vector": "avx512f", "gpus": [], "torch": "2.14.1",
            "environment": {"OMP_NUM_THREADS": "1"}}  # fmt: skip
    there = {**here, "cpu": "EPYC", "cpu_vector": "avx2"}
    nothing_kept = {**here, "host": "node-7"}
    resumed = [
        {"machine": there, "stage": "fit", "kept_seconds": 40.0},
        {"machine": nothing_kept, "stage": "fit", "kept_seconds": 0.0},  # stopped before a checkpoint
    ]
    for seed, record in enumerate([{"machine": here}, {"machine": here}, {"machine": here, "resumed": resumed}, {}]):
        sweep = {"batch_size": 64, "seed": seed, "variant": "standard", "status": "finished", **record}
        _write_run(tmp_path / "sweep" / f"bs64_seed{seed}", batch_size=64, seed=seed, sweep=sweep)
    main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])

    markdown = (tmp_path / "report" / "report.md").read_text()
    this = "vm (Xeon, avx512f, torch 2.14.1, OMP_NUM_THREADS=1)"
    that = "vm (EPYC, avx2, torch 2.14.1, OMP_NUM_THREADS=1)"
    assert f"Machines (`sweep.json`): 2 runs on {this}; 1 run on {that} then {this}; 1 without a record." in markdown
    assert "round differently" in markdown and "node-7" not in markdown
    rows = {row["seed"]: row["machine"] for row in csv.DictReader((tmp_path / "report" / "runs.csv").open())}
    assert rows == {"0": this, "1": this, "2": f"{that} then {this}", "3": ""}


def test_one_machine_is_named_without_a_warning(tmp_path: Path) -> None:
    machine = {"host": "gpu-node", "cpu": "Xeon", "gpus": ["NVIDIA H200", "NVIDIA H200"], "torch": "2.14.1"}
    for seed in (0, 1):
        sweep = {"batch_size": 64, "seed": seed, "variant": "standard", "status": "finished", "machine": machine}
        _write_run(tmp_path / "sweep" / f"bs64_seed{seed}", batch_size=64, seed=seed, sweep=sweep)
    main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Machines (`sweep.json`): 2 runs on gpu-node (Xeon, 2x NVIDIA H200, torch 2.14.1)." in markdown
    assert "round differently" not in markdown
    html = (tmp_path / "report" / "report.html").read_text()
    assert "2 runs on gpu-node (Xeon, 2x NVIDIA H200, torch 2.14.1)." in html
