"""Cost of HessianSpectrumCallback against the training it observes, in the same run.

One ``Trainer.fit`` per analysis configuration trains :class:`~lightning_hessian.models.ImageClassifier`
with the callback attached (analysis after every epoch). A timer callback placed before it
measures each training epoch without the analysis; the callback reports its own seconds
(``hessian/seconds``). Printed: medians over the epochs after the first (the first epoch and the
first analysis pay one-off warm-up costs) and their ratio, *analysis seconds per training epoch*, the
median products per analysis over the same epochs and the lowest fraction of converged quantities;
also the ratio of process CPU times, which other processes' load disturbs less on a shared CPU.

Two analyses: **top-1** (``top_k=1``, eigenvalues only, warm-started from the previous epoch) and
**full** (top-5, smallest eigenvalue, Hutch++ trace, SLQ density). Targets (issue 15): top-1 at
most 10 % of an epoch, the full analysis at most one epoch (``--targets``).

``--config`` reads a ``hessian-train`` YAML: the model's options, the data module (class and
options; ``--dataset cifar_random`` swaps in CIFAR-shaped random images, no download), the
trainer's precision and accelerator, its logger (a TensorBoardLogger in a temporary folder if the
config has one), and the sample, tolerance, trace and density options of the config's first
``HessianSpectrumCallback``; the analyses then set ``top_k``/``quantities`` and analyse every
epoch. Other callbacks of the config are not attached. A command-line option overrides the config.

Fashion-MNIST, the paper's CNN ``m1`` (issue 15's CPU measurement; data from ``data/`` or
``/usr/share/datasets/fashion-mnist``)::

    OMP_NUM_THREADS=1 python benchmarks/callback_overhead.py --config configs/results_fashion_mnist_m1.yaml \\
        --epochs 2 --threads 1

GPU, the paper's large-batch setting (resnet18, batch 2048, bf16-mixed, GPU-resident random CIFAR)::

    python benchmarks/callback_overhead.py --config configs/cifar_bs2048.yaml --dataset cifar_random \\
        --num-samples 50000 --epochs 3

Small CPU run without a config::

    python benchmarks/callback_overhead.py --dataset digits --arch mlp --batch-size 64 \\
        --analysis-samples 512 --trace-max-probes 64 --density-steps 32 --epochs 3
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_datamodule

from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.data import ImageDataModule
from lightning_hessian.models import ImageClassifier


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

#: the HessianSpectrumCallback options taken from a config (and overridable on the command line)
SPECTRUM_OPTIONS = {
    "num_samples": "analysis_samples",
    "analysis_batch_size": "analysis_batch_size",
    "eig_tol": "eig_tol",
    "trace_rel_tol": "trace_rel_tol",
    "trace_max_probes": "trace_max_probes",
    "density_probes": "density_probes",
    "density_steps": "density_steps",
}
#: defaults where neither the command line nor a config says: the callback's own defaults, except
#: 1024 analysis samples (a CPU-sized sample)
DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "arch": "mlp", "batch_size": 64, "lr": 0.05, "precision": "32-true", "accelerator": "cpu",
    "analysis_samples": 1024, "analysis_batch_size": 512, "eig_tol": 1e-3, "trace_rel_tol": 1e-2,
    "trace_max_probes": 200, "density_probes": 4, "density_steps": 64, "gpu_resident": False, "augment": False,
}  # fmt: skip


def read_config(path: str) -> dict[str, Any]:
    """The parts of a ``hessian-train`` config this benchmark uses."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    trainer = config.get("trainer") or {}
    data = config.get("data") or {}
    spectrum: dict[str, Any] = {}
    for callback in trainer.get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("HessianSpectrumCallback"):
            spectrum = dict(callback.get("init_args") or {})
            break
    return {
        "model": dict(config.get("model") or {}),
        "data_class": data.get("class_path"),
        "data_args": dict(data.get("init_args") or {}),
        "precision": trainer.get("precision"),
        "accelerator": trainer.get("accelerator"),
        "logger": trainer.get("logger") not in (None, False),
        "log_every_n_steps": trainer.get("log_every_n_steps"),
        "spectrum": spectrum,
    }


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset on the command line from the config, then from DEFAULTS."""
    config = read_config(args.config) if args.config else None
    args.config_settings = config
    from_config: dict[str, Any] = {}
    if config:
        data_args = config["data_args"]
        from_config.update(
            arch=config["model"].get("arch"), lr=config["model"].get("lr"), batch_size=data_args.get("batch_size"),
            gpu_resident=data_args.get("gpu_resident"), augment=data_args.get("augment"),
            precision=config["precision"], accelerator=config["accelerator"],
        )  # fmt: skip
        for option, attribute in SPECTRUM_OPTIONS.items():
            from_config[attribute] = config["spectrum"].get(option)
    if args.dataset is None and config and config["data_class"]:
        args.dataset = config["data_class"]  # for the record; build_datamodule reads the config itself
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            value = from_config.get(name)
            setattr(args, name, default if value is None else value)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        raise SystemExit("the config or --accelerator asks for a GPU and there is none; pass --accelerator cpu")
    return args


def build_datamodule(args: argparse.Namespace, workdir: Path) -> ImageDataModule:
    """The config's data module (its options, with batch size, residency and augmentation as
    resolved), or :func:`train_throughput.make_datamodule` when ``--dataset`` names one."""
    config = args.config_settings
    if config and config["data_class"] and not args.dataset_given:
        module_name, _, class_name = config["data_class"].rpartition(".")
        data_class = getattr(importlib.import_module(module_name), class_name)
        options = {
            **config["data_args"],
            "batch_size": args.batch_size,
            "gpu_resident": args.gpu_resident,
            "augment": args.augment,
        }
        return data_class(**options)
    return make_datamodule(args, workdir)


def build_model(args: argparse.Namespace, datamodule: ImageDataModule) -> ImageClassifier:
    shapes = dict(
        num_classes=datamodule.num_classes, input_shape=datamodule.input_shape, mean=datamodule.mean, std=datamodule.std
    )
    if args.config_settings:
        options = {**args.config_settings["model"], "arch": args.arch, "lr": args.lr}
        return ImageClassifier(**options, **shapes, batch_size=args.batch_size)
    return ImageClassifier(
        arch=args.arch, **shapes, batch_size=args.batch_size, base_batch_size=args.batch_size, lr=args.lr
    )


def run(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    pl.seed_everything(args.seed, verbose=False)
    datamodule = build_datamodule(args, workdir)
    model = build_model(args, datamodule)
    spectrum_options = dict(args.config_settings["spectrum"]) if args.config_settings else {}
    spectrum_options = {
        key: value
        for key, value in spectrum_options.items()
        if key in ("split", "seed", "max_iter", "lanczos_block_size")
    }
    spectrum = HessianSpectrumCallback(
        **ANALYSES[name],
        **spectrum_options,
        every_n_epochs=1,
        analyse_on_train_end=False,  # only the per-epoch analyses are measured
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
    use_logger = args.config_settings["logger"] if args.config_settings else False
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(workdir / "logs"), name=name, default_hp_metric=False) if use_logger else False,
        log_every_n_steps=(args.config_settings or {}).get("log_every_n_steps") or 50,
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
    # the products and convergence of the same analyses the seconds are the median of
    hvps = statistics.median(r.get("hessian/hvps", float("nan")) for r in recorder.records[timed])
    converged = min(r.get("hessian/converged", float("nan")) for r in recorder.records[timed])
    last = recorder.records[-1]
    return {
        "train_epoch_s": epoch,
        "train_steps": trainer.num_training_batches,
        "analysis_s": analysis,
        "ratio": analysis / epoch,
        "cpu_ratio": analysis_cpu / epoch_cpu,
        "hvps": hvps,
        "converged": converged,
        "eig_1": last.get("hessian/eig_1", float("nan")),
    }


def parse_targets(text: str) -> dict[str, float]:
    """``"top-1=0.1,full=1"`` -> ``{"top-1": 0.1, "full": 1.0}`` (analysis seconds per epoch)."""
    targets = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        targets[name.strip()] = float(value)
    return targets


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a hessian-train YAML (model, data, trainer, spectrum options)")
    parser.add_argument(
        "--dataset",
        default=None,
        choices=["digits", "fashion_mnist", "cifar_random", "cifar10"],
        help="instead of the config's data module; cifar_random: CIFAR-shaped random images",
    )
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global training batch")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=50000, help="training samples (cifar_random only)")
    parser.add_argument("--analysis-samples", type=int, default=None)
    parser.add_argument("--analysis-batch-size", type=int, default=None)
    parser.add_argument("--eig-tol", type=float, default=None)
    parser.add_argument("--trace-rel-tol", type=float, default=None)
    parser.add_argument("--trace-max-probes", type=int, default=None)
    parser.add_argument("--density-probes", type=int, default=None)
    parser.add_argument("--density-steps", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per analysis (the first is a warm-up)")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="steps per epoch (smoke runs)")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--accelerator", default=None)
    parser.add_argument("--gpu-resident", action="store_const", const=True, default=None)
    parser.add_argument("--augment", action="store_const", const=True, default=None)
    parser.add_argument("--analyses", default="top-1,full", help=f"comma-separated, of {list(ANALYSES)}")
    parser.add_argument("--targets", default="top-1=0.1,full=1", help="most analysis seconds per epoch (issue 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.dataset_given = args.dataset is not None
    resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = parse_targets(args.targets)

    gpu = args.accelerator in ("gpu", "cuda")
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {device}; config {args.config}; {args.arch} on {args.dataset}, batch {args.batch_size},"
        f" precision {args.precision}, gpu_resident {args.gpu_resident}, {args.analysis_samples} analysis samples"
        f" (micro-batch {args.analysis_batch_size}),"
        f" eig_tol {args.eig_tol}, trace rel_tol {args.trace_rel_tol} (<= {args.trace_max_probes} probes),"
        f" density {args.density_probes} x {args.density_steps}, {args.epochs} epochs"
    )
    print(
        f"{'analysis':<8} {'train s/epoch':>14} {'steps':>6} {'analysis s':>11} {'ratio':>7} {'CPU-time ratio':>15}"
        f" {'HVPs':>6} {'converged':>9} {'eig_1':>10} {'target':>7} {'meets':>5}"
    )
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.analyses.split(","):
            result = run(name, args, Path(folder) / name)
            target = targets.get(name)
            meets = "" if target is None else ("yes" if result["ratio"] <= target else "no")
            print(
                f"{name:<8} {result['train_epoch_s']:>14.3f} {result['train_steps']:>6.0f}"
                f" {result['analysis_s']:>11.3f} {result['ratio']:>7.3f} {result['cpu_ratio']:>15.3f}"
                f" {result['hvps']:>6.0f} {result['converged']:>9.2f}"
                f" {result['eig_1']:>10.4g} {'' if target is None else f'{target:g}':>7} {meets:>5}",
                flush=True,
            )
            results.append({"analysis": name, "target": target, **result})
    if args.json:
        settings = {key: value for key, value in vars(args).items() if key != "config_settings"}
        with open(args.json, "w") as handle:
            json.dump({"device": device, "settings": settings, "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
