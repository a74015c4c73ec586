"""report layer of lightning_hessian (see docs/design.md, "Layers"): from runs to the paper's tables and figures.

* :mod:`~lightning_hessian.report.sweep`: ``hessian-sweep``, one ``hessian-train fit``/``test``
  per batch size and seed, named so the report can group them.
* :mod:`~lightning_hessian.report.report`: ``hessian-report``, Markdown/HTML report with the
  table (mean ± std over seeds) and figures, from the logged TensorBoard tags only.
* :mod:`~lightning_hessian.report.events`, :mod:`~lightning_hessian.report.runs`,
  :mod:`~lightning_hessian.report.tables`, :mod:`~lightning_hessian.report.figures`,
  :mod:`~lightning_hessian.report.render`: reading event files and metadata, aggregating,
  drawing, writing.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: `python -m lightning_hessian.report.sweep` must not find its own module
# already imported by the package, and the sweep should not pay for matplotlib.
_EXPORTS = {
    "Run": "runs",
    "RunEvents": "events",
    "SweepSettings": "sweep",
    "VariantTable": "tables",
    "build_report": "report",
    "find_run_dirs": "events",
    "load_run": "runs",
    "load_runs": "report",
    "read_events": "events",
    "run_sweep": "sweep",
    "summarize_runs": "tables",
}

__all__ = [
    "Run",
    "RunEvents",
    "SweepSettings",
    "VariantTable",
    "build_report",
    "find_run_dirs",
    "load_run",
    "load_runs",
    "read_events",
    "run_sweep",
    "summarize_runs",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_hessian.report.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_hessian.report' has no attribute {name!r}")
