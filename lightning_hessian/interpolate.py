"""``hessian-landscape``: loss landscapes of trained checkpoints from the command line.

Usage::

    hessian-landscape interpolate --ckpt-a small_batch.ckpt --ckpt-b large_batch.ckpt \\
        --config configs/cifar_bs128.yaml [--alpha-min -0.5 --alpha-max 1.5 --num 21] [--eigenvalue]

Builds the model and data module of a ``hessian-train`` config (any extra ``--model.*``/
``--data.*`` arguments after the options override it, as on ``hessian-train``), loads the two
checkpoints, and evaluates loss and accuracy on fixed, seeded samples of the training and test
sets along

    theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B,   alpha in [alpha_min, alpha_max],

BatchNorm running statistics interpolated too (Yao et al. 2018's small-vs-large-batch and
original-vs-robust figure; Goodfellow et al. 2015). With ``--eigenvalue`` also the top Hessian
eigenvalue at every alpha (the curvature along the path). Writes ``interpolation.png``,
``interpolation.csv`` and ``interpolation.json`` into ``--output-dir``.

Checkpoints are read with ``torch.load(weights_only=True)`` (no code runs from the file); a
checkpoint that needs full unpickling is refused unless ``--trust-checkpoints`` is given. A
checkpoint of another architecture than the config's is reported with the mismatching keys.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hessian.errors import UserInputError, run_console_script
from lightning_hessian.landscape import (
    InterpolationResult,
    StateMismatchError,
    check_state_matches,
    interpolation_path,
    plot_interpolation,
    write_interpolation_csv,
)

__all__ = ["CheckpointError", "build_from_config", "load_state_dict", "main", "select_samples"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read as a state dict; the message says why and what to do."""


def load_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """The model ``state_dict`` in a Lightning checkpoint (``["state_dict"]``) or a plain one.

    Args:
        path: the ``.ckpt``/``.pt`` file.
        trust: allow full unpickling (``weights_only=False``) when the safe loader refuses the
            file; only for files from a trusted source, since unpickling can run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust:
            raise CheckpointError(
                f"{path} holds objects that the safe loader (torch.load(weights_only=True)) refuses:"
                f" {str(error).splitlines()[0]}\nIf you trust the file, rerun with --trust-checkpoints."
            ) from None
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # corrupt or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        state = payload["state_dict"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, Tensor) for v in payload.values()):
        state = payload
    else:
        keys = list(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict of tensors;"
            f" found {keys}"
        )
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def build_from_config(config: str | Path, overrides: Sequence[str] = ()) -> tuple[nn.Module, Any]:
    """The LightningModule and LightningDataModule a ``hessian-train`` config describes.

    ``overrides`` are extra command-line arguments for the config parser (``--model.arch=c1``).
    """
    from lightning_hessian.cli import HessianCLI

    args = [
        "--config", str(config), *overrides,
        "--trainer.logger=false", "--trainer.callbacks=null", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]
    with warnings.catch_warnings():
        # this script's own sys.argv is not for LightningCLI; `args` is the whole input
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = HessianCLI(args=args, run=False, save_config_callback=None)
    return cli.model, cli.datamodule


def select_samples(datamodule: Any, split: str, num_samples: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``num_samples`` samples of ``split`` (``train``/``val``/``test``), drawn with ``seed``.

    Uses the data module's ``<split>_dataset`` (unaugmented tensors) when it has one, else
    collects batches from its ``<split>_dataloader()``.
    """
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        length = len(dataset)
        count = length if num_samples is None else min(num_samples, length)
        indices = torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:count]
        if hasattr(dataset, "batch"):
            x, y = dataset.batch(indices)
        else:
            pairs = [dataset[int(i)] for i in indices]
            x, y = torch.stack([p[0] for p in pairs]), torch.as_tensor([int(p[1]) for p in pairs])
        return x.cpu(), y.cpu()
    loader = getattr(datamodule, f"{split}_dataloader")()
    xs, ys, have = [], [], 0
    for x, y, *_ in loader:
        xs.append(x)
        ys.append(y)
        have += len(x)
        if num_samples is not None and have >= num_samples:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if num_samples is None else (x[:num_samples], y[:num_samples])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessian-landscape", description="Loss landscapes of trained checkpoints (lightning-hessian)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inter = commands.add_parser(
        "interpolate",
        help="loss/accuracy (and curvature) on the line between two checkpoints",
        description="Loss and accuracy along theta(alpha) = (1 - alpha) theta_A + alpha theta_B. Arguments"
        " not listed here (e.g. --model.arch=c1) override the config.",
    )
    inter.add_argument("--ckpt-a", required=True, type=Path, help="checkpoint at alpha = 0")
    inter.add_argument("--ckpt-b", required=True, type=Path, help="checkpoint at alpha = 1")
    inter.add_argument("--config", required=True, type=Path, help="the hessian-train config both were trained with")
    inter.add_argument("--alpha-min", type=float, default=-0.5)
    inter.add_argument("--alpha-max", type=float, default=1.5)
    inter.add_argument("--num", type=int, default=21, help="number of evenly spaced alphas (default 21); alpha = 0 and 1 (the two models) are always added")
    inter.add_argument("--eigenvalue", action="store_true", help="also the top Hessian eigenvalue at every alpha")
    inter.add_argument("--eig-tol", type=float, default=1e-3, help="Lanczos tolerance for --eigenvalue")
    inter.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "val", "test"])
    inter.add_argument("--num-samples", type=int, default=2048, help="samples per split (0: the whole split)")
    inter.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    inter.add_argument("--batch-size", type=int, default=512, help="micro-batch size of the evaluation")
    inter.add_argument("--chunk-size", type=int, default=8, help="alphas per batched forward pass")
    inter.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0', ...")
    inter.add_argument("--output-dir", type=Path, default=Path("interpolation"))
    inter.add_argument("--label-a", default=None, help="legend label of A (default: file name)")
    inter.add_argument("--label-b", default=None, help="legend label of B (default: file name)")
    inter.add_argument(
        "--trust-checkpoints", action="store_true",
        help="allow full unpickling of checkpoints the safe loader refuses (only for trusted files)",
    )
    return parser


def interpolate(args: argparse.Namespace, overrides: Sequence[str]) -> InterpolationResult:
    """Run the ``interpolate`` command; returns the result (also written to ``--output-dir``)."""
    if args.num < 2:
        raise UserInputError(f"--num={args.num} must be at least 2")
    if args.alpha_max <= args.alpha_min:
        raise UserInputError(f"--alpha-max={args.alpha_max} must be larger than --alpha-min={args.alpha_min}")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise UserInputError("--batch-size and --chunk-size must be >= 1")
    state_a = load_state_dict(args.ckpt_a, trust=args.trust_checkpoints)
    state_b = load_state_dict(args.ckpt_b, trust=args.trust_checkpoints)
    model, datamodule = build_from_config(args.config, overrides)
    check_state_matches(model, state_a, source=f"checkpoint A ({args.ckpt_a})")
    check_state_matches(model, state_b, source=f"checkpoint B ({args.ckpt_b})")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model = model.to(device)

    datamodule.prepare_data()
    datamodule.setup("fit")
    if "test" in args.splits:
        datamodule.setup("test")
    num_samples = None if args.num_samples == 0 else args.num_samples
    data = {}
    for split in args.splits:
        x, y = select_samples(datamodule, split, num_samples, args.seed)
        data[split] = [(x[i : i + args.batch_size].to(device), y[i : i + args.batch_size].to(device))
                       for i in range(0, len(x), args.batch_size)]

    alphas = np.linspace(args.alpha_min, args.alpha_max, args.num)
    # both models are always on the path: snap 0 and 1 onto the grid when (nearly) on it, else add them
    for end in (0.0, 1.0):
        nearest = int(np.argmin(np.abs(alphas - end)))
        if abs(alphas[nearest] - end) < 1e-9:
            alphas[nearest] = end
    alphas = np.union1d(alphas, [0.0, 1.0])
    start = time.perf_counter()
    # batch_loss=None: the module's hooks (hessian_loss, hessian_accuracy) as the callbacks use them
    result = interpolation_path(
        model, state_a, state_b, alphas, data, batch_loss=None, chunk_size=args.chunk_size,
        eigenvalues=args.eigenvalue,
        eigen_kwargs={"tol": args.eig_tol, "seed": args.seed},
    )
    seconds = time.perf_counter() - start

    labels = (args.label_a or args.ckpt_a.stem, args.label_b or args.ckpt_b.stem)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_interpolation_csv(out / "interpolation.csv", result)
    figure = plot_interpolation(result, labels=labels, title=f"{labels[0]} (alpha=0) to {labels[1]} (alpha=1)")
    figure.savefig(out / "interpolation.png", dpi=120)
    summary = {
        "ckpt_a": str(args.ckpt_a), "ckpt_b": str(args.ckpt_b), "config": str(args.config),
        "overrides": list(overrides), "labels": list(labels), "num_samples": {s: sum(len(b[0]) for b in data[s]) for s in data},
        "seed": args.seed, "device": str(device), "seconds": seconds,
        "alphas": result.alphas.tolist(),
        "loss": {s: v.tolist() for s, v in result.loss.items()},
        "accuracy": {s: v.tolist() for s, v in result.accuracy.items()},
        "top_eigenvalue": None if result.top_eigenvalue is None else result.top_eigenvalue.tolist(),
    }
    (out / "interpolation.json").write_text(json.dumps(summary, indent=2))
    print(f"hessian-landscape: {len(alphas)} alphas x {list(data)} in {seconds:.2f} s -> {out}/interpolation.{{png,csv,json}}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessian-landscape`` console script."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and not o.startswith(("--model", "--data", "--seed_everything"))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides must start with --model. or --data.)")

    def run() -> int:
        interpolate(args, overrides)
        return 0

    # user errors (a bad checkpoint or option, a config the checkpoints do not fit): one line, exit 2
    return run_console_script("hessian-landscape", run, extra_types=(CheckpointError, StateMismatchError))


if __name__ == "__main__":
    sys.exit(main())
