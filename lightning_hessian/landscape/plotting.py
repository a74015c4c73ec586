"""Matplotlib figures of landscapes: 1-D curves, contour plots, 3-D surfaces, interpolation paths.

Figures are built with :class:`matplotlib.figure.Figure` directly (no ``pyplot`` state, no GUI
backend), so they are safe in training processes and threads; render with
``figure.savefig`` or log with TensorBoard's ``add_figure``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from lightning_hessian.landscape.evaluation import LossCurve, LossSurface
from lightning_hessian.landscape.interpolation import InterpolationResult

__all__ = ["plot_contour", "plot_curves", "plot_interpolation", "plot_surface_3d"]


def plot_curves(curves: Sequence[LossCurve], *, title: str = "", xlabel: str = "step t along the direction") -> Figure:
    """Loss (left) and accuracy (right) along each direction, one line per curve."""
    has_accuracy = any(np.isfinite(c.accuracy).any() for c in curves)
    figure = Figure(figsize=(10 if has_accuracy else 5.5, 4), layout="constrained")
    axes = figure.subplots(1, 2 if has_accuracy else 1, squeeze=False)[0]
    for curve in curves:
        axes[0].plot(curve.steps, curve.loss, marker=".", label=curve.name)
        if has_accuracy:
            axes[1].plot(curve.steps, curve.accuracy, marker=".", label=curve.name)
    axes[0].set(xlabel=xlabel, ylabel="loss", title="loss")
    axes[0].legend()
    if has_accuracy:
        axes[1].set(xlabel=xlabel, ylabel="accuracy", title="accuracy")
    if title:
        figure.suptitle(title)
    return figure


def plot_contour(surface: LossSurface, *, title: str = "", levels: int = 20) -> Figure:
    """Filled contour plot of the loss over ``alphas x betas``; the centre is marked.

    Levels are logarithmically spaced when the loss spans more than two orders of magnitude
    (the basin around a minimum is otherwise one flat colour next to the steep walls).

    Returns:
        The figure, with a colour bar.
    """
    from matplotlib.colors import LogNorm

    figure = Figure(figsize=(5.5, 4.5), layout="constrained")
    axis = figure.subplots()
    grid_a, grid_b = np.meshgrid(surface.alphas, surface.betas, indexing="ij")
    loss = surface.loss
    finite = loss[np.isfinite(loss)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = None
    log_levels: np.ndarray | None = None
    if low > 0 and high / low > 100:
        log_levels = np.geomspace(low, high, levels)
        norm = LogNorm(vmin=low, vmax=high)
    contour_levels: int | np.ndarray = levels if log_levels is None else log_levels
    filled = axis.contourf(grid_a, grid_b, loss, levels=contour_levels, cmap="viridis", norm=norm)
    axis.contour(grid_a, grid_b, loss, levels=contour_levels, colors="k", linewidths=0.3, norm=norm)
    axis.plot([0], [0], marker="*", color="red", markersize=10)
    if log_levels is None:
        figure.colorbar(filled, ax=axis, label="loss")
    else:
        colorbar = figure.colorbar(filled, ax=axis, label="loss (log scale)", ticks=log_levels[::3], format="%.3g")
        colorbar.minorticks_off()
    axis.set(
        xlabel=surface.names[0],
        ylabel=surface.names[1],
        title=title or f"loss: {surface.names[0]} x {surface.names[1]}",
    )
    return figure


def plot_surface_3d(surface: LossSurface, *, title: str = "") -> Figure:
    """3-D surface of the loss over ``alphas x betas``."""
    figure = Figure(figsize=(6, 5), layout="constrained")
    axis = figure.add_subplot(projection="3d")
    grid_a, grid_b = np.meshgrid(surface.alphas, surface.betas, indexing="ij")
    axis.plot_surface(grid_a, grid_b, surface.loss, cmap="viridis", linewidth=0, antialiased=True)
    axis.set(xlabel=surface.names[0], ylabel=surface.names[1], zlabel="loss")
    axis.set_title(title or f"loss surface: {surface.names[0]} x {surface.names[1]}")
    return figure


def plot_interpolation(result: InterpolationResult, *, labels: tuple[str, str] = ("A", "B"), title: str = "") -> Figure:
    """Loss (log scale), accuracy and optionally top eigenvalue along ``theta(alpha)``."""
    panels = 3 if result.top_eigenvalue is not None else 2
    figure = Figure(figsize=(4.5 * panels, 4), layout="constrained")
    axes = figure.subplots(1, panels)
    for split in result.loss:
        axes[0].plot(result.alphas, result.loss[split], marker=".", label=split)
        axes[1].plot(result.alphas, result.accuracy[split], marker=".", label=split)
    axes[0].set_yscale("log")
    axes[0].set(xlabel="alpha", ylabel="loss", title="loss")
    axes[1].set(xlabel="alpha", ylabel="accuracy", title="accuracy")
    if result.top_eigenvalue is not None:
        axes[2].plot(result.alphas, result.top_eigenvalue, marker=".", color="C3")
        axes[2].set(xlabel="alpha", ylabel="top Hessian eigenvalue", title="curvature")
        finite = result.top_eigenvalue[np.isfinite(result.top_eigenvalue)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            axes[2].set_yscale("log")
    for axis in axes:
        for x, label in zip((0.0, 1.0), labels, strict=True):
            axis.axvline(x, color="gray", linestyle=":", linewidth=1)
            axis.annotate(
                label,
                (x, 0.98),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="top",
                fontsize="small",
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
    axes[0].legend()
    if title:
        figure.suptitle(title)
    return figure
