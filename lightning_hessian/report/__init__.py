"""report layer of lightning_hessian (see docs/design.md, "Layers"): from runs to the paper's tables and figures.

The library behind ``hessian-report`` (:mod:`lightning_hessian.cli.report`):

* :mod:`~lightning_hessian.report.build`: :func:`build_report`, Markdown/HTML report with the table
  (mean ± std over seeds) and figures, from the logged TensorBoard tags only;
* :mod:`~lightning_hessian.report.events`, :mod:`~lightning_hessian.report.runs`,
  :mod:`~lightning_hessian.report.artifacts`, :mod:`~lightning_hessian.report.tables`,
  :mod:`~lightning_hessian.report.figures` (with :mod:`~lightning_hessian.report.spectrum_figures`,
  :mod:`~lightning_hessian.report.robustness_figures`, :mod:`~lightning_hessian.report.landscape_figures`),
  :mod:`~lightning_hessian.report.render`: reading event files, metadata, landscape grids and
  interpolations, aggregating, drawing, writing;
* :mod:`~lightning_hessian.report.claims`: the paper's claims judged from the numbers by a stated rule.

The tags it reads are those of :mod:`lightning_hessian.metrics`. Sweeps, which produce the runs,
are :mod:`lightning_hessian.sweep`; ``lightning_hessian.report.SweepSettings`` and
``run_sweep`` still work for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_hessian.report.artifacts import Interpolation, find_interpolations
from lightning_hessian.report.build import build_report, load_runs
from lightning_hessian.report.claims import Claim, evaluate_claims
from lightning_hessian.report.events import RunEvents, find_run_dirs, read_events
from lightning_hessian.report.runs import Run, load_run
from lightning_hessian.report.tables import Column, VariantTable, report_columns, summarize_runs

__all__ = [
    "Claim",
    "Column",
    "Interpolation",
    "Run",
    "RunEvents",
    "VariantTable",
    "build_report",
    "evaluate_claims",
    "find_interpolations",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "read_events",
    "report_columns",
    "summarize_runs",
]

# moved to lightning_hessian.sweep (a subprocess runner, not reporting); kept for one release
_MOVED_TO_SWEEP = ("SweepSettings", "run_sweep")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SWEEP:
        warnings.warn(
            f"lightning_hessian.report.{name} is deprecated; import it from lightning_hessian.sweep.",
            DeprecationWarning,
            stacklevel=2,
        )
        import lightning_hessian.sweep

        return getattr(lightning_hessian.sweep, name)
    raise AttributeError(f"module 'lightning_hessian.report' has no attribute {name!r}")
