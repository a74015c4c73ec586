"""The ``hessian-landscape interpolate`` console script on real ``hessian-train`` checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import QUICKSTART
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_hessian.cli.landscape import load_state_dict, main, select_samples
from lightning_hessian.cli.train import build_from_config
from lightning_hessian.cli.train import main as train_main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A small-batch and a large-batch model, one short epoch each, trained by hessian-train."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for name, batch in (("small", 32), ("large", 256)):
        # the small-batch run also carries the landscape callback, added on the command line
        landscape = (
            [
                "--trainer.callbacks+=lightning_hessian.callbacks.landscape.LossLandscapeCallback",
                "--trainer.callbacks.curves=[gradient, random1]",
                "--trainer.callbacks.surfaces=[[random1, random2]]",
                "--trainer.callbacks.curve_points=5",
                "--trainer.callbacks.surface_points=5",
                "--trainer.callbacks.num_samples=128",
            ]
            if name == "small"
            else []
        )
        train_main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--trainer.max_epochs=1",
                "--trainer.limit_train_batches=4",
                "--trainer.limit_val_batches=1",
                f"--trainer.logger.init_args.save_dir={root}",
                f"--trainer.logger.init_args.name={name}",
                f"--data.init_args.batch_size={batch}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                *landscape,
            ]
        )
        paths.append(next((root / name).rglob("*.ckpt")))
    return paths[0], paths[1]


def test_quickstart_run_with_the_callback_shows_the_figures_in_tensorboard(checkpoints):
    run_dir = checkpoints[0].parents[1]  # <save_dir>/small/version_0/checkpoints/<file>.ckpt
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert {"landscape/curves", "landscape/contour/random1_random2", "landscape/surface3d/random1_random2"} <= set(
        events.Tags()["images"]
    )
    assert "landscape/rise/gradient" in events.Tags()["scalars"]
    assert (run_dir / "landscape" / "epoch_000_surface_random1_random2.csv").exists()


def test_interpolation_endpoints_are_the_checkpoints_own_losses(checkpoints, tmp_path):
    ckpt_a, ckpt_b = checkpoints
    out = tmp_path / "out"
    code = main(
        [
            "interpolate",
            "--ckpt-a",
            str(ckpt_a),
            "--ckpt-b",
            str(ckpt_b),
            "--config",
            str(QUICKSTART),
            "--num",
            "5",
            "--num-samples",
            "200",
            "--batch-size",
            "64",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--batch-norm",  # the saved statistics along the path: the end points are the checkpoints
            "interpolate",
        ]
    )
    assert code == 0
    assert (out / "interpolation.png").read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((out / "interpolation.csv").open()))
    assert [float(r["alpha"]) for r in rows] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    summary = json.loads((out / "interpolation.json").read_text())
    assert summary["num_samples"] == {"train": 200, "test": 200}

    # an odd grid that misses alpha = 0 and 1 still evaluates both models
    odd = tmp_path / "odd"
    assert (
        main(
            [
                "interpolate",
                "--ckpt-a",
                str(ckpt_a),
                "--ckpt-b",
                str(ckpt_b),
                "--config",
                str(QUICKSTART),
                "--num",
                "4",
                "--num-samples",
                "32",
                "--batch-size",
                "64",
                "--output-dir",
                str(odd),
                "--device",
                "cpu",
                "--splits",
                "test",
            ]
        )
        == 0
    )
    odd_rows = list(csv.DictReader((odd / "interpolation.csv").open()))
    odd_alphas = [float(r["alpha"]) for r in odd_rows]
    assert 0.0 in odd_alphas and 1.0 in odd_alphas and odd_alphas == sorted(odd_alphas) and len(odd_alphas) == 6

    # oracle: each checkpoint loaded into the model the config builds, evaluated plainly
    model, datamodule = build_from_config(QUICKSTART)
    datamodule.setup("fit")
    for split in ("train", "test"):
        x, y = select_samples(datamodule, split, 200, 0)
        for ckpt, row in ((ckpt_a, rows[1]), (ckpt_b, rows[3])):
            model.load_state_dict(load_state_dict(ckpt))
            model.eval()
            with torch.no_grad():
                logits = model(x)
            assert float(row[f"{split}_loss"]) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
            assert float(row[f"{split}_accuracy"]) == pytest.approx((logits.argmax(1) == y).float().mean().item())
    # the two models differ, and so do their losses
    assert float(rows[1]["train_loss"]) != pytest.approx(float(rows[3]["train_loss"]), rel=1e-3)


def test_architecture_mismatch_is_a_clear_error(checkpoints, tmp_path, capsys):
    ckpt_a, ckpt_b = checkpoints
    code = main(
        [
            "interpolate",
            "--ckpt-a",
            str(ckpt_a),
            "--ckpt-b",
            str(ckpt_b),
            "--config",
            str(QUICKSTART),
            "--model.batch_norm=false",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "does not match the model's architecture" in err and "unexpected keys" in err and "running_mean" in err
    assert "Traceback" not in err


class NotAllowListed:
    """An object that ``torch.load(weights_only=True)`` refuses to unpickle."""


def test_unsafe_checkpoint_is_refused_unless_trusted(checkpoints, tmp_path, capsys):
    state = load_state_dict(checkpoints[0])
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": state, "extra": NotAllowListed()}, unsafe)
    args = [
        "interpolate",
        "--ckpt-a",
        str(unsafe),
        "--ckpt-b",
        str(checkpoints[1]),
        "--config",
        str(QUICKSTART),
        "--num",
        "2",
        "--alpha-min",
        "0",
        "--alpha-max",
        "1",
        "--num-samples",
        "32",
        "--splits",
        "test",
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert "--trust-checkpoints" in capsys.readouterr().err
    assert main([*args, "--trust-checkpoints"]) == 0


def test_the_old_module_path_still_runs_with_a_deprecation_warning(checkpoints, tmp_path):
    """``python -m lightning_hessian.interpolate`` (the module before ``lightning_hessian.cli.landscape``)
    warns and runs the same command."""
    import subprocess
    import sys

    ckpt_a, ckpt_b = checkpoints
    out = tmp_path / "old"
    result = subprocess.run(
        [
            sys.executable, "-m", "lightning_hessian.interpolate", "interpolate", "--ckpt-a", str(ckpt_a),
            "--ckpt-b", str(ckpt_b), "--config", str(QUICKSTART), "--num", "2", "--alpha-min", "0", "--alpha-max", "1",
            "--num-samples", "32", "--splits", "test", "--output-dir", str(out), "--device", "cpu",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lightning_hessian.interpolate is deprecated" in result.stderr
    assert "lightning_hessian.cli.landscape" in result.stderr
    assert [float(row["alpha"]) for row in csv.DictReader((out / "interpolation.csv").open())] == [0.0, 1.0]


def test_interpolation_json_names_the_eigenvalue_split(checkpoints, tmp_path):
    ckpt_a, ckpt_b = checkpoints
    out = tmp_path / "eig"
    assert main([
        "interpolate", "--ckpt-a", str(ckpt_a), "--ckpt-b", str(ckpt_b), "--config", str(QUICKSTART), "--num", "2",
        "--alpha-min", "0", "--alpha-max", "1", "--num-samples", "64", "--splits", "test", "train", "--eigenvalue",
        "--eig-tol", "0.01", "--output-dir", str(out), "--device", "cpu",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "interpolation.json").read_text())
    assert summary["eigenvalue_split"] == "test" and len(summary["top_eigenvalue"]) == 2
    assert all(value > 0 for value in summary["top_eigenvalue"])
    # the quickstart MLP has BatchNorm: by default its statistics are recomputed on the training samples
    assert (summary["batch_norm"], summary["batch_norm_samples"]) == ("recompute", 64)

    # 65 samples in micro-batches of 64: the last batch of one sample (no batch variance) is left out
    out = tmp_path / "odd_batch"
    assert main([
        "interpolate", "--ckpt-a", str(ckpt_a), "--ckpt-b", str(ckpt_b), "--config", str(QUICKSTART), "--num", "2",
        "--alpha-min", "0", "--alpha-max", "1", "--num-samples", "65", "--batch-size", "64", "--splits", "train",
        "--output-dir", str(out), "--device", "cpu",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "interpolation.json").read_text())
    assert (summary["batch_norm_samples"], summary["num_samples"]) == (64, {"train": 65})


def test_surface_of_a_checkpoint_along_its_top_eigenvectors(checkpoints, tmp_path):
    """``hessian-landscape surface``: the grid's centre is the checkpoint's own loss on each split,
    the directions are the top two Hessian eigenvectors of the training samples (the second
    difference along the first axis at the centre is about the top eigenvalue), files the report reads."""
    from lightning_hessian.cli.landscape import surface  # noqa: F401  (the library entry point exists)
    from lightning_hessian.landscape import load_landscape

    ckpt = checkpoints[0]
    out = tmp_path / "landscape"
    assert main([
        "surface", "--ckpt", str(ckpt), "--config", str(QUICKSTART), "--splits", "train", "test",
        "--num-samples", "128", "--points", "5", "--range", "0.02", "--batch-size", "64", "--output-dir", str(out),
        "--device", "cpu", "--label", "B=32",
    ]) == 0  # fmt: skip
    summary = json.loads((out / "surface.json").read_text())
    assert summary["directions"] == ["eig1", "eig2"] and summary["eigenvalue_split"] == "train"
    lambda_1, lambda_2 = summary["eigenvalues"]
    assert lambda_1 >= lambda_2
    model, datamodule = build_from_config(QUICKSTART)
    datamodule.setup("fit")
    datamodule.setup("test")
    model.load_state_dict(load_state_dict(ckpt))
    model.eval()
    for split in ("train", "test"):
        curves, surfaces, extra = load_landscape(out / f"surface_{split}.npz")
        (grid,) = surfaces
        assert not curves and str(extra["split"]) == split and grid.loss.shape == (5, 5)
        x, y = select_samples(datamodule, split, 128, 0)
        with torch.no_grad():
            assert grid.loss[2, 2] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
        assert (out / f"surface_{split}.png").read_bytes().startswith(b"\x89PNG")
    _, (train_grid,), _ = load_landscape(out / "surface_train.npz")
    h = train_grid.alphas[3] - train_grid.alphas[2]
    second_difference = (train_grid.loss[3, 2] + train_grid.loss[1, 2] - 2 * train_grid.loss[2, 2]) / h**2
    assert second_difference == pytest.approx(lambda_1, rel=0.05)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--points", "4"], "--points=4 must be an odd number"),
        (["--directions", "eig1", "eig1"], "two different directions"),
        (["--directions", "eig1", "grad"], "unknown direction 'grad'"),
        (["--range", "0"], "--range=0.0 must be > 0"),
    ],
)
def test_surface_bad_options_are_one_line_errors(checkpoints, tmp_path, capsys, arguments, message):
    code = main(
        [
            "surface",
            "--ckpt",
            str(checkpoints[0]),
            "--config",
            str(QUICKSTART),
            "--output-dir",
            str(tmp_path),
            *arguments,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
