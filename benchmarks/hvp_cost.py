"""Cost of one Hessian-vector product in gradient passes, per ``hvp_mode`` and vectors per call K.

For each model the cost of a mode at K is the median, over repeats, of the seconds of one
``op.matmat(V)`` with K columns divided by K and by the seconds of one plain gradient pass over
the same sample. In every repeat each mode runs inside its own ``op.analysis()`` context, as in
the spectral routines: one untimed call builds the retained graph, then the timed calls (only one
graph is alive at a time). The column "call alone" is one ``matvec`` outside any context (graph
build included), what a caller without a context pays. The modes alternate (rotated order per
repeat), so load changes on a shared machine hit them alike. Also reported: the mode
``hvp_mode="auto"`` chooses on a fresh copy of the model and after how many calls, and, with
``--lanczos``, the time of ``top_eigenvalues(op, k=5, tol=1e-3)`` per mode.

Models (synthetic data, eval mode, BatchNorm statistics of the data): ``cnn``, a small CNN with
BatchNorm (38,666 parameters) on 512 CIFAR-shaped samples (3x16x16); ``mlp``, 784-256-128-10 on
1024 samples; ``resnet18``, torchvision's ResNet-18 with the CIFAR stem on 4096 3x32x32 samples;
``m1``, the paper's Fashion-MNIST CNN (this package's architecture, BatchNorm) on 256 1x28x28
samples, the callback's light full analysis in ``callback_overhead.py``.

CPU, one thread (the numbers in benchmarks/RESULTS.md):
    OMP_NUM_THREADS=1 python benchmarks/hvp_cost.py --repeats 7 --lanczos
GPU:
    python benchmarks/hvp_cost.py --device cuda --repeats 11 --lanczos
    python benchmarks/hvp_cost.py --model resnet18 --device cuda --ks 1 16 --repeats 3 --no-auto-choice
Smoke test (tiny sizes, seconds):
    python benchmarks/hvp_cost.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.curvature import HessianOperator, top_eigenvalues
from lightning_hessian.curvature.hvp_tuning import k_bucket
from lightning_hessian.curvature.operator import HVP_MODES
from lightning_hessian.models.architectures import build_architecture

MODES = tuple(mode for mode in HVP_MODES if mode != "auto")


def small_cnn(image_size: int = 16, classes: int = 10) -> nn.Module:
    """Two conv-BatchNorm-ReLU-pool stages and two linear layers: 38,666 parameters at 16x16."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * side * side, 64),
        nn.ReLU(),
        nn.Linear(64, classes),
    )


def resnet18_cifar(classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mlp(widths: Sequence[int] = (784, 256, 128, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Case:
    """One benchmarked model and its sample."""

    name: str
    description: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor


CASE_NAMES = ("cnn", "mlp", "resnet18", "m1")


def make_cases(
    names: Sequence[str], *, smoke: bool, device: torch.device, seed: int, samples: int | None = None
) -> list[Case]:
    """The benchmarked models on synthetic data (tiny sizes with ``smoke``; ``samples`` overrides
    the sample count), with BatchNorm statistics of the data as after training."""
    cases = []
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        torch.manual_seed(seed)
        if name == "cnn":
            size, count = (8, 16) if smoke else (16, 512)
            model = small_cnn(size)
            description = f"small CNN with BatchNorm, {size}x{size}x3 inputs"
        elif name == "mlp":
            count = 32 if smoke else 1024
            model = mlp()
            description = "MLP 784-256-128-10, ReLU"
        elif name == "resnet18":
            size, count = (8, 8) if smoke else (32, 4096)
            model = resnet18_cifar()
            description = f"ResNet-18 (CIFAR stem), {size}x{size}x3 inputs"
        elif name == "m1":
            size, count = 28, (16 if smoke else 256)
            model = build_architecture("m1", input_shape=(1, 28, 28), num_classes=10)
            description = "the paper's m1 (this package's, BatchNorm), 28x28x1 inputs"
        else:
            raise ValueError(f"unknown case {name!r}: use {', '.join(CASE_NAMES)}")
        count = samples or count
        if name == "mlp":
            x = torch.randn(count, 784, generator=generator)
        else:
            x = torch.randn(count, 1 if name == "m1" else 3, size, size, generator=generator)
        model = model.to(device)
        x = x.to(device)
        with torch.no_grad():  # running statistics of the data, as after training
            model.train()(x[:512])
        y = torch.randint(0, 10, (count,), generator=generator)
        cases.append(Case(name, description, model.eval(), x, y.to(device)))
    return cases


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def compiled_func_product(case: Case, num_vectors: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of forward-over-reverse ``vmap(jvp(grad))`` on the whole sample (one
    micro-batch), outside the operator: does compilation pay for this mode?"""
    names = [n for n, _ in case.model.named_parameters()]
    primals = tuple(p.detach() for p in case.model.parameters())
    shapes = [p.shape for p in primals]
    sizes = [p.numel() for p in primals]
    buffers = dict(case.model.named_buffers())

    def loss(*params: torch.Tensor) -> torch.Tensor:
        tensors = {**buffers, **dict(zip(names, params, strict=True))}
        return F.cross_entropy(torch.func.functional_call(case.model, tensors, (case.x,)), case.y)

    grad = torch.func.grad(loss, argnums=tuple(range(len(primals))))

    def one(flat: torch.Tensor) -> torch.Tensor:
        tangents = tuple(piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes, strict=True))
        return torch.cat([h.reshape(-1) for h in torch.func.jvp(grad, primals, tangents)[1]])

    product = (lambda V: one(V[0]).unsqueeze(0)) if num_vectors == 1 else torch.func.vmap(one)
    return torch.compile(product)


def measure_products(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median seconds per product / gradient pass for each mode and K, plus the lone-call cost.

    Each mode's timed calls run inside one ``op.analysis()`` per repeat, after one untimed call
    that builds its retained graph, so that only one graph is alive at a time (large models)."""

    def operator(mode: str) -> HessianOperator:
        return HessianOperator(
            case.model, F.cross_entropy, (case.x, case.y), micro_batch_size=args.micro_batch_size, hvp_mode=mode
        )

    operators = {mode: operator(mode) for mode in args.modes}
    gradient_op = operator("func")
    generator = torch.Generator().manual_seed(args.seed)
    num_params = gradient_op.num_params
    blocks = {k: torch.randn(num_params, k, generator=generator).to(device) for k in args.ks}
    single = blocks[args.ks[0]][:, 0].contiguous()
    compiled = {k: compiled_func_product(case, k) for k in args.ks} if args.compile else {}
    compile_seconds = {
        k: timed(lambda product=product, k=k: product(blocks[k].T.contiguous()), device)
        for k, product in compiled.items()
    }

    def rotated(items: Sequence[str], repeat: int) -> list[str]:
        shift = repeat % len(items)
        return [*items[shift:], *items[:shift]]

    for op in operators.values():  # warm-up: every mode and size once
        with op.analysis():
            for k in args.ks:
                op.matmat(blocks[k])
    lone: dict[str, list[float]] = {mode: [] for mode in args.modes}
    gradients: list[float] = []
    seconds: dict[str, dict[int, list[float]]] = {
        mode: {k: [] for k in args.ks} for mode in (*args.modes, *(["compiled_func"] if compiled else []))
    }
    with gradient_op.analysis():
        gradient_op.gradient()
    for repeat in range(args.repeats):
        with gradient_op.analysis():
            gradients.append(timed(gradient_op.gradient, device))
        for mode in rotated(args.modes, repeat):
            op = operators[mode]
            lone[mode].append(timed(lambda op=op: op.matvec(single), device))  # its own analysis: graph built and freed
            with op.analysis():
                op.matvec(single)  # builds the retained graph, untimed
                for k in args.ks:
                    seconds[mode][k].append(timed(lambda op=op, k=k: op.matmat(blocks[k]), device) / k)
        for k, product in compiled.items():
            vectors = blocks[k].T.contiguous()
            seconds["compiled_func"][k].append(
                timed(lambda product=product, vectors=vectors: product(vectors), device) / k
            )
    gradient = statistics.median(gradients)
    return {
        "gradient_seconds": gradient,
        "num_params": num_params,
        "per_product_in_gradient_passes": {
            mode: {k: statistics.median(values) / gradient for k, values in by_k.items()}
            for mode, by_k in seconds.items()
        },
        "lone_call_in_gradient_passes": {mode: statistics.median(values) / gradient for mode, values in lone.items()},
        "ran_as": {mode: op.selected_hvp_mode for mode, op in operators.items()},
        "compile_seconds": compile_seconds,
    }


def auto_choice(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """What ``hvp_mode="auto"`` picks for each K, on a fresh copy of the model, and after how many calls."""
    model = copy.deepcopy(case.model)
    op = HessianOperator(model, F.cross_entropy, (case.x, case.y), micro_batch_size=args.micro_batch_size)
    generator = torch.Generator().manual_seed(args.seed + 1)
    out = {}
    with op.analysis():
        for k in args.ks:
            calls = 0
            while op.selected_hvp_modes[k_bucket(k)] is None and calls < 30:
                op.matmat(torch.randn(op.num_params, k, generator=generator).to(op.device))
                calls += 1
            out[k] = {"mode": op.selected_hvp_modes[k_bucket(k)], "calls": calls}
    out["hvp_count"] = op.hvp_count
    return out


def measure_lanczos(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``top_eigenvalues(op, k=5, tol=1e-3)`` per mode. ``auto (first)`` analyses a fresh copy of
    the model (the mode trial included), ``auto (tuned)`` the same copy a second time. A gradient
    pass is timed before every run, so that the ratio compares times of the same load."""

    def operator(model: nn.Module, mode: str) -> HessianOperator:
        return HessianOperator(
            model, F.cross_entropy, (case.x, case.y), micro_batch_size=args.micro_batch_size, hvp_mode=mode
        )

    def run(op: HessianOperator) -> tuple[float, int]:
        began = time.perf_counter()
        result = top_eigenvalues(op, k=5, tol=1e-3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began, result.hvp_count

    results: dict[str, list[tuple[float, int]]] = {}
    labels = [*args.modes, "auto"]
    gradient_op = operator(case.model, "func")
    gradients = []
    for repeat in range(args.lanczos_repeats):
        for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
            gradients.append(timed(gradient_op.gradient, device))
            if label == "auto":
                fresh = copy.deepcopy(case.model)
                results.setdefault("auto (first)", []).append(run(operator(fresh, "auto")))
                results.setdefault("auto (tuned)", []).append(run(operator(fresh, "auto")))
            else:
                results.setdefault(label, []).append(run(operator(case.model, label)))
    gradient = statistics.median(gradients)
    return {
        label: {
            "seconds": statistics.median(s for s, _ in runs),
            "gradient_passes": statistics.median(s for s, _ in runs) / gradient,
            "hvp_count": statistics.median(h for _, h in runs),
        }
        for label, runs in results.items()
    }


def print_report(case: Case, result: dict[str, Any], args: argparse.Namespace, device_name: str) -> None:
    print(
        f"\n## {case.name}: {case.description}, {result['num_params']:,} parameters, {case.x.shape[0]} samples"
        f" (micro-batch {args.micro_batch_size}), {device_name}, {torch.get_num_threads()} thread(s)"
    )
    print(f"gradient pass: {result['gradient_seconds'] * 1e3:.1f} ms (median of {args.repeats})\n")
    header = "| mode | " + " | ".join(f"K={k}" for k in args.ks) + " | call alone (K=1, build included) |"
    print(header)
    print("| --- |" + " ---: |" * (len(args.ks) + 1))
    table = result["per_product_in_gradient_passes"]
    for mode, by_k in table.items():
        alone = result["lone_call_in_gradient_passes"].get(mode)
        cells = " | ".join(f"{by_k[k]:.2f}" for k in args.ks)
        ran = result["ran_as"].get(mode, mode)
        label = mode if ran == mode else f"{mode} (ran as {ran}: the retained graph did not fit)"
        print(f"| {label} | {cells} | {'' if alone is None else f'{alone:.2f}'} |")
    if result["compile_seconds"]:
        print(
            "\ncompile time of compiled_func: "
            + ", ".join(f"K={k}: {s:.0f} s" for k, s in result["compile_seconds"].items())
        )
    auto = result.get("auto")
    if auto:
        print(
            "\nhvp_mode='auto' chooses: "
            + ", ".join(f"K={k}: {auto[k]['mode']} (after {auto[k]['calls']} calls)" for k in args.ks)
            + f"; {auto['hvp_count']} products in all, every one counted"
        )
    if "lanczos" in result:
        print(f"\ntop_eigenvalues(op, k=5, tol=1e-3), median of {args.lanczos_repeats}:\n")
        print("| mode | seconds | gradient passes | HVPs |")
        print("| --- | ---: | ---: | ---: |")
        for label, row in result["lanczos"].items():
            print(f"| {label} | {row['seconds']:.2f} | {row['gradient_passes']:.1f} | {row['hvp_count']:.0f} |")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", "--model", dest="cases", nargs="+", default=["cnn", "mlp"], choices=CASE_NAMES)
    parser.add_argument(
        "--samples", type=int, default=None, help="sample count (default 512 cnn, 1024 mlp, 4096 resnet18, 256 m1)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="vectors per call (default 1 4 16 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode and K (default 7)")
    parser.add_argument("--micro-batch-size", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument(
        "--compile", action="store_true", help="add a torch.compile'd forward-over-reverse column (slow to compile)"
    )
    parser.add_argument(
        "--no-auto-choice", action="store_true", help="skip the run of hvp_mode='auto' until it has chosen"
    )
    parser.add_argument("--lanczos", action="store_true", help="also time top_eigenvalues(op, k=5, tol=1e-3) per mode")
    parser.add_argument("--lanczos-repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.ks = args.ks or ([1, 2] if args.smoke else [1, 4, 16, 32])
    args.repeats = args.repeats or (2 if args.smoke else 7)
    if args.smoke:
        args.lanczos_repeats = 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"

    results: dict[str, Any] = {"args": vars(args), "device": device_name, "cases": {}}
    for case in make_cases(args.cases, smoke=args.smoke, device=device, seed=args.seed, samples=args.samples):
        result = measure_products(case, args, device)
        if not args.no_auto_choice:
            result["auto"] = auto_choice(case, args)
        if args.lanczos:
            result["lanczos"] = measure_lanczos(case, args, device)
        results["cases"][case.name] = result
        print_report(case, result, args, device_name)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                results,
                handle,
                indent=1,
                default=lambda value: value if not isinstance(value, float) or math.isfinite(value) else None,
            )
    return results


if __name__ == "__main__":
    main()
