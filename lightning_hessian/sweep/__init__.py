"""Batch-size sweeps: one ``hessian-train fit`` (and ``test``) per batch size and seed.

The library behind ``hessian-sweep`` (:mod:`lightning_hessian.cli.sweep`)::

    from lightning_hessian.sweep import SweepSettings, run_sweep

    settings = SweepSettings(configs=("configs/quickstart.yaml",), batch_sizes=(32, 256), seeds=(0, 1))
    runs = run_sweep(settings)          # each run: its status, wall time and record

Each combination runs as its own process, one after the other, into ``ROOT/NAME/bsB_seedS``, where
``hessian-report ROOT/NAME`` finds it:

* :mod:`~lightning_hessian.sweep.settings`: what runs (:class:`SweepSettings`, :func:`plan_sweep`);
* :mod:`~lightning_hessian.sweep.runner`: running them (:func:`run_sweep`: processes, signals, records);
* :mod:`~lightning_hessian.sweep.records`: the files of a run directory (``sweep.json``, ``train.log``);
* :mod:`~lightning_hessian.sweep.lock`: one writer per run directory (:class:`RunLock`);
* :mod:`~lightning_hessian.sweep.machine`: what machine made a run (its CPU, torch, threads).

A sweep is a subprocess runner, not part of the report; the report only reads what it writes
(``sweep.json``, :data:`SWEEP_FILE`).
"""

from lightning_hessian.sweep.lock import LOCK_FILE, RunBusyError, RunLock
from lightning_hessian.sweep.records import ATTEMPTS_DIR, LOG_FILE, SWEEP_FILE, read_record
from lightning_hessian.sweep.runner import (
    STOP_GRACE_SECONDS,
    ResumePoint,
    SweepInterrupted,
    find_resume_point,
    run_sweep,
    stop_on_signal,
)
from lightning_hessian.sweep.settings import DEFAULT_TRAIN_COMMAND, SweepRun, SweepSettings, plan_sweep, run_version

__all__ = [
    "ATTEMPTS_DIR",
    "DEFAULT_TRAIN_COMMAND",
    "LOCK_FILE",
    "LOG_FILE",
    "STOP_GRACE_SECONDS",
    "SWEEP_FILE",
    "ResumePoint",
    "RunBusyError",
    "RunLock",
    "SweepInterrupted",
    "SweepRun",
    "SweepSettings",
    "find_resume_point",
    "plan_sweep",
    "read_record",
    "run_sweep",
    "run_version",
    "stop_on_signal",
]
