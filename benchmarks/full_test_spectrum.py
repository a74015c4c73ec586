"""Top Hessian eigenvalue of the finished sweep runs on the whole test set, and how much the
1024-sample estimate that the callbacks log depends on which 1024 samples are drawn.

The loss Hessian over a sample is the mean of per-sample Hessians, and on Fashion-MNIST a few
samples carry most of the curvature, so lambda_1 over 1024 samples varies from one draw to the
next. This script loads the last checkpoint of every finished run below ``--root`` and computes,
with this package's Lanczos (:func:`lightning_hessian.curvature.top_eigenvalues` on a
:class:`~lightning_hessian.curvature.HessianOperator`, eval mode), lambda_1 of the mean
cross-entropy over all 10,000 test images and over ``--subsets`` disjoint random 1024-image
subsets of them:

    python benchmarks/full_test_spectrum.py --root runs/results --out docs/results/mlp/full_test_spectrum.json

``--min-accuracy 30`` skips runs that diverged (their Hessian is ~0 and Lanczos would run to its
iteration cap); ``--runs`` selects runs by a glob of ``NAME/bsB_seedS``.

It prints a Markdown table (mean +- sample std over the seeds of each training variant and batch
size) and writes the per-run numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lightning_hessian.curvature import HessianOperator, top_eigenvalues
from lightning_hessian.data import FashionMNIST
from lightning_hessian.models.classifier import ImageClassifier


def _variant(hparams: dict, record: dict) -> str:
    if record.get("variant"):
        return str(record["variant"])
    adversarial = hparams.get("adversarial") or {}
    label = (
        "standard"
        if adversarial.get("method", "none") == "none"
        else (f"{adversarial['method']} ε={adversarial['epsilon']:g}")
    )
    if hparams.get("activation") == "softplus":
        label += f", softplus β={hparams['softplus_beta']:g}"
    return label


def _lambda_1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tol: float) -> tuple[float, int]:
    operator = HessianOperator(model, F.cross_entropy, data=(x, y), micro_batch_size=2048)
    result = top_eigenvalues(operator, k=1, tol=tol)
    if not bool(result.converged[0]):
        raise RuntimeError(f"Lanczos did not converge (residual {float(result.residuals[0]):.3g})")
    return float(result.eigenvalues[0]), int(result.hvp_count)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/results", help="folder of the sweeps (default: runs/results)")
    parser.add_argument("--out", required=True, help="JSON output, e.g. docs/results/mlp/full_test_spectrum.json")
    parser.add_argument("--subsets", type=int, default=4, help="disjoint 1024-image subsets per run (default: 4)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual tolerance")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        metavar="PERCENT",
        help="skip (and list) runs whose test accuracy is below PERCENT: on a network that diverged to chance "
        "accuracy the Hessian is ~0 and Lanczos runs to its iteration cap (default: keep all)",
    )
    parser.add_argument(
        "--runs",
        default="*/bs*_seed*",
        help="which runs below --root, as a glob of NAME/bsB_seedS (default: all), e.g. '*/bs*_seed0' for seed 0 only",
    )
    args = parser.parse_args(argv)

    runs = []
    for record_path in sorted(Path(args.root).glob(f"{args.runs}/sweep.json")):
        record = json.loads(record_path.read_text())
        if record.get("status") == "finished":
            runs.append((record_path.parent, record))
    if not runs:
        print(f"no finished sweep runs below {args.root}", file=sys.stderr)
        return 1
    data = FashionMNIST(data_dir=args.data_dir, batch_size=1024, augment=False)
    data.setup("test")
    assert data.test_dataset is not None
    x_all, y_all = data.test_dataset.batch(torch.arange(len(data.test_dataset)))
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    subsets = [order[i * 1024 : (i + 1) * 1024] for i in range(args.subsets)]

    rows = []
    for run_dir, record in runs:
        hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        model = ImageClassifier.load_from_checkpoint(checkpoints[-1], map_location="cpu").eval()
        if args.min_accuracy is not None:
            with torch.no_grad():
                accuracy = 100 * float((model(x_all).argmax(1) == y_all).float().mean())
            if accuracy < args.min_accuracy:
                print(
                    f"{run_dir.parent.name}/{run_dir.name}: skipped, test accuracy {accuracy:.2f}%"
                    f" < {args.min_accuracy:g}%"
                )
                continue
        start = time.perf_counter()
        full, hvps = _lambda_1(model, x_all, y_all, args.tol)
        per_subset = [_lambda_1(model, x_all[index], y_all[index], args.tol)[0] for index in subsets]
        row = {
            "run": str(run_dir),
            "variant": _variant(hparams, record),
            "batch_size": record["batch_size"],
            "seed": record["seed"],
            "lambda_1_full_test": full,
            "hvps_full_test": hvps,
            "lambda_1_subsets_1024": per_subset,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(f"{run_dir.parent.name}/{run_dir.name}: λ1(10k test) = {full:.4g}, λ1(1024-subsets) = "
              f"{', '.join(f'{v:.3g}' for v in per_subset)} ({row['seconds']:.1f} s)", flush=True)  # fmt: skip

    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["variant"], row["batch_size"])].append(row)
    print()
    print("| training | batch size | runs | λ₁(θ), all 10,000 test images | "
          f"λ₁(θ) on {args.subsets} disjoint 1024-image subsets: min – max over subsets and seeds |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for (variant, batch_size), members in sorted(groups.items(), key=lambda item: (item[0][0] != "standard", item[0])):
        subset_values = [v for member in members for v in member["lambda_1_subsets_1024"]]
        full_test = _mean_std([m["lambda_1_full_test"] for m in members])
        print(f"| {variant} | {batch_size} | {len(members)} | {full_test} | "
              f"{min(subset_values):.3g} – {max(subset_values):.3g} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"subsets": args.subsets, "subset_size": 1024, "tol": args.tol, "split": "test", "sample_seed": 0}
    out.write_text(json.dumps({"settings": settings, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
