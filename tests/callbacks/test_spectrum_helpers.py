"""The spectrum callback's helper modules on their own: the density histogram encoding and its
decoding (``lightning_hessian.density_histogram``), the engine helpers (``callbacks/spectrum_engine``),
the custom-scalars layout (``callbacks/spectrum_output``) and the progress lines (``callbacks/progress``).

The models and oracles shared by the spectrum-callback tests are in ``tests/helpers.py``.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian.callbacks.progress import AnalysisProgress
from lightning_hessian.callbacks.spectrum_engine import padded_flags, select_layers, vectors_to_cpu, warm_start
from lightning_hessian.callbacks.spectrum_output import density_figure, spectrum_layout
from lightning_hessian.curvature import HessianOperator
from lightning_hessian.density_histogram import density_from_histogram, density_histogram

# ------------------------------------------------------------------------------ density histogram


def test_density_histogram_counts_eigenvalues() -> None:
    grid = torch.linspace(-1.0, 3.0, 5)
    density = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    histogram = density_histogram(grid, density, num_params=10)
    assert histogram["bucket_counts"] == [0.0, 5.0, 0.0, 5.0, 0.0]
    assert histogram["bucket_limits"] == [-0.5, 0.5, 1.5, 2.5, 3.5]
    assert histogram["sum"] == pytest.approx(5 * 0.0 + 5 * 2.0)
    assert histogram["sum_squares"] == pytest.approx(5 * 4.0)
    assert histogram["num"] == 10 and histogram["min"] == -1.5 and histogram["max"] == 3.5


def test_density_histogram_decodes_to_the_density_it_encoded() -> None:
    """Encoding then decoding (edges = the left edge plus the bucket limits, as the report reads
    TensorBoard's histogram) gives the grid and the normalised density back; negative quadrature
    noise counts as zero, and an all-zero density decodes to a uniform one."""
    grid = torch.linspace(-2.0, 10.0, 49, dtype=torch.float64)
    density = torch.exp(-0.5 * (grid - 3.0) ** 2) + 0.1 * torch.exp(-0.5 * (grid - 9.0) ** 2)
    density[0] = -1e-6
    histogram = density_histogram(grid, density, num_params=12345)
    edges = np.array([histogram["min"], *histogram["bucket_limits"]])
    counts = np.array(histogram["bucket_counts"])
    assert counts.sum() == pytest.approx(12345)
    centres, decoded = density_from_histogram(edges, counts)
    expected = density.clamp_min(0).numpy()
    expected /= expected.sum() * float(grid[1] - grid[0])
    assert centres == pytest.approx(grid.numpy(), abs=1e-12)
    assert decoded == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert float(np.sum(decoded * np.diff(edges))) == pytest.approx(1.0)

    flat = density_histogram(grid, torch.zeros_like(grid), num_params=49)
    assert flat["bucket_counts"] == pytest.approx([1.0] * 49)
    _, uniform = density_from_histogram(
        np.array([flat["min"], *flat["bucket_limits"]]), np.array(flat["bucket_counts"])
    )
    assert uniform == pytest.approx(np.full(49, 1 / 12.25))  # 49 buckets of width 0.25


def test_density_figure_marks_the_top_eigenvalues() -> None:
    grid = torch.linspace(0.0, 4.0, 9, dtype=torch.float64)
    figure = density_figure(grid, torch.ones(9, dtype=torch.float64), [3.0, 3.5], epoch=7)
    (axes,) = figure.axes
    assert axes.get_yscale() == "log" and axes.get_title() == "Hessian spectral density, epoch 7"
    assert sorted(line.get_xdata()[0] for line in axes.lines[1:]) == [3.0, 3.5]


# ------------------------------------------------------------------------------ engine helpers


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.head = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def test_select_layers_matches_names_and_patterns() -> None:
    model = _Net()
    assert select_layers(model, ["head"]) == {"head": ["head.weight", "head.bias"]}
    # "body.*" matches its two linear layers (the ReLU has no parameters); "body" the whole block
    assert list(select_layers(model, ["body.*"])) == ["body.0", "body.2"]
    assert select_layers(model, ["body"])["body"] == ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]
    with pytest.raises(ValueError, match=r"\['frozen', 'tail'\] match no module.*'body.0'.*'head'"):
        select_layers(model, ["head", "frozen", "tail"])  # frozen: no trainable parameters


def test_warm_start_only_when_the_vectors_fit_the_operator() -> None:
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    operator = HessianOperator(model, nn.functional.cross_entropy, (x, y))
    fitting = [{name: torch.randn_like(p) for name, p in model.named_parameters()}]
    assert warm_start(fitting, operator) is fitting
    assert warm_start(None, operator) is None and warm_start([], operator) is None
    assert warm_start([{"weight": torch.randn(2, 3)}], operator) is None  # a parameter missing
    assert warm_start([{"weight": torch.randn(3, 2), "bias": torch.randn(2)}], operator) is None  # another shape


def test_padded_flags_and_cpu_copies() -> None:
    assert padded_flags(torch.tensor([True, False]), 4) == [True, False, False, False]
    assert padded_flags(torch.tensor([True]), 1) == [True]
    vector = {"w": torch.ones(2, requires_grad=True) * 2}
    (copy,) = vectors_to_cpu([vector])
    assert not copy["w"].requires_grad and copy["w"].device.type == "cpu" and copy["w"] is not vector["w"]
    assert vectors_to_cpu(None) is None


# ------------------------------------------------------------------------------ output and progress


def test_custom_scalars_layout_follows_the_quantities() -> None:
    full = spectrum_layout(("eigenvalues", "trace", "input_hessian"), per_layer=True)["hessian spectrum"]
    assert list(full) == ["eigenvalues", "trace", "input space", "per-layer top eigenvalue", "cost"]
    assert full["eigenvalues"] == ["Multiline", [r"hessian/eig_\d+$", "hessian/eig_min"]]
    assert full["cost"] == ["Multiline", ["hessian/hvps", "hessian/seconds"]]
    assert list(spectrum_layout(("density",), per_layer=False)["hessian spectrum"]) == ["cost"]


def test_progress_lines_are_periodic_and_count_earlier_products(caplog: pytest.LogCaptureFixture) -> None:
    start = time.perf_counter()
    progress = AnalysisProgress(3600.0, "HessianSpectrumCallback epoch 2", start)
    with caplog.at_level(logging.INFO):
        progress.report("trace", 10)  # within the interval: nothing
        progress.done(10)
        assert not caplog.records
        progress.report("trace", 12, force=True)
        on_step = progress.with_base(12).lanczos_callback("largest")
        frequent = AnalysisProgress(1e-9, "probe", start).with_base(5)
        # what the engine passes after a Lanczos step (only these fields are read)
        step = SimpleNamespace(hvp_count=7, eigenvalues=torch.tensor([-1.5, 2.0]), num_converged=1)
        frequent.lanczos_callback("smallest")(step)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("HessianSpectrumCallback epoch 2: trace; 12 HVPs, ")
    assert messages[1].startswith("probe: Lanczos (smallest), 1 converged, Ritz values [-1.5, 2]; 12 HVPs, ")
    assert callable(on_step) and len(messages) == 2
    with pytest.raises(ValueError, match="interval"):
        AnalysisProgress(0.0, "probe", start)
