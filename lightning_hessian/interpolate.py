"""Deprecated: ``hessian-landscape`` moved to :mod:`lightning_hessian.cli.landscape` (this module's
name collided with :mod:`lightning_hessian.landscape.interpolation`, the library it calls).

Importing this module, or running ``python -m lightning_hessian.interpolate``, still works for one
release and warns (``DeprecationWarning``); use ``hessian-landscape`` or
``python -m lightning_hessian.cli.landscape``.
"""

from __future__ import annotations

import sys
import warnings

from lightning_hessian.cli.landscape import CheckpointError, interpolate, load_state_dict, main, select_samples
from lightning_hessian.cli.train import build_from_config

__all__ = ["CheckpointError", "build_from_config", "interpolate", "load_state_dict", "main", "select_samples"]

# stacklevel 2 names the importing line; run as a script, the warning is this module's own (and
# Python shows DeprecationWarnings of __main__)
warnings.warn(
    "lightning_hessian.interpolate is deprecated: run hessian-landscape or `python -m lightning_hessian.cli.landscape`,"
    " and import from lightning_hessian.cli.landscape",
    DeprecationWarning,
    stacklevel=1 if __name__ == "__main__" else 2,
)

if __name__ == "__main__":
    sys.exit(main())
