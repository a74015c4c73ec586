"""Robust-training step cost: the attack on the whole batch at once vs in slices (``attack_batch_size``).

One training step of :class:`lightning_hessian.attacks.AdversarialTraining` (the attack in eval
mode, then the training forward and backward in train mode, Ghost BatchNorm per 128 samples as in
the paper study's configs) on a batch of synthetic images, with the attack's forward and backward
passes run on the whole batch (``attack_batch_size: null``) or on slices of each given size. The
training forward and backward are the same in every variant; only the attack is sliced.

For each variant the table shows the median seconds of one step over ``--repeats`` rounds (the
variants rotated within each round, so that load changes on a shared machine hit them alike), the
speed-up against the whole-batch attack of the same run, and how the variant's perturbation differs
from the whole batch's from the same random start (computed once, untimed): the largest difference
and the pixels that differ by more than 1e-6. Slices change nothing but speed, so both are 0, or
rounding that flips the sign of a gradient entry that is almost zero (then a pixel moves a step).

CPU, one thread (the paper study's m1 robust runs at B = 16384; benchmarks/RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/robust_training_step.py --arch m1 --batch-size 16384 \\
        --methods pgd --attack-batch-sizes 256 1024 --repeats 3 --threads 1

Smoke test (tiny sizes, seconds)::

    python benchmarks/robust_training_step.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_hessian.attacks import AdversarialTraining
from lightning_hessian.models.architectures import build_architecture

WHOLE = "whole batch"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="m1", help="architecture of lightning_hessian (default m1)")
    parser.add_argument("--batch-size", type=int, default=16384, help="training batch (default 16384)")
    parser.add_argument("--methods", nargs="+", default=["pgd"], help="robust-training methods (default pgd)")
    parser.add_argument("--steps", type=int, default=5, help="attack steps of pgd and trades (default 5)")
    parser.add_argument("--epsilon", type=float, default=0.1, help="Linf radius (default 0.1, the study's)")
    parser.add_argument(
        "--attack-batch-sizes", nargs="+", type=int, default=[256, 1024], help="slice sizes (default 256 1024)"
    )
    parser.add_argument("--virtual-batch-size", type=int, default=128, help="Ghost BatchNorm samples (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: m1, B = 64, slices of 16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.attack_batch_sizes, args.repeats, args.steps = 64, [16], 1, 2
        args.methods = ["fgsm", "pgd", "trades"]
    return args


def step_seconds(model: nn.Module, training: AdversarialTraining, x: Tensor, y: Tensor) -> float:
    """Seconds of one training step: the attack, then the training forward and backward."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    training.training_loss(model, x, y).loss.backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_architecture(
        args.arch, input_shape=(1, 28, 28), num_classes=10, bn_virtual_batch_size=args.virtual_batch_size
    ).train()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator)
    variants: list[int | None] = [None, *args.attack_batch_sizes]
    results = []
    for method in args.methods:
        trainings = {
            size: AdversarialTraining(method=method, epsilon=args.epsilon, steps=args.steps, attack_batch_size=size)
            for size in variants
        }
        # the check, untimed: each variant's perturbation from the same random start
        perturbations = {}
        for size in variants:
            torch.manual_seed(0)
            perturbations[size] = trainings[size].perturb(model, x, y)
        timings: dict[int | None, list[float]] = {size: [] for size in variants}
        for round_index in range(args.repeats):
            shift = round_index % len(variants)
            for size in variants[shift:] + variants[:shift]:
                timings[size].append(step_seconds(model, trainings[size], x, y))
        whole_step = statistics.median(timings[None])
        for size in variants:
            step = statistics.median(timings[size])
            results.append(
                {
                    "method": method,
                    "attack_batch_size": size,
                    "step_s": step,
                    "step_s_all": timings[size],
                    "speedup": whole_step / step,
                    "max_perturbation_difference": (perturbations[size] - perturbations[None]).abs().max().item(),
                    # a flipped gradient sign moves a pixel by a whole step; rounding moves it by ~1e-7
                    "pixels_differing": int(((perturbations[size] - perturbations[None]).abs() > 1e-6).sum()),
                }
            )
    threads = torch.get_num_threads()
    print(
        f"{args.arch}, B = {args.batch_size}, Ghost BatchNorm per {args.virtual_batch_size}, epsilon {args.epsilon}, "
        f"{args.steps} attack steps (pgd, trades), {threads} thread(s), median of {args.repeats}"
    )
    print("| method | attack_batch_size | step s | speed-up | max perturbation difference | pixels differing |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in results:
        size = WHOLE if row["attack_batch_size"] is None else row["attack_batch_size"]
        print(
            f"| {row['method']} | {size} | {row['step_s']:.2f} | {row['speedup']:.2f} | "
            f"{row['max_perturbation_difference']:.1e} | {row['pixels_differing']} of {x.numel()} |"
        )
    report = {"arch": args.arch, "batch_size": args.batch_size, "threads": threads, "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
