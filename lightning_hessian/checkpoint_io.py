"""Checkpoint files that are either the old or the complete new file, and the record of which one
a training run wrote.

**Atomic saving.** Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose
temporary file lies in the system's temporary directory; committing it copies it onto the
checkpoint path when that is another file system, without ``fsync``. A full disk (``OSError``
errno 28, ``ENOSPC``) or a kill during that copy leaves a truncated ``.ckpt`` beside the good
ones. :class:`AtomicCheckpointIO` writes a local checkpoint into a hidden temporary file in the
checkpoint's own directory, flushes and ``fsync``s it, renames it onto the path with
``os.replace`` (atomic within a file system) and ``fsync``s the directory. On any error the
temporary file is removed and whatever was at the path before is untouched. URLs
(``s3://...``) and ``storage_options`` go through Lightning's own saving.

``hessian-train`` installs it with :func:`use_atomic_checkpoint_io` when the strategy would use
Lightning's plain ``TorchCheckpointIO``; a ``CheckpointIO`` the user configured (``trainer.plugins``,
a strategy's ``checkpoint_io``, ``AsyncCheckpointIO``, XLA's) is kept.

**Checkpoint record.** After ``fit``, ``hessian-train`` writes :data:`CHECKPOINT_RECORD` into the
run's log directory (:func:`write_checkpoint_record`): the paths ``ModelCheckpoint`` reports
(``last_model_path``, ``best_model_path``). ``hessian-sweep`` tests the checkpoint named there
(:func:`recorded_checkpoint`), not whichever ``.ckpt`` file in the directory is newest.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.strategies import Strategy
from typing_extensions import override

__all__ = [
    "CHECKPOINT_RECORD",
    "AtomicCheckpointIO",
    "atomic_torch_save",
    "recorded_checkpoint",
    "use_atomic_checkpoint_io",
    "write_checkpoint_record",
]

#: file in a run's log directory that names the checkpoints ``fit`` wrote
CHECKPOINT_RECORD = "checkpoint.json"


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` such that ``path`` is either its old content or the whole new file.

    Writes ``.<name>.<pid>.<random>.tmp`` in the same directory (never matched by ``*.ckpt``),
    flushes and fsyncs it, then ``os.replace``s it onto ``path``. On any error, ``KeyboardInterrupt``
    included, the temporary file is removed and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as handle:  # "x": never another writer's file; mode follows the umask
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docstring); loading and
    removing are Lightning's."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote (or file://) URLs: Lightning's saving
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoint_io(strategy: Strategy) -> bool:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` if it would save with Lightning's plain
    ``TorchCheckpointIO``; any other (user-configured or strategy-specific) one is kept.

    Returns:
        Whether it was installed.
    """
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


def write_checkpoint_record(trainer: pl.Trainer, directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Write :data:`CHECKPOINT_RECORD` (JSON) into ``directory`` (default: ``trainer.log_dir``) on
    global rank 0.

    Keys: ``checkpoint`` (``last_model_path``, else ``best_model_path``, of the trainer's first
    ``ModelCheckpoint``, absolute; ``null`` without checkpointing), ``last_model_path``,
    ``best_model_path``, ``epoch``, ``global_step``, ``status``.

    Returns:
        The record's path, or ``None`` where nothing was written (other ranks, no log dir).
    """
    if not trainer.is_global_zero:
        return None
    directory = directory if directory is not None else trainer.log_dir
    if directory is None:
        return None
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or ""
    best = getattr(callback, "best_model_path", "") or ""
    chosen = last or best
    record = {
        "checkpoint": os.path.abspath(chosen) if chosen else None,
        "last_model_path": last,
        "best_model_path": best,
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "status": str(trainer.state.status.value),
    }
    target = Path(directory) / CHECKPOINT_RECORD
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, target)
    return target


def recorded_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[Path | None, str]:
    """The checkpoint that ``fit`` recorded in ``run_dir`` (:data:`CHECKPOINT_RECORD`) and, when
    there is none to use, why not.

    Returns:
        ``(checkpoint, "")``, or ``(None, reason)`` when there is no readable record, no recorded
        checkpoint, or the recorded file does not exist.
    """
    record_path = Path(run_dir) / CHECKPOINT_RECORD
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return None, f"fit wrote no {CHECKPOINT_RECORD} (not hessian-train, or it stopped before the end)"
    except (OSError, json.JSONDecodeError) as error:
        return None, f"cannot read {record_path}: {error}"
    checkpoint = record.get("checkpoint") if isinstance(record, dict) else None
    if not checkpoint:
        return None, "fit wrote no checkpoint (trainer.enable_checkpointing is off?)"
    path = Path(checkpoint)
    if not path.is_file():
        return None, f"the checkpoint that fit recorded, {path}, does not exist"
    return path, ""
