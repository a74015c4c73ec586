"""Base class for callbacks that analyse a model on a fixed sample at epoch end.

The spectrum, robustness and landscape callbacks share everything but the analysis itself:
when to run (epoch/step schedule, ``fit``/``validate``/``test``, never in the sanity check),
which samples to use (a seeded subset chosen once and kept on the device, sharded across DDP
ranks), the numerical and state guarantees (:func:`~lightning_hessian.curvature.analysis_mode`),
and how results reach the loggers. A subclass implements :meth:`EpochAnalysisCallback.analyse`.

Which loss is analysed: :func:`~lightning_hessian.curvature.objective.batch_loss`. By default
the cross-entropy of ``module(x)`` against ``y`` for batches ``(x, y, ...)``; a LightningModule
whose loss is something else defines ``hessian_loss(self, batch) -> Tensor`` (the batch-mean
loss) and every callback uses it, with the batch exactly as ``training_step`` receives it.

Both Lightning packages (``pytorch_lightning`` and ``lightning.pytorch``) are accepted: every
check on the user's objects goes through :mod:`lightning_hessian.callbacks.packages`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing.util
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_hessian.callbacks.budget import TimeBudget
from lightning_hessian.callbacks.packages import Callback, split_dataloader, tensorboard_logger_types, trainer_fn
from lightning_hessian.curvature.batches import batch_size, slice_batch
from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.curvature.objective import batch_loss, inputs_and_targets
from lightning_hessian.errors import UserInputError
from lightning_hessian.metrics import SPLITS, Split, split_tag

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = ["AnalysisSamples", "EpochAnalysisCallback", "batch_loss", "slice_batch"]

# Half-precision parameters cannot be analysed faithfully (docs/design.md: numerical guarantees, precision).
_REFUSED_PRECISIONS = ("16-true", "bf16-true", "transformer-engine")


@dataclass
class AnalysisSamples:
    """The rank-local analysis sample: one collated batch that stays on the model's device.

    Attributes:
        batch: the collated samples of this rank (the structure the dataloader yields).
        num_local: samples on this rank.
        num_global: samples over all ranks (equal to ``num_local`` without DDP).
    """

    batch: Any
    num_local: int
    num_global: int

    def micro_batches(self, size: int) -> list[Any]:
        """``batch`` cut into consecutive slices of at most ``size`` samples."""
        if size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {size}")
        return [slice_batch(self.batch, i, min(i + size, self.num_local)) for i in range(0, self.num_local, size)]

    def inputs_and_targets(self, module: nn.Module, needed_by: str) -> tuple[Tensor, Tensor]:
        """The input tensor and integer labels of ``batch``
        (:func:`~lightning_hessian.curvature.objective.inputs_and_targets`).

        Returns:
            ``(inputs, labels)``.
        """
        return inputs_and_targets(module, self.batch, needed_by=needed_by)


class _ForkedRNG:
    """Save and restore torch (CPU and CUDA), NumPy and Python RNG states.

    Drawing samples through a dataset's random transforms must not change training.
    """

    def __enter__(self) -> None:
        self._python = random.getstate()
        self._numpy = np.random.get_state()
        self._torch = torch.get_rng_state()
        self._cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    def __exit__(self, *exc: object) -> None:
        random.setstate(self._python)
        np.random.set_state(self._numpy)
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)


class EpochAnalysisCallback(Callback):
    r"""Run an analysis of the model on a fixed, seeded sample at epoch end.

    When it runs:

    * in ``trainer.fit``: at the end of every ``every_n_epochs``-th training epoch (after
      validation) and/or every ``every_n_train_steps`` optimizer steps; never in the sanity check;
    * in ``trainer.validate`` / ``trainer.test``: once, at the end of the validation/test epoch.

    Which samples: ``num_samples`` samples drawn once with ``seed`` from ``split`` (``trainer.test``
    uses the test split) and kept on the device, so every epoch analyses the same points. Under
    DDP each rank holds the slice ``indices[rank::world_size]``; subclasses combine ranks with
    :meth:`all_reduce_sum`. Samples are taken straight from the dataset and collated; a training
    set's random augmentation is therefore drawn once, with the RNG states restored afterwards.

    The analysis runs on the unwrapped LightningModule (never the DDP wrapper) inside
    :func:`~lightning_hessian.curvature.analysis_mode`: gradients on, autocast and TF32 off, eval
    mode, and the model's flags, ``.grad`` and the RNG states restored bit for bit.

    Tags: during ``fit`` the metrics are logged under the names :meth:`analyse` returns; under
    ``validate``/``test`` under the same names qualified by the split of the samples
    (``hessian/eig_1`` -> ``hessian/test/eig_1``, :func:`lightning_hessian.metrics.split_tag`),
    so that a test from the last checkpoint, which logs at the checkpoint's step, never replaces
    the fit's last analysis of the training samples (see :meth:`analysis_tag`).

    Args:
        every_n_epochs: analyse at the end of every n-th training epoch; ``None`` or 0 to disable.
        every_n_train_steps: analyse every n optimizer steps; ``None`` or 0 to disable.
        num_samples: size of the analysis sample over all ranks; ``None`` for the whole split.
        split: ``"train"``, ``"val"`` or ``"test"``: where samples come from during ``fit``.
        seed: seed of the sample choice (and of the analysis' own random probes).
        analysis_batch_size: micro-batch size for the analysis' forward/backward passes.
        time_budget: seconds one analysis may take; subclasses stop cleanly when it is spent,
            checking the :class:`~lightning_hessian.callbacks.budget.TimeBudget` of
            :meth:`start_budget`.

    Raises:
        ValueError: for a bad option (in ``__init__``) or a ``num_samples`` larger than the split,
            or a ``*-true`` half precision (in ``setup``).
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_samples: int | None = 1024,
        split: Split = "train",
        seed: int = 0,
        analysis_batch_size: int = 512,
        time_budget: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and value < 0:
                raise UserInputError(f"{name}={value} must be >= 0 (0 or None disables it)")
        if num_samples is not None and num_samples < 1:
            raise UserInputError(f"num_samples={num_samples} must be >= 1, or None for the whole split")
        if split not in SPLITS:
            raise UserInputError(f"split={split!r} is not one of {SPLITS}")
        if analysis_batch_size < 1:
            raise UserInputError(f"analysis_batch_size={analysis_batch_size} must be >= 1")
        if time_budget is not None and time_budget <= 0:
            raise UserInputError(f"time_budget={time_budget} must be a positive number of seconds, or None")
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_train_steps = every_n_train_steps or 0
        self.num_samples = num_samples
        self.split: Split = split
        self.seed = seed
        self.analysis_batch_size = analysis_batch_size
        self.time_budget = time_budget
        self._samples: dict[str, AnalysisSamples] = {}
        self._last_epoch = -1
        self._last_step = -1
        self._warned_figures: set[str] = set()
        self._checkpoint_steps: dict[str, int] = {}
        self._warned_non_finite = False
        self._last_metrics: dict[str, float] = {}
        self._analysed_step = -1  # trainer.global_step of the last analysis

    # ----------------------------------------------------------------------------------------
    # what subclasses implement

    def analyse(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> dict[str, float]:
        """Analyse ``pl_module`` on ``samples``; return scalar metrics to log (full tag names).

        Called inside ``analysis_mode(pl_module)`` on every rank; all ranks must make the same
        collective calls. The returned metrics are logged by rank zero.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement analyse()")

    def check_samples(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> None:
        """Check that the analysis can run on ``samples`` (raise a clear error if not).

        Called once per split, when the samples are chosen: before the first training step in
        ``fit`` (``on_train_start``, when Lightning has attached the data however it was passed),
        at the start of ``validate``/``test``.
        """

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: AnyTrainer, pl_module: AnyLightningModule, stage: str) -> None:
        _destroy_process_group_at_exit()
        precision = str(trainer.precision)
        if precision in _REFUSED_PRECISIONS:
            raise UserInputError(
                f"{type(self).__name__} cannot analyse a model whose parameters are stored in {precision!r}"
                " precision: curvature and attacks need float32 parameters. Train with"
                f" precision='{precision.split('-')[0]}-mixed' (parameters stay float32) instead."
            )
        split = self._split_for(trainer)
        # Only the training run's own split is held to num_samples, and only when the callback analyses
        # during fit (a callback for trainer.test alone, every_n_epochs=None, may exceed a small
        # validation split); validate/test clamp with a warning.
        length = self._dataset_length(trainer, pl_module, split) if stage == "fit" and self._analyses_in_fit() else None
        if length is not None and self.num_samples is not None and self.num_samples > length:
            raise UserInputError(
                f"{type(self).__name__}: num_samples={self.num_samples} is larger than the {split} split"
                f" ({length} samples). Lower num_samples to at most {length}, or pass num_samples=None"
                " to use the whole split."
            )

    def _analyses_in_fit(self) -> bool:
        """Whether the callback analyses during ``fit`` at all (by epoch, by step or at the end)."""
        return bool(self.every_n_epochs or self.every_n_train_steps or getattr(self, "analyse_on_train_end", False))

    @override
    def on_train_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if self._analyses_in_fit():
            self._samples_for(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._samples_for(trainer, pl_module)

    @override
    def on_test_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if trainer.state.fn == TrainerFn.TESTING:
            self._samples_for(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        epoch = trainer.current_epoch
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0 and epoch > self._last_epoch:
            self._last_epoch = epoch
            self._run(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: AnyTrainer, pl_module: AnyLightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook fires per micro-batch; run once per optimizer step.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step > self._last_step:
            self._last_step = step
            self._run(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._run(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if trainer.state.fn == TrainerFn.TESTING:
            self._run(trainer, pl_module)

    @property
    @override
    def state_key(self) -> str:
        # Distinct keys let several instances (say a cheap every-epoch one and a full one) share a
        # trainer and a checkpoint; subclasses add their own distinguishing options.
        return self._generate_state_key(
            split=self.split,
            num_samples=self.num_samples,
            seed=self.seed,
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self._last_epoch, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_epoch = state_dict.get("last_epoch", -1)
        self._last_step = state_dict.get("last_step", -1)

    # ----------------------------------------------------------------------------------------
    # helpers for subclasses

    def all_reduce_sum(self, trainer: AnyTrainer) -> Callable[[Tensor], Tensor] | None:
        """A function summing a tensor over all processes, or ``None`` when not distributed."""
        if trainer.world_size <= 1:
            return None
        return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")

    def start_budget(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> TimeBudget:
        """The time budget of an analysis starting now: ``time_budget`` seconds (unlimited when
        ``None``), decided collectively over the processes (:class:`~lightning_hessian.callbacks.budget.TimeBudget`).

        Returns:
            The budget, its clock started.
        """
        return TimeBudget(self.time_budget, self.all_reduce_sum(trainer), pl_module.device)

    def tensorboard(self, trainer: AnyTrainer) -> Any | None:
        """The rank-zero TensorBoard ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, tensorboard_logger_types()):
                return logger.experiment
        return None

    def run_dir(self, trainer: AnyTrainer) -> Path | None:
        """Rank zero's directory for raw result files: the first logger's ``log_dir``."""
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                return Path(log_dir)
        return Path(trainer.default_root_dir)

    def analysis_tag(self, trainer: AnyTrainer, tag: str) -> str:
        """The name under which the current analysis logs ``tag``.

        During ``fit``: ``tag`` itself. Under ``trainer.validate``/``trainer.test``: ``tag``
        qualified by the split the samples come from (``hessian/test/eig_1``,
        :func:`lightning_hessian.metrics.split_tag`). Those trainers log at the checkpoint's step
        (:meth:`log_step`), the step of the fit's last analysis, and a report keeps one value per
        tag and step: unqualified, a test-sample value would replace the training-sample one.

        Args:
            trainer: the running trainer.
            tag: an unqualified tag (``hessian/eig_1``; any group but the model's own ``train/``,
                ``val/``, ``test/``).

        Returns:
            The tag to log.
        """
        return self._tagger(trainer)(tag)

    def _tagger(self, trainer: AnyTrainer) -> Callable[[str], str]:
        """:meth:`analysis_tag` for many tags (the split is looked up once)."""
        if trainer_fn(trainer) in ("validate", "test"):
            split = self._split_for(trainer)
            return lambda tag: split_tag(tag, split)
        return lambda tag: tag

    def log_figure(self, trainer: AnyTrainer, tag: str, figure: Any) -> None:
        """Log a matplotlib figure as an image (TensorBoard) at :meth:`log_step`; closes it.

        ``tag`` is unqualified; under ``validate``/``test`` it is logged under
        :meth:`analysis_tag`. Loggers that cannot take figures get the scalars only, and one
        warning per logger type.
        """
        import matplotlib.pyplot as plt

        try:
            if not trainer.is_global_zero:
                return
            tag = self.analysis_tag(trainer, tag)
            for logger in trainer.loggers:
                if isinstance(logger, tensorboard_logger_types()):
                    logger.experiment.add_figure(tag, figure, global_step=self.log_step(trainer), close=False)
                elif type(logger).__name__ not in self._warned_figures:
                    self._warned_figures.add(type(logger).__name__)
                    rank_zero_warn(
                        f"{type(self).__name__}: {type(logger).__name__} cannot take figures; it gets the"
                        " scalar metrics only. Add a TensorBoardLogger to see the figures."
                    )
        finally:
            plt.close(figure)

    # ----------------------------------------------------------------------------------------
    # internals

    def _samples_for(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> AnalysisSamples:
        """This run's samples of the current split: chosen and checked once, then kept."""
        split = self._split_for(trainer)
        samples = self._samples.get(split)
        if samples is None:
            samples = self._select_samples(trainer, pl_module, split)
            self.check_samples(trainer, pl_module, samples)
            self._samples[split] = samples
        return samples

    @property
    def last_metrics(self) -> dict[str, float]:
        """The scalar metrics of the last analysis as they were logged: under
        ``validate``/``test`` with split-qualified names (:meth:`analysis_tag`)."""
        return dict(self._last_metrics)

    def unavailable_metrics(self) -> dict[str, float]:
        """The metrics logged (as NaN) when the model cannot be analysed: non-finite weights or
        loss, e.g. a diverged run. Subclasses list their main tags.

        Returns:
            Tag -> NaN; empty here.
        """
        return {}

    def _run(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        split = self._split_for(trainer)
        samples = self._samples_for(trainer, pl_module)
        self._analysed_step = trainer.global_step
        start = time.perf_counter()
        # DDP: analyse the model a checkpoint would save (rank 0's BatchNorm statistics)
        with analysis_mode(pl_module), _rank_zero_buffers(trainer, pl_module):
            problem = self._non_finite(trainer, pl_module, samples)
            try:
                metrics = self.unavailable_metrics() if problem else self.analyse(trainer, pl_module, samples)
            except torch.linalg.LinAlgError as error:  # non-finite curvature despite a finite loss
                problem, metrics = f"the analysis met non-finite values ({error})", self.unavailable_metrics()
        if problem:
            # An analysis never ends a training run: a diverged model gets NaN metrics and a warning.
            if not self._warned_non_finite:
                self._warned_non_finite = True
                rank_zero_warn(
                    f"{type(self).__name__}: {problem} at epoch {trainer.current_epoch}, step {trainer.global_step};"
                    " logging NaN for this analysis (and for later ones, without another warning). The run"
                    " has probably diverged: lower the learning rate or check the data."
                )
            self._log_metrics(trainer, metrics)
            return
        rank_zero_info(
            f"{type(self).__name__}: analysed {samples.num_global} {split} samples in"
            f" {time.perf_counter() - start:.2f} s (epoch {trainer.current_epoch}, step {trainer.global_step})"
        )
        self._log_metrics(trainer, metrics)

    def _non_finite(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> str | None:
        """Why the model cannot be analysed (non-finite weights or loss), the same on every rank."""
        # flags: weights not finite, loss NaN, loss infinite (summed over ranks)
        flags = torch.zeros(3, dtype=torch.float64, device=pl_module.device)
        if not all(bool(torch.isfinite(p).all()) for p in pl_module.parameters() if p.is_floating_point()):
            flags[0] = 1
        else:
            try:
                with torch.no_grad():
                    losses = torch.stack(
                        [
                            batch_loss(pl_module, batch).detach().double().reshape(())
                            for batch in samples.micro_batches(self.analysis_batch_size)
                        ]
                    )
                flags[1], flags[2] = float(torch.isnan(losses).any()), float(torch.isinf(losses).any())
            except TypeError:  # no loss for this batch structure: the analysis itself says what is missing
                pass
        reduce = self.all_reduce_sum(trainer)
        if reduce is not None:
            flags = reduce(flags)
        if flags[0] > 0:
            return "the model's weights are not finite"
        if flags[1] > 0 or flags[2] > 0:
            return f"the loss on the {samples.num_global} analysis samples is {'nan' if flags[1] > 0 else 'inf'}"
        return None

    def _log_metrics(self, trainer: AnyTrainer, metrics: dict[str, float]) -> None:
        """Log ``metrics`` (names as :meth:`analyse` returns them) under :meth:`analysis_tag`;
        they become :attr:`last_metrics`."""
        tagger = self._tagger(trainer)
        metrics = {tagger(name): value for name, value in metrics.items()}
        self._last_metrics = dict(metrics)
        if not metrics:
            return
        for name, value in metrics.items():
            trainer.callback_metrics[name] = torch.tensor(float(value))
        if trainer.is_global_zero:
            step = self.log_step(trainer)
            for logger in trainer.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_step(self, trainer: AnyTrainer) -> int:
        """The step results are logged at: ``trainer.global_step``, or under
        ``trainer.validate/test(ckpt_path=...)`` the global step the checkpoint was saved at (those
        trainers start at step 0, which would put the analysis at the start of the training curve).

        Returns:
            The step; ``trainer.global_step`` also when the checkpoint cannot be read.
        """
        ckpt_path = getattr(trainer, "ckpt_path", None)
        if trainer_fn(trainer) in ("validate", "test") and ckpt_path:
            if ckpt_path not in self._checkpoint_steps:
                try:
                    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
                    self._checkpoint_steps[ckpt_path] = int(checkpoint.get("global_step", trainer.global_step))
                except Exception:  # a remote or unusual checkpoint: fall back to the trainer's step
                    self._checkpoint_steps[ckpt_path] = trainer.global_step
            return self._checkpoint_steps[ckpt_path]
        return trainer.global_step

    def _split_for(self, trainer: AnyTrainer) -> Split:
        fn = trainer.state.fn
        if fn == TrainerFn.TESTING:
            return "test"
        if fn == TrainerFn.VALIDATING and self.split == "train" and not self._has_split(trainer, "train"):
            return "val"
        return self.split

    @staticmethod
    def _has_split(trainer: AnyTrainer, split: Split) -> bool:
        # A datamodule set up for "validate" may not have built its training set.
        try:
            return split_dataloader(trainer, split) is not None
        except Exception:
            return False

    @staticmethod
    def _dataloader(trainer: AnyTrainer, pl_module: AnyLightningModule, split: Split) -> DataLoader | None:
        return split_dataloader(trainer, split)

    def _dataset_length(self, trainer: AnyTrainer, pl_module: AnyLightningModule, split: Split) -> int | None:
        try:
            loader = self._dataloader(trainer, pl_module, split)
        except Exception:  # the data may only be ready later in the run; checked again then
            return None
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset):
            return None
        try:
            return len(dataset)
        except TypeError:
            return None

    def _select_samples(self, trainer: AnyTrainer, pl_module: AnyLightningModule, split: Split) -> AnalysisSamples:
        loader = self._dataloader(trainer, pl_module, split)
        if loader is None:
            raise UserInputError(
                f"{type(self).__name__} found no {split} dataloader. Give the trainer one, or set split= to a"
                " split your datamodule provides."
            )
        rank, world = trainer.global_rank, trainer.world_size
        # Samples outlive this call and feed autograd later: never create them as inference tensors.
        with _ForkedRNG(), torch.inference_mode(False):
            dataset = loader.dataset
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
                batch, num_global = self._take_from_iterable(loader, world)
            else:
                length = len(dataset)
                num_global = length if self.num_samples is None else self.num_samples
                if num_global > length:
                    if trainer.state.fn == TrainerFn.FITTING:
                        raise UserInputError(
                            f"{type(self).__name__}: num_samples={num_global} is larger than the {split} split"
                            f" ({length} samples). Lower num_samples or pass None for the whole split."
                        )
                    rank_zero_warn(
                        f"{type(self).__name__}: num_samples={num_global} is larger than the {split} split;"
                        f" analysing all {length} samples."
                    )
                    num_global = length
                generator = torch.Generator().manual_seed(self.seed)
                indices = torch.randperm(length, generator=generator)[:num_global][rank::world].tolist()
                if not indices:
                    raise UserInputError(
                        f"{type(self).__name__}: num_samples={num_global} leaves rank {rank} of {world} without"
                        f" samples; use num_samples >= {world}."
                    )
                # As torch's own fetcher does: datasets may fetch many indices at once.
                getitems = getattr(dataset, "__getitems__", None)
                items = getitems(indices) if getitems is not None else [dataset[i] for i in indices]
                collate = loader.collate_fn or torch.utils.data.default_collate
                batch = collate(items)
            batch = move_data_to_device(batch, pl_module.device)
            batch = apply_to_collection(batch, Tensor, lambda t: t.clone() if t.is_inference() else t)
        return AnalysisSamples(batch=batch, num_local=batch_size(batch), num_global=num_global)

    def _take_from_iterable(self, loader: DataLoader, world: int) -> tuple[Any, int]:
        """Collect samples from an iterable dataloader (already rank-sharded by its owner)."""
        if self.num_samples is None:
            raise UserInputError(
                f"{type(self).__name__}: num_samples=None needs a map-style dataset with a length; this"
                " dataloader iterates an IterableDataset. Set num_samples."
            )
        wanted = math.ceil(self.num_samples / world)
        pieces, have = [], 0
        for batch in loader:
            pieces.append(batch)
            have += batch_size(batch)
            if have >= wanted:
                break
        if not pieces:
            raise UserInputError(f"{type(self).__name__}: the dataloader yielded no batches")
        batch = _concatenate(pieces)
        have = min(have, wanted)
        return slice_batch(batch, 0, have), have * world


_EXIT_HOOK_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Destroy this process's default process group before it exits (once per process).

    Lightning does so only for NCCL. A gloo group left alive when a ``ddp_spawn`` worker exits
    aborts it now and then ("terminate called without an active exception", SIGABRT: measured
    4 of 30 CPU runs of a two-process fit, 0 of 30 with this hook). Multiprocessing workers run
    ``multiprocessing.util`` finalizers, not ``atexit``, on their way out; the main process runs
    them at exit too.
    """
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    _EXIT_HOOK_REGISTERED = True

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    multiprocessing.util.Finalize(None, destroy, exitpriority=100)


@contextlib.contextmanager
def _rank_zero_buffers(trainer: AnyTrainer, pl_module: nn.Module) -> Iterator[None]:
    """Under DDP, rank 0's buffers on every rank for the duration; each rank's own afterwards.

    DDP broadcasts buffers from rank 0 only at a forward through its wrapper, so after the last
    training step each rank holds its own BatchNorm running statistics, while a checkpoint holds
    rank 0's. Analysing each rank's own statistics would analyse a model that was never saved.
    """
    buffers = [b for b in pl_module.buffers() if b.numel() > 0]
    if (
        trainer.world_size <= 1
        or not buffers
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        yield
        return
    own = [b.detach().clone() for b in buffers]
    with torch.no_grad():
        for buffer in buffers:
            torch.distributed.broadcast(buffer.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():  # training goes on exactly as without the callback
            for buffer, saved in zip(buffers, own, strict=True):
                buffer.copy_(saved)


def _concatenate(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        # the batch's own mapping class (dict, OrderedDict, ...): Mapping itself takes no arguments
        mapping_class: Callable[..., Any] = type(first)
        return mapping_class({k: _concatenate([b[k] for b in batches]) for k in first})
    if isinstance(first, (list, tuple)):
        columns = [_concatenate([b[i] for b in batches]) for i in range(len(first))]
        return type(first)(*columns) if hasattr(first, "_fields") else type(first)(columns)
    return first
