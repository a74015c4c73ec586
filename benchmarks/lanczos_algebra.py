"""The spectral routines' own linear algebra, without the cost of Hessian-vector products.

The operator is a float32 diagonal matrix applied elementwise, so one product costs about one
pass over a vector and returns rows the way ``HessianOperator`` does (the transpose of a
row-major result): what each step costs beyond it is the routines' algebra (re-orthogonalisation,
normalisation, Ritz values and residuals, probe generation, copies). Printed per size ``n``, as
medians over ``--repeats``:

* ``product``: one product of one vector with that operator, and with a ``MatrixOperator`` of the
  same diagonal stored as a sparse CSR matrix (a dense one would not fit), for scale;
* ``top_eigenvalues``: ms of algebra per Lanczos step, ``k`` pairs, ``--steps`` products (a
  tolerance no run can meet, so every run takes exactly that many steps), single vectors and
  blocks of 4;
* ``spectral_density``: ms of algebra per step of 4 probes (``--steps`` steps);
* ``hessian_trace``: ms of algebra per probe (Hutchinson, 64 probes; Hutch++, 64 products).

Algebra = wall time minus the time spent inside the operator's ``matmat``. One thread::

    OMP_NUM_THREADS=1 python benchmarks/lanczos_algebra.py --sizes 100000 1000000 --k 5 --steps 30

``--mlp`` also times the end-to-end case of issue 15 (MLP 784-256-128-10, 1024 random samples,
seed 0): ``top_eigenvalues(k=5, tol=1e-3)``, ``hessian_trace(rel_tol=0.02)`` and
``spectral_density(4 probes, 32 steps)``, with their products and the time outside them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_hessian.curvature import MatrixOperator, hessian_trace, spectral_density, top_eigenvalues


class TimedOperator:
    """A diagonal matrix as an operator (``matmat(V) = diag(d) V``, computed on the rows of
    ``V^T``), adding the seconds spent in its products to ``product_seconds``."""

    def __init__(self, diagonal: Tensor) -> None:
        self.diagonal = diagonal
        self.num_params = diagonal.numel()
        self.dtype = diagonal.dtype
        self.device = diagonal.device
        self.hvp_count = 0
        self.product_seconds = 0.0

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        began = time.perf_counter()
        self.hvp_count += V.shape[1]
        result = (V.T.to(self.dtype) * self.diagonal).T
        self.product_seconds += time.perf_counter() - began
        return result


def diagonal_of(size: int) -> Tensor:
    """Float32 eigenvalues spread over [-1, 1] (cubed: dense near 0, a few well separated)."""
    return torch.linspace(-1.0, 1.0, size, dtype=torch.float32) ** 3


def sparse_matrix_operator(diagonal: Tensor) -> MatrixOperator:
    index = torch.arange(diagonal.numel())
    size = diagonal.numel()
    matrix = torch.sparse_coo_tensor(torch.stack([index, index]), diagonal, (size, size), check_invariants=False)
    return MatrixOperator(matrix.to_sparse_csr())


def algebra_ms(
    op: TimedOperator, run: Callable[[], Any], per: Callable[[Any], int], repeats: int
) -> tuple[float, float]:
    """Median ms of (wall - product) time per unit (``per(result)`` units per run), and the units."""
    run()  # warm-up: allocator, first-call paths
    values = []
    units = 0
    for _ in range(repeats):
        op.product_seconds = 0.0
        began = time.perf_counter()
        result = run()
        wall = time.perf_counter() - began
        units = per(result)
        values.append((wall - op.product_seconds) / units * 1e3)
    return statistics.median(values), units


def product_ms(op: Any, repeats: int) -> float:
    """Median ms of one product of one float64 vector."""
    vector = torch.randn(op.num_params, 1, dtype=torch.float64)
    op.matmat(vector)
    times = []
    for _ in range(max(repeats, 5)):
        began = time.perf_counter()
        op.matmat(vector)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def algebra_figures(size: int, k: int, steps: int, repeats: int) -> None:
    diagonal = diagonal_of(size)
    op = TimedOperator(diagonal)
    print(
        f"n = {size:,}: one product (1 vector) {product_ms(op, repeats):.2f} ms;"
        f" MatrixOperator (sparse CSR diagonal) {product_ms(sparse_matrix_operator(diagonal), repeats):.2f} ms",
        flush=True,
    )
    never = 1e-300  # no run converges: exactly max_iter products
    ms, units = algebra_ms(
        op, lambda: top_eigenvalues(op, k=k, tol=never, max_iter=steps), lambda r: r.hvp_count, repeats
    )
    print(f"  top_eigenvalues k={k}, block 1: {ms:.2f} ms algebra per step ({units} steps)", flush=True)
    ms, units = algebra_ms(
        op,
        lambda: top_eigenvalues(op, k=k, tol=never, max_iter=4 * steps, block_size=4),
        lambda r: r.hvp_count // 4,
        repeats,
    )
    print(f"  top_eigenvalues k={k}, block 4: {ms:.2f} ms algebra per step of 4 vectors ({units} steps)", flush=True)
    ms, units = algebra_ms(
        op,
        lambda: spectral_density(op, num_probes=4, lanczos_steps=steps, grid_size=256),
        lambda r: r.lanczos_steps,
        repeats,
    )
    print(f"  spectral_density 4 probes: {ms:.2f} ms algebra per step of 4 probes ({units} steps)", flush=True)
    for method in ("hutchinson", "hutch++"):
        ms, units = algebra_ms(
            op,
            lambda method=method: hessian_trace(op, method=method, rel_tol=None, max_probes=64),
            lambda r: r.hvp_count,
            repeats,
        )
        print(f"  hessian_trace {method}: {ms:.2f} ms algebra per product ({units} products)", flush=True)


def mlp_case(repeats: int) -> None:
    """Issue 15's CPU case: the three analyses on an MLP, time and products, medians."""
    import torch.nn.functional as F
    from torch import nn

    from lightning_hessian.curvature import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(1024, 784), torch.randint(0, 10, (1024,))
    op = HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=1024)
    product_seconds = [0.0]
    matmat = op.matmat

    def timed(V: Tensor) -> Tensor:
        began = time.perf_counter()
        result = matmat(V)
        product_seconds[0] += time.perf_counter() - began
        return result

    op.matmat = timed  # type: ignore[method-assign]
    for count in (1, 1, 4, 4):  # warm-up, and hvp_mode="auto" picks its implementation per bucket
        op.matmat(torch.randn(op.num_params, count))
    cases: dict[str, Callable[[], Any]] = {
        "top_eigenvalues(k=5, tol=1e-3)": lambda: top_eigenvalues(op, k=5, tol=1e-3),
        "hessian_trace(rel_tol=0.02)": lambda: hessian_trace(op, rel_tol=0.02),
        "spectral_density(4 probes, 32 steps)": lambda: spectral_density(op, num_probes=4, lanczos_steps=32),
    }
    print(f"MLP 784-256-128-10, {op.num_params:,} parameters, 1024 samples:")
    for name, run in cases.items():
        walls, outside, hvps = [], [], []
        for _ in range(repeats):
            product_seconds[0] = 0.0
            began = time.perf_counter()
            result = run()
            wall = time.perf_counter() - began
            walls.append(wall)
            outside.append(wall - product_seconds[0])
            hvps.append(result.hvp_count)
        detail = (
            f", method {result.method}, relative stderr {result.relative_stderr:.3f}"
            if hasattr(result, "method")
            else ""
        )
        print(
            f"  {name}: {statistics.median(walls):.2f} s (runs {', '.join(f'{w:.2f}' for w in walls)}),"
            f" outside products {statistics.median(outside):.2f} s, products {hvps}{detail}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mlp", action="store_true", help="also time issue 15's MLP case end to end")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lightning_hessian

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {lightning_hessian.__file__}")
    for size in args.sizes:
        algebra_figures(size, args.k, args.steps, args.repeats)
    if args.mlp:
        mlp_case(args.repeats)


if __name__ == "__main__":
    main()
