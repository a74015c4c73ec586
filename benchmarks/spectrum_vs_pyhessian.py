"""Hessian spectrum: lightning-hessian's curvature engine against PyHessian, same model and data.

Prints, in one run, HVP counts, seconds, speed ratios and the error of each estimate against a
tight reference (our Lanczos at ``--reference-tol`` in float64 for eigenvalues, a long Hutch++ run
for the trace), plus the cost of one Hessian-vector product relative to a gradient pass.

CPU (small CNN):
    python benchmarks/spectrum_vs_pyhessian.py --model smallcnn --samples 512 --batch-size 128
GPU (the issue's target setting):
    python benchmarks/spectrum_vs_pyhessian.py --model resnet18 --samples 4096 --batch-size 512 \\
        --device cuda --density-probes 8 --density-steps 64 --reference-dtype float32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.curvature import HessianOperator, hessian_trace, spectral_density, top_eigenvalues
from lightning_hessian.curvature.pyhessian_backend import pyhessian_top_eigenvalues, pyhessian_trace


def small_cnn(channels: int = 3, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes),
    )


def resnet18_cifar(classes: int = 10) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem: 3x3, stride 1, no max-pool
    model.maxpool = nn.Identity()
    return model


def synthetic_data(samples: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped inputs with class-dependent means, so that a few training steps learn."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (samples,), generator=generator)
    templates = torch.randn(10, 3, size, size, generator=generator)
    x = 0.7 * templates[y] + torch.randn(samples, 3, size, size, generator=generator)
    return x, y


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - began


def relative_errors(values: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((values.double() - reference.double()).abs() / reference.double().abs()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smallcnn", "resnet18"], default="smallcnn")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=None, help="default 16 (smallcnn) or 32 (resnet18)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=100, help="SGD steps before the analysis")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-4, help="our Lanczos residual tolerance")
    parser.add_argument("--trace-rel-tol", type=float, default=1e-2)
    parser.add_argument("--density-probes", type=int, default=4)
    parser.add_argument("--density-steps", type=int, default=32)
    parser.add_argument("--matmat-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--reference-tol", type=float, default=1e-8)
    parser.add_argument("--reference-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--reference-trace-rel-tol", type=float, default=2e-3)
    parser.add_argument("--pyhessian-max-iter", type=int, default=100)
    parser.add_argument("--pyhessian-tol", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    image_size = args.image_size or (16 if args.model == "smallcnn" else 32)
    model = (small_cnn() if args.model == "smallcnn" else resnet18_cifar()).to(device)
    x, y = synthetic_data(args.samples, image_size, args.seed)
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(args.train_steps):
        index = torch.randint(0, args.samples, (min(128, args.samples),), device=device)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=args.batch_size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {args.model}: {op.num_params} parameters, {op.num_samples} samples in batches of {args.batch_size}, device {name}")
    results: dict[str, Any] = {"args": vars(args), "device": name, "num_params": op.num_params}

    # ---------------------------------------------------------------- cost of one product
    op.gradient()  # warm-up
    _, gradient_seconds = timed(op.gradient, device)
    cost = {"gradient_s": gradient_seconds}
    for mode in ("func", "double_backward"):
        fixed = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=args.batch_size, hvp_mode=mode)
        for size in (1, *args.matmat_sizes):
            V = torch.randn(op.num_params, size, device=device)
            fixed.matmat(V)  # warm-up
            _, seconds = timed(lambda V=V: fixed.matmat(V), device)
            cost[f"{mode}_K{size}_per_vector"] = seconds / size / gradient_seconds
    results["hvp_cost_vs_gradient"] = cost
    print("\n## cost of one Hessian-vector product (per vector, K vectors per call), in gradient passes")
    print(f"gradient pass: {gradient_seconds:.3f} s")
    for key, value in cost.items():
        if key != "gradient_s":
            print(f"{key:>28}: {value:.2f}x")

    # ------------------------------------------------------------------------- reference
    reference_dtype = torch.float64 if args.reference_dtype == "float64" else torch.float32
    ref_op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=args.batch_size, dtype=reference_dtype)
    reference, reference_seconds = timed(lambda: top_eigenvalues(ref_op, k=args.k, tol=args.reference_tol, max_iter=2000), device)
    ref_trace = hessian_trace(op, rel_tol=args.reference_trace_rel_tol, max_probes=20000, batch_probes=32, seed=12345)
    print(f"\n## reference: Lanczos {args.reference_dtype} tol {args.reference_tol:g}: {reference.eigenvalues.tolist()}"
          f" (converged {bool(reference.converged.all())}, {reference.hvp_count} HVPs, {reference_seconds:.1f} s);"
          f" trace {ref_trace.estimate:.6g} +- {ref_trace.stderr:.2g} ({ref_trace.hvp_count} HVPs)")
    results["reference"] = {"eigenvalues": reference.eigenvalues.tolist(), "trace": ref_trace.estimate, "trace_stderr": ref_trace.stderr}

    # ------------------------------------------------------------------------ the contest
    rows = []

    def record(task: str, method: str, hvps: int, seconds: float, error: float, note: str = "") -> None:
        print(f"  {task:>8} {method:<24} {hvps:>5} HVPs {seconds:8.2f} s", flush=True)
        rows.append({"task": task, "method": method, "hvps": hvps, "seconds": seconds, "rel_error": error, "note": note})

    ours1, s = timed(lambda: top_eigenvalues(op, k=1, tol=args.tol), device)
    record("top-1", "ours (Lanczos)", ours1.hvp_count, s, relative_errors(ours1.eigenvalues, reference.eigenvalues[:1]))
    theirs1, s = timed(lambda: pyhessian_top_eigenvalues(op, k=1, tol=args.pyhessian_tol, max_iter=args.pyhessian_max_iter), device)
    record("top-1", "PyHessian (power)", theirs1.hvp_count, s, relative_errors(theirs1.eigenvalues, reference.eigenvalues[:1]))

    oursk, s = timed(lambda: top_eigenvalues(op, k=args.k, tol=args.tol), device)
    record(f"top-{args.k}", "ours (Lanczos)", oursk.hvp_count, s, relative_errors(oursk.eigenvalues, reference.eigenvalues),
           f"converged {int(oursk.converged.sum())}/{args.k}")
    theirsk, s = timed(lambda: pyhessian_top_eigenvalues(op, k=args.k, tol=args.pyhessian_tol, max_iter=args.pyhessian_max_iter), device)
    ordered = bool((theirsk.eigenvalues[:-1] >= theirsk.eigenvalues[1:]).all())
    record(f"top-{args.k}", "PyHessian (power)", theirsk.hvp_count, s, relative_errors(theirsk.eigenvalues, reference.eigenvalues),
           "in order" if ordered else "OUT OF ORDER")

    trace, s = timed(lambda: hessian_trace(op, rel_tol=args.trace_rel_tol), device)
    record("trace", "ours (Hutch++)", trace.hvp_count, s, abs(trace.estimate - ref_trace.estimate) / abs(ref_trace.estimate),
           f"rel stderr {trace.relative_stderr:.3g}")
    their_trace, s = timed(lambda: pyhessian_trace(op, tol=args.pyhessian_tol, max_iter=args.pyhessian_max_iter), device)
    record("trace", "PyHessian (Hutchinson)", their_trace.hvp_count, s,
           abs(their_trace.estimate - ref_trace.estimate) / abs(ref_trace.estimate), f"rel stderr {their_trace.relative_stderr:.3g}")

    matched = max(their_trace.relative_stderr, args.trace_rel_tol)
    trace_matched, s = timed(lambda: hessian_trace(op, rel_tol=matched, seed=1), device)
    record("trace@PyHessian's stderr", "ours (Hutch++)", trace_matched.hvp_count, s,
           abs(trace_matched.estimate - ref_trace.estimate) / abs(ref_trace.estimate),
           f"rel_tol {matched:.3g}: rel stderr {trace_matched.relative_stderr:.3g}")

    density, s = timed(lambda: spectral_density(op, num_probes=args.density_probes, lanczos_steps=args.density_steps), device)
    record("density", "ours (SLQ, batched)", density.hvp_count, s, float("nan"),
           f"integral {float(torch.trapezoid(density.density, density.grid)):.6f}")
    record("density", "PyHessian", 0, float("nan"), float("nan"), "fails on torch 2.x (torch.eig removed)")

    ours_total = sum(r["seconds"] for r in rows if r["method"].startswith("ours") and r["task"] in (f"top-{args.k}", "trace", "density"))
    theirs_total = sum(r["seconds"] for r in rows if r["method"].startswith("PyHessian") and r["task"] in (f"top-{args.k}", "trace"))
    results["rows"] = rows
    results["ours_topk_trace_density_s"] = ours_total
    results["pyhessian_topk_trace_s"] = theirs_total

    print("\n## results (errors against the reference)")
    print("| task | method | HVPs | seconds | speed-up vs PyHessian | max rel. error | note |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        task = row["task"].split("@")[0]
        peer = next((r for r in rows if r["task"] == task and r["method"].startswith("PyHessian")), None)
        ratio = ""
        if row["method"].startswith("ours") and peer is not None and peer["seconds"] == peer["seconds"]:
            ratio = f"{peer['seconds'] / row['seconds']:.1f}x"
        error = "" if row["rel_error"] != row["rel_error"] else f"{row['rel_error']:.1e}"
        seconds = "" if row["seconds"] != row["seconds"] else f"{row['seconds']:.2f}"
        print(f"| {row['task']} | {row['method']} | {row['hvps']} | {seconds} | {ratio} | {error} | {row['note']} |")
    print(f"\nours top-{args.k} + trace + density: {ours_total:.2f} s; PyHessian top-{args.k} + trace: {theirs_total:.2f} s;"
          f" speed-up {theirs_total / ours_total:.1f}x")
    print(f"PyHessian top-{args.k} eigenvalues: {[round(v, 6) for v in theirsk.eigenvalues.tolist()]}")
    print(f"ours      top-{args.k} eigenvalues: {[round(v, 6) for v in oursk.eigenvalues.tolist()]}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
