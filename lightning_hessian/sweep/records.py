"""The files a sweep keeps in each run directory, and the record of what happened to the run.

* ``sweep.json`` (:data:`SWEEP_FILE`): config, batch size, seed, overrides, commands, status
  (``running``, ``finished``, ``failed``, ``interrupted``), wall times, the machine
  (:func:`~lightning_hessian.sweep.machine.describe_machine`), and for a run continued after an
  interruption the earlier attempts (``resumed``, each with its machine). ``hessian-report`` reads the batch size, seed,
  variant, status and ``wall_seconds`` from it (:mod:`lightning_hessian.report.runs`).
* ``train.log`` (:data:`LOG_FILE`): the output of the run's ``hessian-train`` commands.
* ``sweep.lock``: the claim of the directory (:mod:`lightning_hessian.sweep.lock`).

Unfinished runs that do not continue from their checkpoint
(:func:`~lightning_hessian.sweep.runner.find_resume_point`) are moved to ``ROOT/NAME/.attempts/``
(:data:`ATTEMPTS_DIR`) before they run again.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["ATTEMPTS_DIR", "LOG_FILE", "SWEEP_FILE", "move_aside", "read_record", "utc_now", "write_record"]

#: the run's record, written by the sweep and read by ``hessian-report``
SWEEP_FILE = "sweep.json"
#: the output of the run's commands
LOG_FILE = "train.log"
#: where earlier, unfinished attempts go (hidden from the report)
ATTEMPTS_DIR = ".attempts"


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``sweep.json`` of ``run_dir``, or ``None`` when there is none or it is not JSON."""
    try:
        return json.loads((Path(run_dir) / SWEEP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``sweep.json`` atomically (a temporary file, then a rename): a killed sweep never
    leaves half a file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / (SWEEP_FILE + ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(run_dir / SWEEP_FILE)


def utc_now() -> str:
    """The time now, ISO 8601 in UTC to the second (the records' time stamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def move_aside(run_dir: Path) -> Path:
    """Move an unfinished run out of the report's way (hidden ``.attempts`` folder)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.parent / ATTEMPTS_DIR / f"{run_dir.name}-{stamp}"
    counter = 1
    while target.exists():
        target = target.with_name(f"{run_dir.name}-{stamp}-{counter}")
        counter += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(target))
    return target
