"""Robustness evaluation cost: our native FGSM/PGD vs foolbox 3.3.4 vs a hand-written PGD loop.

All three attack the same model (eval mode, frozen parameters) on the same samples at the same
epsilons with the same steps and step sizes (Linf PGD: random start, ``2.5 * eps / steps``):

- ``hand loop``: the plain PyTorch PGD a user would write, one epsilon at a time, micro-batches
  of ``--batch-size``, ``torch.autograd.grad`` with respect to the perturbation only;
- ``ours (native)``: :func:`lightning_hessian.attacks.evaluate_attack` with ``backend="native"``,
  what :class:`~lightning_hessian.AdversarialRobustnessCallback` runs by default (all epsilons
  stacked into one batched pass);
- ``foolbox``: the same call with ``backend="foolbox"`` (foolbox's ``LinfPGD``/``FGSM`` through
  our adapter: device, eval mode, frozen parameters, all epsilons in one call).

Times are medians over ``--repeats`` runs, the three sides interleaved so that load changes on a
shared machine hit all of them; ratios are against the hand loop of the same run. The robust
accuracies are printed too: the native and hand-loop PGD agree within sampling error with
foolbox's, FGSM exactly.

CPU (what RESULTS.md records; the models are briefly trained on Fashion-MNIST)::

    python benchmarks/robustness_eval.py --arch mlp --samples 512 --batch-size 128 --threads 1 --repeats 5
    python benchmarks/robustness_eval.py --arch m1 --samples 512 --batch-size 256 --threads 1 --repeats 3

GPU::

    python benchmarks/robustness_eval.py --arch resnet18 --dataset cifar_random --samples 4096 \\
        --batch-size 512 --device cuda --train-steps 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.attacks import AttackSpec, evaluate_attack
from lightning_hessian.data.idx import read_idx
from lightning_hessian.models.architectures import build_architecture

FASHION = "/usr/share/datasets/fashion-mnist"


def hand_written_pgd(
    model: nn.Module, x: Tensor, y: Tensor, epsilons: list[float], steps: int, batch_size: int, random_start: bool
) -> list[float]:
    """Robust accuracy per epsilon with a textbook Linf PGD loop (random start, sign steps)."""
    with torch.no_grad():  # clean predictions once, shared by every epsilon
        clean = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]) == y
    accuracies = []
    for eps in epsilons:
        step = eps if steps == 1 and not random_start else 2.5 * eps / steps
        correct = 0
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            delta = torch.empty_like(xb).uniform_(-eps, eps) if random_start else torch.zeros_like(xb)
            delta = (xb + delta).clamp(0, 1) - xb
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model(xb + delta), yb, reduction="sum")
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
                delta = (xb + delta).clamp(0, 1) - xb
            with torch.no_grad():
                correct += int(((model(xb + delta).argmax(1) == yb) & clean[start : start + batch_size]).sum())
        accuracies.append(correct / len(x))
    return accuracies


def load_data(
    dataset: str, samples: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, int, int]]:
    if dataset == "fashion_mnist":
        x = read_idx(f"{FASHION}/train-images-idx3-ubyte.gz").float().div(255).unsqueeze(1)
        y = read_idx(f"{FASHION}/train-labels-idx1-ubyte.gz").long()
        x_test = read_idx(f"{FASHION}/t10k-images-idx3-ubyte.gz").float().div(255).unsqueeze(1)[:samples]
        y_test = read_idx(f"{FASHION}/t10k-labels-idx1-ubyte.gz").long()[:samples]
        return x.to(device), y.to(device), x_test.to(device), y_test.to(device), (1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    x_test = torch.rand(samples, 3, 32, 32, generator=generator)
    y_test = torch.randint(0, 10, (samples,), generator=generator)
    return x_test.to(device), y_test.to(device), x_test.to(device), y_test.to(device), (3, 32, 32)


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch_size: int = 128) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator(device=x.device).manual_seed(0)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch_size,), generator=generator, device=x.device)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def timed(function: Callable[[], list[float]], device: torch.device) -> tuple[float, list[float]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="m1")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar_random"])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2 / 255, 4 / 255, 8 / 255])
    parser.add_argument("--train-steps", type=int, default=200, help="SGD steps before attacking (0: random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x_train, y_train, x, y, shape = load_data(args.dataset, args.samples, device)
    model = build_architecture(args.arch, input_shape=shape, num_classes=10).to(device)
    if args.train_steps:
        train(model, x_train, y_train, args.train_steps)
    model.eval().requires_grad_(False)  # the same frozen model for every side
    print(
        f"{args.arch} on {args.dataset}, {args.samples} samples, batch {args.batch_size}, {args.device}, "
        f"threads {torch.get_num_threads()}, epsilons {[round(e, 5) for e in args.epsilons]}, torch {torch.__version__}"
    )
    for name, steps, random_start in (("fgsm", 1, False), ("linf_pgd", args.steps, True)):
        spec = AttackSpec(name, args.epsilons, steps=None if name == "fgsm" else steps)
        sides: dict[str, Callable[[], list[float]]] = {
            "hand loop": lambda steps=steps, random_start=random_start: hand_written_pgd(
                model, x, y, args.epsilons, steps, args.batch_size, random_start
            ),
            "ours (native)": lambda spec=spec: (
                evaluate_attack(model, x, y, spec, backend="native", batch_size=args.batch_size)
                .robust_correct.float()
                .mean(1)
                .tolist()
            ),
            "foolbox": lambda spec=spec: (
                evaluate_attack(model, x, y, spec, backend="foolbox", batch_size=args.batch_size)
                .robust_correct.float()
                .mean(1)
                .tolist()
            ),
        }
        for side in sides.values():  # warm-up
            side()
        times: dict[str, list[float]] = {side: [] for side in sides}
        accuracies: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for side, function in sides.items():
                seconds, accuracies[side] = timed(function, device)
                times[side].append(seconds)
        label = "FGSM" if name == "fgsm" else f"Linf PGD-{steps}"
        print(
            f"\n{label}: median seconds over {args.repeats} repeats, ratio to the hand loop;"
            " robust accuracy per epsilon"
        )
        reference = statistics.median(times["hand loop"])
        for side in sides:
            median = statistics.median(times[side])
            acc = " ".join(f"{a:.3f}" for a in accuracies[side])
            print(f"  {side:<14} {median:8.3f} s  {median / reference:5.2f}x   acc [{acc}]")


if __name__ == "__main__":
    main()
