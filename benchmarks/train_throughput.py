"""Training throughput: one ``hessian-train`` epoch (Lightning) against a plain PyTorch loop.

Both sides train the same :class:`~lightning_hessian.models.ImageClassifier` network (same
initial weights), on the same batches of the same data module (same per-device batch, same
GPU-resident tensors and on-device augmentation when enabled), with the same SGD optimiser and
precision. The Lightning side is what ``hessian-train fit`` runs: ``training_step`` with
torchmetrics accuracy and logging to TensorBoard, the learning-rate scheduler stepping every
step; validation and checkpointing are off on both sides. Samples/s are medians over the timed
epochs (the first epoch of each side is a warm-up); repeats alternate the two sides so that
load changes on a shared machine hit both.

CPU (what RESULTS.md records)::

    python benchmarks/train_throughput.py --dataset fashion_mnist --arch m1 --batch-size 128 --num-samples 12800
    python benchmarks/train_throughput.py --dataset digits --arch mlp --batch-size 64

GPU (the paper's large-batch setting; CIFAR-shaped random data, no download)::

    python benchmarks/train_throughput.py --dataset cifar_random --arch resnet18 --batch-size 2048 \\
        --precision bf16-mixed --gpu-resident --accelerator gpu --num-samples 50000 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import pickle
import statistics
import tempfile
import time
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
        entry = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, count).tolist()}
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
    """Wall time of each training epoch (device synchronised)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.samples: list[int] = []
        self._start = 0.0
        self._count = 0

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module.device)
        self._count = 0
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._count += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)
        self.samples.append(self._count)


def lightning_epochs(args: argparse.Namespace, model: ImageClassifier, dm: ImageDataModule, logdir: Path) -> list[float]:
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs + 1,
        logger=TensorBoardLogger(str(logdir), name="lightning"),
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(model, datamodule=dm)
    return [n / s for n, s in zip(timer.samples[1:], timer.seconds[1:])]


def plain_epochs(args: argparse.Namespace, model: ImageClassifier, dm: ImageDataModule, device: torch.device) -> list[float]:
    """The hand-written loop: forward, cross-entropy, backward, SGD step."""
    network = model.network.to(device).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=model.learning_rate, momentum=0.9, weight_decay=5e-4)
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    dm.setup("fit")
    if args.gpu_resident:
        for name in ("train_dataset", "val_dataset", "test_dataset"):
            setattr(dm, name, getattr(dm, name).to(device))
    loader = dm.train_dataloader()
    rates = []
    for epoch in range(args.epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, count = time.perf_counter(), 0
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
    return rates


def main() -> None:
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
    args = parser.parse_args()
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
        lightning_rates: list[float] = []
        plain_rates: list[float] = []
        for repeat in range(args.repeats):
            dm.train_dataset = train_subset  # the Lightning run moves it when gpu_resident
            lightning_rates += lightning_epochs(args, copy.deepcopy(template), dm, workdir / f"runs{repeat}")
            dm.train_dataset = train_subset
            plain_rates += plain_epochs(args, copy.deepcopy(template), dm, device)

    lightning = statistics.median(lightning_rates)
    plain = statistics.median(plain_rates)
    print(
        f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
        f"threads={torch.get_num_threads()} dataset={args.dataset} samples/epoch~{len(train_subset)} "
        f"arch={args.arch} batch={args.batch_size} precision={args.precision} gpu_resident={args.gpu_resident} "
        f"augment={args.augment}"
    )
    print(f"lightning (hessian-train epoch): {lightning:10.1f} samples/s  (epochs: {', '.join(f'{r:.0f}' for r in lightning_rates)})")
    print(f"plain PyTorch loop:              {plain:10.1f} samples/s  (epochs: {', '.join(f'{r:.0f}' for r in plain_rates)})")
    print(f"ratio lightning/plain: {lightning / plain:.3f}  (Lightning overhead {100 * (1 - lightning / plain):+.1f}%)")


if __name__ == "__main__":
    main()
