"""Is the input Hessian of a trained network positive semidefinite? (Yao et al. 2018, Theorem 1.)

For a ReLU network with softmax cross-entropy, the Hessian of the loss with respect to the input
is ``J^T (diag(p) - p p^T) J`` almost everywhere (``J`` the logits' input Jacobian), which is
positive semidefinite, so the inner maximisation of robust training is saddle-free. With a smooth
activation (softplus) a second term ``sum_c dL/dz_c * d^2 z_c / dx^2`` appears and the Hessian can
be indefinite. ``HessianSpectrumCallback`` logs only the largest input-Hessian eigenvalue; this
script computes the smallest one, per sample, for the last checkpoint of finished sweep runs:

    python benchmarks/input_hessian_psd.py --root runs/results --out docs/results/mlp/input_hessian_psd.json

For every run directory below ``--root`` whose ``sweep.json`` says ``finished`` (seed 0 only,
unless ``--all-seeds``), it loads the last checkpoint, draws ``--num-samples`` test images
(seeded), and runs per-sample Lanczos in float64 for the largest and the smallest eigenvalue of
the input Hessian; for the first ``--exact-check`` samples it also forms the exact 784 x 784
Hessian (``torch.autograd.functional.hessian``, float64) and compares its extreme eigenvalues. It
prints a Markdown table and writes the numbers as JSON. A sample counts as "negative" when its
smallest eigenvalue is below ``-rel_tol`` times the run's mean largest eigenvalue (float64 Lanczos
on an exactly PSD matrix returns round-off of about 1e-15).

Incremental: each run's row is also written into the run's folder (``input_hessian_psd.json``, with
the settings), where a later call finds it, so a run is measured once and needs no checkpoint after
that: a study continued on another machine, whose earlier runs were restored without their
checkpoints, measures only its new runs (``--redo`` measures every run with a checkpoint again). A
run with neither a row nor a checkpoint is named on stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from lightning_hessian.curvature import input_curvature
from lightning_hessian.data import FashionMNIST
from lightning_hessian.models.classifier import ImageClassifier


def _runs(root: Path, all_seeds: bool) -> list[tuple[Path, dict]]:
    found = []
    for record_path in sorted(root.glob("*/bs*_seed*/sweep.json")):
        record = json.loads(record_path.read_text())
        if record.get("status") != "finished" or (not all_seeds and record.get("seed") != 0):
            continue
        found.append((record_path.parent, record))
    return found


def _checkpoint(run_dir: Path) -> Path | None:
    """The run's last checkpoint, or None when it has none (a run restored from the study's records)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
    return checkpoints[-1] if checkpoints else None


RUN_FILE = "input_hessian_psd.json"  # a run's own row, in its folder


def _kept_row(run_dir: Path, settings: dict) -> dict | None:
    """The row measured before for ``run_dir`` with ``settings``, if any."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    return kept["row"] if kept.get("settings") == settings else None


def _exact_extremes(model: torch.nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest eigenvalue of the exact float64 input Hessian of each sample (oracle)."""
    model = copy.deepcopy(model).double().eval()
    lows, highs = [], []
    for xi, yi in zip(x.double(), y, strict=True):

        def loss(inputs: Tensor, target: Tensor = yi) -> Tensor:
            return F.cross_entropy(model(inputs.unsqueeze(0)), target.unsqueeze(0))

        hessian = torch.autograd.functional.hessian(loss, xi).reshape(xi.numel(), xi.numel())
        eigenvalues = torch.linalg.eigvalsh((hessian + hessian.T) / 2)
        lows.append(eigenvalues[0])
        highs.append(eigenvalues[-1])
    return torch.stack(lows), torch.stack(highs)


def _test_samples(data_dir: str, num_samples: int) -> tuple[Tensor, Tensor]:
    """``num_samples`` Fashion-MNIST test images and labels, the same ones for every run (seed 0)."""
    data = FashionMNIST(data_dir=data_dir, batch_size=num_samples, augment=False)
    data.setup("test")
    assert data.test_dataset is not None
    indices = torch.randperm(len(data.test_dataset), generator=torch.Generator().manual_seed(0))[:num_samples]
    return data.test_dataset.batch(indices)


def _measure(run_dir: Path, record: dict, checkpoint: Path, x: Tensor, y: Tensor, args: argparse.Namespace) -> dict:
    """The row of one run: the extreme input-Hessian eigenvalues of its model on ``x``."""
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    model = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    start = time.perf_counter()
    curvature = input_curvature(
        model, F.cross_entropy, x, y, smallest=True, batch_size=len(x), tol=1e-6,
        max_steps=args.max_steps, dtype=torch.float64,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert curvature.smallest is not None
    largest = curvature.largest.eigenvalues
    smallest = curvature.smallest.eigenvalues
    # relative to the run's mean largest eigenvalue: a very confident sample has an input
    # Hessian of about 0 whose float64 round-off (~1e-15) is not a negative curvature
    negative = smallest < -args.rel_tol * float(largest.abs().mean())
    activation = hparams["activation"]
    if activation == "softplus":
        activation = f"softplus(beta={hparams['softplus_beta']:g})"
    adversarial = hparams.get("adversarial") or {}
    training = adversarial.get("method", "none")
    if training != "none":
        training = f"{training} eps={adversarial.get('epsilon'):g}"
    row = {
        "run": str(run_dir),
        "activation": activation,
        "training": training,
        "batch_size": record["batch_size"],
        "seed": record["seed"],
        "num_samples": len(smallest),
        "mean_lambda_max": float(largest.mean()),
        "mean_lambda_min": float(smallest.mean()),
        "min_lambda_min": float(smallest.min()),
        "max_lambda_min": float(smallest.max()),
        "fraction_negative": float(negative.double().mean()),
        "converged_smallest": float(curvature.smallest.converged.double().mean()),
        "converged_largest": float(curvature.largest.converged.double().mean()),
        "seconds": seconds,
    }
    if args.exact_check > 0:
        k = min(args.exact_check, len(smallest))
        exact_low, exact_high = _exact_extremes(model, x[:k], y[:k])
        scale = exact_high.abs().clamp_min(1e-12)
        row["exact_check"] = {
            "samples": k,
            "exact_lambda_min": exact_low.tolist(),
            "exact_lambda_max": exact_high.tolist(),
            "max_rel_error_min": float(((smallest[:k] - exact_low).abs() / scale).max()),
            "max_rel_error_max": float(((largest[:k] - exact_high).abs() / scale).max()),
        }
    return row


def _table_row(row: dict, run_dir: Path) -> str:
    """The Markdown line of one run."""
    exact = row.get("exact_check")
    return (
        f"| {run_dir.parent.name}/{run_dir.name} | {row['activation']} | {row['training']} | {row['batch_size']} | "
        f"{row['mean_lambda_max']:.4g} | {row['mean_lambda_min']:.3g} | {row['min_lambda_min']:.3g} | "
        f"{100 * row['fraction_negative']:.1f}% | {row['seconds']:.1f} |"
        + (
            f" {exact['max_rel_error_min']:.1e}, {exact['max_rel_error_max']:.1e} ({exact['samples']} samples) |"
            if exact
            else " - |"
        )
    )


def _group_order(activation: str, training: str) -> tuple[int, float, int, str]:
    """ReLU first, then softplus by increasing beta; within each, standard training first."""
    beta = re.fullmatch(r"softplus\(beta=(.+)\)", activation)
    return (0 if beta is None else 1, float(beta.group(1)) if beta else 0.0, training != "none", training)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/results", help="folder of the sweeps (default: runs/results)")
    parser.add_argument("--out", required=True, help="JSON output, e.g. docs/results/mlp/input_hessian_psd.json")
    parser.add_argument("--num-samples", type=int, default=256, help="test images per run (default: 256)")
    parser.add_argument("--max-steps", type=int, default=80, help="Lanczos steps per sample (default: 80)")
    parser.add_argument(
        "--rel-tol", type=float, default=1e-6, help="'negative' threshold, relative to the run's mean lambda_max"
    )
    parser.add_argument("--all-seeds", action="store_true", help="every seed, not only seed 0")
    parser.add_argument(
        "--exact-check", type=int, default=2,
        help="also form the exact float64 input Hessian of this many samples per run and compare (default: 2)",
    )  # fmt: skip
    parser.add_argument("--data-dir", default="data")
    parser.add_argument(
        "--redo", action="store_true", help="measure every run with a checkpoint again, also those measured before"
    )
    args = parser.parse_args(argv)

    runs = _runs(Path(args.root), args.all_seeds)
    if not runs:
        print(f"no finished sweep runs below {args.root}", file=sys.stderr)
        return 1
    out = Path(args.out)
    settings = {"num_samples": args.num_samples, "max_steps": args.max_steps, "rel_tol": args.rel_tol,
                "dtype": "float64", "split": "test", "sample_seed": 0}  # fmt: skip
    samples: tuple[Tensor, Tensor] | None = None  # the test images, loaded when a run needs measuring

    rows, missing = [], []
    print(
        "| run | activation | training | batch | mean λ_max(x) | mean λ_min(x) | min λ_min(x) | "
        f"samples with λ_min < -{args.rel_tol:g} mean λ_max | seconds | exact check: rel. error of λ_min, λ_max |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run_dir, record in runs:
        row = _kept_row(run_dir, settings)
        checkpoint = _checkpoint(run_dir) if row is None or args.redo else None
        if checkpoint is not None:
            if samples is None:
                samples = _test_samples(args.data_dir, args.num_samples)
            row = _measure(run_dir, record, checkpoint, *samples, args)
            (run_dir / RUN_FILE).write_text(json.dumps({"settings": settings, "row": row}, indent=2) + "\n")
        elif row is None:
            missing.append(run_dir)
            continue
        elif args.redo:
            print(f"{run_dir}: no checkpoint to measure again, its row in {run_dir / RUN_FILE} is kept",
                  file=sys.stderr)  # fmt: skip
        rows.append(row)
        print(_table_row(row, run_dir), flush=True)
    # one line per activation and training: is any sample's input Hessian indefinite?
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["activation"], row["training"]), []).append(row)
    print()
    print(f"| activation | training | runs | samples | mean λ_max(x) | smallest λ_min(x) | "
          f"largest λ_min(x) | samples with λ_min < -{args.rel_tol:g} mean λ_max |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (activation, training), members in sorted(groups.items(), key=lambda item: _group_order(*item[0])):
        samples = sum(m["num_samples"] for m in members)
        negative = sum(m["fraction_negative"] * m["num_samples"] for m in members)
        mean_max = sum(m["mean_lambda_max"] * m["num_samples"] for m in members) / samples
        print(f"| {activation} | {training} | {len(members)} | {samples} | {mean_max:.3g} | "
              f"{min(m['min_lambda_min'] for m in members):.3g} | {max(m['max_lambda_min'] for m in members):.3g} | "
              f"{100 * negative / samples:.1f}% |")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)  # stderr: stdout is the Markdown table the study script keeps
    for run_dir in missing:
        print(f"{run_dir}: not measured, no checkpoint in {run_dir / 'checkpoints'} and no {RUN_FILE}; delete "
              f"{run_dir} and rerun its sweep to train it again", file=sys.stderr)  # fmt: skip
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
