r"""
Adaptive batch size (ABSA)
^^^^^^^^^^^^^^^^^^^^^^^^^^

Grow the batch size during training when the loss landscape flattens: Yao, Gholami, Arfeen, Liaw,
Gonzalez, Keutzer and Mahoney (2018), "Large batch size training of neural networks with
adversarial training and second-order information" (arXiv:1810.01021), and the authors' ``absa.py``
in HessianFlow.

Training starts at a small global batch :math:`B_0`. At the end of an epoch, when the top
eigenvalue :math:`\lambda_1` of the loss Hessian has fallen by ``eigenvalue_factor`` since the last
increase, or after ``max_epochs_per_size`` epochs at the same size, the global batch and the
learning rate are multiplied by ``growth_factor`` (at most up to ``max_batch_size``). The paper:
:math:`B_0 = 128`, factor 2 for both, at most :math:`128 B_0`, ten epochs; and FGSM adversarial
training of 20 % of each batch at :math:`\epsilon = 0.005`, switched off after half the epochs.

The eigenvalue comes from a :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback`
on the same trainer (never computed twice). The batch size is the datamodule's ``batch_size``,
read by its ``train_dataloader()``, which Lightning calls again every epoch under
``Trainer(reload_dataloaders_every_n_epochs=1)``.

"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_hessian import metrics as tags
from lightning_hessian.attacks.training import AdversarialTraining
from lightning_hessian.callbacks.packages import Callback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.errors import UserInputError
from lightning_hessian.models.optim import LR_SCALING_RULES, scaled_learning_rate

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = ["BATCH_SIZE_SCOPES", "AdaptiveBatchSizeCallback"]

#: How the datamodule's ``batch_size`` relates to the global batch (see
#: :class:`AdaptiveBatchSizeCallback`, ``batch_size_scope``).
BATCH_SIZE_SCOPES: tuple[str, ...] = ("auto", "global", "per_device")

# Scheduler attributes holding learning rates a scheduler computes the next rate from.
_SCHEDULER_LR_ATTRIBUTES = ("base_lrs", "max_lrs")
# Param-group entries holding learning rates (torch's schedulers keep these in the groups).
_GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class AdaptiveBatchSizeCallback(Callback):
    r"""Grow the global batch size and the learning rate as the top Hessian eigenvalue falls (ABSA).

    At the end of every training epoch, after the spectrum callback's analysis of that epoch, the
    callback multiplies the global batch size and the learning rate by ``growth_factor`` when

    * the top eigenvalue (``metric``, by default ``hessian/eig_1``) is at most the eigenvalue at the
      last increase (at the start: the first one measured, at the end of epoch 0) divided by
      ``eigenvalue_factor``, or
    * ``max_epochs_per_size`` epochs have been trained at the current size,

    as long as the batch stays at most ``max_batch_size`` (the last step is cut to
    ``max_batch_size``; the learning rate then follows the actual ratio). The next epoch trains at
    the new size.

    Requirements (each checked in :meth:`setup`, before training, with a message naming the fix):

    * **A datamodule with a settable ``batch_size``** (``trainer.fit(model, datamodule=dm)``) that
      its ``train_dataloader()`` reads each time it is called. ``batch_size_scope`` says what it
      counts: ``"global"``, samples per optimizer step over all devices and accumulated
      micro-batches (the package's :class:`~lightning_hessian.data.ImageDataModule`, which derives
      the per-device batch ``batch_size / (world_size x accumulate_grad_batches)``); or
      ``"per_device"``, the samples of one micro-batch on one device (the usual
      ``DataLoader(batch_size=self.batch_size)``). ``"auto"`` picks ``"global"`` for datamodules
      with a ``per_device_batch_size`` attribute (the package's convention) and ``"per_device"``
      otherwise. Every global size of the growth chain must divide by
      ``world_size x accumulate_grad_batches``.
    * **``Trainer(reload_dataloaders_every_n_epochs=1)``**, Lightning's documented way to rebuild
      the training loader (and, under DDP, its ``DistributedSampler``) every epoch: the global batch
      changes, the per-device batch follows, every sample is seen once per epoch.
    * **A** :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback` **before this
      callback** in ``callbacks`` (hooks run in list order, so its analysis of the epoch comes
      first) that logs ``metric`` at epoch ends (``every_n_epochs >= 1``). With
      ``every_n_epochs = k > 1`` the eigenvalue rule is checked only at the epochs it analyses
      (every k-th), the epoch rule at every epoch; a NaN eigenvalue (diverged run, time budget)
      is skipped with a warning. Not needed with ``eigenvalue_factor=None``.
    * With ``stop_adversarial_at``: a module with robust training switched on in an attribute
      ``adversarial`` holding an :class:`~lightning_hessian.attacks.AdversarialTraining` (what
      :class:`~lightning_hessian.models.ImageClassifier`'s ``adversarial`` option sets), and a
      finite ``max_epochs``.

    Learning rate: every param group's ``lr`` of every optimizer is multiplied by the factor
    (``lr_scaling``: the batch ratio, its square root, or 1), and so are the rates the active
    learning-rate schedulers compute the next rate from (``base_lrs``; ``initial_lr``/``max_lr``/
    ``min_lr`` in the groups; ``max_lrs`` of ``CyclicLR``), so a schedule keeps its shape on the
    new scale: with the package's ``LambdaLR`` (warm-up, ``step``, ``cosine``) the rate is
    ``lr x factor x m(t)``. ``ImageClassifier``'s schedule runs on a clock of epochs
    (``warmup_epochs``, ``lr_milestones`` and the cosine length land at their configured epochs
    however short the epochs become, and its clock is in the checkpoint, so a resumed run repeats
    the uninterrupted one); a module's own step-counted scheduler keeps counting steps.

    Resume: the state (sizes, learning-rate factor, reference eigenvalue, epochs at this size,
    steps, history) is saved in checkpoints, and on loading the datamodule's ``batch_size`` is set
    back at once, before Lightning builds the first training loader; the optimizer's and
    schedulers' learning rates come back from their own state (the factor is not applied twice).
    ``ModelCheckpoint`` saves at the end of the training epoch after this callback by default; a
    checkpoint saved at validation end holds the state before the epoch's decision, and Lightning
    then runs that epoch's end again when resuming (the spectrum analyses, this callback decides).
    Should a resumed run still miss a decision, it warns. When ``fit`` ends (or fails), the
    datamodule's ``batch_size`` and the module's ``adversarial`` are set back to what they were
    given as; the final size is :attr:`batch_size`.

    Logged metrics (to every logger at ``trainer.global_step``, and in ``trainer.callback_metrics``),
    at the start of training and at the end of every epoch after the decision, i.e. what the next
    epoch starts with:

    - ``absa/batch_size``: the global batch size.
    - ``absa/lr``: the learning rate of the first param group of the first optimizer.
    - ``absa/steps``: optimizer steps so far (``trainer.global_step``).
    - ``absa/adversarial``: 1 while the module's adversarial training is on (``stop_adversarial_at``).

    Args:
        max_batch_size: largest global batch size (the paper: ``128 x`` the start).
        growth_factor: factor of each increase of the global batch, > 1.
        eigenvalue_factor: increase when ``metric`` has fallen by this factor since the last
            increase (> 1); ``None`` disables the rule (no spectrum callback needed).
        max_epochs_per_size: increase after this many epochs at the same size; ``None`` disables
            the rule.
        metric: the spectrum callback's metric to watch.
        lr_scaling: ``"linear"`` (the learning rate follows the batch), ``"sqrt"`` or ``"none"``.
        stop_adversarial_at: switch the module's adversarial training off for epochs
            ``>= ceil(stop_adversarial_at x max_epochs)`` (the paper: 0.5); ``None`` leaves it alone.
            The module gets its own setting back when ``fit`` ends.
        batch_size_scope: ``"auto"``, ``"global"`` or ``"per_device"``: what the datamodule's
            ``batch_size`` counts (see above). ``max_batch_size`` and the logged size are global.

    Raises:
        UserInputError: (a ``ValueError``) for bad options in ``__init__``, and in :meth:`setup`
            for a missing or unsuitable datamodule, spectrum callback, reload setting, batch sizes
            that do not divide, a ``max_batch_size`` below the start, or ``stop_adversarial_at``
            without adversarial training.

    Attributes:
        history: one entry per increase: ``epoch`` (the epoch whose end triggered it), ``step``,
            ``batch_size`` (the new size), ``lr_factor`` (cumulative), ``eigenvalue`` and
            ``reason`` (``"eigenvalue"`` or ``"epochs"``).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_hessian import AdaptiveBatchSizeCallback, HessianSpectrumCallback
        >>> callbacks = [HessianSpectrumCallback(num_samples=2048), AdaptiveBatchSizeCallback(max_batch_size=16384)]
        >>> trainer = Trainer(max_epochs=90, reload_dataloaders_every_n_epochs=1, callbacks=callbacks)
    """

    # the state of a fit: set by _reset_state and load_state_dict
    _start_batch_size: int | None
    _batch_size: int | None
    _lr_factor: float
    _reference: float | None
    _epochs_at_size: int
    _steps: int
    _last_epoch: int
    history: list[dict[str, Any]]

    def __init__(
        self,
        *,
        max_batch_size: int,
        growth_factor: float = 2,
        eigenvalue_factor: float | None = 2.0,
        max_epochs_per_size: int | None = 10,
        metric: str = tags.TOP_EIGENVALUE,
        lr_scaling: str = "linear",
        stop_adversarial_at: float | None = None,
        batch_size_scope: Literal["auto", "global", "per_device"] = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not _is_int(max_batch_size) or max_batch_size < 1:
            raise UserInputError(f"{name}: max_batch_size must be a positive integer, got {max_batch_size!r}.")
        if not _is_number(growth_factor) or not growth_factor > 1:
            raise UserInputError(
                f"{name}: growth_factor must be a number > 1 (the batch grows by it), got {growth_factor!r};"
                " the paper uses 2."
            )
        if eigenvalue_factor is not None and (not _is_number(eigenvalue_factor) or not eigenvalue_factor > 1):
            raise UserInputError(
                f"{name}: eigenvalue_factor must be a number > 1 (the fall of the top eigenvalue that triggers an"
                f" increase), or None to disable that rule; got {eigenvalue_factor!r}. The paper uses 2."
            )
        if max_epochs_per_size is not None and (not _is_int(max_epochs_per_size) or max_epochs_per_size < 1):
            raise UserInputError(
                f"{name}: max_epochs_per_size must be an integer >= 1, or None to disable that rule;"
                f" got {max_epochs_per_size!r}. The paper uses 10."
            )
        if eigenvalue_factor is None and max_epochs_per_size is None:
            raise UserInputError(
                f"{name}: eigenvalue_factor and max_epochs_per_size are both None, so the batch would never grow;"
                " set at least one of them (the paper: 2 and 10)."
            )
        if lr_scaling not in LR_SCALING_RULES:
            valid = ", ".join(LR_SCALING_RULES)
            raise UserInputError(f"{name}: unknown lr_scaling {lr_scaling!r}; valid values: {valid}.")
        if stop_adversarial_at is not None and not (_is_number(stop_adversarial_at) and 0 < stop_adversarial_at <= 1):
            raise UserInputError(
                f"{name}: stop_adversarial_at is a fraction of max_epochs in (0, 1], or None; got"
                f" {stop_adversarial_at!r}. The paper switches adversarial training off at 0.5."
            )
        if batch_size_scope not in BATCH_SIZE_SCOPES:
            raise UserInputError(
                f"{name}: unknown batch_size_scope {batch_size_scope!r}; valid values: {', '.join(BATCH_SIZE_SCOPES)}."
            )
        self.max_batch_size = int(max_batch_size)
        self.growth_factor = growth_factor
        self.eigenvalue_factor = eigenvalue_factor
        self.max_epochs_per_size = max_epochs_per_size
        self.metric = metric
        self.lr_scaling = lr_scaling
        self.stop_adversarial_at = stop_adversarial_at
        self.batch_size_scope = batch_size_scope

        # set up for each fit in setup()
        self._datamodule: Any = None
        self._spectrum: HessianSpectrumCallback | None = None
        self._parts = 1  # world_size x accumulate_grad_batches
        self._scope = "global"
        self._adversarial_off_epoch: int | None = None
        self._module_adversarial: tuple[Any, AdversarialTraining] | None = None
        self._warned: set[str] = set()
        self._reset_state(batch_size=None)

    # ----------------------------------------------------------------------------------------
    # public state

    @property
    def batch_size(self) -> int | None:
        """The current global batch size (``None`` before ``fit``)."""
        return self._batch_size

    @property
    def start_batch_size(self) -> int | None:
        """The global batch size training started with (``None`` before ``fit``)."""
        return self._start_batch_size

    @property
    def lr_factor(self) -> float:
        """The factor the learning rates have been multiplied by so far."""
        return self._lr_factor

    @property
    def reference_eigenvalue(self) -> float | None:
        """The eigenvalue at the last increase (at the start: the first one measured)."""
        return self._reference

    @property
    def epochs_at_size(self) -> int:
        """Epochs trained at the current batch size."""
        return self._epochs_at_size

    def batch_size_chain(self, start: int) -> list[int]:
        """The global batch sizes training can go through from ``start``: ``start``, then each
        times ``growth_factor`` (rounded), the last one cut to ``max_batch_size``.

        Returns:
            The sizes in increasing order; ``[start]`` alone when ``start >= max_batch_size``.

        Raises:
            UserInputError: ``growth_factor`` does not grow a size of the chain (after rounding).
        """
        sizes = [start]
        while sizes[-1] < self.max_batch_size:
            following = min(self.max_batch_size, round(sizes[-1] * self.growth_factor))
            if following <= sizes[-1]:
                raise UserInputError(
                    f"{type(self).__name__}: growth_factor={self.growth_factor} does not grow the global batch"
                    f" {sizes[-1]} (rounded to {following}); use a larger growth_factor, e.g. 2."
                )
            sizes.append(following)
        return sizes

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: AnyTrainer, pl_module: AnyLightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        # Lightning sets Trainer.datamodule in its data connector without declaring it on the Trainer
        datamodule = trainer.datamodule  # type: ignore[union-attr]
        if datamodule is None:
            raise UserInputError(
                f"{name} changes the batch size through the datamodule's `batch_size`, but this fit has no"
                " datamodule; pass a LightningDataModule with a settable `batch_size` that its train_dataloader()"
                " reads: trainer.fit(model, datamodule=dm)."
            )
        size = getattr(datamodule, "batch_size", None)
        if not _is_int(size) or size < 1:
            raise UserInputError(
                f"{name}: the datamodule {type(datamodule).__name__} has no integer attribute `batch_size` (found"
                f" {size!r}); give it one and read it in train_dataloader(), e.g."
                " DataLoader(dataset, batch_size=self.batch_size)."
            )
        try:
            datamodule.batch_size = size
        except AttributeError as error:
            raise UserInputError(
                f"{name}: the `batch_size` of {type(datamodule).__name__} cannot be set ({error}); make it a plain"
                " attribute or a property with a setter."
            ) from error
        reload = getattr(trainer, "reload_dataloaders_every_n_epochs", 0)
        if reload != 1:
            raise UserInputError(
                f"{name} needs Trainer(reload_dataloaders_every_n_epochs=1) (got {reload}): Lightning builds the"
                " training DataLoader once per fit otherwise, and a new batch size would not reach it"
                " (hessian-train: trainer.reload_dataloaders_every_n_epochs: 1)."
            )

        self._datamodule = datamodule
        self._parts = trainer.world_size * trainer.accumulate_grad_batches
        scope = self.batch_size_scope
        if scope == "auto":
            scope = "global" if hasattr(datamodule, "per_device_batch_size") else "per_device"
        self._scope = scope
        start = size if scope == "global" else size * self._parts
        parts_text = (
            f"world_size x accumulate_grad_batches = {trainer.world_size} x {trainer.accumulate_grad_batches}"
            f" = {self._parts}"
        )
        if self.max_batch_size < start:
            raise UserInputError(
                f"{name}: max_batch_size={self.max_batch_size} is smaller than the starting global batch {start}"
                f" (the datamodule's batch_size {size}, {scope}); raise max_batch_size (the paper: 128 x the start)"
                " or start from a smaller batch_size."
            )
        for global_size in self.batch_size_chain(start):
            if global_size % self._parts:
                multiple = math.ceil(start / self._parts) * self._parts
                raise UserInputError(
                    f"{name}: the global batch {global_size} (growing from {start} by growth_factor="
                    f"{self.growth_factor} up to max_batch_size={self.max_batch_size}) is not a multiple of"
                    f" {parts_text}; choose a start and max_batch_size whose every size divides, e.g. start at"
                    f" {multiple} with max_batch_size a power-of-2 multiple of it, or change"
                    " devices/accumulate_grad_batches."
                )

        self._spectrum = self._find_spectrum(trainer) if self.eigenvalue_factor is not None else None
        self._check_adversarial(trainer, pl_module)
        # A new fit starts from the datamodule's size; a checkpoint's state is loaded after setup.
        self._reset_state(batch_size=start)
        self._warned = set()

    @override
    def on_train_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if not trainer.optimizers:
            raise UserInputError(
                f"{type(self).__name__} scales the learning rate of the optimizers, but the module configured"
                " none; return an optimizer from configure_optimizers()."
            )
        if trainer.global_step == 0 and self._last_epoch < 0:
            self._log(trainer, next_epoch=0)

    @override
    def on_train_epoch_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch > 0 and self._last_epoch < epoch - 1:
            self._warn_once(
                "missed",
                f"{type(self).__name__}: no batch-size decision was made at the end of epoch {epoch - 1} (the"
                " checkpoint this run resumed from was saved before it, and that epoch's end did not run again);"
                f" epoch {epoch} trains at the checkpoint's global batch {self._batch_size}. Save checkpoints at"
                " the end of the training epoch: ModelCheckpoint(save_on_train_epoch_end=True).",
            )
        self._check_loader(trainer)
        if self._adversarial_off_epoch is not None and epoch >= self._adversarial_off_epoch:
            adversarial = getattr(pl_module, "adversarial", None)
            if isinstance(adversarial, AdversarialTraining) and adversarial.enabled:
                # torch types a module's unknown attributes as Tensor | Module (nn.Module.__getattr__)
                pl_module.adversarial = dataclasses.replace(adversarial, method="none")  # type: ignore[assignment]
                rank_zero_info(
                    f"{type(self).__name__}: adversarial training ({adversarial.method}) switched off from epoch"
                    f" {epoch} (stop_adversarial_at={self.stop_adversarial_at})."
                )

    @override
    def on_train_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch <= self._last_epoch:  # an epoch end run again after a restart
            return
        self._last_epoch = epoch
        self._epochs_at_size += 1
        # every rank takes the same decision, from rank 0's eigenvalue
        eigenvalue = trainer.strategy.broadcast(self._eigenvalue(trainer, epoch), src=0)
        reference = self._reference
        reason = None
        if eigenvalue is not None:
            if self._reference is None or self._reference <= 0:  # no reference yet (or a useless one)
                self._reference = eigenvalue
            elif self.eigenvalue_factor is not None and eigenvalue <= self._reference / self.eigenvalue_factor:
                reason = "eigenvalue"
        if reason is None and self.max_epochs_per_size is not None and self._epochs_at_size >= self.max_epochs_per_size:
            reason = "epochs"
        assert self._batch_size is not None, "setup() sets the batch size of every fit"
        if self._batch_size >= self.max_batch_size:
            reason = None
        if reason is not None:
            self._grow(trainer, epoch, eigenvalue, reference, reason)
        self._steps = trainer.global_step
        self._log(trainer, next_epoch=epoch + 1)

    @override
    def on_exception(self, trainer: AnyTrainer, pl_module: AnyLightningModule, exception: BaseException) -> None:
        self._give_back()

    @override
    def teardown(self, trainer: AnyTrainer, pl_module: AnyLightningModule, stage: str) -> None:
        if stage == "fit":
            self._give_back()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "start_batch_size": self._start_batch_size,
            "batch_size": self._batch_size,
            "lr_factor": self._lr_factor,
            "reference_eigenvalue": self._reference,
            "epochs_at_size": self._epochs_at_size,
            "steps": self._steps,
            "last_epoch": self._last_epoch,
            "history": [dict(entry) for entry in self.history],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        start = state_dict.get("start_batch_size")
        if self._start_batch_size is not None and start is not None and start != self._start_batch_size:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's run started at global batch {start}, this one at"
                f" {self._start_batch_size}; continuing the checkpoint's run (batch {state_dict.get('batch_size')})."
            )
        self._start_batch_size = start
        self._batch_size = state_dict.get("batch_size", start)
        self._lr_factor = float(state_dict.get("lr_factor", 1.0))
        self._reference = state_dict.get("reference_eigenvalue")
        self._epochs_at_size = int(state_dict.get("epochs_at_size", 0))
        self._steps = int(state_dict.get("steps", 0))
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        # before Lightning builds the first training loader of the resumed run
        self._set_datamodule_batch_size()

    # ----------------------------------------------------------------------------------------
    # internals

    def _reset_state(self, batch_size: int | None) -> None:
        self._start_batch_size = batch_size
        self._batch_size = batch_size
        self._lr_factor = 1.0
        self._reference = None
        self._epochs_at_size = 0
        self._steps = 0
        self._last_epoch = -1
        self.history = []

    def _find_spectrum(self, trainer: AnyTrainer) -> HessianSpectrumCallback:
        name = type(self).__name__
        # Lightning sets Trainer.callbacks in its callback connector without declaring it on the Trainer
        callbacks = list(trainer.callbacks)  # type: ignore[union-attr]
        spectra = [c for c in callbacks if isinstance(c, HessianSpectrumCallback)]
        if not spectra:
            raise UserInputError(
                f"{name} reads the top Hessian eigenvalue ({self.metric}) from a HessianSpectrumCallback, and the"
                f" trainer has none; add HessianSpectrumCallback(every_n_epochs=1) before {name} in callbacks, or"
                " pass eigenvalue_factor=None to grow the batch by epochs only."
            )
        logging_metric = [c for c in spectra if self.metric in c.metric_names]
        if not logging_metric:
            raise UserInputError(
                f"{name}: no HessianSpectrumCallback logs {self.metric!r} (theirs: {spectra[0].metric_names});"
                " compute it (quantities=['eigenvalues'] for hessian/eig_1) or set `metric` to one of those."
            )
        by_epoch = [c for c in logging_metric if c.every_n_epochs >= 1]
        if not by_epoch:
            raise UserInputError(
                f"{name}: the HessianSpectrumCallback logging {self.metric!r} does not analyse at epoch ends"
                " (every_n_epochs=None/0); the batch size changes between epochs, so set every_n_epochs=1."
            )
        spectrum = min(by_epoch, key=lambda c: c.every_n_epochs)
        if callbacks.index(spectrum) > callbacks.index(self):
            raise UserInputError(
                f"{name} comes before the HessianSpectrumCallback in the trainer's callbacks, so it would decide"
                " before the epoch's analysis; put the HessianSpectrumCallback first:"
                f" callbacks=[HessianSpectrumCallback(...), {name}(...)]."
            )
        if spectrum.every_n_epochs > 1:
            rank_zero_warn(
                f"{name}: the HessianSpectrumCallback analyses every {spectrum.every_n_epochs} epochs, so the"
                " eigenvalue rule is checked only at those epochs (the max_epochs_per_size rule at every epoch);"
                " use every_n_epochs=1 for the paper's schedule."
            )
        return spectrum

    def _check_adversarial(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        self._adversarial_off_epoch = None
        self._module_adversarial = None
        if self.stop_adversarial_at is None:
            return
        name = type(self).__name__
        adversarial = getattr(pl_module, "adversarial", None)
        if not isinstance(adversarial, AdversarialTraining) or not adversarial.enabled:
            raise UserInputError(
                f"{name}: stop_adversarial_at={self.stop_adversarial_at} switches the module's adversarial training"
                f" off, but {type(pl_module).__name__}.adversarial is {adversarial!r}; switch it on (ImageClassifier:"
                " adversarial={'method': 'fgsm', 'epsilon': 0.005, 'ratio': 0.2}, the paper's) or pass"
                " stop_adversarial_at=None."
            )
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise UserInputError(
                f"{name}: stop_adversarial_at={self.stop_adversarial_at} is a fraction of max_epochs, and"
                f" max_epochs is {max_epochs}; set Trainer(max_epochs=...)."
            )
        self._adversarial_off_epoch = math.ceil(self.stop_adversarial_at * max_epochs)
        self._module_adversarial = (pl_module, adversarial)

    def _give_back(self) -> None:
        """Leave the module and the datamodule as they were given: the module's own adversarial
        setting, the starting batch size."""
        if self._module_adversarial is not None:
            module, adversarial = self._module_adversarial
            module.adversarial = adversarial
            self._module_adversarial = None
        start = self._start_batch_size
        if self._datamodule is not None and start is not None and start % self._parts == 0:
            self._datamodule.batch_size = self._datamodule_value(start)
        self._datamodule = None

    def _datamodule_value(self, global_size: int) -> int:
        if global_size % self._parts:
            raise UserInputError(
                f"{type(self).__name__}: the global batch {global_size} is not a multiple of world_size x"
                f" accumulate_grad_batches = {self._parts}; resume with the devices and accumulate_grad_batches"
                " of the checkpoint's run, or with sizes that divide."
            )
        return global_size if self._scope == "global" else global_size // self._parts

    def _set_datamodule_batch_size(self) -> None:
        if self._datamodule is not None and self._batch_size is not None:
            self._datamodule.batch_size = self._datamodule_value(self._batch_size)

    def _check_loader(self, trainer: AnyTrainer) -> None:
        """The epoch's training loader must have the per-device batch the datamodule was given."""
        loader = trainer.train_dataloader
        loader_size = getattr(loader, "batch_size", None)
        if self._batch_size is None or not _is_int(loader_size):
            return  # a batch sampler or a combined loader: nothing to compare
        expected = self._batch_size // self._parts
        if loader_size != expected:
            raise UserInputError(
                f"{type(self).__name__}: the training DataLoader of epoch {trainer.current_epoch} has batch_size"
                f" {loader_size}, but the global batch is {self._batch_size}, i.e. {expected} per device and"
                f" micro-batch; {type(self._datamodule).__name__}.train_dataloader() must read `batch_size` when"
                f" it is called (batch_size_scope={self.batch_size_scope!r}, read as {self._scope!r})."
            )

    def _eigenvalue(self, trainer: AnyTrainer, epoch: int) -> float | None:
        """The spectrum callback's ``metric`` from its analysis of this epoch, or ``None``."""
        spectrum = self._spectrum
        if spectrum is None or (epoch + 1) % spectrum.every_n_epochs:
            return None
        value = spectrum.last_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            self._warn_once(
                "eigenvalue",
                f"{type(self).__name__}: the spectrum callback gave {self.metric} = {value} at epoch {epoch}; the"
                " eigenvalue rule skips such epochs (warned once).",
            )
            return None
        return float(value)

    def _grow(
        self, trainer: AnyTrainer, epoch: int, eigenvalue: float | None, reference: float | None, reason: str
    ) -> None:
        old = self._batch_size
        assert old is not None, "setup() sets the batch size of every fit"
        new = min(self.max_batch_size, round(old * self.growth_factor))
        ratio = scaled_learning_rate(1.0, new, old, self.lr_scaling)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in _GROUP_LR_KEYS:
                    if key in group:
                        group[key] = _scaled(group[key], ratio)
        for config in trainer.lr_scheduler_configs:
            _scale_scheduler(config.scheduler, ratio)
        self._lr_factor *= ratio
        self._batch_size = new
        self._set_datamodule_batch_size()
        self._epochs_at_size = 0
        self._reference = eigenvalue  # None (no analysis this epoch): the next one measured
        self.history.append(
            {
                "epoch": epoch,
                "step": trainer.global_step,
                "batch_size": new,
                "lr_factor": self._lr_factor,
                "eigenvalue": eigenvalue,
                "reason": reason,
            }
        )
        because = (
            f"{self.metric} fell from {reference:.4g} to {eigenvalue:.4g}, by {self.eigenvalue_factor}x or more"
            if reason == "eigenvalue"
            else f"{self.max_epochs_per_size} epoch(s) at {old}"
        )
        rank_zero_info(
            f"{type(self).__name__}: global batch {old} -> {new}, learning rate x{ratio:g} (x{self._lr_factor:g} in"
            f" all) after epoch {epoch} ({because})."
        )

    def _log(self, trainer: AnyTrainer, next_epoch: int) -> None:
        """Log what epoch ``next_epoch`` starts with, at ``trainer.global_step``."""
        lr = math.nan
        if trainer.optimizers and trainer.optimizers[0].param_groups:
            lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        assert self._batch_size is not None, "setup() sets the batch size of every fit"
        metrics = {
            tags.ABSA_BATCH_SIZE: float(self._batch_size),
            tags.ABSA_LR: lr,
            tags.ABSA_STEPS: float(trainer.global_step),
        }
        if self._adversarial_off_epoch is not None:
            metrics[tags.ABSA_ADVERSARIAL] = float(next_epoch < self._adversarial_off_epoch)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


# --------------------------------------------------------------------------------------------
# helpers


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scaled(value: Any, ratio: float) -> Any:
    """``value * ratio``, in place for a tensor learning rate (``capturable``/fused optimizers)."""
    if isinstance(value, torch.Tensor):
        return value.mul_(ratio)
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, ratio) for v in value)
    return value * ratio


def _scale_scheduler(scheduler: Any, ratio: float) -> None:
    """Scale the learning rates ``scheduler`` computes the next rate from (and its children's,
    for ``SequentialLR``/``ChainedScheduler``)."""
    for attribute in _SCHEDULER_LR_ATTRIBUTES:
        values = getattr(scheduler, attribute, None)
        if isinstance(values, (list, tuple)):
            setattr(scheduler, attribute, [_scaled(v, ratio) for v in values])
    for child in getattr(scheduler, "_schedulers", None) or ():
        _scale_scheduler(child, ratio)
