"""The Hessian spectrum figures of ``hessian-report``: the top eigenvalue over training, the final
eigenvalues against batch size, the top-k spectrum per batch size and the spectral densities.

The conventions and shared helpers are those of :mod:`lightning_hessian.report.figures`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import MaxNLocator

from lightning_hessian.density_histogram import density_from_histogram
from lightning_hessian.metrics import (
    DENSITY,
    EIGENVALUE_PATTERN,
    SPLITS,
    TOP_EIGENVALUE,
    eigenvalue_tag,
    parse_split_tag,
    split_tag,
)
from lightning_hessian.report.figures import (
    FigureFile,
    _batch_axis,
    _batch_size_colors,
    _batch_size_label,
    _curve,
    _figure_legend,
    _grid,
    _group,
    _mean_std,
    _save,
    _seed_mean_curve,
    _sorted_batch_sizes,
    _split_phrase,
    use_log_scale,
)
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import tag_split

__all__ = [
    "plot_spectral_density",
    "plot_spectrum_vs_batch_size",
    "plot_top_eigenvalue_vs_epoch",
    "plot_topk_spectrum",
]

EIGENVALUE_TAG = EIGENVALUE_PATTERN
TOP_EIGENVALUE_TAG = TOP_EIGENVALUE
DENSITY_TAG = DENSITY


def plot_top_eigenvalue_vs_epoch(
    runs: Sequence[Run], out_dir: Path, *, tag: str = TOP_EIGENVALUE_TAG
) -> FigureFile | None:
    """Top Hessian eigenvalue over training, one panel per variant, one curve per batch size."""
    grouped = {
        variant: by_batch
        for variant, by_batch in _group(runs).items()
        if any(tag in run.events.scalars for batch_runs in by_batch.values() for run in batch_runs)
    }
    if not grouped:
        return None
    figure, axes = _grid(len(grouped))
    colors = _batch_size_colors([b for by_batch in grouped.values() for b in by_batch])
    any_steps = False
    splits = []
    for ax, (variant, by_batch) in zip(axes, grouped.items(), strict=True):
        panel_values: list[float] = []
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            values_at: dict[float, list[float]] = defaultdict(list)
            for run in by_batch[batch_size]:
                x, y, is_epoch = _curve(run, tag)
                if y:
                    splits.append(tag_split(run, tag) or "?")
                any_steps |= not is_epoch
                for xi, yi in zip(x, y, strict=True):
                    values_at[xi].append(yi)
            if not values_at:
                continue
            xs = sorted(values_at)
            stats = [_mean_std(values_at[xi]) for xi in xs]
            means = np.array([m for m, _ in stats])
            stds = np.array([s for _, s in stats])
            panel_values += means.tolist()
            color = colors[batch_size]
            ax.plot(xs, means, marker="o", markersize=3, color=color, label=_batch_size_label(batch_size))
            if len(by_batch[batch_size]) > 1:
                ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.2, linewidth=0)
        if use_log_scale(panel_values):
            ax.set_yscale("log")
        ax.set_title(f"{variant} training")
        ax.set_xlabel("step" if any_steps else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("top Hessian eigenvalue λ₁(θ)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    file_name = "top_eigenvalue_vs_epoch.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Top Hessian eigenvalue during training",
        f"`{tag}` on {_split_phrase(splits)} (the analyses during `fit`), mean ± std over seeds, one curve per batch "
        "size.",
    )


def _eigen_indices(runs: Sequence[Run]) -> dict[str, list[int]]:
    """Split label -> the eigenvalue indices logged at that split (fit-time tags at their fit split)."""
    found: dict[str, set[int]] = defaultdict(set)
    for run in runs:
        for tag in run.events.scalars:
            split, base = parse_split_tag(tag)
            if (match := EIGENVALUE_TAG.match(base)) is not None:
                found[split or run.fit_splits.get("hessian", "train")].add(int(match.group(1)))
    return {split: sorted(indices) for split, indices in found.items()}


def _eigen_tag(run_split: str, split: str, index: int) -> str:
    """The tag of the index-th eigenvalue at ``split`` (unqualified when it is the fit split)."""
    tag = eigenvalue_tag(index)
    return tag if split == run_split else split_tag(tag, split)  # type: ignore[arg-type]


def _final_eigenvalues(runs: Sequence[Run], split: str, index: int) -> list[float]:
    """The finite final index-th Hessian eigenvalues at ``split`` over ``runs`` (one per seed)."""
    return [
        v for run in runs
        if (v := run.events.final(_eigen_tag(run.fit_splits.get("hessian", "train"), split, index))) is not None
        and math.isfinite(v)
    ]  # fmt: skip


def plot_spectrum_vs_batch_size(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Final top-k Hessian eigenvalues against batch size, one panel per (variant, split)."""
    panels = []
    for variant, by_batch in _group(runs).items():
        members = [run for batch_runs in by_batch.values() for run in batch_runs]
        for split, indices in _eigen_indices(members).items():
            if any(b is not None for b in by_batch):
                panels.append((variant, split, by_batch, indices))
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (variant, split, by_batch, indices) in zip(axes, panels, strict=True):
        batch_sizes = sorted(b for b in by_batch if b is not None)
        colormap = colormaps["plasma"]
        panel_values: list[float] = []
        for position, index in enumerate(indices):
            xs, means, stds = _seed_mean_curve(
                (batch_size, _final_eigenvalues(by_batch[batch_size], split, index)) for batch_size in batch_sizes
            )
            if xs:
                panel_values += means
                color = colormap(0.85 * position / max(len(indices) - 1, 1))
                ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=color, label=f"λ{index}")
        _batch_axis(ax, batch_sizes)
        if use_log_scale(panel_values) or (panel_values and min(panel_values) > 0 and len(indices) > 1):
            ax.set_yscale("log")
        ax.set_title(f"{variant} training, {split} samples")
        ax.set_ylabel("final Hessian eigenvalue")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", ncol=2)
    file_name = "spectrum_vs_batch_size.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Top Hessian eigenvalues vs batch size",
        f"Final `hessian/eig_1` ... `hessian/eig_k` on {_split_phrase([p[1] for p in panels])} (each panel names "
        "its split), mean ± std over seeds.",
    )


def plot_topk_spectrum(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """The top-k spectrum per batch size: eigenvalue index on x, one line per batch size.

    One panel per (variant, split) with at least two eigenvalues; all panels share the y axis.

    Returns:
        The figure (``topk_spectrum.png``), or ``None`` when no variant logged two or more
        eigenvalues at one split.
    """
    panels = []
    for variant, by_batch in _group(runs).items():
        members = [run for batch_runs in by_batch.values() for run in batch_runs]
        for split, indices in _eigen_indices(members).items():
            if len(indices) >= 2:
                panels.append((variant, split, by_batch, indices))
    if not panels:
        return None
    figure, axes = _grid(len(panels), sharey=True)
    colors = _batch_size_colors([b for _, _, by_batch, _ in panels for b in by_batch])
    all_values: list[float] = []
    for ax, (variant, split, by_batch, indices) in zip(axes, panels, strict=True):
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            xs, means, stds = _seed_mean_curve(
                (index, _final_eigenvalues(by_batch[batch_size], split, index)) for index in indices
            )
            if xs:
                all_values += means
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=3, capsize=2, color=colors[batch_size],
                    label=_batch_size_label(batch_size),
                )  # fmt: skip
        ax.set_title(f"{variant} training, {split} samples")
        ax.set_xlabel("eigenvalue index i")
        ax.set_ylabel("λᵢ(θ)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    if all_values and min(all_values) > 0:
        axes[0].set_yscale("log")  # shared
    file_name = "topk_spectrum.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Top-k Hessian spectrum per batch size",
        f"Final λ₁ ≥ … ≥ λ_k of each batch size (Lanczos) on {_split_phrase([p[1] for p in panels])} (each panel "
        "names its split), mean ± std over seeds; all panels share the (logarithmic where positive) y axis.",
    )


def plot_spectral_density(runs: Sequence[Run], out_dir: Path, *, tag: str = DENSITY_TAG) -> FigureFile | None:
    """Final spectral densities overlaid, one panel per (variant, split), one colour per batch size.

    Reads the last ``hessian/density`` (or split-qualified) histogram of each run (seeds of a batch
    size share a colour). All panels share both axes. The y axis is logarithmic: the bulk near zero
    and the outliers differ by orders of magnitude. The x axis stays linear: SLQ's Gaussian kernel
    (by default 1 % of the spectrum's width) does not resolve the bulk, and a symmetric-log axis
    would draw the kernel's tails as a spread of eigenvalues.

    Returns:
        The figure (``spectral_density.png``), or ``None`` when no run logged a non-empty density
        histogram.
    """
    panels = []
    for variant, by_batch in _group(runs).items():
        members = [run for batch_runs in by_batch.values() for run in batch_runs]
        splits = {}
        for run in members:
            for name in run.events.histograms:
                named_split, base = parse_split_tag(name)
                if base == tag and run.events.histograms[name]:
                    splits[named_split or run.fit_splits.get("hessian", "train")] = True
        for split in sorted(splits, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
            panels.append((variant, split, by_batch))
    if not panels:
        return None
    figure, axes = _grid(len(panels), sharex=True, sharey=True)
    colors = _batch_size_colors([b for _, _, by_batch in panels for b in by_batch])
    floor = 1e-8
    for ax, (variant, split, by_batch) in zip(axes, panels, strict=True):
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            labelled = False
            for run in by_batch[batch_size]:
                name = tag if split == run.fit_splits.get("hessian", "train") else split_tag(tag, split)  # type: ignore[arg-type]
                histograms = run.events.histograms.get(name)
                if not histograms:
                    continue
                centres, density = density_from_histogram(histograms[-1].edges, histograms[-1].counts)
                ax.semilogy(
                    centres, np.where(density > floor, density, np.nan), color=colors[batch_size], linewidth=1.0,
                    alpha=0.8, label=None if labelled else _batch_size_label(batch_size),
                )  # fmt: skip
                labelled = True
        ax.set_title(f"{variant} training, {split} samples")
        ax.tick_params(labelbottom=True)  # also above an empty cell of the grid
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
    _figure_legend(figure, axes)
    file_name = "spectral_density.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Hessian spectral density at the end of training",
        f"Last `{tag}` histogram (stochastic Lanczos quadrature) of each run on "
        f"{_split_phrase([p[1] for p in panels])}, "
        "one line per seed, one colour per batch size; each panel names its split; all panels share both axes. The "
        "density is smoothed by SLQ's Gaussian kernel (by default 1 % of the spectrum's width): what is narrower, the "
        "bulk's shape near 0 included, is not resolved; the smallest and the top-k eigenvalues are in the tables.",
    )
