"""hessian-report on a synthetic paper study: every element of the paper as a column or a figure,
the split named everywhere, and the claims judged from the numbers by the stated rule.

The runs are written the way ``hessian-sweep`` with ``configs/overlays/paper_study.yaml`` leaves
them (fit-time analyses of training samples under unqualified tags, ``hessian-train test`` under
``hessian/test/...``, ``robust/test/...``, landscape grids, ``checkpoint.json``, ``sweep.json``,
``config.yaml``) and ``hessian-landscape interpolate`` its ``interpolation.json``; the numbers are
chosen so that each claim has a known verdict.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

from lightning_hessian import metrics
from lightning_hessian.cli.report import main
from lightning_hessian.density_histogram import density_histogram
from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import save_landscape
from lightning_hessian.report.claims import CONTRADICTED, HOLDS, NOT_DECIDED, compare
from lightning_hessian.report.figures import use_log_scale
from lightning_hessian.report.runs import DEFAULT_FIT_SPLITS, fit_splits

BATCH_SIZES = (128, 2048, 16384)
SEEDS = (0, 1, 2)
EPSILONS = (0.01, 0.05, 0.1)
#: the overlay's callbacks as config.yaml holds them (the splits the report names)
CONFIG = {
    "trainer": {
        "callbacks": [
            {
                "class_path": "lightning_hessian.callbacks.spectrum.HessianSpectrumCallback",
                "init_args": {"split": "train"},
            },
            {
                "class_path": "lightning_hessian.callbacks.landscape.LossLandscapeCallback",
                "init_args": {"split": "train"},
            },
            {
                "class_path": "lightning_hessian.callbacks.robustness.AdversarialRobustnessCallback",
                "init_args": {"split": "val"},
            },
        ]
    }
}


def _values(batch_size: int, seed: int, method: str, beta: float | None = None) -> dict[str, float]:
    """The final numbers of one run. Per seed a small wobble; across batch sizes large trends:
    lambda_1 and the input curvature grow with B (the paper), the attacks' accuracy falls (the
    paper), DeepFool's median norm GROWS with B (contradicting the paper), the test accuracy
    moves less than its seed spread (undecided). Robust training lowers lambda_1, noise does not.
    A softplus network (``beta``) has a smaller lambda_1 that approaches ReLU's as beta grows."""
    level = math.log2(batch_size / 128)  # 0, 4, 7
    wobble = (seed - 1) * 0.5
    top = 20.0 + 10.0 * level + wobble
    if method == "fgsm":
        top *= 0.4
    if beta is not None:
        top *= 1 - 0.5 / (1 + beta)
    values = {metrics.eigenvalue_tag(i): top / i for i in range(1, 11)}
    values.update({
        metrics.EIG_MIN: -0.02 * top - 0.01 * seed,
        metrics.TRACE: 10 * top + seed,
        metrics.INPUT_EIG_1: 1.0 + level + 0.1 * seed,
        metrics.INPUT_GRAD_NORM: 0.5 + 0.1 * level + 0.01 * seed,
        metrics.SHARPNESS: 1.0 + level,
        metrics.STABILITY: top * 0.02 / 3.8,  # lr 0.02, momentum 0.9
        metrics.TRAIN_LOSS: 0.05 + 0.05 * level + 0.001 * seed,
        metrics.LANDSCAPE_LOSS: 0.06 + 0.05 * level + 0.001 * seed,
        metrics.TRAIN_ACC: 0.98 - 0.02 * level,
        metrics.WEIGHT_NORM: 30.0 + level,
        metrics.TEST_ACC: 0.90 - 0.001 * level + 0.02 * (seed - 1),
        metrics.split_tag(metrics.TOP_EIGENVALUE, "test"): 1.5 * top,
        metrics.split_tag(metrics.INPUT_EIG_1, "test"): 1.2 + level + 0.1 * seed,
        metrics.split_tag(metrics.INPUT_GRAD_NORM, "test"): 0.6 + 0.1 * level + 0.01 * seed,
        metrics.split_tag(metrics.CLEAN_ACC, "test"): 0.9,
        metrics.split_tag(metrics.median_norm_tag("l2_deepfool"), "test"): 0.5 + 0.1 * level + 0.001 * seed,
    })  # fmt: skip
    for attack in ("fgsm", "linf_pgd"):
        for eps in EPSILONS:
            accuracy = max(0.0, 0.9 - eps * (4 + 2 * level) - (0.1 if attack == "linf_pgd" else 0) + 0.002 * seed)
            values[metrics.split_tag(metrics.robust_accuracy_tag(attack, eps), "test")] = accuracy
    return values


def _write_run(run_dir: Path, *, batch_size: int, seed: int, variant: str, method: str = "none",
               landscape: bool = False, surface: bool = False,
               beta: float | None = None) -> dict[str, float]:  # fmt: skip
    run_dir.mkdir(parents=True)
    final = _values(batch_size, seed, method, beta)
    epochs, steps_per_epoch = 4, max(1, 54_000 // batch_size)
    last = epochs * steps_per_epoch
    writer = SummaryWriter(str(run_dir))
    for epoch in range(epochs):
        step = (epoch + 1) * steps_per_epoch
        writer.add_scalar("epoch", epoch, step - 1)
        fraction = (epoch + 1) / epochs
        writer.add_scalar(metrics.TRAIN_LOSS, final[metrics.TRAIN_LOSS] / fraction, step - 1)
        writer.add_scalar(metrics.TRAIN_ACC, final[metrics.TRAIN_ACC] * fraction, step - 1)
        writer.add_scalar(metrics.WEIGHT_NORM, final[metrics.WEIGHT_NORM] * fraction, step - 1)
        writer.add_scalar(metrics.TOP_EIGENVALUE, final[metrics.TOP_EIGENVALUE] * fraction, step)
    # the end-of-training spectrum, at the last step (after the every-epoch top eigenvalue)
    for tag, value in final.items():
        if metrics.parse_split_tag(tag)[0] is None and tag.startswith(("hessian/", "landscape/")):
            writer.add_scalar(tag, value, last)
    grid = torch.linspace(-1.0, final[metrics.TOP_EIGENVALUE], 64, dtype=torch.float64)
    writer.add_histogram_raw(
        metrics.DENSITY, global_step=last, **density_histogram(grid, torch.exp(-grid.abs()), 44_000)
    )
    writer.close()
    tester = SummaryWriter(str(run_dir))  # hessian-train test from the checkpoint
    tester.add_scalar(metrics.TEST_ACC, final[metrics.TEST_ACC], 0)
    for tag, value in final.items():
        if metrics.parse_split_tag(tag)[0] == "test":
            tester.add_scalar(tag, value, last)
    tester.close()
    record = {
        "batch_size": batch_size,
        "seed": seed,
        "variant": variant,
        "status": "finished",
        "wall_seconds": 100.0 + batch_size / 100,
    }
    (run_dir / "sweep.json").write_text(json.dumps(record))
    (run_dir / "checkpoint.json").write_text(json.dumps({"checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
                                                         "epoch": epochs, "global_step": last}))  # fmt: skip
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    if landscape:
        steps = np.linspace(-0.5, 0.5, 11)
        for split, prefix, scale in (("train", "", 1.0), ("test", "test_", 1.3)):
            loss = final[metrics.TRAIN_LOSS] + 0.5 * scale * final[metrics.TOP_EIGENVALUE] * steps**2
            save_landscape(run_dir / "landscape" / f"{prefix}epoch_{epochs:03d}",
                           [LossCurve("eig1", steps, loss, 1 - loss / 10)], extra={"split": split})  # fmt: skip
    if surface:
        axis = np.linspace(-0.5, 0.5, 5)
        loss = 0.1 + 0.5 * final[metrics.TOP_EIGENVALUE] * np.add.outer(axis**2, 0.5 * axis**2)
        save_landscape(run_dir / "landscape" / "surface_train", [],
                       [LossSurface(("eig1", "eig2"), axis, axis, loss, 1 - loss / 100)],
                       extra={"split": "train"})  # fmt: skip
    return final


def _write_interpolation(
    out: Path, run_a: Path, run_b: Path, labels: tuple[str, str], top_a: float, top_b: float
) -> None:
    alphas = np.union1d(np.linspace(-0.5, 1.5, 5), [0.0, 1.0])
    loss = 0.1 + (alphas - 0.5) ** 2
    out.mkdir(parents=True)
    (out / "interpolation.json").write_text(json.dumps({
        "ckpt_a": str(run_a / "checkpoints" / "last.ckpt"), "ckpt_b": str(run_b / "checkpoints" / "last.ckpt"),
        "labels": list(labels), "alphas": alphas.tolist(),
        "loss": {"train": loss.tolist(), "test": (loss + 0.1).tolist()},
        "accuracy": {"train": (1 - loss / 3).tolist(), "test": (1 - loss / 2).tolist()},
        "top_eigenvalue": (top_a + (top_b - top_a) * alphas + 5 * alphas * (1 - alphas)).tolist(),
        "eigenvalue_split": "train", "seconds": 1.0,
    }))  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("paper_study")
    finals: dict = {}
    for seed in SEEDS:
        for batch_size in BATCH_SIZES:
            run = root / "recipe" / f"bs{batch_size}_seed{seed}"
            finals[("standard", batch_size, seed)] = _write_run(
                run, batch_size=batch_size, seed=seed, variant="standard", landscape=True, surface=seed == 0
            )
        for method, variant in (("fgsm", "fgsm ε=0.1"), ("gaussian_noise", "gaussian_noise ε=0.1")):
            finals[(variant, 128, seed)] = _write_run(
                root / method / f"bs128_seed{seed}", batch_size=128, seed=seed, variant=variant, method=method
            )
        small, large = root / "recipe" / f"bs128_seed{seed}", root / "recipe" / f"bs16384_seed{seed}"
        _write_interpolation(root / "interpolation" / "bs128_vs_bs16384" / f"seed{seed}", small, large,
                             ("B=128", "B=16384"), finals[("standard", 128, seed)][metrics.TOP_EIGENVALUE],
                             finals[("standard", 16384, seed)][metrics.TOP_EIGENVALUE])  # fmt: skip
        _write_interpolation(root / "interpolation" / "standard_vs_fgsm" / f"seed{seed}", small,
                             root / "fgsm" / f"bs128_seed{seed}", ("standard", "FGSM"),
                             finals[("standard", 128, seed)][metrics.TOP_EIGENVALUE],
                             finals[("fgsm ε=0.1", 128, seed)][metrics.TOP_EIGENVALUE])  # fmt: skip
    return root, finals


@pytest.fixture(scope="module")
def report(study: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root, _ = study
    out = tmp_path_factory.mktemp("report")
    assert main([str(root), "--out", str(out), "--title", "synthetic paper study"]) == 0
    return out, json.loads((out / "summary.json").read_text()), {}


def _claims(summary: dict, prefix: str, setting: str = "") -> list[dict]:
    return [c for c in summary["claims"] if c["claim"].startswith(prefix) and setting in c["setting"]]


def test_every_element_of_the_paper_is_a_column_naming_its_split(report) -> None:
    _, summary, _ = report
    titles = {column["key"]: column["title"] for column in summary["columns"]}
    expected = {
        "hessian/eig_1": "λ₁(θ), train",
        "hessian/eig_10": "λ₁₀(θ), train",
        "hessian/eig_min": "λ_min(θ), train",
        "ratio:hessian/eig_min:hessian/eig_1": "λ_min/λ₁, train",
        "hessian/trace": "trace, train",
        "hessian/stability": "λ₁/stability limit, train",
        "hessian/input_eig_1": "λ₁(x), train",
        "hessian/test/input_eig_1": "λ₁(x), test",
        "hessian/test/input_grad_norm": "‖∇ₓJ‖, test",
        "hessian/test/eig_1": "λ₁(θ), test",
        "train/loss": "train loss",
        # the end-of-training loss in eval mode on the landscape callback's samples, beside the epoch mean
        "landscape/loss": "loss in eval mode, train",
        "train/acc": "train acc (%)",
        "model/weight_norm": "‖θ‖₂",
        "run/epochs": "epochs",
        "run/steps": "steps",
        "acc": "test acc (%)",
        "robust/test/linf_pgd/eps_0.05": "linf_pgd ε=0.05 (%), test",
        "robust/test/l2_deepfool/median_norm": "l2_deepfool median ‖δ‖, test",
    }
    for key, title in expected.items():
        assert titles[key] == title, key
    shown = {column["key"] for column in summary["columns"] if column["shown"]}
    assert "hessian/eig_10" in shown and "hessian/eig_5" not in shown  # λ₂..λ₉ in summary.json only
    sections = {column["key"]: column["section"] for column in summary["columns"]}
    assert sections["landscape/loss"] == "training" and "landscape/loss" in shown
    standard = next(table for table in summary["tables"] if table["variant"] == "standard")
    row = next(r for r in standard["rows"] if r["batch_size"] == 16384)
    assert row["metrics"]["hessian/eig_5"]["n"] == 3
    assert row["metrics"]["run/steps"]["values"] == [4 * (54_000 // 16384)] * 3


def test_claims_are_judged_by_the_stated_rule(report, study) -> None:
    _, summary, _ = report
    _, finals = study
    (top,) = _claims(summary, "Large batches converge to points of larger curvature: top", "standard, train")
    assert top["verdict"] == HOLDS
    small = [finals[("standard", 128, s)]["hessian/eig_1"] for s in SEEDS]
    large = [finals[("standard", 16384, s)]["hessian/eig_1"] for s in SEEDS]
    assert top["numbers"]["a"]["values"] == pytest.approx(small, rel=1e-6)
    assert top["numbers"]["b"]["values"] == pytest.approx(large, rel=1e-6)
    assert f"{np.mean(small):.4g} ± {np.std(small, ddof=1):.2g} (n=3)" in top["evidence"]

    (saddle,) = _claims(summary, "Large-batch training does not end at saddle points")
    assert saddle["verdict"] == HOLDS and saddle["numbers"]["batch_size"] == 16384
    (accuracy,) = _claims(summary, "Large batches generalise worse")
    assert accuracy["verdict"] == NOT_DECIDED  # 0.7 points lower, 2 points of seed spread
    robust = _claims(summary, "Large-batch models are less robust: ")
    by_attack = {c["claim"].split(": ")[1].split(" ")[0]: c for c in robust}
    assert by_attack["fgsm"]["verdict"] == HOLDS and by_attack["linf_pgd"]["verdict"] == HOLDS
    # the epsilon of each attack: where B = 128 keeps closest to half its clean accuracy
    assert "ε=0.1" in by_attack["fgsm"]["claim"]
    assert by_attack["l2_deepfool"]["verdict"] == CONTRADICTED  # the synthetic data says the opposite
    (input_curvature,) = _claims(summary, "Large batches have a larger input-space curvature")
    assert input_curvature["verdict"] == HOLDS and "test samples" in input_curvature["setting"]
    (correlation,) = _claims(summary, "Higher input-space curvature goes with lower robustness")
    from scipy.stats import spearmanr

    expected_rho = []
    for seed in SEEDS:
        runs = [finals[("standard", b, seed)] for b in BATCH_SIZES]
        expected_rho.append(spearmanr([r["hessian/test/input_eig_1"] for r in runs],
                                      [r[correlation["numbers"]["y"]] for r in runs]).statistic)  # fmt: skip
    assert correlation["numbers"]["y"] == "robust/test/linf_pgd/eps_0.1"  # PGD, at its deciding epsilon
    assert correlation["verdict"] == HOLDS and correlation["numbers"]["values"] == pytest.approx(expected_rho)

    flatter = _claims(summary, "Robust training (fgsm ε=0.1) finds flatter points")
    assert {c["verdict"] for c in flatter if "λ₁(θ)" in c["claim"]} == {HOLDS}
    noise = _claims(summary, "Noise training, the baseline (gaussian_noise ε=0.1)")
    assert {c["verdict"] for c in noise if "λ₁(θ)" in c["claim"]} == {NOT_DECIDED}

    (sharper,) = _claims(summary, "Model interpolation: the large-batch end is sharper")
    assert sharper["verdict"] == HOLDS and sharper["setting"].startswith("B=128 → B=16384 (standard)")
    (robust_end,) = _claims(summary, "Model interpolation: the robustly trained end is flatter")
    assert robust_end["verdict"] == HOLDS
    assert robust_end["numbers"]["alpha_1"] == pytest.approx(
        [finals[("fgsm ε=0.1", 128, s)]["hessian/eig_1"] for s in SEEDS]
    )
    assert summary["claims_rule"].startswith("Each line compares two means over seeds")

    # context lines under each variant's claims: the training loss and the stability ratio, both ends
    for key in (metrics.TRAIN_LOSS, metrics.STABILITY):
        (context,) = [
            c for c in summary["claims"] if c["numbers"].get("key") == key and "standard, train" in c["setting"]
        ]
        assert context["verdict"] == "context" and context["claim"].startswith("(Context, not a claim of the paper)")
        assert context["numbers"]["a"] == pytest.approx([finals[("standard", 128, s)][key] for s in SEEDS], rel=1e-6)
        assert context["numbers"]["b"] == pytest.approx([finals[("standard", 16384, s)][key] for s in SEEDS], rel=1e-6)


def test_figures_and_files_for_a_reviewer(report) -> None:
    out, _, _ = report
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Which of the paper's claims hold here") < markdown.index("## Final metrics")
    for heading in ("### Training: the under-training check", "### Curvature", "### Accuracy and robustness"):
        assert heading in markdown
    figures = [
        "training_vs_batch_size.png", "metrics_vs_batch_size.png", "top_eigenvalue_vs_epoch.png", "topk_spectrum.png",
        "spectrum_vs_batch_size.png", "spectral_density.png", "robust_accuracy_vs_epsilon.png",
        "median_norms_vs_batch_size.png", "landscape_curves_0_standard.png",
        "landscape_surface_0_standard_eig1_eig2_train.png",
    ]  # fmt: skip
    for name in figures:
        assert (out / name).stat().st_size > 2000, name
        assert f"]({name})" in markdown
    interpolations = sorted(p.name for p in out.glob("interpolation_*.png"))
    assert len(interpolations) == 2
    # every caption names the split of its samples
    lines = markdown.splitlines()
    captions = [lines[i + 2] for i, line in enumerate(lines) if line.startswith("![")]
    assert len(captions) == len(figures) + 2
    for caption in captions:
        assert "train" in caption or "test" in caption, caption
    assert "surface eig1_eig2 on train samples" in markdown and "one colour scale for both panels" in markdown
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 15 and {"epochs", "steps", "wall_seconds", "hessian/test/eig_1", "hessian/eig_1"} <= set(
        rows[0]
    )
    assert "Run time (fit and test, from `sweep.json`)" in markdown


def test_compare_rule() -> None:
    assert compare([1.0, 1.2], [3.0, 3.2], "larger") == HOLDS
    assert compare([1.0, 1.2], [3.0, 3.2], "smaller") == CONTRADICTED
    assert compare([1.0, 2.0], [2.0, 2.5], "larger") == NOT_DECIDED  # 0.75 apart, 1.06 of spread
    assert compare([1.0], [5.0, 5.1], "larger") == NOT_DECIDED  # one seed: no spread to judge by
    assert compare([], [5.0, 5.1], "larger") == NOT_DECIDED
    assert compare([1.0, 1.0], [1.5, 1.5], "larger") == HOLDS  # identical seeds: any difference decides


def test_log_scale_only_where_values_span_decades() -> None:
    assert use_log_scale([1.0, 10.0]) and use_log_scale([0.01, 0.5, 2.0])
    assert not use_log_scale([1.0, 9.0]) and not use_log_scale([-1.0, 100.0]) and not use_log_scale([5.0])
    assert not use_log_scale([0.0, 100.0]) and use_log_scale([1.0, math.nan, 50.0])


def test_fit_splits_come_from_the_callbacks_in_config_yaml() -> None:
    assert fit_splits({}) == DEFAULT_FIT_SPLITS == {"hessian": "train", "landscape": "train", "robust": "val"}
    config = {"trainer": {"callbacks": [
        {"class_path": "lightning_hessian.callbacks.spectrum.HessianSpectrumCallback", "init_args": {"split": "val"}},
        {"class_path": "x.HessianSpectrumCallback", "init_args": {"split": "train"}},
        {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor"},
        {"class_path": "lightning_hessian.callbacks.robustness.AdversarialRobustnessCallback",
         "init_args": {"split": "test"}},
    ]}}  # fmt: skip
    assert fit_splits(config) == {"hessian": "val/train", "landscape": "train", "robust": "test"}


def test_split_tags_round_trip_and_refuse_what_is_no_analysis_tag() -> None:
    for tag in (
        "hessian/eig_1",
        "robust/linf_pgd/eps_0.1",
        "landscape/rise/eig1",
        "hessian/layer/net.3/eig_2",
        "probe/loss",
    ):
        for split in metrics.SPLITS:
            qualified = metrics.split_tag(tag, split)
            assert metrics.parse_split_tag(qualified) == (split, tag)
            assert metrics.parse_split_tag(tag) == (None, tag)
    assert metrics.split_tag("hessian/eig_1", "test") == "hessian/test/eig_1"
    assert metrics.EIGENVALUE_PATTERN.match("hessian/test/eig_1") is None
    assert metrics.ROBUST_ACCURACY_PATTERN.match("robust/test/fgsm/eps_0.1") is None
    assert metrics.parse_split_tag("test/acc") == (None, "test/acc")
    with pytest.raises(ValueError, match="not one of"):
        metrics.split_tag("hessian/eig_1", "holdout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already names a split"):
        metrics.split_tag("hessian/test/eig_1", "test")
    with pytest.raises(ValueError, match="metric of the model"):
        metrics.split_tag("test/acc", "test")


def test_softplus_networks_against_beta_next_to_relu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reviewers' smooth-activation check: a figure against beta with the ReLU network as the
    beta -> infinity line, and the batch-size claims judged for each softplus network."""
    from lightning_hessian.report import figures
    from lightning_hessian.report.build import load_runs
    from lightning_hessian.report.runs import describe_variant, softplus_variant

    finals: dict = {}
    for seed in SEEDS:
        for batch_size in (128, 16384):
            finals[(None, batch_size, seed)] = _write_run(
                tmp_path / "runs" / "recipe" / f"bs{batch_size}_seed{seed}", batch_size=batch_size, seed=seed,
                variant="standard",
            )  # fmt: skip
            for beta in (1.0, 10.0):
                variant = describe_variant({"activation": "softplus", "softplus_beta": beta})
                assert variant is not None and softplus_variant(variant) == ("standard", beta)
                finals[(beta, batch_size, seed)] = _write_run(
                    tmp_path / "runs" / f"softplus_beta={beta:g}" / f"bs{batch_size}_seed{seed}",
                    batch_size=batch_size, seed=seed, variant=variant, beta=beta,
                )  # fmt: skip
    assert softplus_variant("standard") is None and softplus_variant("fgsm ε=0.1, softplus β=5") == ("fgsm ε=0.1", 5.0)

    drawn = []
    save = figures._save

    def keep(figure, out_dir: Path, name: str) -> None:
        drawn.append(figure)
        save(figure, out_dir, name)

    monkeypatch.setattr(figures, "_save", keep)
    runs, _ = load_runs([tmp_path / "runs"])
    written = figures.plot_metrics_vs_softplus_beta(runs, tmp_path / "out")
    assert written is not None and (tmp_path / "out" / written.file_name).stat().st_size > 2000
    assert "ReLU network of the same training and batch size" in written.caption
    (figure,) = drawn
    (panel,) = [ax for ax in figure.axes if ax.get_ylabel() == "λ₁(θ), train"]
    lines = {line.get_label(): line for line in panel.lines if not line.get_label().startswith("_")}
    curves = {container.get_label(): container.lines[0] for container in panel.containers}  # errorbar's data line
    for batch_size in (128, 16384):
        softplus = curves[f"softplus, B={batch_size}"]
        assert list(softplus.get_xdata()) == [1.0, 10.0]
        expected = [np.mean([finals[(beta, batch_size, s)]["hessian/eig_1"] for s in SEEDS]) for beta in (1.0, 10.0)]
        assert list(softplus.get_ydata()) == pytest.approx(expected)
        relu = np.mean([finals[(None, batch_size, s)]["hessian/eig_1"] for s in SEEDS])
        assert list(lines[f"ReLU (β=∞), B={batch_size}"].get_ydata()) == pytest.approx([relu, relu])
    assert panel.get_xscale() == "log"

    # without softplus runs there is nothing to draw, and the report says so
    plain = [run for run in runs if softplus_variant(run.variant) is None]
    assert figures.plot_metrics_vs_softplus_beta(plain, tmp_path / "plain") is None
    out = tmp_path / "report"
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "](metrics_vs_softplus_beta.png)" in (out / "report.md").read_text()
    # each softplus network gets the paper's batch-size claims: the growth of λ₁ with B holds at every beta
    for beta in ("1", "10"):
        (top,) = _claims(summary, "Large batches converge to points of larger curvature: top", f"softplus β={beta},")
        assert top["verdict"] == HOLDS


def test_variant_figures_draw_one_legend_beside_the_panels(
    study: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A legend of every variant in each panel hides the data (ten variants in the lenet5 study):
    figures whose lines are coloured by variant draw one legend, right of the panels, each variant once."""
    from lightning_hessian.report import figures, robustness_figures
    from lightning_hessian.report.build import load_runs
    from lightning_hessian.report.tables import report_columns

    drawn = []
    save = figures._save

    def keep(figure, out_dir: Path, name: str) -> None:
        drawn.append(figure)
        save(figure, out_dir, name)

    monkeypatch.setattr(figures, "_save", keep)
    monkeypatch.setattr(robustness_figures, "_save", keep)
    runs, _ = load_runs([study[0]])
    assert figures.plot_training_vs_batch_size(runs, tmp_path, report_columns(runs)) is not None
    assert robustness_figures.plot_median_norms_vs_batch_size(runs, tmp_path) is not None
    for figure in drawn:
        panels = [ax for ax in figure.axes if ax.get_visible()]
        assert panels and all(ax.get_legend() is None for ax in panels)
        (legend,) = figure.legends
        labels = [text.get_text() for text in legend.get_texts()]
        assert labels == ["standard", "fgsm ε=0.1", "gaussian_noise ε=0.1"]
        # the panels keep their width: the figure grew by the legend's
        assert figure.get_figwidth() > 4.8 * min(len(panels), 3)


def test_robust_accuracy_panels_are_a_variant_by_attack_grid(
    study: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row per training variant, a column per attack: a column compares one attack across trainings,
    and the batch sizes' legend is drawn once, beside the grid."""
    from lightning_hessian.report import robustness_figures
    from lightning_hessian.report.build import load_runs

    drawn = []
    monkeypatch.setattr(robustness_figures, "_save", lambda figure, out_dir, name: drawn.append(figure))
    runs, _ = load_runs([study[0]])
    assert robustness_figures.plot_robust_accuracy_vs_epsilon(runs, tmp_path) is not None
    (figure,) = drawn
    panels = [ax for ax in figure.axes if ax.get_visible()]
    variant_of_row: dict[int, set[str]] = defaultdict(set)
    attack_of_column: dict[int, set[str]] = defaultdict(set)
    for ax in panels:
        variant, attack = ax.get_title().split("\n")
        spec = ax.get_subplotspec()
        variant_of_row[spec.rowspan.start].add(variant)
        attack_of_column[spec.colspan.start].add(attack)
        assert ax.get_legend() is None
    assert [variants for _, variants in sorted(variant_of_row.items())] == [
        {"standard training"}, {"fgsm ε=0.1 training"}, {"gaussian_noise ε=0.1 training"}
    ]  # fmt: skip
    assert len(attack_of_column) >= 2 and all(len(attacks) == 1 for attacks in attack_of_column.values())
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [f"B={b}" for b in BATCH_SIZES]


def test_figures_share_a_quantitys_axis_and_name_the_attack_norm(
    study: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a reviewer compares is drawn on one scale: a quantity at the train and the test split on
    one y axis, the 2-D surfaces on a log colour scale once the loss spans a decade; the spectral
    density with one legend and every panel's tick labels; each robust-accuracy
    panel says which norm ε bounds; an interpolation shows each seed, not a band a log axis clips; the
    thresholds of λ_min/λ₁ and of the stability ratio are drawn in their panels."""
    from lightning_hessian.report import figures, landscape_figures, robustness_figures, spectrum_figures
    from lightning_hessian.report.artifacts import find_interpolations
    from lightning_hessian.report.build import load_runs
    from lightning_hessian.report.tables import report_columns

    drawn: dict[str, object] = {}
    for module in (figures, landscape_figures, robustness_figures, spectrum_figures):
        monkeypatch.setattr(module, "_save", lambda figure, out_dir, name: drawn.__setitem__(name, figure))
    runs, _ = load_runs([study[0]])
    assert figures.plot_metrics_vs_batch_size(runs, tmp_path, report_columns(runs)) is not None
    panels = {ax.get_ylabel(): ax for ax in drawn["metrics_vs_batch_size.png"].axes if ax.get_visible()}
    train, test = panels["λ₁(θ), train"], panels["λ₁(θ), test"]
    assert train.get_ylim() == test.get_ylim() and train.get_yscale() == test.get_yscale()
    # the test λ₁ is 1.5 x the train one in these runs: apart, each panel would have its own range
    assert max(line.get_ydata().max() for line in test.lines) > train.get_ylim()[0] * 1.5
    # the thresholds a reader compares with, dotted: the saddle convention and the edge of stability
    for title, threshold in (("λ_min/λ₁, train", -0.1), ("λ₁/stability limit, train", 1.0)):
        dotted = [line for line in panels[title].lines if line.get_linestyle() == ":"]
        assert [tuple(line.get_ydata()) for line in dotted] == [(threshold, threshold)], title
        assert panels[title].get_ylim()[0] < threshold < panels[title].get_ylim()[1]

    assert robustness_figures.plot_robust_accuracy_vs_epsilon(runs, tmp_path) is not None
    for ax in (ax for ax in drawn["robust_accuracy_vs_epsilon.png"].axes if ax.get_visible()):
        attack = ax.get_title().split("\n")[1].split(",")[0]
        assert ("‖δ‖∞ ≤ ε" if attack in ("fgsm", "linf_pgd") else "‖δ‖₂ ≤ ε") in ax.get_xlabel()

    # four variants: a 2 x 3 grid with two empty cells, above which matplotlib hides shared tick labels
    extra = [dataclasses.replace(run, variant="softplus") for run in runs if run.variant == "standard"]
    assert spectrum_figures.plot_spectral_density([*runs, *extra], tmp_path) is not None
    density = drawn["spectral_density.png"]
    density_panels = [ax for ax in density.axes if ax.get_visible()]
    assert all(tick.label1.get_visible() for ax in density_panels for tick in ax.xaxis.get_major_ticks())
    assert len(density.legends) == 1 and all(ax.get_legend() is None for ax in density_panels)

    assert landscape_figures.plot_landscapes(runs, tmp_path) is not None
    (surface_name,) = [name for name in drawn if name.startswith("landscape_surface_")]
    surface_panels = [ax for ax in drawn[surface_name].axes if ax.get_title().startswith("B=")]
    # the synthetic losses span 0.1 to 3.85 at B = 128: more than a decade, less than two
    assert surface_panels and all(
        type(ax.collections[0].norm).__name__ == "LogNorm" and ax.get_xlabel() == "a: step along eig1"
        for ax in surface_panels
    )

    assert landscape_figures.plot_interpolations(find_interpolations([study[0]], runs), tmp_path) is not None
    interpolation = drawn[next(name for name in drawn if name.startswith("interpolation_0"))]
    eigenvalue_panel = next(ax for ax in interpolation.axes if ax.get_ylabel().startswith("top Hessian"))
    assert len(eigenvalue_panel.lines) == len(SEEDS) + 1 + 2  # each seed, the mean, and the lines at α = 0, 1
    assert not eigenvalue_panel.collections  # no ± std band
