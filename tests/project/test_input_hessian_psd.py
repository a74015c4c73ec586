"""benchmarks/input_hessian_psd.py: the PSD check of the ReLU input Hessian, measured against the exact
float64 Hessian, and incremental (a run measured before keeps its row, in its folder, and needs no
checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from helpers import REPO_ROOT

from lightning_hessian.data.datasets import DEBIAN_FASHION_MNIST_DIR
from lightning_hessian.models import ImageClassifier

SCRIPT = REPO_ROOT / "benchmarks" / "input_hessian_psd.py"

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed"
)


def _save_model(run_dir: Path, seed: int) -> None:
    """An untrained lenet5, initialised with ``seed``, as the run's last checkpoint."""
    pl.seed_everything(seed)
    model = ImageClassifier(arch="lenet5", input_shape=(1, 28, 28))
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.strategy.connect(model)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def _finished_run(root: Path, seed: int) -> Path:
    """A finished sweep run of an untrained lenet5 with its checkpoint and hparams.yaml."""
    run_dir = root / "recipe" / f"bs128_seed{seed}"
    _save_model(run_dir, seed)
    (run_dir / "hparams.yaml").write_text(yaml.safe_dump({"activation": "relu", "adversarial": None}))
    (run_dir / "sweep.json").write_text(json.dumps({"status": "finished", "batch_size": 128, "seed": seed}))
    return run_dir


def _psd(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), "--num-samples", "8",
         "--max-steps", "40", "--all-seeds", "--exact-check", "1", *extra],
        capture_output=True, text=True, timeout=300, cwd=root.parent,
    )  # fmt: skip


def test_measured_runs_keep_their_rows_without_checkpoints(tmp_path: Path) -> None:
    root, out = tmp_path / "runs", tmp_path / "psd.json"
    first, second = _finished_run(root, 0), _finished_run(root, 1)
    result = _psd(root, out)
    assert result.returncode == 0, result.stderr
    rows = {row["run"]: row for row in json.loads(out.read_text())["runs"]}
    assert set(rows) == {str(first), str(second)}
    for row in rows.values():
        # Lanczos against the exact float64 input Hessian; ReLU: PSD up to round-off
        assert row["exact_check"]["max_rel_error_max"] < 1e-6 and row["exact_check"]["max_rel_error_min"] < 1e-6
        assert row["fraction_negative"] == 0.0 and row["mean_lambda_max"] > 0
    assert result.stdout.count("| recipe/bs128_seed") == 2
    assert json.loads((first / "input_hessian_psd.json").read_text())["row"] == rows[str(first)]

    # the checkpoints gone (another machine), a new run without one: the rows stay as they were, the
    # new run is named with the fix, and the exit status says something is missing
    for run_dir in (first, second):
        (run_dir / "checkpoints" / "last.ckpt").unlink()
    third = root / "recipe" / "bs128_seed2"
    third.mkdir()
    (third / "sweep.json").write_text(json.dumps({"status": "finished", "batch_size": 128, "seed": 2}))
    result = _psd(root, out)
    assert result.returncode == 1
    assert f"{third}: not measured, no checkpoint" in result.stderr and "rerun its sweep" in result.stderr
    assert {row["run"]: row for row in json.loads(out.read_text())["runs"]} == rows
    # the rows are the runs': a new --out file gets them too
    assert _psd(root, tmp_path / "elsewhere.json").returncode == 1
    assert json.loads((tmp_path / "elsewhere.json").read_text())["runs"] == json.loads(out.read_text())["runs"]
    assert result.stdout.count("| recipe/bs128_seed") == 2

    # --redo measures again what has a checkpoint (another model in the second run) and keeps the rest
    (third / "sweep.json").unlink()
    _save_model(second, seed=11)
    result = _psd(root, out, "--redo")
    assert result.returncode == 0, result.stderr
    assert f"{first}: no checkpoint to measure again" in result.stderr
    again = {row["run"]: row for row in json.loads(out.read_text())["runs"]}
    assert again[str(first)] == rows[str(first)]
    assert again[str(second)]["mean_lambda_max"] != pytest.approx(rows[str(second)]["mean_lambda_max"], rel=1e-3)
