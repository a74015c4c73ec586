"""Hessian spectrum at equal accuracy: this package against PyHessian, curvlinops and hessian-eigenthings.

Every tool analyses the same model (same weights, eval mode) on the same samples, in float32, and
is scored against a float64 reference:

* **top-5**: the five largest eigenvalues to ``--eig-target`` (1e-3) relative error, each
  eigenvalue against its own reference value, worst over the seeds. Reference: SciPy's ARPACK
  (``eigsh``, ``which="LA"``, tol ``--reference-tol``) on this package's ``HessianOperator`` in
  float64. (ARPACK is the eigensolver, so the reference shares only the Hessian-vector product
  with the tool under test; that product is checked against curvlinops' in float64 when it is
  installed.)
* **trace**: to ``--trace-target`` (2 %) RMS relative error over the seeds. Reference: the exact
  trace in float64 from the Gauss-Newton identity. Both networks are, with every other parameter
  fixed, piecewise linear in each single parameter (linear/conv layers, eval-mode BatchNorm,
  ReLU, max-pooling), so the second derivative of every logit with respect to any one parameter
  vanishes (almost everywhere) and ``diag(H) = diag(GGN)``; hence
  ``tr H = (1/N) sum_n tr(Lambda_n J_n J_n^T)`` with the per-sample logit Jacobian ``J_n`` and the
  softmax Hessian ``Lambda_n``. With ``--check-trace-identity`` (on by default for models up to
  5000 parameters, as in ``--smoke``) it is checked against the sum of ``e_i^T H e_i`` over all
  unit vectors.
* **density**: fixed effort, ``--density-probes`` x ``--density-steps`` (4 x 32) stochastic
  Lanczos quadrature; seconds and products only.

"Equal accuracy": each tool runs at increasing effort (its own knob: Lanczos tolerance or
steps, ARPACK tolerance, power-iteration tolerance, probe count) until it meets the target, and
the time of the cheapest setting that met it is reported (median over the seeds), or "not
reached" when its ladder or the ``--max-hvps`` cap per run ran out first. A tool run is timed
from building its operator to its result, device-synchronised, after one untimed warm-up run of
each tool (top-5 at its lowest setting: imports, allocator, first-call compilation, and this
package's one-off ``hvp_mode="auto"`` trial; its seconds are printed as the first-call cost).
The tools alternate: each round
runs every tool's next (setting, seed) before any tool runs again, so load changes on a shared
machine hit all of them. Hessian-vector products (HVPs) are counted per vector by wrapping each
peer's product function, and by our operator's own ``hvp_count`` (``--hvp-mode``, default the
operator's ``"auto"``). A tool that fails (e.g. PyHessian's density on torch 2.x) or is
not installed gets its reason in the table.

Tasks: an MLP 784-256-128-10 (ReLU) on 1024 MNIST-shaped samples and a CNN with BatchNorm
(38,666 parameters) on 512 CIFAR-shaped (3x32x32) samples. The samples are synthetic (overlapping
class templates plus noise and 10 % wrong labels, so that no download is needed, a GPU machine
runs the same thing, and the loss stays away from zero) and the networks are trained for
``--train-steps`` SGD steps first; the loss on the samples is printed.

CPU (RESULTS.md records the MLP with ``--models mlp``)::

    OMP_NUM_THREADS=1 python benchmarks/spectrum_vs_peers.py --threads 1 --seeds 3 --json spectrum_vs_peers.json
GPU (as benchmarks/gpu_suite.sh runs it)::

    python benchmarks/spectrum_vs_peers.py --device cuda --seeds 3
Smoke (tiny sizes, seconds; what tests/project/test_benchmarks_smoke.py runs)::

    python benchmarks/spectrum_vs_peers.py --smoke

The peers are the ``bench`` extra: ``pip install -e .[bench]`` (PyHessian 0.1, curvlinops-for-
pytorch, hessian-eigenthings).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import math
import platform
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.curvature import HessianOperator, hessian_trace, spectral_density, top_eigenvalues

TOOLS = ("ours", "pyhessian", "curvlinops", "eigenthings")
TOOL_LABELS = {
    "ours": "ours",
    "pyhessian": "PyHessian",
    "curvlinops": "curvlinops",
    "eigenthings": "hessian-eigenthings",
}
#: the distribution each peer is imported from, for the "not installed" message
PEER_PACKAGES = {"pyhessian": "pyhessian", "curvlinops": "curvlinops-for-pytorch", "eigenthings": "hessian-eigenthings"}
PEER_MODULES = {"pyhessian": "pyhessian", "curvlinops": "curvlinops", "eigenthings": "hessian_eigenthings"}
TASKS = ("top5", "trace", "density")


# ------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One model with its analysis samples, shared by every tool."""

    name: str
    description: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    num_params: int
    device: torch.device

    @property
    def inputs(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.batches])

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([y for _, y in self.batches])

    @property
    def num_samples(self) -> int:
        return sum(len(y) for _, y in self.batches)


def make_mlp(widths: Sequence[int]) -> nn.Sequential:
    """``Linear-ReLU-...-Linear`` on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn(image_size: int, widths: tuple[int, int], hidden: int, classes: int = 10) -> nn.Sequential:
    """Two conv-BN-ReLU-maxpool blocks, one more max-pool, two dense layers.

    At 3x32x32 with widths (16, 32) and 64 hidden units: 38,666 parameters (the third pool keeps
    the dense layer at 32 * 4 * 4 inputs)."""
    first, second = widths
    side = image_size // 8
    return nn.Sequential(
        nn.Conv2d(3, first, 3, padding=1), nn.BatchNorm2d(first), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(first, second, 3, padding=1), nn.BatchNorm2d(second), nn.ReLU(), nn.MaxPool2d(2),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(second * side * side, hidden), nn.ReLU(), nn.Linear(hidden, classes),
    )  # fmt: skip


def synthetic_classification(
    samples: int,
    shape: tuple[int, ...],
    seed: int,
    classes: int = 10,
    separation: float = 3.0,
    label_noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class templates plus unit noise, with overlapping classes and some wrong labels.

    Each template has norm ``separation``, so that two class means lie about ``separation *
    sqrt(2)`` noise standard deviations apart whatever the input size, and ``label_noise`` of the labels are
    redrawn: the loss stays well above zero after a short training run, so the Hessian is that of
    a model still learning (a model that fits its samples exactly has a vanishing Hessian)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    if len(shape) == 3:  # images: smooth templates (4x coarser, upsampled), which convolutions and pooling keep
        channels, height, width = shape
        coarse = torch.randn(classes, channels, max(1, height // 4), max(1, width // 4), generator=generator)
        templates = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    else:
        templates = torch.randn(classes, *shape, generator=generator)
    templates = (
        templates / templates.flatten(1).norm(dim=1).view(-1, *[1] * len(shape)) * separation
    )  # norm: separation
    inputs = templates[labels] + torch.randn(samples, *shape, generator=generator)
    redraw = torch.rand(samples, generator=generator) < label_noise
    labels = torch.where(redraw, torch.randint(0, classes, (samples,), generator=generator), labels)
    return inputs, labels


def build_problem(name: str, args: argparse.Namespace, device: torch.device) -> Problem:
    """Model, samples and a short SGD run, all from ``args.seed``."""
    torch.manual_seed(args.seed)
    if name == "mlp":
        widths = args.mlp_widths
        side = math.isqrt(widths[0])
        shape: tuple[int, ...] = (1, side, side) if side * side == widths[0] else (widths[0],)
        model, samples = make_mlp(widths), args.mlp_samples
        description = f"MLP {'-'.join(map(str, widths))} (ReLU), {samples} samples {'x'.join(map(str, shape))}"
    else:
        shape = (3, args.cnn_image_size, args.cnn_image_size)
        model, samples = make_cnn(args.cnn_image_size, tuple(args.cnn_widths), args.cnn_hidden), args.cnn_samples
        description = f"CNN with BatchNorm, {samples} samples 3x{args.cnn_image_size}x{args.cnn_image_size}"
    # class separation chosen so that after the default 40 SGD steps both networks are mid-training
    # (loss about 0.6 for the MLP, 1.3 for the CNN, against ln 10 = 2.3 at the start)
    inputs, labels = synthetic_classification(samples, shape, args.seed, separation={"mlp": 3.0, "cnn": 10.0}[name])
    model = model.to(device)
    inputs, labels = inputs.to(device), labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.train_lr, momentum=0.9)
    model.train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.train_steps):
        index = torch.randint(0, samples, (min(128, samples),), generator=generator).to(device)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[index]), labels[index]).backward()
        optimizer.step()
    model.eval()  # every tool sees the same eval-mode function (BatchNorm on running statistics)
    for param in model.parameters():
        param.grad = None
    batch = args.batch_size or samples
    if samples % batch:
        # hessian-eigenthings averages its batches with equal weights: unequal batches would change its Hessian
        raise SystemExit(f"--batch-size {batch} must divide the {samples} samples of {name}")
    batches = [(inputs[start : start + batch], labels[start : start + batch]) for start in range(0, samples, batch)]
    num_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        loss = float(F.cross_entropy(model(inputs), labels))
    description += (
        f", {num_params:,} parameters, {len(batches)} batch(es) of {batch},"
        f" loss {loss:.3f} after {args.train_steps} steps"
    )
    return Problem(name, description, model, batches, num_params, device)


# ----------------------------------------------------------------------------------- references
def float64_operator(problem: Problem) -> HessianOperator:
    return HessianOperator(problem.model, F.cross_entropy, batches=problem.batches, dtype=torch.float64)


def reference_eigenvalues(problem: Problem, k: int, tol: float, seed: int) -> np.ndarray:
    """The ``k`` largest eigenvalues by ARPACK on the float64 Hessian, descending."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = float64_operator(problem)
    size = problem.num_params

    def matvec(vector: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64).reshape(-1)).to(problem.device)
        return op.matvec(flat).cpu().numpy()

    linear = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(size)
    values = eigsh(
        linear, k=k, which="LA", tol=tol, ncv=min(size, max(2 * k + 1, 40)), v0=start, return_eigenvectors=False
    )
    return np.sort(values)[::-1]


def exact_trace_gauss_newton(problem: Problem, max_bytes: float = 2e8) -> float:
    """``tr H`` in float64 from ``tr H = tr GGN`` (see the module docstring): per-sample logit
    Jacobians by ``vmap(jacrev)``, in chunks that keep the Jacobians under ``max_bytes``."""
    from torch.func import functional_call, jacrev, vmap

    model = copy.deepcopy(problem.model).double().eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def logits(parameters: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (parameters, buffers), (sample.unsqueeze(0),)).squeeze(0)

    jacobians = vmap(jacrev(logits), in_dims=(None, 0))
    inputs = problem.inputs.double()
    classes = int(model(inputs[:1]).shape[1])
    chunk = max(1, int(max_bytes // (classes * problem.num_params * 8)))
    total = torch.zeros((), dtype=torch.float64, device=problem.device)
    with torch.no_grad():
        for start in range(0, len(inputs), chunk):
            x = inputs[start : start + chunk]
            probabilities = torch.softmax(model(x), dim=1)
            softmax_hessian = torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
            kernel = torch.zeros(len(x), classes, classes, dtype=torch.float64, device=problem.device)
            for jac in jacobians(params, x).values():
                flat = jac.reshape(len(x), classes, -1)
                kernel += flat @ flat.transpose(1, 2)
            total += (softmax_hessian * kernel).sum()  # tr(Lambda K), both symmetric
    return float(total) / len(inputs)


def exact_trace_columns(problem: Problem, block: int = 64) -> float:
    """``sum_i e_i^T H e_i`` over all unit vectors, float64 (small models only)."""
    op = float64_operator(problem)
    total = 0.0
    for start in range(0, problem.num_params, block):
        count = min(block, problem.num_params - start)
        units = torch.zeros(problem.num_params, count, dtype=torch.float64, device=problem.device)
        units[torch.arange(start, start + count), torch.arange(count)] = 1.0
        total += float(op.matmat(units)[start : start + count].diagonal().sum())
    return total


def curvlinops_product_check(problem: Problem) -> float | None:
    """Relative difference of one float64 Hessian-vector product, ours against curvlinops'."""
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return None
    model = copy.deepcopy(problem.model).double().eval()
    batches = [(x.double(), y) for x, y in problem.batches]
    theirs = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), batches, check_deterministic=False
    )
    vector = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(
        problem.device
    )
    ours = float64_operator(problem).matvec(vector)
    return float(torch.linalg.vector_norm(ours - theirs @ vector) / torch.linalg.vector_norm(ours))


# ------------------------------------------------------------------------------- running a tool
class BudgetExceeded(RuntimeError):
    """A tool used more Hessian-vector products than ``--max-hvps`` in one run."""


class ProductCounter:
    """Counts the Hessian-vector products (per vector) of one tool run and enforces the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    def add(self, vectors: int) -> None:
        self.count += vectors
        if self.count > self.cap:
            raise BudgetExceeded(f"over the cap of {self.cap} HVPs")


@dataclass
class RunOutcome:
    """One run of one tool at one setting and seed."""

    seconds: float
    hvps: int
    value: Any = None  # eigenvalues (np.ndarray), trace (float) or density summary (dict)
    error: float = math.nan  # relative error against the reference
    failure: str | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(model: nn.Module) -> None:
    """PyHessian reads ``.grad`` after its own ``backward``: stale gradients would be added in."""
    for param in model.parameters():
        param.grad = None


# One function per (tool, task): (problem, setting, seed, counter, args) -> (value, hvps or None).
# ``hvps`` None means: take the counter's count.


def ours_operator(problem: Problem, args: argparse.Namespace) -> HessianOperator:
    return HessianOperator(problem.model, F.cross_entropy, batches=problem.batches, hvp_mode=args.hvp_mode)


def ours_top(
    problem: Problem, tol: float, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, int]:
    op = ours_operator(problem, args)
    result = top_eigenvalues(op, k=args.k, tol=tol, max_iter=counter.cap, seed=seed)
    return result.eigenvalues.detach().double().cpu().numpy(), op.hvp_count


def ours_trace(
    problem: Problem, rel_tol: float, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, int]:
    op = ours_operator(problem, args)
    result = hessian_trace(op, rel_tol=rel_tol, max_probes=counter.cap, seed=seed)
    return result.estimate, op.hvp_count


def ours_density(
    problem: Problem, _setting: Any, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, int]:
    op = ours_operator(problem, args)
    result = spectral_density(op, num_probes=args.density_probes, lanczos_steps=args.density_steps, seed=seed)
    return {"nodes": int((~torch.isnan(result.nodes)).sum())}, op.hvp_count


@contextmanager
def pyhessian_engine(problem: Problem, counter: ProductCounter) -> Iterator[Any]:
    """A ``pyhessian.hessian`` on the problem whose products go through ``counter``.

    With one batch PyHessian keeps one gradient graph and differentiates it again per product
    (its fastest mode); with several it rebuilds the graph per batch and product."""
    module = importlib.import_module("pyhessian.hessian")  # the package re-exports the class under the module's name

    class CountingHessian(module.hessian):
        def dataloader_hv_product(self, v: Any) -> Any:
            counter.add(1)
            return super().dataloader_hv_product(v)

    plain_product = module.hessian_vector_product

    def counted_product(*inputs: Any, **kwargs: Any) -> Any:
        counter.add(1)
        return plain_product(*inputs, **kwargs)

    clear_grads(problem.model)
    module.hessian_vector_product = counted_product
    try:
        with warnings.catch_warnings():
            # its loss.backward(create_graph=True) warns about a .grad reference cycle; the grads are cleared below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            criterion = nn.CrossEntropyLoss()
            cuda = problem.device.type == "cuda"
            if len(problem.batches) == 1:
                yield CountingHessian(problem.model, criterion, data=problem.batches[0], cuda=cuda)
            else:
                yield CountingHessian(problem.model, criterion, dataloader=problem.batches, cuda=cuda)
    finally:
        module.hessian_vector_product = plain_product
        clear_grads(problem.model)
        problem.model.eval()


def pyhessian_top(
    problem: Problem, tol: float, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    torch.manual_seed(seed)  # PyHessian draws its start vectors from the global RNG
    with pyhessian_engine(problem, counter) as engine:
        values, _ = engine.eigenvalues(maxIter=counter.cap, tol=tol, top_n=args.k)
    return np.asarray(values, dtype=np.float64), None


def pyhessian_trace(
    problem: Problem, probes: int, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    torch.manual_seed(seed)
    with pyhessian_engine(problem, counter) as engine:
        # tol=0 switches its stop on the running mean's change off: exactly ``probes`` probes
        samples = engine.trace(maxIter=probes, tol=0.0)
    return float(np.mean(samples)), None


def pyhessian_density(
    problem: Problem, _setting: Any, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    torch.manual_seed(seed)
    with pyhessian_engine(problem, counter) as engine:
        engine.density(iter=args.density_steps, n_v=args.density_probes)
    return {}, None


def curvlinops_operator(problem: Problem, counter: ProductCounter) -> Any:
    """curvlinops' Hessian with its products counted (columns per call). Its determinism check
    (products run twice at construction) is off, as for every tool the model is deterministic."""
    from curvlinops import HessianLinearOperator

    op = HessianLinearOperator(
        problem.model, nn.CrossEntropyLoss(), [p for p in problem.model.parameters() if p.requires_grad],
        problem.batches, check_deterministic=False,
    )  # fmt: skip
    plain = op._matmat

    def counted(matrix: list[torch.Tensor]) -> list[torch.Tensor]:
        counter.add(int(matrix[0].shape[-1]))
        return plain(matrix)

    op._matmat = counted
    return op


def curvlinops_top(
    problem: Problem, tol: float, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    """curvlinops has no eigensolver of its own; its documented route is SciPy's ``eigsh`` on
    ``to_scipy()``. ARPACK runs in float64 (``to_scipy(float64)``), the products in float32."""
    from scipy.sparse.linalg import eigsh

    op = curvlinops_operator(problem, counter)
    start = np.random.default_rng(seed).standard_normal(problem.num_params)
    values = eigsh(
        op.to_scipy(dtype=np.float64), k=args.k, which="LA", tol=tol, v0=start, maxiter=10**6, return_eigenvectors=False
    )
    return np.sort(values)[::-1], None


def curvlinops_trace(
    problem: Problem, matvecs: int, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    from curvlinops import hutchpp_trace

    torch.manual_seed(seed)
    return float(hutchpp_trace(curvlinops_operator(problem, counter), num_matvecs=matvecs)), None


def curvlinops_density(
    problem: Problem, _setting: Any, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    """Papyan's SLQ; it first estimates the spectrum's ends with ``eigsh`` (products counted)."""
    from curvlinops import lanczos_approximate_spectrum

    torch.manual_seed(seed)
    lanczos_approximate_spectrum(
        curvlinops_operator(problem, counter), ncv=args.density_steps, num_repeats=args.density_probes
    )
    return {}, None


def eigenthings_operator(problem: Problem, counter: ProductCounter) -> Any:
    from hessian_eigenthings import HessianOperator as EigenthingsHessian
    from hessian_eigenthings import supervised_loss

    class CountingHessian(EigenthingsHessian):
        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            counter.add(1)
            return super().matvec(v)

    return CountingHessian(problem.model, problem.batches, supervised_loss(F.cross_entropy))


def eigenthings_top(
    problem: Problem, steps: int, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    """Its Lanczos runs a fixed number of steps (no restart); full reorthogonalisation (its
    default only up to 50 steps) is asked for at every length."""
    from hessian_eigenthings import lanczos

    result = lanczos(
        eigenthings_operator(problem, counter), k=args.k, max_iter=steps, which="LA", reorthogonalize=True, seed=seed
    )
    return result.eigenvalues.double().cpu().numpy(), None


def eigenthings_trace(
    problem: Problem, matvecs: int, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    from hessian_eigenthings import trace

    return float(
        trace(eigenthings_operator(problem, counter), num_matvecs=matvecs, method="hutch++", seed=seed).estimate
    ), None


def eigenthings_density(
    problem: Problem, _setting: Any, seed: int, counter: ProductCounter, args: argparse.Namespace
) -> tuple[Any, None]:
    from hessian_eigenthings import spectral_density as eigenthings_slq

    result = eigenthings_slq(
        eigenthings_operator(problem, counter),
        num_runs=args.density_probes,
        lanczos_steps=args.density_steps,
        seed=seed,
    )
    return {"nodes": int((~torch.isnan(result.raw_eigenvalues)).sum())}, None


@dataclass
class TaskSpec:
    """How one tool does one task: the function and its effort ladder, cheapest first."""

    run: Callable[[Problem, Any, int, ProductCounter, argparse.Namespace], tuple[Any, int | None]]
    ladder: list[Any]
    describe: Callable[[Any], str]


def task_specs(args: argparse.Namespace) -> dict[str, dict[str, TaskSpec]]:
    """The effort ladders. Probe ladders are multiples of 3 (curvlinops' Hutch++ needs that)."""
    cap = args.max_hvps
    probes = [p for p in (30, 60, 120, 240, 480, 960, 1920, 3840) if p <= cap] or [cap - cap % 3]
    fixed = [None]
    density = f"SLQ {args.density_probes} x {args.density_steps}"
    return {
        "ours": {
            "top5": TaskSpec(
                ours_top, [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6], lambda t: f"Lanczos tol {t:g}"
            ),
            "trace": TaskSpec(ours_trace, [8e-2, 4e-2, 2e-2, 1e-2, 5e-3, 2.5e-3], lambda t: f"Hutch++ rel_tol {t:g}"),
            "density": TaskSpec(ours_density, fixed, lambda _: f"{density} (batched)"),
        },
        "pyhessian": {
            "top5": TaskSpec(pyhessian_top, [1e-3, 1e-4, 1e-5, 1e-6, 1e-7], lambda t: f"power iteration tol {t:g}"),
            "trace": TaskSpec(pyhessian_trace, [p for p in (50, 100, 200, 400, 800, 1600, 3200) if p <= cap] or [cap],
                              lambda n: f"Hutchinson {n} probes"),
            "density": TaskSpec(pyhessian_density, fixed, lambda _: density),
        },
        "curvlinops": {
            "top5": TaskSpec(curvlinops_top, [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], lambda t: f"SciPy eigsh tol {t:g}"),
            "trace": TaskSpec(curvlinops_trace, probes, lambda n: f"hutchpp_trace {n} HVPs"),
            "density": TaskSpec(curvlinops_density, fixed, lambda _: f"{density} (Papyan, + eigsh ends)"),
        },
        "eigenthings": {
            "top5": TaskSpec(eigenthings_top,
                             [s for s in (10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 260) if s <= cap],
                             lambda s: f"Lanczos {s} steps"),
            "trace": TaskSpec(eigenthings_trace, probes, lambda n: f"Hutch++ {n} HVPs"),
            "density": TaskSpec(eigenthings_density, fixed, lambda _: density),
        },
    }  # fmt: skip


def first_line(error: BaseException) -> str:
    """``Type: first sentence`` of an error, short enough for a table cell."""
    text = str(error).strip().splitlines()
    sentence = (text[0] if text else "").split(". ")[0]
    return f"{type(error).__name__}: {sentence}"[:120]


# ----------------------------------------------------------------------------- equal accuracy
@dataclass
class Search:
    """One tool's walk up its effort ladder for one task, one (setting, seed) run per step.

    top5: a setting passes when every seed meets the target (a failing seed moves up at once).
    trace: a setting passes when the RMS error over all seeds meets the target (it moves up as
    soon as the squared errors so far exceed what the target allows). density: one setting, all
    seeds, no target."""

    tool: str
    task: str
    spec: TaskSpec
    seeds: list[int]
    target: float
    level: int = 0
    runs: list[RunOutcome] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    done: bool = False
    reached: bool = False
    failure: str | None = None
    last_accuracy: float = math.nan

    @property
    def setting(self) -> Any:
        return self.spec.ladder[self.level]

    def accuracy(self) -> float:
        errors = [r.error for r in self.runs]
        if self.task == "top5":
            return max(errors)
        return math.sqrt(sum(e * e for e in errors) / len(errors))

    def record(self, outcome: RunOutcome, cap: int) -> None:
        if outcome.failure is not None:
            self.runs.append(outcome)
            self.failure = outcome.failure
            self.done = True
            self.last_accuracy = math.nan
            return
        self.runs.append(outcome)
        if self.task == "density":
            if len(self.runs) == len(self.seeds):
                self.done = self.reached = True
            return
        over_budget = outcome.hvps >= cap
        if self.task == "top5":
            passed_so_far = outcome.error <= self.target
        else:
            passed_so_far = sum(r.error**2 for r in self.runs) <= len(self.seeds) * self.target**2
        if passed_so_far and len(self.runs) == len(self.seeds):
            self.done = self.reached = True
            return
        if passed_so_far:
            return
        self.last_accuracy = self.accuracy()
        self.tried.append(f"{self.spec.describe(self.setting)}: {self.last_accuracy:.1e}")
        if over_budget or self.level + 1 == len(self.spec.ladder):
            self.done = True  # the next setting would only cost more
            return
        self.level += 1
        self.runs = []


def run_once(
    search: Search, problem: Problem, seed: int, reference: dict[str, Any], args: argparse.Namespace
) -> RunOutcome:
    counter = ProductCounter(args.max_hvps)
    synchronize(problem.device)
    began = time.perf_counter()
    try:
        value, hvps = search.spec.run(problem, search.setting, seed, counter, args)
    except BudgetExceeded as error:
        synchronize(problem.device)
        return RunOutcome(time.perf_counter() - began, counter.count, error=math.inf, value=str(error))
    except Exception as error:
        if args.verbose:
            traceback.print_exc()
        return RunOutcome(time.perf_counter() - began, counter.count, failure=first_line(error))
    synchronize(problem.device)
    seconds = time.perf_counter() - began
    hvps = counter.count if hvps is None else int(hvps)
    outcome = RunOutcome(seconds, hvps, value=value)
    if search.task == "top5":
        values = np.sort(np.asarray(value, dtype=np.float64))[::-1][: args.k]
        expected = reference["eigenvalues"]
        outcome.error = (
            float(np.max(np.abs(values - expected) / np.abs(expected))) if len(values) == args.k else math.inf
        )
    elif search.task == "trace":
        outcome.error = abs(float(value) - reference["trace"]) / abs(reference["trace"])
    return outcome


def warm_up(tool: str, problem: Problem, args: argparse.Namespace) -> float:
    """One run of the top-5 task at the tool's lowest setting, outside the table; its seconds.

    It takes every tool's one-off costs out of the timed runs: imports, the allocator, first-call
    compilation, and for this package the ``hvp_mode="auto"`` trial, which times the candidate
    modes on a model's first calls and keeps the choice for the model. The timed runs then compare
    the steady state of each tool; the warm-up's seconds are printed as the first-call cost.
    """
    spec = task_specs(args)[tool]["top5"]
    began = time.perf_counter()
    try:
        spec.run(problem, spec.ladder[0], 0, ProductCounter(args.max_hvps), args)
    except Exception:
        pass
    return time.perf_counter() - began


def compare(
    problem: Problem, tasks: Sequence[str], tools: Sequence[str], reference: dict[str, Any], args: argparse.Namespace
) -> list[Search]:
    """Every task, every tool; tools alternate within each round."""
    specs = task_specs(args)
    seeds = list(range(args.seeds))
    searches: list[Search] = []
    first_calls = {tool: warm_up(tool, problem, args) for tool in tools}
    print(
        f"# {problem.name}: first call (warm-up, top-5 at each tool's lowest setting, not in the table): "
        + ", ".join(f"{TOOL_LABELS[tool]} {seconds:.2f} s" for tool, seconds in first_calls.items()),
        flush=True,
    )
    for task in tasks:
        target = {"top5": args.eig_target, "trace": args.trace_target, "density": math.nan}[task]
        task_searches = [Search(tool, task, specs[tool][task], seeds, target) for tool in tools]
        round_index = 0
        while not all(s.done for s in task_searches):
            active = [s for s in task_searches if not s.done]
            shift = round_index % len(active)
            for search in active[shift:] + active[:shift]:
                seed = seeds[len(search.runs)]
                setting = search.spec.describe(search.setting)
                outcome = run_once(search, problem, seed, reference, args)
                search.record(outcome, args.max_hvps)
                status = outcome.failure or (f"error {outcome.error:.1e}" if not math.isnan(outcome.error) else "")
                print(
                    f"  {problem.name:>4} {task:>7} {TOOL_LABELS[search.tool]:<20} {setting:<34}"
                    f" seed {seed}: {outcome.seconds:8.2f} s {outcome.hvps:6d} HVPs {status}",
                    flush=True,
                )
            round_index += 1
        searches += task_searches
    return searches


# --------------------------------------------------------------------------------------- output
def summarize(search: Search) -> dict[str, Any]:
    """The reported figures of one finished search (medians over its seeds)."""
    summary: dict[str, Any] = {"tool": search.tool, "task": search.task, "tried": search.tried}
    if search.failure is not None:
        summary.update(status="failed", note=search.failure)
        return summary
    if not search.reached:
        summary.update(
            status="not reached",
            note=f"best {search.last_accuracy:.1e} at {search.tried[-1].split(':')[0] if search.tried else '?'}",
        )
        return summary
    summary.update(
        status="reached",
        setting=search.spec.describe(search.setting),
        seconds=statistics.median(r.seconds for r in search.runs),
        hvps=int(statistics.median(r.hvps for r in search.runs)),
        accuracy=None if search.task == "density" else search.accuracy(),
    )
    return summary


def speed_up(rows: list[dict[str, Any]]) -> str:
    ours = next((r for r in rows if r["tool"] == "ours" and r["status"] == "reached"), None)
    peers = [r for r in rows if r["tool"] != "ours" and r["status"] == "reached"]
    if ours is None:
        return "ours not reached"
    if not peers:
        return "no peer reached"
    best = min(peers, key=lambda r: r["seconds"])
    return f"{best['seconds'] / ours['seconds']:.2f}x vs {TOOL_LABELS[best['tool']]}"


def cell(row: dict[str, Any]) -> str:
    if row["status"] == "reached":
        return f"{row['seconds']:.2f} s ({row['hvps']} HVPs)"
    return f"{row['status']}: {row['note']}"


def print_tables(results: list[dict[str, Any]], tools: Sequence[str], args: argparse.Namespace) -> None:
    print("\n## Seconds to the target (median over seeds), HVPs per run, speed-up = best peer s / ours s\n")
    print(f"| model | task | {' | '.join(TOOL_LABELS[t] for t in tools)} | speed-up |")
    print(f"| --- | --- | {' | '.join('---:' for _ in tools)} | ---: |")
    for problem in results:
        for task, rows in problem["tasks"].items():
            by_tool = {r["tool"]: r for r in rows}
            label = {"top5": f"top-{args.k} to {args.eig_target:g}",
                     "trace": f"trace to {100 * args.trace_target:g} % RMS",
                     "density": f"density {args.density_probes} x {args.density_steps}"}[task]  # fmt: skip
            print(f"| {problem['name']} | {label} | {' | '.join(cell(by_tool[t]) for t in tools)} | {speed_up(rows)} |")
    print("\n## Settings that reached the target\n")
    print("| model | task | tool | setting | HVPs | seconds | accuracy | settings below it (accuracy) |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- |")
    for problem in results:
        for task, rows in problem["tasks"].items():
            for row in rows:
                accuracy = row.get("accuracy")
                if row["status"] == "reached":
                    shown = f"{accuracy:.1e}" if accuracy is not None else ""
                    print(
                        f"| {problem['name']} | {task} | {TOOL_LABELS[row['tool']]} | {row['setting']} |"
                        f" {row['hvps']} | {row['seconds']:.2f} | {shown} | {'; '.join(row['tried'])} |"
                    )
                else:
                    print(
                        f"| {problem['name']} | {task} | {TOOL_LABELS[row['tool']]} | {row['status']} | | | |"
                        f" {'; '.join(row['tried']) or row['note']} |"
                    )


def versions(tools: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    for tool in tools:
        if tool == "ours":
            continue
        try:
            found[PEER_PACKAGES[tool]] = version(PEER_PACKAGES[tool])
        except PackageNotFoundError:
            found[PEER_PACKAGES[tool]] = "not installed"
    return found


def available(tool: str) -> str | None:
    """None if the tool can be imported, else why not."""
    if tool == "ours":
        return None
    try:
        importlib.import_module(PEER_MODULES[tool])
    except Exception as error:
        return f"not installed ({PEER_PACKAGES[tool]}): {first_line(error)}"
    return None


def apply_smoke(args: argparse.Namespace) -> None:
    """Tiny sizes: every code path in seconds."""
    args.mlp_widths = [64, 32, 16, 10]
    args.mlp_samples = 128
    args.cnn_image_size, args.cnn_widths, args.cnn_hidden, args.cnn_samples = 8, [4, 8], 16, 64
    args.train_steps = min(args.train_steps, 20)
    args.seeds = min(args.seeds, 2)
    args.max_hvps = min(args.max_hvps, 400)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {TASKS}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {TOOLS}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off for every tool)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (start vectors, probes)")
    parser.add_argument("--max-hvps", type=int, default=2048, help="cap on the products of one run")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--eig-target", type=float, default=1e-3, help="relative error of each top eigenvalue")
    parser.add_argument("--trace-target", type=float, default=0.02, help="RMS relative error of the trace over seeds")
    parser.add_argument("--density-probes", type=int, default=4)
    parser.add_argument("--density-steps", type=int, default=32)
    parser.add_argument("--mlp-widths", type=int, nargs="+", default=[784, 256, 128, 10])
    parser.add_argument("--mlp-samples", type=int, default=1024)
    parser.add_argument("--cnn-image-size", type=int, default=32)
    parser.add_argument("--cnn-widths", type=int, nargs=2, default=[16, 32])
    parser.add_argument("--cnn-hidden", type=int, default=64)
    parser.add_argument("--cnn-samples", type=int, default=512)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples per batch for every tool (default: all in one)"
    )
    parser.add_argument("--train-steps", type=int, default=40, help="SGD steps (batch 128) before the analysis")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--reference-tol", type=float, default=1e-8, help="ARPACK tolerance of the float64 reference")
    parser.add_argument(
        "--check-trace-identity",
        choices=["auto", "yes", "no"],
        default="auto",
        help="compare the Gauss-Newton trace with the column-by-column trace (auto: up to 5000 parameters)",
    )
    parser.add_argument("--hvp-mode", default="auto", help="our HessianOperator's hvp_mode")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and training")
    parser.add_argument("--smoke", action="store_true", help="tiny models and samples: every path in seconds")
    parser.add_argument("--json", default=None, help="also write everything to this file")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing tool runs")
    args = parser.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # full float32 for every tool, as our analyses run (design.md: TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tools = [t for t in args.tools.split(",") if t]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown tools/tasks {unknown}; tools: {TOOLS}, tasks: {TASKS}")
    missing = {tool: why for tool in tools if (why := available(tool)) is not None}
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    header = {
        "device": device_name,
        "threads": torch.get_num_threads(),
        "versions": versions(tools),
        "seeds": args.seeds,
        "max_hvps": args.max_hvps,
        "smoke": args.smoke,
    }
    print(f"# spectrum_vs_peers: {json.dumps(header)}")
    for tool, why in missing.items():
        print(f"# {TOOL_LABELS[tool]}: {why}")
    runnable = [t for t in tools if t not in missing]
    results: list[dict[str, Any]] = []
    for name in [m for m in args.models.split(",") if m]:
        problem = build_problem(name, args, device)
        print(f"\n# {name}: {problem.description}", flush=True)
        reference: dict[str, Any] = {}
        checks: dict[str, Any] = {}
        if "top5" in tasks:
            began = time.perf_counter()
            reference["eigenvalues"] = reference_eigenvalues(problem, args.k, args.reference_tol, args.seed)
            print(
                f"# reference top-{args.k} (ARPACK, float64, tol {args.reference_tol:g},"
                f" {time.perf_counter() - began:.1f} s):"
                f" {[float(f'{v:.8g}') for v in reference['eigenvalues']]}"
            )
        if "trace" in tasks or "density" in tasks:
            began = time.perf_counter()
            reference["trace"] = exact_trace_gauss_newton(problem)
            print(
                f"# reference trace (exact, Gauss-Newton identity, float64, {time.perf_counter() - began:.1f} s):"
                f" {reference['trace']:.10g}"
            )
            check = args.check_trace_identity == "yes" or (
                args.check_trace_identity == "auto" and problem.num_params <= 5000
            )
            if check:
                columns = exact_trace_columns(problem)
                checks["trace_columns"] = columns
                checks["trace_identity_rel_diff"] = abs(columns - reference["trace"]) / abs(columns)
                print(
                    f"# check: trace from all {problem.num_params} unit vectors {columns:.10g},"
                    f" relative difference {checks['trace_identity_rel_diff']:.1e}"
                )
        product_check = curvlinops_product_check(problem)
        if product_check is not None:
            checks["hvp_float64_vs_curvlinops"] = product_check
            print(f"# check: float64 HVP, ours vs curvlinops, relative difference {product_check:.1e}")
        searches = compare(problem, tasks, runnable, reference, args)
        rows: dict[str, list[dict[str, Any]]] = {}
        for task in tasks:
            rows[task] = []
            for tool in tools:
                if tool in missing:
                    rows[task].append(
                        {"tool": tool, "task": task, "status": "not installed", "note": missing[tool], "tried": []}
                    )
                else:
                    rows[task].append(summarize(next(s for s in searches if s.tool == tool and s.task == task)))
        results.append({
            "name": name, "description": problem.description, "num_params": problem.num_params,
            "reference": {
                key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in reference.items()
            },
            "checks": checks, "tasks": rows,
        })  # fmt: skip
    print_tables(results, tools, args)
    report = {"header": header, "args": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    return report


if __name__ == "__main__":
    main()
