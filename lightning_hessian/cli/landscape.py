"""``hessian-landscape``: loss landscapes of trained checkpoints from the command line.

(Also ``python -m lightning_hessian.cli.landscape``.) Usage::

    hessian-landscape interpolate --ckpt-a small_batch.ckpt --ckpt-b large_batch.ckpt \\
        --config configs/cifar_bs128.yaml [--alpha-min -0.5 --alpha-max 1.5 --num 21] [--eigenvalue]
    hessian-landscape surface --ckpt run/checkpoints/last.ckpt --config configs/cifar_bs128.yaml \\
        --output-dir run/landscape [--directions eig1 eig2] [--splits train test]

``surface`` draws the 2-D loss surface ``L(theta + a d1 + b d2)`` of one checkpoint along two
directions (by default the top two eigenvectors of the Hessian of the loss on ``--num-samples``
training samples, unit length; ``random<k>`` directions are filter-normalised as in Li et al.
2018) on each split's samples, and writes ``surface_<split>.npz`` (read back by
:func:`lightning_hessian.landscape.load_landscape`; ``hessian-report`` finds it in a run's
``landscape/`` folder), ``surface_<split>.png`` and ``surface.json``.

``interpolate``:

Builds the model and data module of a ``hessian-train`` config (any extra ``--model.*``/
``--data.*`` arguments after the options override it, as on ``hessian-train``), loads the two
checkpoints, and evaluates loss and accuracy on fixed, seeded samples of the training and test
sets along

    theta(alpha) = (1 - alpha) * theta_A + alpha * theta_B,   alpha in [alpha_min, alpha_max],

with BatchNorm running statistics recomputed at every alpha on the training samples
(``--batch-norm recompute``, the default; ``interpolate`` interpolates them) (Yao et al. 2018's
small-vs-large-batch and original-vs-robust figure; Goodfellow et al. 2015). With ``--eigenvalue`` also the top Hessian
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
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_hessian.cli.train import build_from_config
from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.curvature.objective import batch_loss
from lightning_hessian.errors import UserInputError, run_console_script
from lightning_hessian.landscape import (
    InterpolationResult,
    LossSurface,
    StateMismatchError,
    check_state_matches,
    eigenvector_directions,
    has_running_statistics,
    interpolation_path,
    loss_surface,
    normalize_direction,
    plot_contour,
    plot_interpolation,
    random_direction,
    save_landscape,
    trainable_parameters,
    write_interpolation_csv,
)
from lightning_hessian.metrics import SPLITS, Split

__all__ = ["CheckpointError", "interpolate", "load_state_dict", "main", "select_samples", "surface"]

_SURFACE_DIRECTION = re.compile(r"^(eig|random)([1-9][0-9]*)$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read as a state dict; the message says why and what to do."""


def load_state_dict(path: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """The model ``state_dict`` in a Lightning checkpoint (``["state_dict"]``) or a plain one.

    Args:
        path: the ``.ckpt``/``.pt`` file.
        trust: allow full unpickling (``weights_only=False``) when the safe loader refuses the
            file; only for files from a trusted source, since unpickling can run code.

    Returns:
        The state dict's tensor entries (other entries are left out), on the CPU.

    Raises:
        CheckpointError: the file does not exist, cannot be read (corrupt, not a torch file, or
            refused by the safe loader without ``trust``), or holds neither a Lightning checkpoint
            nor a state dict of tensors.
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


def select_samples(datamodule: Any, split: Split, num_samples: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """``num_samples`` samples of ``split`` (``train``/``val``/``test``), drawn with ``seed``.

    Uses the data module's ``<split>_dataset`` (unaugmented tensors) when it has one, else
    collects batches from its ``<split>_dataloader()``.

    Returns:
        ``(x, y)``, the inputs and their labels: all of the split when ``num_samples`` is ``None``,
        else at most ``num_samples`` of them.
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
    inter.add_argument(
        "--num",
        type=int,
        default=21,
        help="number of evenly spaced alphas (default 21); alpha = 0 and 1 (the two models) are always added",
    )
    inter.add_argument("--eigenvalue", action="store_true", help="also the top Hessian eigenvalue at every alpha")
    inter.add_argument(
        "--batch-norm", choices=["recompute", "interpolate"], default="recompute",
        help="BatchNorm running statistics at every alpha: recomputed with that point's weights on the --num-samples"
        " training samples (default), or interpolated between A's and B's (variances clamped at 0: beyond [0, 1]"
        " they can vanish and the loss explodes for that reason alone)",
    )  # fmt: skip
    inter.add_argument("--eig-tol", type=float, default=1e-3, help="Lanczos tolerance for --eigenvalue")
    inter.add_argument("--splits", nargs="+", default=["train", "test"], choices=list(SPLITS))
    inter.add_argument("--num-samples", type=int, default=2048, help="samples per split (0: the whole split)")
    inter.add_argument("--seed", type=int, default=0, help="seed of the sample choice")
    inter.add_argument("--batch-size", type=int, default=512, help="micro-batch size of the evaluation")
    inter.add_argument("--chunk-size", type=int, default=8, help="alphas per batched forward pass")
    inter.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0', ...")
    inter.add_argument("--output-dir", type=Path, default=Path("interpolation"))
    inter.add_argument("--label-a", default=None, help="legend label of A (default: file name)")
    inter.add_argument("--label-b", default=None, help="legend label of B (default: file name)")
    inter.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="allow full unpickling of checkpoints the safe loader refuses (only for trusted files)",
    )
    surf = commands.add_parser(
        "surface",
        help="the 2-D loss surface of one checkpoint along two directions (top Hessian eigenvectors)",
        description="Loss and accuracy on the grid theta + a d1 + b d2, a and b in [-range, range]. Arguments"
        " not listed here (e.g. --model.activation=softplus) override the config.",
    )
    surf.add_argument("--ckpt", required=True, type=Path, help="the checkpoint")
    surf.add_argument("--config", required=True, type=Path, help="the hessian-train config it was trained with")
    surf.add_argument(
        "--directions",
        nargs=2,
        default=["eig1", "eig2"],
        metavar=("D1", "D2"),
        help="eig<k> (k-th top Hessian eigenvector, unit length) or random<k> (filter-normalised); default eig1 eig2",
    )
    surf.add_argument(
        "--range", type=float, default=1.0, help="the grid spans [-range, range] on both axes (default 1)"
    )
    surf.add_argument("--points", type=int, default=21, help="grid points per axis, odd (default 21)")
    surf.add_argument(
        "--splits",
        nargs="+",
        default=["train"],
        choices=list(SPLITS),
        help="the samples the loss is evaluated on; the eigenvectors come from the first (default: train)",
    )
    surf.add_argument("--num-samples", type=int, default=1024, help="samples per split (0: the whole split)")
    surf.add_argument("--seed", type=int, default=0, help="seed of the sample choice and of random directions")
    surf.add_argument("--eig-tol", type=float, default=1e-3, help="Lanczos tolerance of the eigenvectors")
    surf.add_argument("--batch-size", type=int, default=512, help="micro-batch size of the evaluation")
    surf.add_argument("--chunk-size", type=int, default=16, help="grid points per batched forward pass")
    surf.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0', ...")
    surf.add_argument("--output-dir", type=Path, default=Path("surface"))
    surf.add_argument("--label", default=None, help="figure title (default: the checkpoint's file name)")
    surf.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help="allow full unpickling of a checkpoint the safe loader refuses (only for trusted files)",
    )
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _split_batches(
    datamodule: Any, splits: Sequence[Split], num_samples: int, seed: int, batch_size: int, device: torch.device
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """Each split's seeded samples (:func:`select_samples`), cut into micro-batches on ``device``."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    if "test" in splits:
        datamodule.setup("test")
    count = None if num_samples == 0 else num_samples
    data: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for split in splits:
        x, y = select_samples(datamodule, split, count, seed)
        data[split] = [
            (x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)
        ]
    return data


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
    device = _device(args.device)
    model = model.to(device)
    data = _split_batches(datamodule, args.splits, args.num_samples, args.seed, args.batch_size, device)

    alphas = np.linspace(args.alpha_min, args.alpha_max, args.num)
    # both models are always on the path: snap 0 and 1 onto the grid when (nearly) on it, else add them
    for end in (0.0, 1.0):
        nearest = int(np.argmin(np.abs(alphas - end)))
        if abs(alphas[nearest] - end) < 1e-9:
            alphas[nearest] = end
    alphas = np.union1d(alphas, [0.0, 1.0])
    batch_norm = args.batch_norm if has_running_statistics(model) else None
    batch_norm_data = None
    if batch_norm == "recompute":  # on training samples, evaluated or not
        train = (
            data["train"]
            if "train" in data
            else _split_batches(datamodule, ["train"], args.num_samples, args.seed, args.batch_size, device)["train"]
        )
        # full micro-batches only, as training drops its last partial batch: every batch counts once in
        # the average, and a one-sample batch has no batch variance
        batch_norm_data = [batch for batch in train if len(batch[0]) == args.batch_size] or train[:1]
    start = time.perf_counter()
    # batch_loss=None: the module's hooks (hessian_loss, hessian_accuracy) as the callbacks use them
    result = interpolation_path(
        model,
        state_a,
        state_b,
        alphas,
        data,
        batch_loss=None,
        chunk_size=args.chunk_size,
        eigenvalues=args.eigenvalue,
        eigen_kwargs={"tol": args.eig_tol, "seed": args.seed},
        batch_norm=batch_norm or "interpolate",
        batch_norm_data=batch_norm_data,
    )
    seconds = time.perf_counter() - start

    labels = (args.label_a or args.ckpt_a.stem, args.label_b or args.ckpt_b.stem)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_interpolation_csv(out / "interpolation.csv", result)
    figure = plot_interpolation(result, labels=labels, title=f"{labels[0]} (alpha=0) to {labels[1]} (alpha=1)")
    figure.savefig(out / "interpolation.png", dpi=120)
    summary = {
        "ckpt_a": str(args.ckpt_a),
        "ckpt_b": str(args.ckpt_b),
        "config": str(args.config),
        "overrides": list(overrides),
        "labels": list(labels),
        "num_samples": {s: sum(len(b[0]) for b in data[s]) for s in data},
        "seed": args.seed,
        "device": str(device),
        "seconds": seconds,
        "alphas": result.alphas.tolist(),
        "loss": {s: v.tolist() for s, v in result.loss.items()},
        "accuracy": {s: v.tolist() for s, v in result.accuracy.items()},
        "top_eigenvalue": None if result.top_eigenvalue is None else result.top_eigenvalue.tolist(),
        # the split the top eigenvalue is computed on (interpolation_path: the first split)
        "eigenvalue_split": args.splits[0] if args.eigenvalue else None,
        # BatchNorm running statistics along the path (None: the model has none)
        "batch_norm": batch_norm,
        "batch_norm_samples": None if batch_norm_data is None else sum(len(b[0]) for b in batch_norm_data),
    }
    (out / "interpolation.json").write_text(json.dumps(summary, indent=2))
    print(
        f"hessian-landscape: {len(alphas)} alphas x {list(data)} in {seconds:.2f} s"
        f" -> {out}/interpolation.{{png,csv,json}}"
    )
    return result


def surface(args: argparse.Namespace, overrides: Sequence[str]) -> dict[str, LossSurface]:
    """Run the ``surface`` command; returns the surface of each split (also written to ``--output-dir``).

    A checkpoint that cannot be read raises :class:`CheckpointError` (from :func:`load_state_dict`),
    one that does not fit the config's model :class:`~lightning_hessian.landscape.StateMismatchError`.

    Args:
        args: the parsed ``surface`` options.
        overrides: config overrides (``--model.*``/``--data.*``).

    Returns:
        Split name -> its :class:`~lightning_hessian.landscape.LossSurface`.

    Raises:
        UserInputError: a bad option (an even number of points, a non-positive range, an unknown
            direction).
    """
    first, second = args.directions
    for name in (first, second):
        if not _SURFACE_DIRECTION.match(name):
            raise UserInputError(f"--directions: unknown direction {name!r}; use eig<k> (k >= 1) or random<k>")
    if first == second:
        raise UserInputError(f"--directions: two different directions are needed, got {first} twice")
    if args.points < 3 or args.points % 2 == 0:
        raise UserInputError(
            f"--points={args.points} must be an odd number >= 3 so that the model itself is on the grid"
        )
    if not args.range > 0:
        raise UserInputError(f"--range={args.range} must be > 0")
    if args.batch_size < 1 or args.chunk_size < 1 or args.num_samples < 0:
        raise UserInputError("--batch-size and --chunk-size must be >= 1, --num-samples >= 0")
    state = load_state_dict(args.ckpt, trust=args.trust_checkpoints)
    model, datamodule = build_from_config(args.config, overrides)
    check_state_matches(model, state, source=f"checkpoint {args.ckpt}")
    device = _device(args.device)
    model.load_state_dict(state)
    model = model.to(device).eval()
    data = _split_batches(datamodule, args.splits, args.num_samples, args.seed, args.batch_size, device)

    start = time.perf_counter()
    params = trainable_parameters(model)
    wanted = [
        int(m.group(2)) for name in (first, second) if (m := _SURFACE_DIRECTION.match(name)) and m.group(1) == "eig"
    ]
    eigenvalues: list[float] = []
    directions = {}
    surfaces: dict[str, LossSurface] = {}
    axis = np.linspace(-args.range, args.range, args.points)
    axis[args.points // 2] = 0.0  # exactly the model
    # eval mode (BatchNorm running statistics), gradients on, TF32 and autocast off, as the callbacks
    with analysis_mode(model, tensors=True):
        if wanted:
            # the module's loss (its hessian_loss when it has one), as the callbacks use it
            eigenvalues, vectors = eigenvector_directions(
                model, data[args.splits[0]], max(wanted), batch_loss=batch_loss, tol=args.eig_tol, seed=args.seed
            )
            for index, vector in enumerate(vectors, start=1):
                directions[f"eig{index}"] = normalize_direction(vector, params, "unit")
        for name in (first, second):
            if name.startswith("random"):
                # the landscape callback's seeds (seed + 1000 k): the same directions as its surfaces
                directions[name] = random_direction(
                    params, seed=args.seed + 1000 * int(name[6:]), normalization="filter"
                )
        for split, batches in data.items():
            surfaces[split] = loss_surface(
                model, directions[first], directions[second], axis, axis, batches, names=(first, second),
                batch_loss=None, chunk_size=args.chunk_size,
            )  # fmt: skip
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or args.ckpt.stem
    for split, result in surfaces.items():
        extra: dict[str, Any] = {"split": split}
        extra.update({f"landscape__eig_{i}": v for i, v in enumerate(eigenvalues, start=1)})
        save_landscape(out / f"surface_{split}", [], [result], extra)
        figure = plot_contour(result, title=f"{label}: loss on {split} samples")
        figure.savefig(out / f"surface_{split}.png", dpi=120)
    seconds = time.perf_counter() - start
    summary = {
        "ckpt": str(args.ckpt), "config": str(args.config), "overrides": list(overrides),
        "directions": [first, second], "eigenvalue_split": args.splits[0] if wanted else None,
        "eigenvalues": eigenvalues, "range": args.range, "points": args.points,
        "num_samples": {s: sum(len(b[0]) for b in data[s]) for s in data}, "seed": args.seed,
        "device": str(device), "seconds": seconds,
        "center_loss": {s: float(r.loss[args.points // 2, args.points // 2]) for s, r in surfaces.items()},
    }  # fmt: skip
    (out / "surface.json").write_text(json.dumps(summary, indent=2))
    print(
        f"hessian-landscape: {args.points}x{args.points} surface x {list(data)} in {seconds:.2f} s"
        f" -> {out}/surface_*.{{npz,png}}"
    )
    return surfaces


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hessian-landscape`` console script."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-") and not o.startswith(("--model", "--data", "--seed_everything"))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (config overrides must start with --model. or --data.)")

    def run() -> int:
        if args.command == "surface":
            surface(args, overrides)
        else:
            interpolate(args, overrides)
        return 0

    # user errors (a bad checkpoint or option, a config the checkpoints do not fit): one line, exit 2
    return run_console_script("hessian-landscape", run, extra_types=(CheckpointError, StateMismatchError))


if __name__ == "__main__":
    sys.exit(main())
