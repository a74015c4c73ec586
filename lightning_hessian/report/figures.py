"""The figures of ``hessian-report``: the pieces they share, and the table's columns against batch size.

The figures are drawn with matplotlib (no pyplot, no global state), by topic:

* this module: :class:`FigureFile`, the shared helpers (panel grid, batch-size colours and labels,
  saving, grouping, :func:`use_log_scale`, :func:`step_to_epoch`, :func:`training_trajectory`) and
  the table's columns against batch size (:func:`plot_training_vs_batch_size`,
  :func:`plot_metrics_vs_batch_size`) and against the softplus sharpness β
  (:func:`plot_metrics_vs_softplus_beta`);
* :mod:`~lightning_hessian.report.spectrum_figures`: the Hessian spectrum (top eigenvalue over
  training, eigenvalues against batch size, top-k spectrum, spectral density);
* :mod:`~lightning_hessian.report.robustness_figures`: the attacks (robust accuracy against
  epsilon, median perturbation norms against batch size);
* :mod:`~lightning_hessian.report.landscape_figures`: loss landscapes and model interpolations.

Every ``plot_*`` function takes the runs (and the table's columns, or the interpolations), draws
PNGs into ``out_dir`` and returns their :class:`FigureFile` (a list where it draws several), or
``None`` when no run logged what the figure needs (the report then says what was missing).

Conventions, for a reviewer comparing panels:

* every caption names the split of the samples behind each curve (``train``, ``test``, ``val``);
* curves over seeds are the mean with a band (or error bars) of one sample standard deviation,
  or, on the model interpolations' log axes, the mean over each seed's thin line;
* a y axis is logarithmic where the values of a panel are positive and span a decade or more
  (:func:`use_log_scale`), the batch-size axis always (base 2);
* panels that are compared share their axes (one quantity at two splits: :func:`_scale_panels`),
  and 2-D surfaces that are compared share one colour scale and one colour bar.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from lightning_hessian.metrics import EIG_MIN, MEDIAN_NORM_PATTERN, SPLITS, STABILITY, TOP_EIGENVALUE, parse_split_tag
from lightning_hessian.report.claims import SADDLE_RATIO
from lightning_hessian.report.events import RunEvents, ScalarPoint
from lightning_hessian.report.runs import Run, softplus_variant
from lightning_hessian.report.tables import Column, column_value, ratio_key, unqualified_key, variant_order

__all__ = [
    "FigureFile",
    "plot_metrics_vs_batch_size",
    "plot_metrics_vs_softplus_beta",
    "plot_training_vs_batch_size",
    "step_to_epoch",
    "training_trajectory",
    "use_log_scale",
]


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


def _figure_legend(figure: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, right of them: the union of the panels' labelled lines.

    For figures whose lines keep one colour per label in every panel (a variant, a batch size): a
    legend in each panel repeats the same entries and, with ten variants, hides the data.
    """
    handles: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        # widen the figure by about the legend's width, so that the panels keep theirs (7 pt per
        # character of "small" text, plus the marker)
        figure.set_figwidth(figure.get_figwidth() + (7 * max(map(len, handles)) + 40) / 72)
        figure.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize="small")


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


def _seed_mean_curve(
    points: Iterable[tuple[float, Sequence[float]]], scale: float = 1.0
) -> tuple[list[float], list[float], list[float]]:
    """A curve of means over seeds: ``(xs, means, stds)`` from ``(x, values over seeds)`` pairs.

    An x without values is left out (not drawn as 0).

    Args:
        points: ``(x, the finite values over seeds at x)`` pairs, in drawing order.
        scale: multiplies means and standard deviations (100 for percentages).

    Returns:
        The xs that have values, the means there and the sample standard deviations (0 for one seed).
    """
    xs: list[float] = []
    means: list[float] = []
    stds: list[float] = []
    for x, values in points:
        if values:
            mean, std = _mean_std(values)
            xs.append(x)
            means.append(scale * mean)
            stds.append(scale * std)
    return xs, means, stds


def _final_values(runs: Sequence[Run], tag: str) -> list[float]:
    """The finite final values of ``tag`` (or a column key) over ``runs``."""
    return [v for run in runs if (v := column_value(run, tag)) is not None and math.isfinite(v)]


def _batch_axis(ax: Axes, batch_sizes: Sequence[int | None]) -> None:
    """A base-2 log axis of batch sizes, ticked at the batch sizes themselves (128, 2048, ...)."""
    ax.set_xscale("log", base=2)
    known = sorted({b for b in batch_sizes if b is not None})
    if known:
        ax.set_xticks(known, [str(b) for b in known])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size")


def use_log_scale(values: Sequence[float] | np.ndarray) -> bool:
    """Whether a panel's values want a log axis: all positive and spanning a decade or more."""
    array = np.asarray([v for v in np.ravel(np.asarray(values, dtype=np.float64)) if math.isfinite(v)])
    return bool(array.size >= 2 and array.min() > 0 and array.max() / array.min() >= 10)


def _quantity(column: Column) -> str:
    """A column's quantity without its split (``"λ₁(θ), test"`` -> ``"λ₁(θ)"``)."""
    suffix = f", {column.split}"
    return column.title[: -len(suffix)] if column.split and column.title.endswith(suffix) else column.title


def _scale_panels(panels: Sequence[tuple[str, Axes, Sequence[float]]]) -> None:
    """Set the y scale of each ``(quantity, axes, plotted means)`` panel: logarithmic by
    :func:`use_log_scale` of its quantity's values over all its panels, which share their y limits,
    so that a quantity at two splits (train and test) is read on one axis."""
    by_quantity: dict[str, list[tuple[Axes, Sequence[float]]]] = defaultdict(list)
    for quantity, ax, values in panels:
        by_quantity[quantity].append((ax, values))
    for members in by_quantity.values():
        if use_log_scale([v for _, values in members for v in values]):
            for ax, _ in members:
                ax.set_yscale("log")
        if len(members) > 1:
            lows, highs = zip(*(ax.get_ylim() for ax, _ in members), strict=True)
            for ax, _ in members:
                ax.set_ylim(min(lows), max(highs))


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


# ------------------------------------------------------------------------------- against batch size


#: quantity -> the threshold a reader compares it with, drawn as a dotted line: the saddle
#: convention of the claims, and the optimizer's stability limit (above 1, the edge of stability)
REFERENCE_LINES: dict[str, float] = {ratio_key(EIG_MIN, TOP_EIGENVALUE): SADDLE_RATIO, STABILITY: 1.0}


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
    scaled: list[tuple[str, Axes, list[float]]] = []
    for ax, column in zip(axes, panels, strict=True):
        panel_values: list[float] = []
        for position, (variant, by_batch) in enumerate(grouped.items()):
            xs, means, stds = _seed_mean_curve(
                ((batch_size, _final_values(by_batch[batch_size], column.key))
                 for batch_size in sorted(b for b in by_batch if b is not None)),
                scale=100.0 if column.percent else 1.0,
            )  # fmt: skip
            if xs:
                panel_values += means
                ax.errorbar(
                    xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=f"C{position % 10}", label=variant
                )
        if panel_values and (reference := REFERENCE_LINES.get(unqualified_key(column.key))) is not None:
            ax.axhline(reference, color="0.35", linestyle=":", linewidth=1.2)
            panel_values.append(reference)
        _batch_axis(ax, [run.batch_size for run in known])
        scaled.append((_quantity(column), ax, panel_values))
        ax.set_ylabel(column.title)
        ax.grid(alpha=0.3, which="both")
    _scale_panels(scaled)
    _figure_legend(figure, axes)
    _save(figure, out_dir, file_name)
    return FigureFile(file_name, title, caption)


def plot_training_vs_batch_size(runs: Sequence[Run], out_dir: Path, columns: Sequence[Column]) -> FigureFile | None:
    """The under-training check: accuracies, training loss, epochs, steps and weight norm vs batch size."""
    chosen = [c for c in columns if c.shown and (c.section == "training" or c.key == "acc")]
    return _plot_columns_vs_batch_size(
        runs, chosen, out_dir, "training_vs_batch_size.png", "Training and test accuracy, training loss vs batch size",
        "Final values per run, mean ± std over seeds, one line per training variant. `train loss`/`train acc`: "
        "epoch means over the last epoch's training batches (train mode; perturbed batches under robust training); "
        "`loss in eval mode`: the loss at the final weights on the landscape analysis's samples, BatchNorm with its "
        "running statistics; "
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
        "the samples (train: the analyses at the end of `fit`; test: `hessian-train test` on the last checkpoint); a "
        "quantity's panels at the two splits share their y axis; dotted: the thresholds the claims and the reader "
        f"compare with (λ_min/λ₁ = {SADDLE_RATIO:g}, the saddle-point convention; λ₁/stability limit = 1, the edge of "
        "stability).",
    )  # fmt: skip


# --------------------------------------------------------------------- against the activation's sharpness


def plot_metrics_vs_softplus_beta(
    runs: Sequence[Run], out_dir: Path, columns: Sequence[Column] | None = None
) -> FigureFile | None:
    """The reviewers' smooth-activation check: the metrics of softplus networks against beta.

    ``softplus_β(x) = log(1 + exp(β x)) / β`` is twice differentiable and approaches ReLU as β grows,
    so a finding of the ReLU network that is no artefact of its zero second derivative shows the same
    trend with batch size at every β, and its values approach the ReLU network's as β grows. A panel
    per column (the accuracy, the shown curvature columns, the median perturbation norms), a line per
    (training, batch size) against β, mean ± std over seeds; a dashed line at the value of the ReLU
    network of the same training and batch size (β = ∞), where the runs have it.

    Args:
        runs: the reported runs; the softplus ones are those whose variant ends in ``softplus β=B``
            (:func:`~lightning_hessian.report.runs.softplus_variant`).
        out_dir: where the PNG goes.
        columns: the report's columns (:func:`~lightning_hessian.report.tables.report_columns` of
            ``runs`` when not given).

    Returns:
        The figure (``metrics_vs_softplus_beta.png``), or ``None`` when no run with a known batch
        size has a softplus activation.
    """
    if columns is None:
        from lightning_hessian.report.tables import report_columns

        columns = report_columns(runs)
    # (base variant, batch size) -> beta -> runs
    lines: dict[tuple[str, int], dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.batch_size is not None and (parsed := softplus_variant(run.variant)) is not None:
            lines[(parsed[0], run.batch_size)][parsed[1]].append(run)
    if not lines:
        return None
    relu: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for run in runs:
        if run.batch_size is not None and (run.variant, run.batch_size) in lines:
            relu[(run.variant, run.batch_size)].append(run)
    softplus_runs = [run for by_beta in lines.values() for beta_runs in by_beta.values() for run in beta_runs]
    chosen = [
        c
        for c in columns
        if c.shown
        and (c.section == "curvature" or c.key == "acc" or MEDIAN_NORM_PATTERN.match(parse_split_tag(c.key)[1]))
    ]
    panels = [column for column in chosen if _final_values(softplus_runs, column.key)]
    if not panels:
        return None
    keys = sorted(lines, key=lambda key: (variant_order(key[0]), key[1]))
    colors = _batch_size_colors([batch_size for _, batch_size in keys])
    bases = sorted({base for base, _ in keys}, key=variant_order)
    markers = "osD^v<>"
    betas = sorted({beta for by_beta in lines.values() for beta in by_beta})
    figure, axes = _grid(len(panels))
    scaled: list[tuple[str, Axes, list[float]]] = []
    for ax, column in zip(axes, panels, strict=True):
        scale = 100.0 if column.percent else 1.0
        panel_values: list[float] = []
        for base, batch_size in keys:
            label = _batch_size_label(batch_size) if len(bases) == 1 else f"{base}, {_batch_size_label(batch_size)}"
            by_beta = lines[(base, batch_size)]
            xs, means, stds = _seed_mean_curve(
                ((beta, _final_values(by_beta[beta], column.key)) for beta in sorted(by_beta)), scale=scale
            )
            color = colors[batch_size]
            if xs:
                panel_values += means
                ax.errorbar(xs, means, yerr=stds, marker=markers[bases.index(base) % len(markers)], markersize=4,
                            capsize=3, color=color, label=f"softplus, {label}")  # fmt: skip
            reference = [scale * v for v in _final_values(relu.get((base, batch_size), []), column.key)]
            if reference:
                mean = _mean_std(reference)[0]
                panel_values.append(mean)
                ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=f"ReLU (β=∞), {label}")
        ax.set_xscale("log")
        ax.set_xticks(betas, [f"{beta:g}" for beta in betas])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("softplus β")
        scaled.append((_quantity(column), ax, panel_values))
        ax.set_ylabel(column.title)
        ax.grid(alpha=0.3, which="both")
    _scale_panels(scaled)
    _figure_legend(figure, axes)
    _save(figure, out_dir, "metrics_vs_softplus_beta.png")
    trainings = ", ".join(bases)
    return FigureFile(
        "metrics_vs_softplus_beta.png", "Final metrics vs the softplus sharpness β",
        f"Networks with softplus_β(x) = log(1 + exp(βx))/β in place of ReLU ({trainings} training): final values "
        "per run, mean ± std over seeds, one line per batch size; dashed: the ReLU network of the same training and "
        "batch size, the limit β → ∞. Each panel names the split of the samples (train: the analyses at the end of "
        "`fit`; test: `hessian-train test` on the last checkpoint); a quantity's panels at the two splits share their "
        "y axis.",
    )  # fmt: skip
