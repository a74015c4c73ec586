"""The loss landscape and model interpolation figures of ``hessian-report``: loss along directions
and 2-D loss surfaces from the runs' landscape grids, and the paper's Figure 5 (model interpolation).

The conventions and shared helpers are those of :mod:`lightning_hessian.report.figures`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize

from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import load_landscape
from lightning_hessian.metrics import SPLITS
from lightning_hessian.report.artifacts import Interpolation, group_interpolations, latest_landscapes
from lightning_hessian.report.figures import (
    FigureFile,
    _batch_size_colors,
    _batch_size_label,
    _grid,
    _group,
    _save,
    _slug,
    _sorted_batch_sizes,
    _split_phrase,
    use_log_scale,
)
from lightning_hessian.report.runs import Run

__all__ = ["RunLandscape", "find_landscape", "plot_interpolations", "plot_landscapes"]


# ------------------------------------------------------------------------------------ landscapes


@dataclass(frozen=True)
class RunLandscape:
    """The last landscape file of a run, as :func:`~lightning_hessian.landscape.load_landscape` reads it."""

    path: Path
    curves: list[LossCurve]
    surfaces: list[LossSurface]


def find_landscape(run: Run) -> RunLandscape | None:
    """The most recently written landscape ``.npz`` of a run, whatever its split.

    ``LossLandscapeCallback`` writes ``<run>/landscape/epoch_XXX.npz`` during ``fit`` and
    ``test_epoch_XXX.npz`` under ``hessian-train test``. Files that are not landscape archives
    are ignored. (The report itself reads every file, per split:
    :func:`lightning_hessian.report.artifacts.latest_landscapes`.)

    Returns:
        The newest file (by modification time, then name) with curves or surfaces, or ``None``
        when the run has none.
    """
    files = [p for p in run.path.rglob("*.npz") if "checkpoints" not in p.relative_to(run.path).parts]
    for path in sorted(files, key=lambda p: (p.stat().st_mtime, p.name), reverse=True):
        try:
            curves, surfaces, _ = load_landscape(path)
        except (OSError, ValueError, KeyError):
            continue
        if curves or surfaces:
            return RunLandscape(path, curves, surfaces)
    return None


def _mean_curve(curves: Sequence[LossCurve]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and std over seeds of curves on one grid (the first curve's grid; others must match)."""
    if not curves:
        return None
    steps = np.asarray(curves[0].steps)
    same = [np.asarray(c.loss, dtype=np.float64) for c in curves if np.array_equal(np.asarray(c.steps), steps)]
    stack = np.vstack(same)
    std = stack.std(axis=0, ddof=1) if len(same) >= 2 else np.zeros(stack.shape[1])
    return steps, stack.mean(axis=0), std


def plot_landscapes(runs: Sequence[Run], out_dir: Path) -> list[FigureFile] | None:
    """Loss landscapes from the runs' ``.npz`` files, per training variant.

    * 1-D: one figure per variant, a panel per (direction, split) with a curve per batch size
      (mean ± std over the seeds that share the grid); panels share the y axis, logarithmic when the
      losses span a decade.
    * 2-D: per variant, surface and split, the smallest and the largest batch size side by side
      (the first seed that has one), on one colour scale (logarithmic when the losses span a
      decade) with one colour bar.

    Returns:
        The figures (``landscape_curves_*.png``, ``landscape_surface_*.png``), or ``None`` when no
        run has a landscape file with a curve or a surface with finite losses.
    """
    written: list[FigureFile] = []
    for variant_index, (variant, by_batch) in enumerate(_group(runs).items()):
        curves: dict[tuple[str, str], dict[int | None, list[LossCurve]]] = defaultdict(lambda: defaultdict(list))
        surfaces: dict[tuple[str, str], dict[int | None, LossSurface]] = defaultdict(dict)
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            for run in sorted(by_batch[batch_size], key=lambda r: (r.seed is None, r.seed or 0)):
                run_curves, run_surfaces = latest_landscapes(run)
                for split, named_curves in run_curves.items():
                    for name, curve in named_curves.items():
                        curves[(name, split)][batch_size].append(curve)
                for split, named_surfaces in run_surfaces.items():
                    for name, surface in named_surfaces.items():
                        surfaces[(name, split)].setdefault(batch_size, surface)
        slug = f"{variant_index}_{_slug(variant)}"
        colors = _batch_size_colors(list(by_batch))
        if curves:
            keys = sorted(curves, key=lambda k: (k[0], SPLITS.index(k[1]) if k[1] in SPLITS else 9))
            figure, axes = _grid(len(keys), sharey=True)
            values: list[float] = []
            for ax, key in zip(axes, keys, strict=True):
                name, split = key
                for batch_size in _sorted_batch_sizes(list(curves[key])):
                    stats = _mean_curve(curves[key][batch_size])
                    if stats is None:
                        continue
                    steps, mean, std = stats
                    values += mean.tolist()
                    ax.plot(steps, mean, color=colors[batch_size], label=_batch_size_label(batch_size))
                    if len(curves[key][batch_size]) > 1:
                        ax.fill_between(steps, mean - std, mean + std, color=colors[batch_size], alpha=0.2, linewidth=0)
                ax.set_title(f"{variant} training: {name}, {split} samples")
                ax.set_xlabel("step t along the direction")
                ax.set_ylabel("loss")
                ax.grid(alpha=0.3, which="both")
                ax.legend(fontsize="small")
            if use_log_scale(values):
                axes[0].set_yscale("log")  # shared
            file_name = f"landscape_curves_{slug}.png"
            _save(figure, out_dir, file_name)
            splits = sorted({split for _, split in keys})
            written.append(
                FigureFile(
                    file_name,
                    f"Loss along directions ({variant} training)",
                    "`L(θ + t d)` along each direction (`eig1`: the top eigenvector of the Hessian on the training "
                    f"samples at the end of `fit`, unit length) on {_split_phrase(splits)} (each panel names its "
                    "split), mean ± std over seeds per batch size; the newest landscape file of each run and split "
                    "(`landscape/*.npz`).",
                )
            )
        for (name, split), by_size in sorted(surfaces.items()):
            ends = _sorted_batch_sizes(list(by_size))
            chosen = [ends[0]] if len(ends) == 1 else [ends[0], ends[-1]]
            losses = np.concatenate([np.ravel(np.asarray(by_size[b].loss, dtype=np.float64)) for b in chosen])
            finite = losses[np.isfinite(losses)]
            if finite.size == 0:
                continue
            log = use_log_scale(finite)
            norm = LogNorm(finite.min(), finite.max()) if log else Normalize(finite.min(), finite.max())
            levels = (
                np.geomspace(finite.min(), finite.max(), 21) if log else np.linspace(finite.min(), finite.max(), 21)
            )
            figure, axes = _grid(len(chosen), width=4.4, height=3.8, max_columns=2, sharex=True, sharey=True)
            contour = None
            for ax, batch_size in zip(axes, chosen, strict=True):
                surface = by_size[batch_size]
                loss = np.asarray(surface.loss, dtype=np.float64)
                contour = ax.contourf(
                    surface.alphas, surface.betas, np.clip(loss, finite.min(), finite.max()).T, levels=levels,
                    norm=norm, cmap="viridis",
                )  # fmt: skip
                ax.plot([0], [0], marker="*", color="white", markersize=10)
                ax.set_title(f"{_batch_size_label(batch_size)}: {name}, {split} samples")
                ax.set_xlabel(f"a: step along {surface.names[0]}")
                ax.set_ylabel(f"b: step along {surface.names[1]}")
            if contour is not None:
                figure.colorbar(contour, ax=axes, label=f"loss ({split} samples)", format="%.3g")
            file_name = f"landscape_surface_{slug}_{_slug(name)}_{split}.png"
            _save(figure, out_dir, file_name)
            written.append(
                FigureFile(
                    file_name,
                    f"Loss surface {name} on {split} samples ({variant} training)",
                    f"`L(θ + a d₁ + b d₂)` on {split} samples for the smallest and the largest batch size (first seed "
                    "with a surface), one colour scale for both panels"
                    + (" (logarithmic)" if log else "")
                    + "; the star is the trained model; directions of unit length (eigenvectors) or "
                    "filter-normalised (random).",
                )
            )
    return written or None


# --------------------------------------------------------------------------------- interpolations


def plot_interpolations(interpolations: Sequence[Interpolation], out_dir: Path) -> list[FigureFile] | None:
    """Model interpolation (the paper's Figure 5): loss, accuracy and top eigenvalue along
    ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``, one figure per pair of models.

    The seeds of one pair (:func:`~lightning_hessian.report.artifacts.interpolation_title`) give
    the mean (thick) and each seed's curve (thin; a ± std band would be clipped on a log axis
    where it reaches below 0); one colour per split of the samples; the loss and eigenvalue axes
    are logarithmic when they span a decade.

    Returns:
        One figure per pair (``interpolation_<i>_<title>.png``), or ``None`` when there are no
        interpolations.
    """
    written: list[FigureFile] = []
    for index, (title, items) in enumerate(group_interpolations(interpolations).items()):
        alphas = items[0].alphas
        same = [item for item in items if np.allclose(item.alphas, alphas)]
        has_eig = any(item.top_eigenvalue is not None for item in same)
        figure, axes = _grid(3 if has_eig else 2, width=4.6, height=3.4)
        splits = sorted({s for item in same for s in item.loss}, key=lambda s: SPLITS.index(s) if s in SPLITS else 9)
        styles = {"train": "-", "val": "-.", "test": "--"}
        # the third panel (when there is one) is the eigenvalue's, drawn below
        for ax, quantity in zip(axes, ("loss", "accuracy"), strict=False):
            values: list[float] = []
            for position, split in enumerate(splits):
                stack = np.vstack([getattr(item, quantity)[split] for item in same if split in getattr(item, quantity)])
                stack = stack * (100 if quantity == "accuracy" else 1)
                mean = stack.mean(axis=0)
                values += stack[np.isfinite(stack)].tolist()
                _seed_lines(ax, alphas, stack, color=f"C{position}", linestyle=styles.get(split, ":"))
                ax.plot(alphas, mean, linestyle=styles.get(split, ":"), color=f"C{position}", linewidth=2,
                        label=f"{split} samples")  # fmt: skip
            if quantity == "loss" and use_log_scale(values):
                ax.set_yscale("log")
            ax.set_ylabel("loss" if quantity == "loss" else "accuracy (%)")
        if has_eig:
            stack = np.vstack([item.top_eigenvalue for item in same if item.top_eigenvalue is not None])
            mean = np.nanmean(stack, axis=0)
            eig_split = next((item.eigenvalue_split for item in same if item.eigenvalue_split), "?")
            _seed_lines(axes[2], alphas, stack, color="C3", linestyle="-")
            axes[2].plot(alphas, mean, color="C3", marker="o", markersize=3, linewidth=2, label=f"{eig_split} samples")
            if use_log_scale(stack):
                axes[2].set_yscale("log")
            axes[2].set_ylabel("top Hessian eigenvalue λ₁(θ(α))")
        for ax in axes:
            for end in (0.0, 1.0):
                ax.axvline(end, color="grey", linewidth=0.8, linestyle=":")
            ax.set_xlabel(f"α  (0: {same[0].labels[0]}, 1: {same[0].labels[1]})")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
        figure.suptitle(f"{title}, {len(same)} seed{'s' if len(same) != 1 else ''}")
        file_name = f"interpolation_{index}_{_slug(title)}.png"
        _save(figure, out_dir, file_name)
        eig_note = (
            f"; the top eigenvalue of the Hessian on {same[0].eigenvalue_split or 'the first split'}'s samples "
            "at every α"
            if has_eig else ""
        )  # fmt: skip
        written.append(
            FigureFile(
                file_name,
                f"Model interpolation: {title}",
                f"θ(α) = (1 − α) θ_A + α θ_B ({_batch_norm_phrase(same)}) from "
                "`hessian-landscape interpolate`: "
                f"loss and accuracy on {_split_phrase(splits)}{eig_note}; the mean (thick) and each of the {len(same)} "
                "pair(s) of runs with the same seed (thin).",
            )
        )
    return written or None


def _seed_lines(ax: Axes, alphas: np.ndarray, stack: np.ndarray, *, color: str, linestyle: str) -> None:
    """One thin line per seed (a row of ``stack``), under the mean's thick one; none for one seed."""
    if len(stack) >= 2:
        for row in stack:
            ax.plot(alphas, row, color=color, linestyle=linestyle, linewidth=0.8, alpha=0.45)


def _batch_norm_phrase(items: Sequence[Interpolation]) -> str:
    """How the interpolations set BatchNorm statistics along the path, for a caption."""
    modes = {item.batch_norm for item in items}
    if modes == {"recompute"}:
        samples = {item.batch_norm_samples for item in items if item.batch_norm_samples}
        on = f" on {samples.pop()} training samples" if len(samples) == 1 else " on training samples"
        return f"BatchNorm statistics recomputed at every α{on}"
    if modes == {None}:
        return "BatchNorm statistics, if any, interpolated too"
    if modes == {"interpolate"}:
        return "BatchNorm statistics interpolated too"
    return "BatchNorm statistics: " + ", ".join(sorted(str(mode) for mode in modes))
