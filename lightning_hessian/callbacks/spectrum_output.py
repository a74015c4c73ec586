"""What :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback` shows in TensorBoard
besides scalars: the spectral density and a custom-scalars layout.

* ``hessian/density`` (``hessian/<split>/density`` under ``validate``/``test``): the SLQ density as a
  histogram whose counts are numbers of eigenvalues
  (encoded by :func:`lightning_hessian.density_histogram.density_histogram`, which
  ``hessian-report`` decodes), so the Histograms and Distributions tabs show the spectrum evolving;
* ``hessian/density_plot``: the same density as a figure, log scale, the top eigenvalues marked;
* a *Custom Scalars* layout grouping the eigenvalue curves in one chart (once per writer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_hessian import metrics as tags
from lightning_hessian.callbacks.base import EpochAnalysisCallback
from lightning_hessian.curvature import DensityResult
from lightning_hessian.density_histogram import density_histogram

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lightning_hessian.callbacks.packages import AnyTrainer

__all__ = ["density_figure", "log_density", "spectrum_layout"]


def log_density(
    callback: EpochAnalysisCallback,
    trainer: AnyTrainer,
    density: DensityResult,
    num_params: int,
    top_values: list[float],
) -> None:
    """Log a spectral density from rank zero: a TensorBoard histogram and a figure.

    The tags are ``hessian/density`` and ``hessian/density_plot`` during ``fit``, split-qualified
    under ``validate``/``test`` (``hessian/test/density``,
    :meth:`~lightning_hessian.callbacks.base.EpochAnalysisCallback.analysis_tag`).

    Args:
        callback: the logging callback (its TensorBoard writer, step and figure logging).
        trainer: the trainer.
        density: the engine's density (grid and values).
        num_params: the number of eigenvalues (the Hessian's size): the histogram's total count.
        top_values: top eigenvalues to mark on the figure.
    """
    if trainer.global_rank != 0:
        return
    grid = torch.as_tensor(density.grid, dtype=torch.float64).cpu()
    values = torch.as_tensor(density.density, dtype=torch.float64).cpu()
    writer = callback.tensorboard(trainer)
    if writer is not None:
        histogram = density_histogram(grid, values, num_params)
        tag = callback.analysis_tag(trainer, tags.DENSITY)  # hessian/test/density under trainer.test
        writer.add_histogram_raw(tag, global_step=callback.log_step(trainer), **histogram)
    callback.log_figure(trainer, tags.DENSITY_PLOT, density_figure(grid, values, top_values, trainer.current_epoch))


def density_figure(grid: Tensor, density: Tensor, top_values: list[float], epoch: int) -> Figure:
    """A log-scale plot of the density (a matplotlib ``Figure`` without pyplot: no global state).

    Args:
        grid: eigenvalue grid.
        density: density on ``grid`` (clamped at 1e-8 for the log scale).
        top_values: drawn as dotted vertical lines.
        epoch: for the title.

    Returns:
        The figure.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.add_subplot()
    floor = 1e-8
    axes.semilogy(grid.numpy(), density.clamp_min(floor).numpy(), color="C0")
    for value in top_values:
        axes.axvline(value, color="C3", linestyle=":", linewidth=0.8)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    axes.set_title(f"Hessian spectral density, epoch {epoch}")
    figure.tight_layout()
    return figure


def spectrum_layout(quantities: tuple[str, ...], per_layer: bool) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars``) of the logged curves.

    Args:
        quantities: the callback's quantities (which charts there are).
        per_layer: whether per-layer spectra are logged.

    Returns:
        The layout: one category, ``"hessian spectrum"``, of multiline charts by title.
    """
    charts: dict[str, list[Any]] = {}
    if "eigenvalues" in quantities or "smallest_eigenvalue" in quantities:
        charts["eigenvalues"] = ["Multiline", [r"hessian/eig_\d+$", tags.EIG_MIN]]
    if "trace" in quantities:
        charts["trace"] = ["Multiline", [tags.TRACE]]
    if "input_hessian" in quantities:
        charts["input space"] = ["Multiline", [tags.INPUT_EIG_1, tags.INPUT_GRAD_NORM]]
    if per_layer:
        charts["per-layer top eigenvalue"] = ["Multiline", [r"hessian/layer/.*/eig_1$"]]
    charts["cost"] = ["Multiline", [tags.HVPS, tags.HESSIAN_SECONDS]]
    return {"hessian spectrum": charts}
