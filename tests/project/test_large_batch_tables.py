"""``benchmarks/large_batch_tables.py``: the large-batch evidence tables are read from the runs
(TensorBoard events plus ``sweep.json``), aggregated over seeds, and the test run's analysis, logged
at the last training step, is kept out of the training curves by its wall time."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import load_benchmark
from torch.utils.tensorboard import SummaryWriter


@pytest.fixture(scope="module")
def tables():
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield load_benchmark("large_batch_tables", monkeypatch)


def write_run(
    root: Path,
    sweep: str,
    batch: int,
    seed: int,
    *,
    test_acc: float | None,
    start: float,
    scalars: dict[str, list[tuple[int, float, float]]],
    fit_seconds: float = 100.0,
    status: str = "finished",
) -> Path:
    """A run as hessian-sweep leaves it: events (tag -> (step, seconds after start, value)) and sweep.json."""
    run = root / sweep / f"bs{batch}_seed{seed}"
    run.mkdir(parents=True)
    writer = SummaryWriter(str(run))
    for tag, points in scalars.items():
        for step, offset, value in points:
            writer.add_scalar(tag, value, step, walltime=start + offset)
    if test_acc is not None:  # the test run: after the fit, its own analysis at the last step
        writer.add_scalar("test/acc", test_acc, 0, walltime=start + fit_seconds + 5)
        last = max(step for points in scalars.values() for step, _, _ in points)
        writer.add_scalar("hessian/eig_1", 999.0, last, walltime=start + fit_seconds + 3)
        writer.add_scalar("hessian/stability", float("nan"), last, walltime=start + fit_seconds + 3)
    writer.close()
    record = {
        "sweep": sweep,
        "batch_size": batch,
        "seed": seed,
        "status": status,
        "fit_returncode": 0,
        "started": datetime.fromtimestamp(start, timezone.utc).isoformat(),
        "fit_seconds": fit_seconds,
    }
    (run / "sweep.json").write_text(json.dumps(record))
    return run


def test_tables_aggregate_seeds_and_keep_the_test_analysis_out(tmp_path: Path, tables) -> None:
    start = 1.8e9
    for seed, acc in enumerate([0.90, 0.92]):
        write_run(
            tmp_path,
            "paper_fashion_mnist_lenet5",
            128,
            seed,
            test_acc=acc,
            start=start + 1000 * seed,
            scalars={
                "train/loss": [(421, 10, 0.5), (841, 20, 0.1 + seed)],
                "train/loss_step": [(840, 19, 0.1)],
                "hessian/eig_1": [(421, 11, 40.0), (841, 21, 50.0)],
                "hessian/stability": [(421, 11, 0.2), (841, 21, 0.25)],
                "lr-SGD": [(0, 1, 0.02)],
            },
        )
    write_run(
        tmp_path,
        "sqrt_lr_rule",
        8192,
        0,
        test_acc=None,
        start=start,
        scalars={
            "train/loss": [(6, 10, 2.3)],
            "val/acc": [(6, 10, 0.1)],
            "lr-SGD": [(0, 1, 0.4)],
            "hessian/eig_1": [(2, 3, 30.0), (4, 5, 2.0)],
            "hessian/stability": [(2, 3, 3.16), (4, 5, 0.21)],
        },
    )
    write_run(
        tmp_path,
        "absa",
        128,
        0,
        test_acc=0.91,
        start=start,
        scalars={
            "train/loss": [(100, 10, 0.2)],
            "absa/steps": [(0, 1, 0.0), (100, 10, 4321.0)],
            "absa/batch_size": [(0, 1, 128.0), (60, 6, 512.0), (100, 10, 1024.0)],
        },
    )
    write_run(
        tmp_path, "absa", 128, 1, test_acc=None, start=start, status="running", scalars={"train/loss": [(5, 1, 1.0)]}
    )

    rows = tables.load_rows([str(tmp_path)])
    recipe = tables.aggregate(rows, tables.RECIPE)[128]
    assert recipe["runs"] == 2 and recipe["seeds"] == [0, 1]
    assert math.isclose(recipe["test_acc_mean"], 0.91, rel_tol=1e-6) and math.isclose(
        recipe["test_acc_sd"], 0.0141421, rel_tol=1e-4
    )
    assert recipe["steps_mean"] == 842  # the last training step + 1
    lenet = next(r for r in rows if r.sweep == tables.RECIPE and r.seed == 0)
    assert [v for _, v in lenet.eig_1_series] == [40.0, 50.0]  # the test run's 999 is not a training point
    assert lenet.stability_max == 0.25

    sqrt_rule = next(r for r in rows if r.sweep == tables.SQRT_RULE)
    assert (sqrt_rule.lr, sqrt_rule.stability_first, sqrt_rule.stability_first_step) == (
        pytest.approx(0.4),
        pytest.approx(3.16),
        2,
    )
    assert sqrt_rule.stability_max == pytest.approx(3.16)

    absa = tables.aggregate(rows, tables.ABSA)[128]
    assert (
        absa["runs"] == 1 and absa["steps_mean"] == 4321 and absa["largest_batch_trained"] == [512.0]
    )  # the running seed is left out

    out = tmp_path / "out"
    assert tables.main([str(tmp_path), "--out", str(out)]) == 0
    text = (out / "tables.md").read_text()
    assert "| 128 | 91.0 ± 1.4 (n=2) | 90.0 / 92.0 |" in text
    # 1024 was set after the last epoch: the largest batch trained with is 512
    assert "absa from B = 128 | 91.0 (n=1) | 4321 | 512 |" in text
    assert "| 8192 | 0 | 0.4 | 30 | 3.16 (step 2) | 3.16 | 10.0 | yes |" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["128"]["runs"] == 2
    assert (
        len((out / "runs.csv").read_text().strip().splitlines()) == 1 + 5
    )  # header and every run, unfinished included
