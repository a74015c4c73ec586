"""Training throughput: one ``hessian-train`` epoch (Lightning) against a plain PyTorch loop.

Three sides train the same :class:`~lightning_hessian.models.ImageClassifier` network (same
initial weights) on the same batches: all three iterate the same data module's
``train_dataloader()`` (one tensor gather per batch, same per-device batch, GPU-resident tensors
and on-device augmentation when enabled), with the same SGD optimiser and precision.

* **plain**: a hand-written loop: forward, cross-entropy, backward, SGD step, ``zero_grad``.
  Nothing else (no LR schedule, no metrics, no logging).
* **lightning bare**: a minimal LightningModule (``training_step`` returns the cross-entropy,
  constant-LR SGD, no ``self.log``) in the same Trainer: the cost of Lightning's loop itself
  (hooks, closure, data fetcher, batch transfer, ``on_after_batch_transfer``).
* **hessian-train**: :class:`ImageClassifier` exactly as ``hessian-train fit`` runs it:
  ``training_step`` through the robust-training loss, torchmetrics accuracy, three ``self.log``
  calls per step, the LR scheduler stepping every step, TensorBoard logging every
  ``--log-every-n-steps`` (10, as in ``configs/``) and the epoch-end metric computation.

Both Lightning sides run without validation, checkpointing, model summary and (unless
``--progress-bar``) progress bar, as in ``configs/results_fashion_mnist.yaml``; callbacks
(Hessian analysis, LR monitor) are measured by ``callback_overhead.py``. A Lightning epoch is timed
from one ``on_train_epoch_start`` to the next (the last one to ``on_train_end``), so the epoch-end
work (metric computation, logger writes) counts; the plain loop is timed around its batch loop.
Wall-clock samples/s and samples per CPU-second of the process (``time.process_time``, all
threads, steadier on a shared machine) are medians over the timed epochs (the first epoch of each
run is a warm-up); repeats alternate the three sides so that load changes hit all of them.

CPU (what RESULTS.md records)::

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --dataset fashion_mnist --arch m1 --batch-size 128 \\
        --num-samples 2560 --epochs 2 --repeats 3 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --dataset digits --arch mlp --batch-size 64 \\
        --epochs 3 --repeats 5 --threads 1

GPU (the paper's large-batch setting; CIFAR-shaped random data, no download)::

    python benchmarks/train_throughput.py --dataset cifar_random --arch resnet18 --batch-size 2048 \\
        --precision bf16-mixed --gpu-resident --accelerator gpu --num-samples 50000 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_hessian.data import CIFAR10, Digits, FashionMNIST, ImageDataModule, random_crop_flip
from lightning_hessian.models import ImageClassifier


def write_random_cifar(folder: Path, num_samples: int, seed: int = 0) -> None:
    """A CIFAR-10 folder in torchvision's pickle format filled with random images."""
    rng = np.random.default_rng(seed)
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True, exist_ok=True)
    per_batch = -(-num_samples // 5)
    for name, count in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", 100)]:
        entry = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, count).tolist(),
        }
        with open(target / name, "wb") as handle:
            pickle.dump(entry, handle)


def make_datamodule(args: argparse.Namespace, workdir: Path) -> ImageDataModule:
    options = dict(batch_size=args.batch_size, augment=args.augment, gpu_resident=args.gpu_resident, val_fraction=0.01)
    if args.dataset == "digits":
        return Digits(**options)
    if args.dataset == "fashion_mnist":
        return FashionMNIST(**options)
    if args.dataset == "cifar_random":
        write_random_cifar(workdir, args.num_samples)
        return CIFAR10(data_dir=str(workdir), **options)
    return CIFAR10(data_dir=args.data_dir, **options)


class EpochTimer(pl.Callback):
    """Wall and process CPU time of each training epoch, from one ``on_train_epoch_start`` to the
    next (the last epoch to ``on_train_end``), device synchronised, so epoch-end work counts."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.samples: list[int] = []
        self._start: tuple[float, float] | None = None
        self._count = 0

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _close_epoch(self, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module.device)
        wall, cpu = time.perf_counter(), time.process_time()
        if self._start is not None:
            self.seconds.append(wall - self._start[0])
            self.cpu_seconds.append(cpu - self._start[1])
            self.samples.append(self._count)
        self._start, self._count = (wall, cpu), 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._count += len(batch[1])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_epoch(pl_module)


class BareModule(pl.LightningModule):
    """The least a LightningModule can be: cross-entropy of the network, constant-LR SGD."""

    def __init__(self, template: ImageClassifier) -> None:
        super().__init__()
        self.network = template.network
        self.learning_rate = template.learning_rate

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.network(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate, momentum=0.9, weight_decay=5e-4)


#: the Lightning sides: name -> the LightningModule to train, made from a copy of the template
LIGHTNING_SIDES: dict[str, Callable[[ImageClassifier], pl.LightningModule]] = {
    "hessian-train": lambda model: model,
    "lightning bare": BareModule,
}

Rates = tuple[list[float], list[float]]  # (samples per wall second, samples per CPU second) per epoch


def lightning_epochs(args: argparse.Namespace, model: pl.LightningModule, dm: ImageDataModule, logdir: Path) -> Rates:
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs + 1,
        logger=TensorBoardLogger(str(logdir), name="lightning", default_hp_metric=False),
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=args.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=args.log_every_n_steps,
    )
    trainer.fit(model, datamodule=dm)
    return (
        [n / s for n, s in zip(timer.samples[1:], timer.seconds[1:], strict=True)],
        [n / s for n, s in zip(timer.samples[1:], timer.cpu_seconds[1:], strict=True)],
    )


def plain_epochs(args: argparse.Namespace, model: ImageClassifier, dm: ImageDataModule, device: torch.device) -> Rates:
    """The hand-written loop: forward, cross-entropy, backward, SGD step."""
    network = model.network.to(device).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=model.learning_rate, momentum=0.9, weight_decay=5e-4)
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    dm.setup("fit")
    if args.gpu_resident:
        for name in ("train_dataset", "val_dataset", "test_dataset"):
            setattr(dm, name, getattr(dm, name).to(device))
    loader = dm.train_dataloader()
    rates: list[float] = []
    cpu_rates: list[float] = []
    for epoch in range(args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start, count = time.perf_counter(), time.process_time(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.augment:
                x = random_crop_flip(x, padding=dm.crop_padding, flip=dm.horizontal_flip)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(network(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            count += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch > 0:
            rates.append(count / (time.perf_counter() - start))
            cpu_rates.append(count / (time.process_time() - cpu_start))
    return rates, cpu_rates


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["digits", "fashion_mnist", "cifar_random", "cifar10"], default="digits")
    parser.add_argument("--data-dir", default="data", help="for --dataset cifar10")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=0, help="training subset (0: all; cifar_random: size)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side and repeat (+1 warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--gpu-resident", action="store_true")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--log-every-n-steps", type=int, default=10, help="Trainer option (configs/ use 10)")
    parser.add_argument(
        "--progress-bar", action="store_true", help="Lightning sides with the TQDM bar (hessian-train's default)"
    )
    parser.add_argument("--json", default=None, help="also write the medians to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "cifar_random" and args.num_samples == 0:
        args.num_samples = 10_000
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dm = make_datamodule(args, workdir / "data")
        dm.setup("fit")
        if args.num_samples and args.dataset != "cifar_random":
            dm.train_dataset = dm.train_dataset.subset(torch.arange(min(args.num_samples, len(dm.train_dataset))))
        train_subset = dm.train_dataset
        pl.seed_everything(0, verbose=False)
        template = ImageClassifier(
            arch=args.arch,
            num_classes=dm.num_classes,
            input_shape=dm.input_shape,
            mean=dm.mean,
            std=dm.std,
            batch_size=args.batch_size,
            base_batch_size=args.batch_size,
            lr=0.01,
            lr_schedule="constant",
        )
        sides = (*LIGHTNING_SIDES, "plain")
        rates: dict[str, list[float]] = {side: [] for side in sides}
        cpu_rates: dict[str, list[float]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            for side in sides:
                dm.train_dataset = train_subset  # the Lightning run moves it when gpu_resident
                model = copy.deepcopy(template)
                if side == "plain":
                    wall, cpu = plain_epochs(args, model, dm, device)
                else:
                    wall, cpu = lightning_epochs(args, LIGHTNING_SIDES[side](model), dm, workdir / f"runs{repeat}")
                rates[side] += wall
                cpu_rates[side] += cpu

    print(
        f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
        f"threads={torch.get_num_threads()} dataset={args.dataset} samples/epoch~{len(train_subset)} "
        f"arch={args.arch} batch={args.batch_size} precision={args.precision} gpu_resident={args.gpu_resident} "
        f"augment={args.augment} log_every_n_steps={args.log_every_n_steps} progress_bar={args.progress_bar} "
        f"timed epochs/side={len(rates['plain'])}"
    )
    plain = statistics.median(rates["plain"])
    plain_cpu = statistics.median(cpu_rates["plain"])
    # ratio: samples/s against plain; overhead: extra time per epoch, plain_rate / rate - 1
    print(
        f"{'side':20s} {'samples/s':>10s} {'ms/step':>8s} {'ratio':>6s} {'overhead':>8s}  "
        f"{'samples/CPU-s':>13s} {'ratio':>6s} {'overhead':>8s}  epochs (samples/s)"
    )
    summary: dict[str, dict[str, float]] = {}
    for side in sides:
        wall, cpu = statistics.median(rates[side]), statistics.median(cpu_rates[side])
        print(
            f"{side:20s} {wall:10.1f} {1e3 * args.batch_size / wall:8.2f} {wall / plain:6.3f}"
            f" {100 * (plain / wall - 1):+7.1f}%  "
            f"{cpu:13.1f} {cpu / plain_cpu:6.3f} {100 * (plain_cpu / cpu - 1):+7.1f}%  "
            f"{', '.join(f'{r:.0f}' for r in rates[side])}"
        )
        summary[side] = {
            "samples_per_s": wall,
            "overhead": plain / wall - 1,
            "samples_per_cpu_s": cpu,
            "cpu_overhead": plain_cpu / cpu - 1,
        }
    if args.json:
        with open(args.json, "w") as handle:
            device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            json.dump({"device": device_name, "settings": vars(args), "sides": summary}, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
