"""The paper's figures from a set of runs, drawn with matplotlib (no pyplot, no global state).

Every ``plot_*`` function takes the runs (and the table's columns, or the interpolations), draws
PNGs into ``out_dir`` and returns their :class:`FigureFile` (a list where it draws several), or
``None`` when no run logged what the figure needs (the report then says what was missing).

Conventions, for a reviewer comparing panels:

* every caption names the split of the samples behind each curve (``train``, ``test``, ``val``);
* curves over seeds are the mean with a band (or error bars) of one sample standard deviation;
* a y axis is logarithmic where the values of a panel are positive and span a decade or more
  (:func:`use_log_scale`), the batch-size axis always (base 2);
* panels that are compared share their axes, and 2-D surfaces that are compared share one colour
  scale and one colour bar.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from lightning_hessian.density_histogram import density_from_histogram
from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import load_landscape
from lightning_hessian.metrics import (
    CLEAN_ACC,
    DENSITY,
    EIGENVALUE_PATTERN,
    MEDIAN_NORM_PATTERN,
    ROBUST_ACCURACY_PATTERN,
    SPLITS,
    TOP_EIGENVALUE,
    eigenvalue_tag,
    parse_split_tag,
    split_tag,
)
from lightning_hessian.report.artifacts import Interpolation, group_interpolations, latest_landscapes
from lightning_hessian.report.events import RunEvents, ScalarPoint
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import Column, column_value, epsilon_value, tag_split, variant_order

__all__ = [
    "FigureFile",
    "RunLandscape",
    "density_from_histogram",
    "find_landscape",
    "plot_interpolations",
    "plot_landscapes",
    "plot_median_norms_vs_batch_size",
    "plot_metrics_vs_batch_size",
    "plot_robust_accuracy_vs_epsilon",
    "plot_spectral_density",
    "plot_spectrum_vs_batch_size",
    "plot_top_eigenvalue_vs_epoch",
    "plot_topk_spectrum",
    "plot_training_vs_batch_size",
    "step_to_epoch",
    "training_trajectory",
    "use_log_scale",
]

EIGENVALUE_TAG = EIGENVALUE_PATTERN
TOP_EIGENVALUE_TAG = TOP_EIGENVALUE
CLEAN_ACCURACY_TAG = CLEAN_ACC
DENSITY_TAG = DENSITY


@dataclass(frozen=True)
class FigureFile:
    """A written figure: its file name (relative to the report directory), title and caption."""

    file_name: str
    title: str
    caption: str


# ----------------------------------------------------------------------------------------- helpers


def _grid(
    panels: int,
    *,
    width: float = 4.8,
    height: float = 3.6,
    max_columns: int = 3,
    sharex: bool = False,
    sharey: bool = False,
) -> tuple[Figure, list]:
    columns = min(panels, max_columns)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=sharex, sharey=sharey).ravel().tolist()
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _batch_size_colors(batch_sizes: Sequence[int | None]) -> dict[int | None, tuple]:
    """Colours by rank of batch size: small batches dark, large batches light."""
    known = sorted({b for b in batch_sizes if b is not None})
    colormap = colormaps["viridis"]
    colors: dict[int | None, tuple] = {None: (0.5, 0.5, 0.5, 1.0)}
    for index, batch_size in enumerate(known):
        colors[batch_size] = colormap(0.9 * index / max(len(known) - 1, 1))
    return colors


def _batch_size_label(batch_size: int | None) -> str:
    return "B=?" if batch_size is None else f"B={batch_size}"


def _save(figure: Figure, out_dir: Path, file_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / file_name, dpi=110)


def _group(runs: Sequence[Run]) -> dict[str, dict[int | None, list[Run]]]:
    grouped: dict[str, dict[int | None, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.variant][run.batch_size].append(run)
    return {variant: grouped[variant] for variant in sorted(grouped, key=variant_order)}


def _sorted_batch_sizes(batch_sizes: Sequence[int | None]) -> list[int | None]:
    return sorted(batch_sizes, key=lambda b: (b is None, b or 0))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size >= 2 else 0.0


def _final_values(runs: Sequence[Run], tag: str) -> list[float]:
    """The finite final values of ``tag`` (or a column key) over ``runs``."""
    return [v for run in runs if (v := column_value(run, tag)) is not None and math.isfinite(v)]


def _batch_axis(ax: object, batch_sizes: Sequence[int | None]) -> None:
    """A base-2 log axis of batch sizes, ticked at the batch sizes themselves (128, 2048, ...)."""
    ax.set_xscale("log", base=2)  # type: ignore[attr-defined]
    known = sorted({b for b in batch_sizes if b is not None})
    if known:
        ax.set_xticks(known, [str(b) for b in known])  # type: ignore[attr-defined]
        ax.xaxis.set_minor_locator(NullLocator())  # type: ignore[attr-defined]
    ax.set_xlabel("batch size")  # type: ignore[attr-defined]


def use_log_scale(values: Sequence[float] | np.ndarray) -> bool:
    """Whether a panel's values want a log axis: all positive and spanning a decade or more."""
    array = np.asarray([v for v in np.ravel(np.asarray(values, dtype=np.float64)) if math.isfinite(v)])
    return bool(array.size >= 2 and array.min() > 0 and array.max() / array.min() >= 10)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _split_phrase(splits: Sequence[str]) -> str:
    unique = sorted(set(splits), key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    return " and ".join(f"{s} samples" for s in unique) if unique else "samples of unknown split"


# ------------------------------------------------------------------------------------- over training


def step_to_epoch(events: RunEvents, steps: Sequence[int]) -> list[float] | None:
    """The training epoch an analysis logged at each global step belongs to.

    Lightning logs an ``epoch`` scalar with every ``self.log`` call: the training steps and the
    validation of epoch ``e`` are logged at steps below ``(e + 1) * steps_per_epoch``, while an
    epoch-end analysis logs at ``trainer.global_step``, which is already ``(e + 1) *
    steps_per_epoch``. So the epoch of step ``s`` is the largest epoch logged at a step
    *before* ``s`` (0 when nothing was logged before).

    Returns:
        The epoch of each of ``steps``, or ``None`` when the run has no ``epoch`` tag.
    """
    points = events.scalars.get("epoch")
    if not points:
        return None
    latest: dict[int, float] = {}
    for point in points:
        latest[point.step] = max(point.value, latest.get(point.step, -math.inf))
    logged_steps = np.array(sorted(latest))
    running_max = np.maximum.accumulate(np.array([latest[s] for s in logged_steps]))
    positions = np.searchsorted(logged_steps, np.asarray(steps), side="left") - 1
    return [float(running_max[p]) if p >= 0 else 0.0 for p in positions]


def training_trajectory(points: Sequence[ScalarPoint]) -> list[ScalarPoint]:
    """The points logged during training: in logging order, each at a step past all before it.

    Later points at a step already passed are left out: a ``hessian-train test`` of runs logged
    before split-qualified tags logged its test-split analyses under the same tag at step 0 or at
    the checkpoint's step. Non-finite values (analyses cut by a time budget) are left out too.

    Returns:
        The kept points, in logging order with increasing steps.
    """
    kept: list[ScalarPoint] = []
    for point in points:  # sorted by wall time
        if (not kept or point.step > kept[-1].step) and math.isfinite(point.value):
            kept.append(point)
    return kept


def _curve(run: Run, tag: str) -> tuple[list[float], list[float], bool]:
    """``(x, y, x_is_epoch)`` of a tag over training, x in epochs when the run logged them."""
    points = training_trajectory(run.events.scalars.get(tag, []))
    steps = [p.step for p in points]
    epochs = step_to_epoch(run.events, steps)
    x = epochs if epochs is not None else [float(s) for s in steps]
    return x, [p.value for p in points], epochs is not None


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


# ------------------------------------------------------------------------------- against batch size


def _plot_columns_vs_batch_size(
    runs: Sequence[Run], columns: Sequence[Column], out_dir: Path, file_name: str, title: str, caption: str
) -> FigureFile | None:
    """A panel per column, a line per training variant, mean ± std over seeds, log axes where due."""
    known = [run for run in runs if run.batch_size is not None]
    panels = [column for column in columns if _final_values(known, column.key)]
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    grouped = _group(known)
    for ax, column in zip(axes, panels, strict=True):
        panel_values: list[float] = []
        for position, (variant, by_batch) in enumerate(grouped.items()):
            xs, means, stds = [], [], []
            for batch_size in sorted(b for b in by_batch if b is not None):
                values = [100 * v if column.percent else v for v in _final_values(by_batch[batch_size], column.key)]
                if values:
                    mean, std = _mean_std(values)
                    xs.append(batch_size)
                    means.append(mean)
                    stds.append(std)
            if xs:
                panel_values += means
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=f"C{position % 10}", label=variant
                )
        _batch_axis(ax, [run.batch_size for run in known])
        if use_log_scale(panel_values):
            ax.set_yscale("log")
        ax.set_ylabel(column.title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    _save(figure, out_dir, file_name)
    return FigureFile(file_name, title, caption)


def plot_training_vs_batch_size(runs: Sequence[Run], out_dir: Path, columns: Sequence[Column]) -> FigureFile | None:
    """The under-training check: accuracies, training loss, epochs, steps and weight norm vs batch size."""
    chosen = [c for c in columns if c.shown and (c.section == "training" or c.key == "acc")]
    return _plot_columns_vs_batch_size(
        runs, chosen, out_dir, "training_vs_batch_size.png", "Training and test accuracy, training loss vs batch size",
        "Final values per run, mean ± std over seeds, one line per training variant. `train loss`/`train acc`: "
        "epoch means over the last epoch's training batches (train mode; perturbed batches under robust training); "
        "accuracy: the test split (`test/acc`, else the validation split); epochs and optimizer steps of the saved "
        "model; ‖θ‖₂: the norm of all trainable parameters.",
    )  # fmt: skip


def plot_metrics_vs_batch_size(
    runs: Sequence[Run], out_dir: Path, columns: Sequence[Column] | None = None
) -> FigureFile | None:
    """The paper's table at a glance: the accuracy and every shown curvature column (each at its
    split) against batch size, a line per training variant.

    Args:
        runs: the reported runs.
        out_dir: where the PNG goes.
        columns: the report's columns (:func:`~lightning_hessian.report.tables.report_columns` of
            ``runs`` when not given).

    Returns:
        The figure (``metrics_vs_batch_size.png``), or ``None`` when no run with a known batch size
        has a value for the accuracy or a shown curvature column.
    """
    if columns is None:
        from lightning_hessian.report.tables import report_columns

        columns = report_columns(runs)
    chosen = [c for c in columns if c.shown and (c.section == "curvature" or c.key == "acc")]
    return _plot_columns_vs_batch_size(
        runs, chosen, out_dir, "metrics_vs_batch_size.png", "Final metrics vs batch size",
        "Final values per run, mean ± std over seeds, one line per training variant; each panel names the split of "
        "the samples (train: the analyses at the end of `fit`; test: `hessian-train test` on the last checkpoint).",
    )  # fmt: skip


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
            xs, means, stds = [], [], []
            for batch_size in batch_sizes:
                values = [
                    v for run in by_batch[batch_size]
                    if (v := run.events.final(_eigen_tag(run.fit_splits.get("hessian", "train"), split, index)))
                    is not None and math.isfinite(v)
                ]  # fmt: skip
                if values:
                    mean, std = _mean_std(values)
                    xs.append(batch_size)
                    means.append(mean)
                    stds.append(std)
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
            xs, means, stds = [], [], []
            for index in indices:
                values = [
                    v for run in by_batch[batch_size]
                    if (v := run.events.final(_eigen_tag(run.fit_splits.get("hessian", "train"), split, index)))
                    is not None and math.isfinite(v)
                ]  # fmt: skip
                if values:
                    mean, std = _mean_std(values)
                    xs.append(index)
                    means.append(mean)
                    stds.append(std)
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


def plot_robust_accuracy_vs_epsilon(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Robust accuracy against epsilon: a panel per (variant, attack, split), a curve per batch size.

    The clean accuracy (``robust/clean_acc`` at the same split) is drawn at epsilon 0 when the
    attack has no ``eps_0`` tag of its own. All panels share the y axis (0-100 %).

    Returns:
        The figure (``robust_accuracy_vs_epsilon.png``), or ``None`` when no run logged a robust
        accuracy ``robust/[SPLIT/]ATTACK/eps_E``.
    """
    panels = []
    for variant, by_batch in _group(runs).items():
        members = [run for batch_runs in by_batch.values() for run in batch_runs]
        tags = {tag for run in members for tag in run.events.scalars}
        by_key: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
        clean: dict[str, str] = {}
        for tag in tags:
            split, base = parse_split_tag(tag)
            label = split or "/".join(sorted({run.fit_splits.get("robust", "val") for run in members}))
            if base == CLEAN_ACC:
                clean[label] = tag
            match = ROBUST_ACCURACY_PATTERN.match(base)
            if match is not None and math.isfinite(value := epsilon_value(match.group("eps"))):
                by_key[(match.group("attack"), label)].append((tag, value))
        for (attack, label), tag_eps in sorted(by_key.items()):
            panels.append((variant, attack, label, by_batch, sorted(tag_eps, key=lambda t: t[1]), clean.get(label)))
    if not panels:
        return None
    figure, axes = _grid(len(panels), sharey=True)
    colors = _batch_size_colors([b for panel in panels for b in panel[3]])
    for ax, (variant, attack, label, by_batch, tag_eps, clean_tag) in zip(axes, panels, strict=True):
        has_zero = any(eps == 0 for _, eps in tag_eps)
        series = list(tag_eps) if has_zero or clean_tag is None else [(clean_tag, 0.0), *tag_eps]
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            xs, means, stds = [], [], []
            for tag, epsilon in series:
                values = _final_values(by_batch[batch_size], tag)
                if values:
                    mean, std = _mean_std(values)
                    xs.append(epsilon)
                    means.append(100 * mean)
                    stds.append(100 * std)
            if xs:
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3,
                    color=colors[batch_size], label=_batch_size_label(batch_size),
                )  # fmt: skip
        ax.set_title(f"{variant} training, {attack}, {label} samples")
        ax.set_xlabel("ε")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    file_name = "robust_accuracy_vs_epsilon.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Robust accuracy vs ε",
        f"Final `robust/[SPLIT/]ATTACK/eps_E` on {_split_phrase([p[2] for p in panels])} (and the clean accuracy of "
        "the attacked samples at ε=0), mean ± std over seeds; each panel names the split of the attacked samples "
        "(test: `hessian-train test` on the last checkpoint).",
    )


def plot_median_norms_vs_batch_size(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Median minimal perturbation norms (DeepFool, CW) against batch size: a panel per (attack,
    split), a line per training variant.

    Returns:
        The figure (``median_norms_vs_batch_size.png``), or ``None`` when no run logged
        ``robust/[SPLIT/]ATTACK/median_norm`` or no run has a known batch size.
    """
    keys: dict[tuple[str, str], dict[Path, str]] = defaultdict(dict)
    for run in runs:
        for tag in run.events.scalars:
            named_split, base = parse_split_tag(tag)
            if (match := MEDIAN_NORM_PATTERN.match(base)) is not None:
                keys[(match.group("attack"), named_split or run.fit_splits.get("robust", "val"))][run.path] = tag
    known = [run for run in runs if run.batch_size is not None]
    if not keys or not known:
        return None
    grouped = _group(known)
    figure, axes = _grid(len(keys))
    for ax, ((attack, split), tag_of) in zip(axes, sorted(keys.items()), strict=True):
        panel_values: list[float] = []
        for position, (variant, by_batch) in enumerate(grouped.items()):
            xs, means, stds = [], [], []
            for batch_size in sorted(b for b in by_batch if b is not None):
                values = [
                    v for run in by_batch[batch_size]
                    if run.path in tag_of and (v := run.events.final(tag_of[run.path])) is not None and math.isfinite(v)
                ]  # fmt: skip
                if values:
                    mean, std = _mean_std(values)
                    xs.append(batch_size)
                    means.append(mean)
                    stds.append(std)
            if xs:
                panel_values += means
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=f"C{position % 10}", label=variant
                )
        _batch_axis(ax, [run.batch_size for run in known])
        if use_log_scale(panel_values):
            ax.set_yscale("log")
        ax.set_title(f"{attack}, {split} samples")
        ax.set_ylabel("median minimal ‖δ‖₂")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    file_name = "median_norms_vs_batch_size.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Median minimal adversarial perturbation vs batch size",
        f"Final `robust/[SPLIT/]ATTACK/median_norm` on {_split_phrase([split for _, split in keys])} (DeepFool, "
        "Carlini-Wagner: the median over the attacked samples of the smallest perturbation found, 0 for "
        "misclassified samples), mean ± std over seeds; larger is more robust; each panel names its split.",
    )


def plot_spectral_density(runs: Sequence[Run], out_dir: Path, *, tag: str = DENSITY_TAG) -> FigureFile | None:
    """Final spectral densities overlaid, one panel per (variant, split), one colour per batch size.

    Reads the last ``hessian/density`` (or split-qualified) histogram of each run (seeds of a batch
    size share a colour). All panels share both axes; the y axis is logarithmic: the bulk near zero
    and the outliers differ by orders of magnitude.

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
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    file_name = "spectral_density.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Hessian spectral density at the end of training",
        f"Last `{tag}` histogram (stochastic Lanczos quadrature) of each run on "
        f"{_split_phrase([p[1] for p in panels])}, "
        "one line per seed, one colour per batch size; each panel names its split; all panels share both axes.",
    )


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
      (the first seed that has one), on one colour scale (logarithmic when the losses span two
      decades) with one colour bar.

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
            log = finite.min() > 0 and finite.max() / finite.min() > 100
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
                ax.set_xlabel(surface.names[0])
                ax.set_ylabel(surface.names[1])
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
    the mean ± std; one line per split of the samples; the loss and eigenvalue axes are
    logarithmic when they span a decade.

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
                mean = stack.mean(axis=0) * (100 if quantity == "accuracy" else 1)
                std = (stack.std(axis=0, ddof=1) if len(stack) >= 2 else np.zeros_like(mean)) * (
                    100 if quantity == "accuracy" else 1
                )
                values += mean[np.isfinite(mean)].tolist()
                ax.plot(alphas, mean, linestyle=styles.get(split, ":"), color=f"C{position}", label=f"{split} samples")
                if len(stack) >= 2:
                    ax.fill_between(alphas, mean - std, mean + std, color=f"C{position}", alpha=0.2, linewidth=0)
            if quantity == "loss" and use_log_scale(values):
                ax.set_yscale("log")
            ax.set_ylabel("loss" if quantity == "loss" else "accuracy (%)")
        if has_eig:
            stack = np.vstack([item.top_eigenvalue for item in same if item.top_eigenvalue is not None])
            mean = np.nanmean(stack, axis=0)
            std = np.nanstd(stack, axis=0, ddof=1) if len(stack) >= 2 else np.zeros_like(mean)
            eig_split = next((item.eigenvalue_split for item in same if item.eigenvalue_split), "?")
            axes[2].plot(alphas, mean, color="C3", marker="o", markersize=3, label=f"{eig_split} samples")
            if len(stack) >= 2:
                axes[2].fill_between(alphas, mean - std, mean + std, color="C3", alpha=0.2, linewidth=0)
            if use_log_scale(mean):
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
                "θ(α) = (1 − α) θ_A + α θ_B (BatchNorm statistics interpolated too) from "
                "`hessian-landscape interpolate`: "
                f"loss and accuracy on {_split_phrase(splits)}{eig_note}; mean ± std over {len(same)} pair(s) of runs "
                "with the same seed.",
            )
        )
    return written or None
