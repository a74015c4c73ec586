"""Two gloo processes with unequal shards give the single-process results (all_reduce hook)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lightning_hessian.curvature import HessianOperator, hessian_trace, spectral_density, top_eigenvalues

SHARDS = (slice(0, 11), slice(11, 17))  # 11 and 6 samples: unequal on purpose


def make_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Softplus(), nn.Linear(8, 3))
    with torch.no_grad():
        model(torch.randn(32, 5))
    return model, torch.randn(17, 5), torch.randint(0, 3, (17,))


def analyse(op: HessianOperator) -> dict[str, torch.Tensor]:
    v = torch.linspace(-1, 1, op.num_params)
    eig = top_eigenvalues(op, k=2, tol=1e-6, max_iter=60)
    trace = hessian_trace(op, rel_tol=None, max_probes=12, batch_probes=4, seed=3)
    density = spectral_density(op, num_probes=2, lanczos_steps=8, grid_size=64)
    return {
        "hv": op.matvec(v),
        "gradient": op.gradient(),
        "loss": op.loss(),
        "eigenvalues": eig.eigenvalues,
        "trace": torch.tensor(trace.estimate),
        "density": density.density,
    }


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, x, y = make_problem()
        shard = SHARDS[rank]
        op = HessianOperator(
            model, F.cross_entropy, (x[shard], y[shard]), micro_batch_size=4, all_reduce=all_reduce_sum
        )
        assert op.num_samples == 17 and op.num_local_samples == shard.stop - shard.start
        results = analyse(op)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_with_unequal_shards_match_one_process(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, x, y = make_problem()
        single = analyse(HessianOperator(model, F.cross_entropy, (x, y), micro_batch_size=5))
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        for key, expected in single.items():
            got = distributed[key].to(expected.dtype)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())), key
