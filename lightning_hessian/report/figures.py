"""The paper's figures from a set of runs, drawn with matplotlib (no pyplot, no global state).

Every ``plot_*`` function takes the runs, draws PNGs into ``out_dir`` and returns their
:class:`FigureFile` (a list for the landscapes), or ``None`` when no run logged what the figure
needs (the report then says what was missing).
Curves over seeds are the mean with a band of one sample standard deviation.
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
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.export import load_landscape
from lightning_hessian.report.events import RunEvents, ScalarPoint
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import epsilon_value, robust_tags, variant_order

__all__ = [
    "FigureFile",
    "RunLandscape",
    "density_from_histogram",
    "find_landscape",
    "plot_landscapes",
    "plot_metrics_vs_batch_size",
    "plot_spectral_density",
    "plot_robust_accuracy_vs_epsilon",
    "plot_spectrum_vs_batch_size",
    "plot_top_eigenvalue_vs_epoch",
    "step_to_epoch",
    "training_trajectory",
]

EIGENVALUE_TAG = re.compile(r"^hessian/eig_(\d+)$")
TOP_EIGENVALUE_TAG = "hessian/eig_1"
CLEAN_ACCURACY_TAG = "robust/clean_acc"


@dataclass(frozen=True)
class FigureFile:
    """A written figure: its file name (relative to the report directory), title and caption."""

    file_name: str
    title: str
    caption: str


def _grid(panels: int, *, width: float = 4.8, height: float = 3.6, max_columns: int = 3) -> tuple[Figure, list]:
    columns = min(panels, max_columns)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
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
    """The finite final values of ``tag`` over ``runs`` (NaN: not computed, e.g. time budget)."""
    return [v for run in runs if (v := run.events.final(tag)) is not None and math.isfinite(v)]


def step_to_epoch(events: RunEvents, steps: Sequence[int]) -> list[float] | None:
    """The training epoch an analysis logged at each global step belongs to.

    Lightning logs an ``epoch`` scalar with every ``self.log`` call: the training steps and the
    validation of epoch ``e`` are logged at steps below ``(e + 1) * steps_per_epoch``, while an
    epoch-end analysis logs at ``trainer.global_step``, which is already ``(e + 1) *
    steps_per_epoch``. So the epoch of step ``s`` is the largest epoch logged at a step
    *before* ``s`` (0 when nothing was logged before). ``None`` when the run has no ``epoch`` tag.
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

    Later points at a step already passed are left out: ``hessian-train test`` logs its test-split
    analyses at step 0 (a test from a checkpoint does not restore the global step), and an
    in-process ``trainer.test`` after ``fit`` logs at the final step again. Non-finite values
    (analyses cut by a time budget) are left out too.
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


def plot_top_eigenvalue_vs_epoch(runs: Sequence[Run], out_dir: Path, *, tag: str = TOP_EIGENVALUE_TAG) -> FigureFile | None:
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
    for ax, (variant, by_batch) in zip(axes, grouped.items()):
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            values_at: dict[float, list[float]] = defaultdict(list)
            for run in by_batch[batch_size]:
                x, y, is_epoch = _curve(run, tag)
                any_steps |= not is_epoch
                for xi, yi in zip(x, y):
                    values_at[xi].append(yi)
            if not values_at:
                continue
            xs = sorted(values_at)
            stats = [_mean_std(values_at[xi]) for xi in xs]
            means = np.array([m for m, _ in stats])
            stds = np.array([s for _, s in stats])
            color = colors[batch_size]
            ax.plot(xs, means, marker="o", markersize=3, color=color, label=_batch_size_label(batch_size))
            if len(by_batch[batch_size]) > 1:
                ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{variant} training")
        ax.set_xlabel("step" if any_steps else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("top Hessian eigenvalue λ₁(θ)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    file_name = "top_eigenvalue_vs_epoch.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Top Hessian eigenvalue during training",
        f"`{tag}` per analysis, mean ± std over seeds, one curve per batch size.",
    )


#: (tag, axis label, shown in percent) of the panels of :func:`plot_metrics_vs_batch_size`
SUMMARY_METRICS = (
    ("test/acc", "test accuracy (%)", True),
    ("hessian/eig_1", "λ₁(θ)", False),
    ("hessian/trace", "trace of the Hessian", False),
    ("hessian/input_eig_1", "λ₁(x), input Hessian", False),
    ("hessian/input_grad_norm", "‖∇ₓJ‖", False),
    ("landscape/sharpness", "ε-sharpness", False),
)


def plot_metrics_vs_batch_size(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """The paper's trends in one figure: a panel per final metric, a line per training variant.

    Panels for the metrics of :data:`SUMMARY_METRICS` that some run logged (with ``val/acc`` in
    place of a missing ``test/acc``); mean ± std over seeds, batch size on a log axis.
    """
    grouped = _group(runs)
    panels = []
    for tag, label, percent in SUMMARY_METRICS:
        tags = (tag, "val/acc") if tag == "test/acc" else (tag,)
        if any(run.events.final(t) is not None for run in runs for t in tags if run.batch_size is not None):
            panels.append((tags, label, percent))
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (tags, label, percent) in zip(axes, panels):
        for position, (variant, by_batch) in enumerate(grouped.items()):
            xs, means, stds = [], [], []
            for batch_size in sorted(b for b in by_batch if b is not None):
                values = []
                for run in by_batch[batch_size]:
                    value = next((v for t in tags if (v := run.events.final(t)) is not None), None)
                    if value is not None and math.isfinite(value):
                        values.append(100 * value if percent else value)
                if values:
                    mean, std = _mean_std(values)
                    xs.append(batch_size)
                    means.append(mean)
                    stds.append(std)
            if xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=f"C{position % 10}", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    file_name = "metrics_vs_batch_size.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Final metrics vs batch size",
        "Last logged value of each run, mean ± std over seeds, one line per training variant "
        "(accuracy: `test/acc`, else `val/acc`).",
    )


def plot_spectrum_vs_batch_size(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Final top-k Hessian eigenvalues against batch size, one panel per variant."""
    grouped = _group(runs)
    panels = {}
    for variant, by_batch in grouped.items():
        indices = sorted(
            {
                int(m.group(1))
                for batch_runs in by_batch.values()
                for run in batch_runs
                for tag in run.events.scalars
                if (m := EIGENVALUE_TAG.match(tag)) is not None
            }
        )
        known = [b for b in by_batch if b is not None]
        if indices and known:
            panels[variant] = (by_batch, indices)
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    for ax, (variant, (by_batch, indices)) in zip(axes, panels.items()):
        batch_sizes = sorted(b for b in by_batch if b is not None)
        colormap = colormaps["plasma"]
        all_positive = True
        for position, index in enumerate(indices):
            xs, means, stds = [], [], []
            for batch_size in batch_sizes:
                values = _final_values(by_batch[batch_size], f"hessian/eig_{index}")
                if values:
                    mean, std = _mean_std(values)
                    xs.append(batch_size)
                    means.append(mean)
                    stds.append(std)
                    all_positive &= min(values) > 0
            if xs:
                color = colormap(0.85 * position / max(len(indices) - 1, 1))
                ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, color=color, label=f"λ{index}")
        ax.set_xscale("log", base=2)
        if all_positive:
            ax.set_yscale("log")
        ax.set_title(f"{variant} training")
        ax.set_xlabel("batch size")
        ax.set_ylabel("final Hessian eigenvalue")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small", ncol=2)
    file_name = "spectrum_vs_batch_size.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Top Hessian eigenvalues vs batch size",
        "Final `hessian/eig_1` ... `hessian/eig_k`, mean ± std over seeds.",
    )


def plot_robust_accuracy_vs_epsilon(runs: Sequence[Run], out_dir: Path) -> FigureFile | None:
    """Robust accuracy against epsilon: a panel per (variant, attack), a curve per batch size.

    The clean accuracy (``robust/clean_acc``) is drawn at epsilon 0 when the attack has no
    ``eps_0`` tag of its own.
    """
    panels = []
    for variant, by_batch in _group(runs).items():
        tags = [tag for batch_runs in by_batch.values() for run in batch_runs for tag in run.events.scalars]
        by_attack: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for tag, attack, epsilon in robust_tags(tags):
            value = epsilon_value(epsilon)
            if math.isfinite(value):
                by_attack[attack].append((tag, value))
        for attack, tag_eps in by_attack.items():
            panels.append((variant, attack, by_batch, tag_eps))
    if not panels:
        return None
    figure, axes = _grid(len(panels))
    colors = _batch_size_colors([b for _, _, by_batch, _ in panels for b in by_batch])
    for ax, (variant, attack, by_batch, tag_eps) in zip(axes, panels):
        has_zero = any(eps == 0 for _, eps in tag_eps)
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            series = list(tag_eps) if has_zero else [(CLEAN_ACCURACY_TAG, 0.0), *tag_eps]
            xs, means, stds = [], [], []
            for tag, epsilon in sorted(series, key=lambda item: item[1]):
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
        ax.set_title(f"{variant} training, {attack} attack")
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
        "Final `robust/ATTACK/eps_E` (and `robust/clean_acc` at ε=0), mean ± std over seeds.",
    )


DENSITY_TAG = "hessian/density"


def density_from_histogram(edges: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bucket centres and a probability density (integrating to 1) from histogram buckets.

    ``HessianSpectrumCallback`` logs its SLQ density as a histogram whose counts are numbers of
    eigenvalues per bucket of a uniform grid; dividing by the total count and the bucket widths
    gives the density back.
    """
    widths = np.diff(edges)
    total = counts.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(widths > 0, counts / (total * widths), 0.0) if total > 0 else np.zeros_like(counts)
    return centres, density


def plot_spectral_density(runs: Sequence[Run], out_dir: Path, *, tag: str = DENSITY_TAG) -> FigureFile | None:
    """Final spectral densities overlaid, one panel per variant, one colour per batch size.

    Reads the last ``hessian/density`` histogram of each run (seeds of a batch size share a
    colour). The y axis is logarithmic: the bulk near zero and the outliers differ by orders of
    magnitude.
    """
    grouped = {
        variant: by_batch
        for variant, by_batch in _group(runs).items()
        if any(run.events.histograms.get(tag) for batch_runs in by_batch.values() for run in batch_runs)
    }
    if not grouped:
        return None
    figure, axes = _grid(len(grouped))
    colors = _batch_size_colors([b for by_batch in grouped.values() for b in by_batch])
    floor = 1e-8
    for ax, (variant, by_batch) in zip(axes, grouped.items()):
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            labelled = False
            for run in by_batch[batch_size]:
                histograms = run.events.histograms.get(tag)
                if not histograms:
                    continue
                centres, density = density_from_histogram(histograms[-1].edges, histograms[-1].counts)
                ax.semilogy(
                    centres, np.where(density > floor, density, np.nan), color=colors[batch_size], linewidth=1.0, alpha=0.8,
                    label=None if labelled else _batch_size_label(batch_size),
                )  # fmt: skip
                labelled = True
        ax.set_title(f"{variant} training")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    file_name = "spectral_density.png"
    _save(figure, out_dir, file_name)
    return FigureFile(
        file_name,
        "Hessian spectral density at the end of training",
        f"Last `{tag}` histogram (stochastic Lanczos quadrature) of each run, one line per seed.",
    )


@dataclass(frozen=True)
class RunLandscape:
    """The last landscape file of a run, as :func:`~lightning_hessian.landscape.load_landscape` reads it."""

    path: Path
    curves: list[LossCurve]
    surfaces: list[LossSurface]


def find_landscape(run: Run) -> RunLandscape | None:
    """The most recently written landscape ``.npz`` of a run (``LossLandscapeCallback``'s files).

    ``LossLandscapeCallback`` writes ``<run>/landscape/epoch_XXX.npz`` during ``fit`` and
    ``test_epoch_XXX.npz`` under ``hessian-train test``; the newest file is the final landscape.
    Files that are not landscape archives are ignored.
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def plot_landscapes(runs: Sequence[Run], out_dir: Path) -> list[FigureFile] | None:
    """Loss landscapes from the runs' ``.npz`` files: curves overlaid, surfaces as contours.

    Per variant: one figure of 1-D curves (a panel per direction, a curve per batch size) and one
    figure of contour plots per surface (a panel per batch size); the first seed of each batch
    size, its newest landscape file.
    """
    written: list[FigureFile] = []
    for variant_index, (variant, by_batch) in enumerate(_group(runs).items()):
        curves: dict[str, dict[int | None, LossCurve]] = defaultdict(dict)
        surfaces: dict[str, dict[int | None, LossSurface]] = defaultdict(dict)
        for batch_size in _sorted_batch_sizes(list(by_batch)):
            for run in sorted(by_batch[batch_size], key=lambda r: (r.seed is None, r.seed or 0)):
                landscape = find_landscape(run)
                if landscape is None:
                    continue
                for curve in landscape.curves:
                    curves[curve.name].setdefault(batch_size, curve)
                for surface in landscape.surfaces:
                    surfaces[surface.name].setdefault(batch_size, surface)
        slug = f"{variant_index}_{_slug(variant)}"
        colors = _batch_size_colors(list(by_batch))
        if curves:
            figure, axes = _grid(len(curves))
            for ax, (name, by_size) in zip(axes, sorted(curves.items())):
                for batch_size, curve in by_size.items():
                    ax.plot(curve.steps, curve.loss, color=colors[batch_size], label=_batch_size_label(batch_size))
                ax.set_title(f"{variant} training: {name}")
                ax.set_xlabel("step t along the direction")
                ax.set_ylabel("loss")
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
            file_name = f"landscape_curves_{slug}.png"
            _save(figure, out_dir, file_name)
            written.append(
                FigureFile(
                    file_name,
                    f"Loss along directions ({variant} training)",
                    "Newest landscape file of the first seed per batch size (`landscape/*.npz`).",
                )
            )
        for name, by_size in sorted(surfaces.items()):
            figure, axes = _grid(len(by_size), width=4.2, height=3.6, max_columns=4)
            for ax, (batch_size, surface) in zip(axes, by_size.items()):
                contour = ax.contourf(surface.alphas, surface.betas, np.asarray(surface.loss).T, levels=20, cmap="viridis")
                figure.colorbar(contour, ax=ax, label="loss")
                ax.plot([0], [0], marker="*", color="white", markersize=10)
                ax.set_title(f"{_batch_size_label(batch_size)}: {name}")
                ax.set_xlabel(surface.names[0])
                ax.set_ylabel(surface.names[1])
            file_name = f"landscape_surface_{slug}_{_slug(name)}.png"
            _save(figure, out_dir, file_name)
            written.append(
                FigureFile(
                    file_name,
                    f"Loss surface {name} ({variant} training)",
                    "Newest landscape file of the first seed per batch size; the star is the trained model.",
                )
            )
    return written or None
