"""The large-batch evidence tables (README "Large batches that train") from the runs of
``benchmarks/run_large_batch.sh``.

    python benchmarks/large_batch_tables.py runs/large_batch --pilot runs/large_batch_pilot \\
        --out docs/results/large_batch

Reads every run under the given folders (TensorBoard events plus ``sweep.json``; see
:mod:`lightning_hessian.report.runs`) and writes ``tables.md`` (the four tables below),
``summary.json`` (the same numbers, per run and aggregated) and ``runs.csv`` (one row per run):

1. *The authors' recipe at every batch size* (sweep ``paper_fashion_mnist_lenet5``): test accuracy
   mean and standard deviation over seeds, final training loss, optimizer steps, fit time.
2. *The previous learning-rate rule* (sweep ``sqrt_lr_rule``, ``lr = 0.05 sqrt(B / 128)``): the
   top eigenvalue and the stability ratio ``eig_1 * lr / (2 (1 + momentum))`` at the first
   analysis and their maximum, and the final validation accuracy (chance is 10 %).
3. *LARS against SGD* (sweep ``lars`` against the recipe's runs at the same batch sizes), plus the
   pilot that chose LARS's learning rate.
4. *ABSA against fixed batches* (sweeps ``absa*`` against the recipe's smallest and largest batch):
   test accuracy, optimizer steps (``absa/steps``, else the last training step), the largest batch
   trained with.

Numbers are read, never typed: a run that has not finished is listed as missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from lightning_hessian.report.events import find_run_dirs
from lightning_hessian.report.runs import Run, load_run

RECIPE = "paper_fashion_mnist_lenet5"
SQRT_RULE = "sqrt_lr_rule"
LARS = "lars"
ABSA = "absa"
CHANCE = 0.1


@dataclass
class RunRow:
    """What the tables need of one run."""

    sweep: str
    batch_size: int | None
    seed: int | None
    finished: bool
    test_acc: float | None
    val_acc: float | None
    train_loss: float | None
    steps: int | None
    fit_seconds: float | None
    lr: float | None = None
    largest_batch_trained: float | None = None
    eig_1_first: float | None = None
    stability_first: float | None = None
    stability_first_step: int | None = None
    stability_max: float | None = None
    eig_1_series: list[tuple[int, float]] = field(default_factory=list)
    stability_series: list[tuple[int, float]] = field(default_factory=list)
    path: str = ""


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _sweep_record(run: Run) -> dict:
    path = run.path / "sweep.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _training_points(run: Run, record: dict, tag: str) -> list[tuple[int, float]]:
    """``tag``'s points logged during fit, by step.

    The test run logs its own analysis (on test samples) at the checkpoint's step, the fit's last
    step, so the report's reader (one point per step, the last written) keeps the test value there.
    The raw events are read here instead, and points written after the fit's end (``fit_ended`` in
    ``sweep.json``, else ``started`` plus ``fit_seconds``) are left out.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    accumulator.Reload()
    if tag not in accumulator.Tags().get("scalars", []):
        return []
    events = sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time)
    fit_end = None
    if record.get("fit_ended"):  # hessian-sweep records it (a resumed run's fit spans attempts)
        fit_end = datetime.fromisoformat(record["fit_ended"]).timestamp()
    elif "started" in record and record.get("fit_seconds") is not None:
        fit_end = datetime.fromisoformat(record["started"]).timestamp() + float(record["fit_seconds"])
    if fit_end is not None:
        events = [e for e in events if e.wall_time <= fit_end]
    by_step = {int(e.step): float(e.value) for e in events}  # a resumed run re-logs a step: keep the last
    return sorted(by_step.items())


def _largest_batch_trained(run: Run) -> float | None:
    """The largest batch an ABSA run trained with: ``absa/batch_size`` is logged after each epoch's
    decision (what the next epoch starts with), so the value logged after the last epoch never
    trained and is left out."""
    points = run.events.scalars.get("absa/batch_size", [])
    if not points:
        return None
    last_step = max(p.step for p in points)
    trained = [p.value for p in points if p.step < last_step]
    return max(trained) if trained else points[0].value


def run_row(run: Run) -> RunRow:
    """The table fields of ``run``."""
    events = run.events
    record = _sweep_record(run)
    train_steps = [p.step for tag in ("train/loss_step", "train/loss") for p in events.scalars.get(tag, [])]
    absa_steps = events.final("absa/steps")
    steps = int(absa_steps) if absa_steps is not None else (max(train_steps) + 1 if train_steps else None)
    lr_points = [p for tag, points in events.scalars.items() if tag.startswith("lr-") for p in points]
    eig = [(s, v) for s, v in _training_points(run, record, "hessian/eig_1") if math.isfinite(v)]
    stability = [(s, v) for s, v in _training_points(run, record, "hessian/stability") if math.isfinite(v)]
    return RunRow(
        sweep=run.path.parent.name,
        batch_size=run.batch_size,
        seed=run.seed,
        finished=run.finished and record.get("fit_returncode", 0) == 0,
        test_acc=_finite(events.final("test/acc")),
        val_acc=_finite(events.final("val/acc")),
        train_loss=_finite(events.final("train/loss")),
        steps=steps,
        fit_seconds=record.get("fit_seconds"),
        lr=lr_points[0].value if lr_points else None,
        largest_batch_trained=_largest_batch_trained(run),
        eig_1_first=eig[0][1] if eig else None,
        stability_first=stability[0][1] if stability else None,
        stability_first_step=stability[0][0] if stability else None,
        stability_max=max(v for _, v in stability) if stability else None,
        eig_1_series=eig,
        stability_series=stability,
        path=run.name,  # sweep/run, relative to the folders read
    )


def _mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    sd = statistics.stdev(present) if len(present) > 1 else 0.0
    return statistics.fmean(present), sd, len(present)


def _pct(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "missing"
    return f"{100 * mean:.1f} ± {100 * sd:.1f} (n={n})" if n > 1 else f"{100 * mean:.1f} (n=1)"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _by_batch(rows: Sequence[RunRow], sweep: str) -> dict[int, list[RunRow]]:
    groups: dict[int, list[RunRow]] = {}
    for row in rows:
        if row.sweep == sweep and row.finished and row.batch_size is not None:
            groups.setdefault(row.batch_size, []).append(row)
    return dict(sorted(groups.items()))


def aggregate(rows: Sequence[RunRow], sweep: str) -> dict[int, dict[str, float | int | None]]:
    """Per batch size of ``sweep``: mean/sd/n of test accuracy, mean steps, train loss, fit seconds."""
    out = {}
    for batch, group in _by_batch(rows, sweep).items():
        mean, sd, n = _mean_sd([r.test_acc for r in group])
        out[batch] = {
            "test_acc_mean": mean,
            "test_acc_sd": sd,
            "runs": n,
            "seeds": sorted(r.seed for r in group if r.seed is not None),
            "test_acc": [r.test_acc for r in group],
            "val_acc_mean": _mean_sd([r.val_acc for r in group])[0],
            "train_loss_mean": _mean_sd([r.train_loss for r in group])[0],
            "steps_mean": _mean_sd([r.steps for r in group])[0],
            "fit_seconds_mean": _mean_sd([r.fit_seconds for r in group])[0],
            "largest_batch_trained": [r.largest_batch_trained for r in group],
        }
    return out


def recipe_table(rows: Sequence[RunRow]) -> list[str]:
    body = []
    for batch, agg in aggregate(rows, RECIPE).items():
        body.append(
            [
                str(batch),
                _pct(agg["test_acc_mean"], agg["test_acc_sd"], agg["runs"]),
                " / ".join(f"{100 * v:.1f}" for v in agg["test_acc"] if v is not None),
                _num(agg["train_loss_mean"]),
                f"{agg['steps_mean']:.0f}",
                f"{agg['fit_seconds_mean']:.0f}",
            ]
        )
    return _table(["B", "test acc % (mean ± sd)", "per seed", "train loss", "optimizer steps", "fit s"], body)


def sqrt_rule_table(rows: Sequence[RunRow]) -> list[str]:
    body = []
    for batch, group in _by_batch(rows, SQRT_RULE).items():
        for row in sorted(group, key=lambda r: r.seed or 0):
            diverged = row.val_acc is not None and row.val_acc < CHANCE + 0.05
            body.append(
                [
                    str(batch),
                    str(row.seed),
                    _num(row.lr),
                    _num(row.eig_1_first),
                    f"{_num(row.stability_first)} (step {row.stability_first_step})"
                    if row.stability_first is not None
                    else "—",
                    _num(row.stability_max),
                    f"{100 * row.val_acc:.1f}" if row.val_acc is not None else "—",
                    "yes" if diverged else "no",
                ]
            )
    return _table(["B", "seed", "lr", "eig_1 first", "stability first", "stability max", "val acc %", "diverged"], body)


def lars_table(rows: Sequence[RunRow], pilot: Sequence[RunRow]) -> list[str]:
    sgd, lars = aggregate(rows, RECIPE), aggregate(rows, LARS)
    body = []
    for batch in sorted(lars):
        body.append(
            [
                str(batch),
                _pct(
                    sgd.get(batch, {}).get("test_acc_mean"),
                    sgd.get(batch, {}).get("test_acc_sd"),
                    sgd.get(batch, {}).get("runs", 0),
                ),
                _pct(lars[batch]["test_acc_mean"], lars[batch]["test_acc_sd"], lars[batch]["runs"]),
            ]
        )
    lines = _table(["B", "SGD (recipe) test acc %", "LARS test acc %"], body)
    if pilot:
        lines += ["", "LARS learning-rate pilot (B = 8192, seed 0, 5 epochs, no analysis):", ""]
        pilot_rows = [
            [
                r.sweep,
                _num(r.lr),
                (f"{100 * r.val_acc:.1f}" if r.val_acc is not None else "—")
                + ("" if r.finished else " (not finished)"),
            ]
            for r in sorted(pilot, key=lambda r: r.lr or 0.0)
        ]
        lines += _table(["pilot run", "lr", "val acc % after 5 epochs"], pilot_rows)
    return lines


def absa_table(rows: Sequence[RunRow]) -> list[str]:
    fixed = aggregate(rows, RECIPE)
    entries = [(f"fixed B = {b}", fixed[b]) for b in sorted({min(fixed), max(fixed)})] if fixed else []
    for sweep in sorted({r.sweep for r in rows if r.sweep.startswith(ABSA)}):
        entries += [(f"{sweep} from B = {b}", agg) for b, agg in aggregate(rows, sweep).items()]
    body = []
    for label, agg in entries:
        sizes = [s for s in agg["largest_batch_trained"] if s is not None]
        body.append(
            [
                label,
                _pct(agg["test_acc_mean"], agg["test_acc_sd"], agg["runs"]),
                f"{agg['steps_mean']:.0f}",
                " / ".join(f"{s:.0f}" for s in sizes) if sizes else "—",
                f"{agg['fit_seconds_mean']:.0f}",
            ]
        )
    return _table(["training", "test acc % (mean ± sd)", "optimizer steps", "largest B trained", "fit s"], body)


def load_rows(folders: Sequence[str]) -> list[RunRow]:
    return [run_row(load_run(path)) for path in find_run_dirs(folders)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders holding the study's runs")
    parser.add_argument("--pilot", nargs="*", default=[], help="folders holding the LARS pilot runs")
    parser.add_argument("--out", default="docs/results/large_batch")
    args = parser.parse_args(argv)
    rows = load_rows(args.runs)
    pilot = load_rows(args.pilot) if args.pilot else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ("The authors' recipe at every batch size (SGD, lr 0.02 at every B)", recipe_table(rows)),
        ("The previous rule lr = 0.05 sqrt(B/128): top eigenvalue and stability ratio", sqrt_rule_table(rows)),
        ("LARS against SGD", lars_table(rows, pilot)),
        ("ABSA against fixed batches", absa_table(rows)),
    ]
    text = [
        "# Large batches: tables",
        "",
        f"Generated by `python benchmarks/large_batch_tables.py {' '.join(args.runs)}"
        + (f" --pilot {' '.join(args.pilot)}" if args.pilot else "")
        + f" --out {args.out}`.",
        "",
    ]
    for title, lines in sections:
        text += [f"## {title}", "", *lines, ""]
    (out / "tables.md").write_text("\n".join(text))
    summary = {
        "recipe": aggregate(rows, RECIPE),
        "sqrt_lr_rule": aggregate(rows, SQRT_RULE),
        "lars": aggregate(rows, LARS),
        **{sweep: aggregate(rows, sweep) for sweep in sorted({r.sweep for r in rows if r.sweep.startswith(ABSA)})},
        "runs": [asdict(r) for r in rows],
        "pilot": [asdict(r) for r in pilot],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    fields = [f for f in RunRow.__dataclass_fields__ if not f.endswith("_series")]
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows + pilot:
            writer.writerow({k: v for k, v in asdict(row).items() if k in fields})
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
