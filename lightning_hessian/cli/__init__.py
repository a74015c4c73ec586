"""The console scripts of lightning-hessian, each a thin layer over the library.

=====================  ==========================================  ===========================================
console script         module                                      library
=====================  ==========================================  ===========================================
``hessian-train``      :mod:`lightning_hessian.cli.train`          the models, data modules and callbacks
``hessian-sweep``      :mod:`lightning_hessian.cli.sweep`          :mod:`lightning_hessian.sweep`
``hessian-report``     :mod:`lightning_hessian.cli.report`         :mod:`lightning_hessian.report`
``hessian-landscape``  :mod:`lightning_hessian.cli.landscape`      :mod:`lightning_hessian.landscape`
=====================  ==========================================  ===========================================

``python -m lightning_hessian.cli`` is ``hessian-train`` (``hessian-sweep`` starts its runs that
way), and ``python -m lightning_hessian.cli.<name>`` runs the others. Errors in the user's input
end each with one line ``PROG: error: ...`` and exit status 2 (:mod:`lightning_hessian.errors`).

This package exports ``hessian-train``'s names (``from lightning_hessian.cli import HessianCLI,
main``); the other scripts' modules are imported only when they run.
"""

from lightning_hessian.cli.train import HessianArgumentParser, HessianCLI, build_from_config, main

__all__ = ["HessianArgumentParser", "HessianCLI", "build_from_config", "main"]
