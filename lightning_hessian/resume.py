"""Resuming a training run exactly: random number generators in checkpoints, the run's last
checkpoint, and event files that continue without repeated steps.

Lightning restores the weights, the optimiser and schedulers, the loop progress and every
callback's ``state_dict`` from a checkpoint, but not the random number generators: a resumed run
draws other shuffling orders, other dropout masks, other adversarial starts and noise than the
run it continues. Two callbacks make ``fit(ckpt_path=...)`` repeat the uninterrupted run:

* :class:`RNGStateCallback` puts the global generators (torch CPU, CUDA when initialised, NumPy,
  Python's ``random``) into every checkpoint (its ``state_dict``) and sets them back when the
  checkpoint is loaded (``load_state_dict``), before Lightning creates the training iterator, so
  the next epoch's ``RandomSampler`` draws the order the uninterrupted run drew (without an
  explicit ``generator``, a ``DataLoader`` draws its base seed and its sampler's seed from torch's
  global generator when the epoch's iterator is created). Any LightningModule, any
  ``DataLoader`` whose randomness comes from the global generators.
* :class:`CheckpointLogSync` flushes the loggers when a checkpoint is saved, so that everything
  logged before a checkpoint is on disk when the checkpoint is, and records the save's wall time
  in the checkpoint.
  When ``fit`` resumes from a checkpoint, it continues the TensorBoard event files with
  :func:`continue_event_log`: a purge marker at the checkpoint's global step (readers then discard
  the killed run's events at that step and later, which the resumed run logs again) and, written
  back, the events at those steps that were logged *before* the checkpoint was saved (an analysis
  callback logs at ``trainer.global_step`` before the epoch's checkpoint; the resumed run does not
  repeat it). Every (tag, step) then has the single value of the uninterrupted run.

``hessian-train`` installs both callbacks; :func:`find_resume_checkpoint` finds the checkpoint
that its ``--ckpt_path last`` means.

Exact, bit for bit on the CPU, when the checkpoint was taken at the end of an epoch (what the
default ``ModelCheckpoint`` does) and no hook between the checkpoint and the next training batch
draws random numbers; with strategies that restore checkpoints after setup (DeepSpeed, FSDP) the
first epoch's order may differ. Not covered: a checkpoint taken in the middle of an epoch (Lightning
restarts the epoch's remaining batches from a fresh iterator unless the ``DataLoader`` has a
``state_dict``; it warns), generators that a ``DataLoader`` or sampler owns (``generator=``) or
that the module keeps itself, random transforms in DataLoader worker processes, and
nondeterministic GPU kernels.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

__all__ = [
    "BEFORE_END_CHECKPOINT",
    "CheckpointLogSync",
    "KeepCheckpointBeforeEnd",
    "RNGStateCallback",
    "capture_rng_state",
    "continue_event_log",
    "find_resume_checkpoint",
    "fit_ends_after_this_step",
    "last_checkpoint_in",
    "read_resume_info",
    "restore_rng_state",
    "surviving_events",
]

#: the file names of ``ModelCheckpoint``'s last checkpoints (``last.ckpt``, ``last-v1.ckpt``)
_LAST_CHECKPOINT = re.compile(r"^last.*\.ckpt$")
_VERSION_DIR = re.compile(r"^version_(\d+)$")


# --------------------------------------------------------------------------------------------
# random number generators


def capture_rng_state() -> dict[str, Any]:
    """The states of the global random number generators, as tensors and plain Python values
    (a checkpoint holding them loads with ``torch.load(weights_only=True)``).

    Keys: ``torch`` (CPU generator), ``cuda`` (one state per visible device; only when CUDA is
    initialised, so that capturing never initialises it), ``numpy`` (the legacy global
    ``np.random`` generator) and ``python`` (``random``).

    Returns:
        The states by those keys.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators to ``state`` (from :func:`capture_rng_state`); parts it lacks are
    left alone. CUDA states are set for as many devices as both the state and the machine have."""
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        keys = torch.as_tensor(numpy_state["keys"]).cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (
                numpy_state["kind"],
                keys,
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
    python_state = state.get("python")
    if python_state is not None:
        internal = tuple(int(v) for v in torch.as_tensor(python_state["state"]).tolist())
        random.setstate((int(python_state["version"]), internal, python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device)


class RNGStateCallback(Callback):
    """Save the global random number generators in every checkpoint and restore them on resume.

    ``state_dict`` (called when Lightning writes a checkpoint) returns
    :func:`capture_rng_state`; ``load_state_dict`` (called while ``trainer.fit(ckpt_path=...)``
    restores the checkpoint, before the optimisers are configured and before the training
    iterator is created) sets the generators back at once. The next random number drawn is then
    the one the uninterrupted run drew after the checkpoint: the ``DataLoader``'s base seed and its
    ``RandomSampler``'s seed for the next epoch's order, then dropout, augmentation, adversarial
    starts and noise.

    Works with any LightningModule and data; ``hessian-train`` installs it by default. With DDP,
    the checkpoint holds rank zero's state and every rank gets it back (exact when the ranks are
    seeded alike, as ``seed_everything`` does). A checkpoint without this callback's state (older
    checkpoints) resumes without restoring the generators.
    """

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_state()}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in (checkpoint.get("callbacks") or {}):
            rank_zero_warn(
                "The checkpoint holds no random number generator states (it was written without"
                " RNGStateCallback): the resumed run continues, but does not repeat the uninterrupted run exactly."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("rng")
        if state is not None:
            restore_rng_state(state)


def fit_ends_after_this_step(trainer: pl.Trainer) -> bool:
    """Whether ``fit`` stops once the current step or epoch ends: ``trainer.should_stop`` (an early
    stop, set before the checkpoint callback runs: Lightning calls it last), or the epoch or step
    limit reached. Meant for the moment a checkpoint is saved.

    Returns:
        ``True`` when training will not continue after this point.
    """
    if trainer.should_stop:
        return True
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    # an epoch-end checkpoint is saved before the epoch counts as completed: current_epoch is its index
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    # ... and in the last epoch only the checkpoint after its last batch is the end, not one in its
    # middle (every_n_train_steps, val_check_interval < 1)
    batch_progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(batch_progress, "is_last_batch", True))


class CheckpointLogSync(Callback):
    """Keep the logs and the checkpoints of a run consistent across a kill and a resume.

    * When a checkpoint is saved, the loggers are flushed (``logger.save()``): what was logged
      before a checkpoint is on disk when the checkpoint is.
    * At the start of the next training epoch or batch after a save they are flushed again, for
      the values Lightning logs just after the checkpoint at steps before it (the epoch means of
      the checkpointed epoch, the last step's loss): these are not logged again by a resumed run,
      so a kill in the few milliseconds between the checkpoint and this flush can lose them.
    * The checkpoint records ``saved_at`` (wall time of the save), ``log_dir`` (the first
      logger's directory, absolute) and ``ends_fit``: whether training stops after this checkpoint
      (``trainer.should_stop``, e.g. set by ``EarlyStopping`` before the checkpoint callback runs,
      or ``max_epochs``/``max_steps`` reached). Lightning keeps neither in the checkpoint: resumed
      from such a checkpoint, ``fit`` skips training and the ``on_train_end`` hooks (the
      end-of-training analyses) when a limit was reached, and trains another epoch after an early
      stop. A resumed run warns about it; ``hessian-sweep`` starts such a run again instead.
    * When ``fit`` resumes from a checkpoint and training starts (``on_train_start``; not when the
      checkpointed run had already finished), every TensorBoard logger's event files are continued
      with :func:`continue_event_log` at the checkpoint's global step: the events the stopped run
      logged after the checkpoint are dropped by readers, those it logged at that step or later
      before the checkpoint are written back (only into the checkpoint's own ``log_dir``).
    """

    def __init__(self) -> None:
        self._log_dir: str | None = None
        self._flush_pending = False
        self._resume: dict[str, Any] | None = None  # global_step, saved_at, log_dir of the loaded checkpoint
        self._trainer: pl.Trainer | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        log_dir = getattr(trainer.loggers[0], "log_dir", None) if trainer.loggers else None
        self._log_dir = os.path.abspath(log_dir) if log_dir else None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "saved_at": time.time(),
            "log_dir": self._log_dir,
            "ends_fit": None if self._trainer is None else fit_ends_after_this_step(self._trainer),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._resume is not None:
            self._resume.update(saved_at=state_dict.get("saved_at"), log_dir=state_dict.get("log_dir"))
        fitting = self._trainer is None or self._trainer.state.fn == TrainerFn.FITTING
        if state_dict.get("ends_fit") and fitting:  # test/validate on a finished run's checkpoint is what it is for
            rank_zero_warn(
                "Resuming from a checkpoint saved when training had reached its end (max_epochs/max_steps, or"
                " an early stop): Lightning does not run the on_train_end hooks again (end-of-training analyses"
                " are not repeated) and, after an early stop, trains another epoch. To redo the end of this"
                f" run, resume from {BEFORE_END_CHECKPOINT} in the same directory if KeepCheckpointBeforeEnd"
                " kept one (it trains the last epoch again), or start it again without --ckpt_path."
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # called before load_state_dict, and also for checkpoints without this callback's state
        self._resume = {"global_step": int(checkpoint.get("global_step", 0)), "saved_at": None, "log_dir": None}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resume, self._resume = self._resume, None
        if resume is None or not trainer.is_global_zero:
            return
        step = resume["global_step"]
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if not _is_tensorboard_logger(logger) or not log_dir:
                continue
            same_run = resume["log_dir"] is not None and os.path.abspath(log_dir) == resume["log_dir"]
            kept = continue_event_log(
                logger.experiment, log_dir, purge_step=step, saved_at=resume["saved_at"] if same_run else None
            )
            rank_zero_info(
                f"Continuing the event files of {log_dir} at global step {step}: readers drop what was logged"
                f" at step {step} or later after the checkpoint ({kept} events logged before it kept)."
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._flush(trainer)
        self._flush_pending = True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_if_pending(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush_if_pending(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def _flush_if_pending(self, trainer: pl.Trainer) -> None:
        if self._flush_pending:
            self._flush_pending = False
            self._flush(trainer)

    @staticmethod
    def _flush(trainer: pl.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()


#: the file :class:`KeepCheckpointBeforeEnd` keeps next to ``last.ckpt``
BEFORE_END_CHECKPOINT = "before_end.ckpt"


class KeepCheckpointBeforeEnd(Callback):
    """Keep the last checkpoint from before the one that ends training, so that a run killed in its
    end-of-training analyses can redo them.

    Resumed from a checkpoint that ends training (``ends_fit``, see :class:`CheckpointLogSync`),
    Lightning skips training and with it the ``on_train_end`` hooks, where the analysis callbacks
    analyse the final model. So, just before that checkpoint is written, this callback copies the
    current last checkpoint of every ``ModelCheckpoint`` with ``save_last`` (the previous epoch's
    with the default checkpoint every epoch; with ``every_n_epochs`` or ``save_last="link"`` an
    older one) to :data:`BEFORE_END_CHECKPOINT` in the same directory. ``fit --ckpt_path
    .../checkpoints/before_end.ckpt`` then trains from there to the end again (bit for bit on the
    CPU, with :class:`RNGStateCallback`) and runs the end of training; ``hessian-sweep`` does this
    by itself. A fit that resumed from the copy keeps it until it ends, so a second kill resumes
    from it again. A fit that trained to its end and ends normally (``on_fit_end``) deletes the
    copy; one that only loaded a finished run's checkpoint leaves it. Rank zero only; a copy that
    fails (disk full) warns and training goes on. Nothing to keep when training ends at its first
    checkpoint.
    """

    def __init__(self) -> None:
        self._kept_at_step: int | None = None  # the step of this process's checkpoint that ends training

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # one copy per step: ModelCheckpoint may save a top-k file before last.ckpt at the same step
        if not trainer.is_global_zero or self._kept_at_step == trainer.global_step:
            return
        if not fit_ends_after_this_step(trainer):
            return
        self._kept_at_step = trainer.global_step
        for directory in self._last_checkpoint_dirs(trainer):
            previous = last_checkpoint_in(directory)
            if previous is None or not _saved_before(previous, trainer.global_step):
                # e.g. resumed from before_end.ckpt, the last checkpoint is the killed attempt's end,
                # at this very step: the copy there is the one to keep
                continue
            target = directory / BEFORE_END_CHECKPOINT
            partial = target.with_name(target.name + ".partial")
            try:
                shutil.copyfile(previous, partial)
                os.replace(partial, target)  # a kill during the copy leaves no half file under the name
            except OSError as error:
                rank_zero_warn(
                    f"KeepCheckpointBeforeEnd: could not copy {previous} to {target} ({error}); training goes on,"
                    " but a kill in the end-of-training analyses means training this run again"
                )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._kept_at_step is None:  # did not train to the end here
            return
        for directory in self._last_checkpoint_dirs(trainer):
            (directory / BEFORE_END_CHECKPOINT).unlink(missing_ok=True)

    @staticmethod
    def _last_checkpoint_dirs(trainer: pl.Trainer) -> list[Path]:
        return [
            Path(callback.dirpath)
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
        ]


def _saved_before(checkpoint: Path, global_step: int) -> bool:
    """Whether ``checkpoint`` can stand before the end at ``global_step``.

    Returns:
        ``True`` when it is readable, from an earlier step and not itself the end of a fit (after
        an early stop Lightning resumes from the end and trains another epoch).
    """
    try:
        info = read_resume_info(checkpoint)
    except Exception:  # any unreadable file (a partial one): not worth keeping
        return False
    return info["global_step"] < global_step and not info["ends_fit"]


class _ExperimentLogger(Protocol):
    """A logger with an ``experiment``: a ``TensorBoardLogger``'s is its ``SummaryWriter``."""

    @property
    def experiment(self) -> Any: ...


def _is_tensorboard_logger(logger: object) -> TypeGuard[_ExperimentLogger]:
    # by name: either Lightning package's TensorBoardLogger (and subclasses)
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


# --------------------------------------------------------------------------------------------
# which checkpoint `--ckpt_path last` means


def last_checkpoint_in(directory: str | os.PathLike[str]) -> Path | None:
    """The newest ``last*.ckpt`` file in ``directory`` (what ``ModelCheckpoint(save_last=True)``
    writes and Lightning's ``ckpt_path="last"`` picks), or ``None``.

    Returns:
        The file (latest modification time, then name), or ``None`` when ``directory`` holds none
        or does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.iterdir() if _LAST_CHECKPOINT.match(p.name) and p.is_file()]
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name)) if candidates else None


def find_resume_checkpoint(
    log_root: str | os.PathLike[str], version: int | str | None = None
) -> tuple[Path, int | str] | None:
    """``(checkpoint, version)`` of the run to resume under ``log_root`` (a logger's
    ``save_dir/name``, holding ``version_<n>`` directories), or ``None`` if there is none.

    With ``version`` given, that run's last checkpoint (``version_<n>`` for a number, the name
    itself for a string). Otherwise the highest-numbered ``version_<n>`` that holds a last
    checkpoint in ``checkpoints/``: a ``test`` or ``validate`` run, or a run killed before its
    first checkpoint, in a later directory is passed over.

    Returns:
        ``(checkpoint, version)`` (``version`` as given, or the number of ``version_<n>``), or
        ``None``.
    """
    log_root = Path(log_root)
    if version is not None:
        run = log_root / (version if isinstance(version, str) else f"version_{version}")
        checkpoint = last_checkpoint_in(run / "checkpoints")
        return (checkpoint, version) if checkpoint is not None else None
    if not log_root.is_dir():
        return None
    numbered = sorted(
        (int(match.group(1)), path)
        for path in log_root.iterdir()
        if path.is_dir() and (match := _VERSION_DIR.match(path.name))
    )
    for number, run in reversed(numbered):
        checkpoint = last_checkpoint_in(run / "checkpoints")
        if checkpoint is not None:
            return checkpoint, number
    return None


def read_resume_info(checkpoint_path: str | os.PathLike[str]) -> dict[str, Any]:
    """What resuming from ``checkpoint_path`` needs to know, without loading it into a model:
    ``global_step``, ``epoch``, ``has_rng`` (whether :class:`RNGStateCallback` saved the
    generators), ``early_stopped`` (the state of an ``EarlyStopping`` callback, or a subclass, says
    it stopped at this epoch; ``None`` when it cannot tell) and, when :class:`CheckpointLogSync` was installed,
    ``saved_at``, ``log_dir`` and ``ends_fit`` (see there).

    Returns:
        The information by those keys (``saved_at``, ``log_dir`` and ``ends_fit`` ``None`` without
        :class:`CheckpointLogSync`, or from a version of it that did not record them).
    """
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint: no mmap
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    callbacks = checkpoint.get("callbacks") or {}
    info: dict[str, Any] = {
        "global_step": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "has_rng": False,
        "saved_at": None,
        "log_dir": None,
        "ends_fit": None,
        "early_stopped": False,
    }
    for key, state in callbacks.items():
        name = key if isinstance(key, str) else getattr(key, "__qualname__", str(key))
        if name.startswith(RNGStateCallback.__qualname__) and isinstance(state, dict) and "rng" in state:
            info["has_rng"] = True
        if name.startswith(CheckpointLogSync.__qualname__) and isinstance(state, dict):
            info["saved_at"] = state.get("saved_at")
            info["log_dir"] = state.get("log_dir")
            info["ends_fit"] = state.get("ends_fit")
        if (
            isinstance(state, dict) and {"stopped_epoch", "wait_count"} <= state.keys()
        ):  # EarlyStopping's (or a subclass')
            # stopped_epoch is 0 until it stops: a stop after the first epoch looks like no stop
            stopped = int(state["stopped_epoch"])
            if stopped > 0 and stopped == info["epoch"]:
                info["early_stopped"] = True
            elif stopped == 0 and info["epoch"] == 0 and info["early_stopped"] is False:
                info["early_stopped"] = None
    return info


# --------------------------------------------------------------------------------------------
# event files


def _event_files(run_dir: Path) -> list[Path]:
    # The order TensorBoard's directory loader reads them in (names start with the creation time).
    return sorted(p for p in run_dir.iterdir() if p.is_file() and "tfevents" in p.name)


def _read_events(path: Path) -> Iterator[Any]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    try:
        yield from LegacyEventFileLoader(str(path)).Load()
    except Exception as error:  # a record cut short by a kill: what came before it is good
        rank_zero_warn(f"Stopped reading {path} at a damaged record ({type(error).__name__}: {error})")


def surviving_events(run_dir: str | os.PathLike[str]) -> list[Any]:
    """The events of ``run_dir``'s event files that TensorBoard keeps: read in file order, each
    ``SessionLog.START`` discards the events read so far at its step or later (what a purge
    marker, ``SummaryWriter(purge_step=...)``, means to TensorBoard's ``EventAccumulator``).

    Returns:
        The kept summary events, in reading order.
    """
    from tensorboard.compat.proto.event_pb2 import SessionLog

    kept: list[Any] = []
    for path in _event_files(Path(run_dir)):
        for event in _read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                kept = [e for e in kept if e.step < event.step]
            elif event.HasField("summary"):
                kept.append(event)
    return kept


def continue_event_log(writer: Any, run_dir: str | os.PathLike[str], *, purge_step: int, saved_at: float | None) -> int:
    """Continue the event files of ``run_dir`` at ``purge_step`` through ``writer`` (a torch
    ``SummaryWriter`` writing into ``run_dir``, before anything else is logged with it).

    Writes a purge marker at ``purge_step`` (as ``SummaryWriter(purge_step=...)`` does): readers
    drop every earlier event at ``purge_step`` or later, which the killed run logged after the
    checkpoint and the resumed run logs again. Then writes back, with their original wall times,
    the events at ``purge_step`` or later that were logged up to ``saved_at`` (before the checkpoint
    was saved, so the resumed run does not repeat them); none when ``saved_at`` is ``None``.

    Returns:
        The number of events written back.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    carried = []
    if saved_at is not None and math.isfinite(saved_at):
        carried = [e for e in surviving_events(run_dir) if e.step >= purge_step and e.wall_time <= saved_at]
    file_writer = writer.file_writer if getattr(writer, "file_writer", None) is not None else writer._get_file_writer()
    file_writer.add_event(Event(step=int(purge_step), session_log=SessionLog(status=SessionLog.START)))
    for event in carried:
        file_writer.add_event(event, walltime=event.wall_time)
    writer.flush()
    return len(carried)
