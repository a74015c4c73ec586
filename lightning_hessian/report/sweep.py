"""Deprecated: ``hessian-sweep`` moved to :mod:`lightning_hessian.cli.sweep`, the sweep runner to
:mod:`lightning_hessian.sweep` (a subprocess runner, not part of the report).

Importing this module, or running ``python -m lightning_hessian.report.sweep``, still works for
one release and warns (``DeprecationWarning``); use ``hessian-sweep`` or
``python -m lightning_hessian.cli.sweep``, and ``from lightning_hessian.sweep import ...``.
"""

from __future__ import annotations

import sys
import warnings

from lightning_hessian.cli.sweep import main, settings_from_args
from lightning_hessian.sweep import (
    ATTEMPTS_DIR,
    DEFAULT_TRAIN_COMMAND,
    LOCK_FILE,
    LOG_FILE,
    STOP_GRACE_SECONDS,
    SWEEP_FILE,
    RunBusyError,
    RunLock,
    SweepRun,
    SweepSettings,
    plan_sweep,
    run_sweep,
    run_version,
)

__all__ = [
    "ATTEMPTS_DIR",
    "DEFAULT_TRAIN_COMMAND",
    "LOCK_FILE",
    "LOG_FILE",
    "STOP_GRACE_SECONDS",
    "SWEEP_FILE",
    "RunBusyError",
    "RunLock",
    "SweepRun",
    "SweepSettings",
    "main",
    "plan_sweep",
    "run_sweep",
    "run_version",
    "settings_from_args",
]

# stacklevel 2 names the importing line; run as a script, the warning is this module's own (and
# Python shows DeprecationWarnings of __main__)
warnings.warn(
    "lightning_hessian.report.sweep is deprecated: run hessian-sweep or `python -m lightning_hessian.cli.sweep`,"
    " and import SweepSettings/run_sweep/... from lightning_hessian.sweep",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,
)

if __name__ == "__main__":
    sys.exit(main())
