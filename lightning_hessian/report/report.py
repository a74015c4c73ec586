"""Deprecated: ``hessian-report`` moved to :mod:`lightning_hessian.cli.report`, its library to
:mod:`lightning_hessian.report.build`.

Importing this module, or running ``python -m lightning_hessian.report.report``, still works for
one release and warns (``DeprecationWarning``); use ``hessian-report`` or
``python -m lightning_hessian.cli.report``, and ``from lightning_hessian.report import
build_report, load_runs``.
"""

from __future__ import annotations

import sys
import warnings

from lightning_hessian.cli.report import main
from lightning_hessian.report.build import build_report, load_runs

__all__ = ["build_report", "load_runs", "main"]

# stacklevel 2 names the importing line; run as a script, the warning is this module's own (and
# Python shows DeprecationWarnings of __main__)
warnings.warn(
    "lightning_hessian.report.report is deprecated: run hessian-report or `python -m lightning_hessian.cli.report`,"
    " and import build_report/load_runs from lightning_hessian.report",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,
)

if __name__ == "__main__":
    sys.exit(main())
