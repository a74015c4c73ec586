"""Cost of HessianSpectrumCallback against the training it observes, in the same run.

One ``Trainer.fit`` per analysis configuration trains :class:`~lightning_hessian.models.ImageClassifier`
with the callback attached (analysis after every epoch). A timer callback placed before it
measures each training epoch without the analysis; the callback reports its own seconds
(``hessian/seconds``). Printed: medians over the epochs after the first (the first epoch and the
first analysis pay one-off warm-up costs) and their ratio, *analysis seconds per training epoch*;
on a shared CPU also the ratio of process CPU times, which other processes' load disturbs less.

Targets (issue 4, GPU, resnet18 in the ``cifar_bs2048.yaml`` shape, 4096 analysis samples): the
top eigenvalue every epoch costs at most one epoch (ratio <= 1); the full analysis (top-5, smallest
eigenvalue, trace, density) at most ten (ratio <= 10).

CPU (what RESULTS.md records)::

    python benchmarks/callback_overhead.py --dataset digits --arch mlp --batch-size 64 \\
        --analysis-samples 1024 --epochs 3

GPU (the paper's large-batch setting; CIFAR-shaped random data, no download)::

    python benchmarks/callback_overhead.py --dataset cifar_random --arch resnet18 --batch-size 2048 \\
        --precision bf16-mixed --gpu-resident --accelerator gpu --num-samples 50000 \\
        --analysis-samples 4096 --analysis-batch-size 512 --epochs 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_datamodule  # noqa: E402  (the same data setup as the throughput benchmark)

from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback  # noqa: E402
from lightning_hessian.models import ImageClassifier  # noqa: E402


class TrainEpochTimer(pl.Callback):
    """Wall and process-CPU seconds of each training epoch, device-synchronised; ends before later
    callbacks' hooks (the spectrum analysis) run, so the analysis is not counted."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.cpu_end = 0.0
        self._start = 0.0
        self._cpu_start = 0.0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_end = time.process_time()
        self.cpu_seconds.append(self.cpu_end - self._cpu_start)


class AnalysisRecorder(pl.Callback):
    """Copies the spectrum callback's metrics after each of its analyses (placed after it), and the
    process-CPU seconds since the timer stopped: the analysis' CPU time."""

    def __init__(self, spectrum: HessianSpectrumCallback, timer: TrainEpochTimer) -> None:
        self.spectrum = spectrum
        self.timer = timer
        self.records: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.spectrum.last_metrics
        record["cpu_seconds"] = time.process_time() - self.timer.cpu_end
        self.records.append(record)


ANALYSES: dict[str, dict[str, Any]] = {
    "top-1": {"top_k": 1, "quantities": ["eigenvalues"]},
    "full": {"top_k": 5, "quantities": ["eigenvalues", "smallest_eigenvalue", "trace", "density"]},
}


def run(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    pl.seed_everything(args.seed)
    datamodule = make_datamodule(args, workdir)
    model = ImageClassifier(
        arch=args.arch,
        num_classes=datamodule.num_classes,
        input_shape=datamodule.input_shape,
        mean=datamodule.mean,
        std=datamodule.std,
        batch_size=args.batch_size,
        base_batch_size=args.batch_size,
        lr=args.lr,
    )
    spectrum = HessianSpectrumCallback(
        **ANALYSES[name],
        num_samples=args.analysis_samples,
        analysis_batch_size=args.analysis_batch_size,
        eig_tol=args.eig_tol,
        trace_rel_tol=args.trace_rel_tol,
        trace_max_probes=args.trace_max_probes,
        density_probes=args.density_probes,
        density_steps=args.density_steps,
    )
    timer = TrainEpochTimer()
    recorder = AnalysisRecorder(spectrum, timer)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=workdir,
        callbacks=[timer, spectrum, recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    timed = slice(1, None) if args.epochs > 1 else slice(None)
    epoch = statistics.median(timer.seconds[timed])
    analysis = statistics.median(r["hessian/seconds"] for r in recorder.records[timed])
    epoch_cpu = statistics.median(timer.cpu_seconds[timed])
    analysis_cpu = statistics.median(r["cpu_seconds"] for r in recorder.records[timed])
    last = recorder.records[-1]
    return {
        "train_epoch_s": epoch,
        "analysis_s": analysis,
        "ratio": analysis / epoch,
        "cpu_ratio": analysis_cpu / epoch_cpu,
        "hvps": last["hessian/hvps"],
        "converged": last["hessian/converged"],
        "eig_1": last["hessian/eig_1"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion_mnist", "cifar_random", "cifar10"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="global training batch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--num-samples", type=int, default=50000, help="training samples (cifar_random only)")
    parser.add_argument("--analysis-samples", type=int, default=1024)
    parser.add_argument("--analysis-batch-size", type=int, default=512)
    parser.add_argument("--eig-tol", type=float, default=1e-3)
    parser.add_argument("--trace-rel-tol", type=float, default=1e-2)
    parser.add_argument("--trace-max-probes", type=int, default=200)
    parser.add_argument("--density-probes", type=int, default=4)
    parser.add_argument("--density-steps", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--gpu-resident", action="store_true")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--analyses", default="top-1,full", help=f"comma-separated, of {list(ANALYSES)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {args.arch} on {args.dataset}, batch {args.batch_size}, precision {args.precision},"
          f" {args.analysis_samples} analysis samples (micro-batch {args.analysis_batch_size}), {args.epochs} epochs")
    print(f"{'analysis':<8} {'train s/epoch':>14} {'analysis s':>11} {'ratio':>7} {'CPU-time ratio':>15} {'HVPs':>6}"
          f" {'converged':>9} {'eig_1':>10}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.analyses.split(","):
            result = run(name, args, Path(folder) / name)
            print(
                f"{name:<8} {result['train_epoch_s']:>14.3f} {result['analysis_s']:>11.3f} {result['ratio']:>7.2f}"
                f" {result['cpu_ratio']:>15.2f} {result['hvps']:>6.0f} {result['converged']:>9.2f} {result['eig_1']:>10.4g}",
                flush=True,
            )


if __name__ == "__main__":
    main()
