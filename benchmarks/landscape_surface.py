"""A 21 x 21 loss surface: batched grid evaluation (vmap) against evaluating points one by one.

Peers, all on the same model (an :class:`~lightning_hessian.models.ImageClassifier` architecture in
eval mode), the same samples and the same two filter-normalised random directions:

* ``in-place loop``: the usual way (Li et al.'s code, the ``loss-landscapes`` package): for every
  grid point write ``theta + a d1 + b d2`` into the model's parameters, run the forward passes,
  restore the weights at the end;
* ``sequential``: this package with ``method="sequential"`` (``functional_call`` per point,
  nothing written into the model);
* ``vmap chunk=C``: this package's default path, ``C`` parameter sets per batched forward pass.

Every peer's grid is compared with the in-place loop's (max relative difference printed); times are
medians over ``--repeats`` runs that alternate the peers, so load changes on a shared machine hit
all of them. Ratios are against the in-place loop of the same run.

CPU (what RESULTS.md records)::

    python benchmarks/landscape_surface.py --arch mlp --dataset fashion_mnist --repeats 1
    python benchmarks/landscape_surface.py --arch m1 --dataset fashion_mnist --points 11 --repeats 1

GPU::

    python benchmarks/landscape_surface.py --arch resnet20 --dataset cifar_random --device cuda --chunk-sizes 8 32 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.data import DEBIAN_FASHION_MNIST_DIR, FashionMNIST
from lightning_hessian.landscape import loss_surface, random_direction, trainable_parameters
from lightning_hessian.models import ImageClassifier


def load_samples(dataset: str, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """``num_samples`` images in [0, 1] and labels: Fashion-MNIST's training set or random CIFAR-shaped data."""
    generator = torch.Generator().manual_seed(seed)
    if dataset == "fashion_mnist":
        module = FashionMNIST(data_dir=DEBIAN_FASHION_MNIST_DIR, val_fraction=0.01)
        module.setup("fit")
        indices = torch.randperm(len(module.train_dataset), generator=generator)[:num_samples]
        x, y = module.train_dataset.batch(indices)
        return x, y, (1, 28, 28)
    if dataset == "cifar_random":
        x = torch.rand(num_samples, 3, 32, 32, generator=generator)
        return x, torch.randint(0, 10, (num_samples,), generator=generator), (3, 32, 32)
    raise ValueError(f"unknown dataset {dataset!r}")


def in_place_loop(model, d1, d2, alphas, betas, batches) -> tuple[np.ndarray, np.ndarray]:
    """The usual landscape loop: write each point into the model, evaluate, restore at the end."""
    params = dict(model.named_parameters())
    center = {n: p.detach().clone() for n, p in params.items() if n in d1}
    loss = np.zeros((len(alphas), len(betas)))
    accuracy = np.zeros_like(loss)
    count = sum(len(b[0]) for b in batches)
    try:
        with torch.no_grad():
            for i, a in enumerate(alphas):
                for j, b in enumerate(betas):
                    for n in center:
                        params[n].copy_(center[n] + float(a) * d1[n] + float(b) * d2[n])
                    total = correct = 0.0
                    for x, y in batches:
                        logits = model(x)
                        total += F.cross_entropy(logits, y).item() * len(x)
                        correct += (logits.argmax(-1) == y).sum().item()
                    loss[i, j], accuracy[i, j] = total / count, correct / count
    finally:
        with torch.no_grad():
            for n in center:
                params[n].copy_(center[n])
    return loss, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "cifar_random"])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1024, help="micro-batch of the forward passes")
    parser.add_argument("--points", type=int, default=21, help="grid points per axis")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    x, y, shape = load_samples(args.dataset, args.num_samples, args.seed)
    torch.manual_seed(args.seed)
    model = ImageClassifier(arch=args.arch, input_shape=shape, num_classes=10).to(device).eval()
    x, y = x.to(device), y.to(device)
    batches = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
    params = trainable_parameters(model)
    d1, d2 = random_direction(params, seed=1), random_direction(params, seed=2)
    axis = np.linspace(-1.0, 1.0, args.points)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    peers: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "in-place loop": lambda: in_place_loop(model, d1, d2, axis, axis, batches),
        "sequential": lambda: _surface(model, d1, d2, axis, batches, "sequential", 1),
    }
    for chunk in args.chunk_sizes:
        peers[f"vmap chunk={chunk}"] = lambda c=chunk: _surface(model, d1, d2, axis, batches, "vmap", c)

    print(
        f"# {args.points}x{args.points} surface, {args.arch} ({sum(p.numel() for p in params.values())} params),"
        f" {len(x)} samples of {args.dataset} in micro-batches of {args.batch_size}, device {device},"
        f" torch threads {torch.get_num_threads()}, {args.repeats} repeats"
    )
    times: dict[str, list[float]] = {name: [] for name in peers}
    grids: dict[str, np.ndarray] = {}
    with analysis_mode(model, tensors=True):
        for name, run in peers.items():  # warm-up (allocator, kernels), also the results
            grids[name] = run()[0]
        for _ in range(args.repeats):
            for name, run in peers.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - start)
    reference = grids["in-place loop"]
    base = statistics.median(times["in-place loop"])
    print("| method | seconds (median) | points/s | speed-up vs in-place loop | max rel. diff of the grid |")
    print("| --- | --- | --- | --- | --- |")
    for name in peers:
        seconds = statistics.median(times[name])
        diff = float(np.max(np.abs(grids[name] - reference) / np.abs(reference)))
        print(f"| {name} | {seconds:.3f} | {args.points**2 / seconds:.1f} | {base / seconds:.2f}x | {diff:.1e} |")


def _surface(model, d1, d2, axis, batches, method: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    surface = loss_surface(model, d1, d2, axis, axis, batches, method=method, chunk_size=chunk)
    return surface.loss, surface.accuracy


if __name__ == "__main__":
    main()
