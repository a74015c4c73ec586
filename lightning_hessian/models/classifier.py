"""The image classifier LightningModule used by every experiment.

Input space: the model's input is the **pixel space** ``[0, 1]``. The data modules yield
unnormalised images and expose their per-channel ``mean``/``std``; the classifier puts a
:class:`~lightning_hessian.models.architectures.Normalize` layer with those statistics *inside*
the network. Attacks (``epsilon`` in pixel units), foolbox (``bounds=(0, 1)``) and Hessians with
respect to the input therefore all see the same, interpretable space, and the callbacks can call
``pl_module(x)`` on the batches the data module yields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_hessian.attacks.training import AdversarialTraining
from lightning_hessian.errors import UserInputError
from lightning_hessian.metrics import WEIGHT_NORM
from lightning_hessian.models.architectures import Normalize, build_architecture
from lightning_hessian.models.optim import (
    LR_SCALING_RULES,
    LR_SCHEDULES,
    OPTIMIZERS,
    build_optimizer,
    check_optimizer_settings,
    lr_multiplier,
    scaled_learning_rate,
)

if TYPE_CHECKING:
    from lightning_fabric.utilities.data import AttributeDict

__all__ = ["ImageClassifier"]

# the default of ImageClassifier's `adversarial`: no robust training (a frozen dataclass, shared safely)
_NO_ROBUST_TRAINING = AdversarialTraining()


class ImageClassifier(pl.LightningModule):
    """Softmax cross-entropy classifier over a registered architecture, with large-batch LR rules
    and optional robust (adversarial or noise) training.

    Logged metrics (TensorBoard tags):

    * ``train/loss`` (epoch mean), ``train/loss_step`` (every logged step), ``train/acc``: loss and
      accuracy on the batches actually trained on (perturbed ones under robust training);
    * ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``: clean data;
    * ``model/weight_norm``: the Euclidean norm of all trainable parameters together at the end of
      every training epoch (curvature is not invariant to the scale of the weights, so a report of
      eigenvalues shows it beside them).

    All constructor arguments are saved with ``save_hyperparameters`` (``hparams.yaml`` of the
    run), ``adversarial`` as a plain dictionary.

    Args:
        arch: architecture name: ``m1``, ``lenet5``, ``c1``, ``c2``, ``resnet20``, ``resnet18``,
            ``wrn16_4``, ``mlp`` or any added with ``register_architecture``.
        num_classes: number of classes (linked from the data module by ``hessian-train``).
        input_shape: ``(channels, height, width)`` (linked from the data module).
        mean: per-channel mean of the data for the internal :class:`Normalize`; ``None`` = 0.
        std: per-channel standard deviation; ``None`` = 1.
        activation: ``relu``, ``softplus``, ``elu`` or ``gelu``.
        softplus_beta: sharpness of ``softplus`` (large values approach ReLU).
        batch_norm: use BatchNorm layers.
        bn_virtual_batch_size: Ghost BatchNorm (Hoffer et al. 2017): in training, BatchNorm
            statistics per this many samples of the per-device batch, exactly as accumulating
            micro-batches of that size through plain BatchNorm, running statistics included
            (:mod:`~lightning_hessian.models.ghost_batch_norm`); evaluation is plain BatchNorm.
            ``None`` (default): statistics over the whole per-device batch.
        init: ``default`` (PyTorch's layer initialisation) or ``he_normal`` (every conv weight
            ``N(0, 2 / fan_out)``, the authors' ResNet initialisation).
        optimizer: ``sgd``, ``adam``, ``lars`` or ``lamb`` (the layer-wise adaptive large-batch
            optimisers from ``pytorch-optimizer``; biases and BatchNorm parameters are neither
            decayed nor adapted: :func:`~lightning_hessian.models.optim.build_optimizer`).
        lr: base learning rate, meant for ``base_batch_size``.
        base_batch_size: batch size at which ``lr`` applies unscaled.
        batch_size: global batch size (linked from the data module by ``hessian-train``).
        lr_scaling: ``linear``, ``sqrt`` or ``none``: ``lr * f(batch_size / base_batch_size)``.
        momentum: SGD and LARS momentum (Adam and LAMB: ``beta1``), in ``[0, 1)``.
        nesterov: Nesterov momentum for ``sgd`` and ``lars`` (refused with ``lamb``).
        weight_decay: L2 weight decay.
        trust_coefficient: LARS's trust coefficient ``eta`` (local rate ``eta ||w|| / (||g|| +
            weight_decay ||w||)``); ``lars`` only (another value with another optimiser is an error).
        warmup_epochs: linear warm-up length in epochs (fractions allowed), counted in steps.
        lr_schedule: ``constant``, ``step`` or ``cosine`` after warm-up.
        lr_milestones: epochs at which ``step`` multiplies the rate by ``lr_gamma``.
        lr_gamma: decay factor of ``step``.
        adversarial: robust-training options
            (:class:`~lightning_hessian.attacks.training.AdversarialTraining`).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        input_shape: Sequence[int] = (3, 32, 32),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        activation: str = "relu",
        softplus_beta: float = 1.0,
        batch_norm: bool = True,
        bn_virtual_batch_size: int | None = None,
        init: str = "default",
        optimizer: str = "sgd",
        lr: float = 0.1,
        base_batch_size: int = 128,
        batch_size: int = 128,
        lr_scaling: str = "linear",
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        trust_coefficient: float = 1e-3,
        warmup_epochs: float = 0.0,
        lr_schedule: str = "cosine",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        adversarial: AdversarialTraining = _NO_ROBUST_TRAINING,
    ) -> None:
        super().__init__()
        # the lr schedule's clock (see _schedule_step): (epoch, global step at its start, its steps)
        self._schedule_steps_per_epoch: int | None = None
        self._epoch_starts: list[tuple[int, int, int]] = []
        if isinstance(adversarial, Mapping):  # from hparams.yaml / a checkpoint
            adversarial = AdversarialTraining(**adversarial)
        for kind, name, valid in (
            ("optimizer", optimizer, OPTIMIZERS),
            ("LR scaling rule", lr_scaling, LR_SCALING_RULES),
            ("LR schedule", lr_schedule, LR_SCHEDULES),
        ):
            if name not in valid:
                raise UserInputError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
        if not lr > 0:
            raise UserInputError(f"lr must be positive, got {lr}")
        if not warmup_epochs >= 0:
            raise UserInputError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if not 0 <= momentum < 1:  # also NaN; momentum >= 1 makes the steps grow without bound
            raise UserInputError(
                f"momentum must be in [0, 1) (SGD momentum, Adam's beta1), got {momentum}; the usual value is 0.9"
            )
        if not weight_decay >= 0:
            raise UserInputError(f"weight_decay must be >= 0, got {weight_decay}; e.g. 5e-4, or 0 for none")
        check_optimizer_settings(optimizer, nesterov=nesterov, trust_coefficient=trust_coefficient)
        channels = int(input_shape[0])
        mean = tuple(float(m) for m in mean) if mean is not None else (0.0,) * channels
        std = tuple(float(s) for s in std) if std is not None else (1.0,) * channels
        if len(mean) != channels or len(std) != channels:
            raise UserInputError(
                f"mean/std need {channels} entries for input_shape {tuple(input_shape)}, got {mean}/{std}"
            )

        # Plain YAML types in hparams.yaml (readable with yaml.safe_load): save_hyperparameters
        # reads these locals, so convert them first; `adversarial` is saved as a dictionary.
        robust_training = adversarial
        input_shape = [int(s) for s in input_shape]
        mean, std = list(mean), list(std)
        lr_milestones = [int(m) for m in lr_milestones]
        # save_hyperparameters reads the constructor's arguments from this frame's locals
        adversarial = dataclasses.asdict(robust_training)  # type: ignore[assignment]
        self.save_hyperparameters()
        self.adversarial = robust_training
        self.network = nn.Sequential(
            Normalize(mean, std),
            build_architecture(
                arch,
                input_shape=input_shape,
                num_classes=num_classes,
                activation=activation,
                softplus_beta=softplus_beta,
                batch_norm=batch_norm,
                bn_virtual_batch_size=bn_virtual_batch_size,
                init=init,
            ),
        )
        # validate_args=False: the input checks cost a device sync per step.
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro", validate_args=False)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate ``lr * f(batch_size / base_batch_size)``."""
        hp = cast("AttributeDict", self.hparams)  # what save_hyperparameters() stores
        return scaled_learning_rate(hp.lr, hp.batch_size, hp.base_batch_size, hp.lr_scaling)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits of pixel-space images ``x`` in ``[0, 1]``, shape ``(N, C, H, W)``."""
        return self.network(x)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, logits, targets = self.adversarial.training_loss(self, x, y, (0.0, 1.0))
        # update(), not forward(): forward also computes the accuracy of this one batch (state
        # copies and a second reduction), which nothing reads; the state, hence the epoch value
        # that Lightning computes and resets, is the same.
        self.train_accuracy.update(logits.detach(), targets)
        detached = loss.detach()
        # batch_size given: Lightning would otherwise search the batch for it (same value)
        self.log("train/loss", detached, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(targets))
        self.log("train/loss_step", detached, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        accuracy.update(logits, y)  # not forward(): see training_step
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_accuracy)

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_accuracy)

    @override
    def configure_optimizers(self) -> Any:
        hp = cast("AttributeDict", self.hparams)  # what save_hyperparameters() stores
        # sgd/adam decay every parameter (as in the paper's and Goyal et al.'s setups); lars/lamb
        # exclude biases and BatchNorm parameters from decay and adaptation (optim.parameter_groups).
        optimizer = build_optimizer(
            hp.optimizer,
            self,
            lr=self.learning_rate,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
            trust_coefficient=hp.trust_coefficient,
        )
        total_steps, steps_per_epoch = self._step_counts()
        # The schedule counts epochs of the first epoch's length (kept across a resume), so that a
        # batch size that changes during training (AdaptiveBatchSizeCallback) moves milestones,
        # warm-up and the cosine to the configured epochs, not to step counts.
        if self._schedule_steps_per_epoch is None:
            self._schedule_steps_per_epoch = steps_per_epoch
        steps_per_epoch = self._schedule_steps_per_epoch
        warmup_steps = math.ceil(hp.warmup_epochs * steps_per_epoch)
        milestones = [m * steps_per_epoch for m in hp.lr_milestones]
        schedule = hp.lr_schedule
        if schedule == "cosine" and not math.isfinite(total_steps):
            raise UserInputError("lr_schedule 'cosine' needs a finite run: set trainer.max_epochs or trainer.max_steps")

        def multiplier(step: int) -> float:
            return lr_multiplier(
                self._schedule_step(step),
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                schedule=schedule,
                milestones=milestones,
                gamma=hp.lr_gamma,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_step(self, step: int) -> float:
        """Optimizer step ``step`` on the schedule's clock: completed epochs times the first epoch's
        steps, plus the steps into the current epoch rescaled to that length. Equal to ``step``
        while every epoch has the same number of steps (the usual case: bit-identical lr).

        Returns:
            The step on the schedule's clock: ``step`` itself before the first recorded epoch.
        """
        starts = [s for s in self._epoch_starts if s[1] <= step]
        if not starts or self._schedule_steps_per_epoch is None:
            return step
        epoch, start, steps_in_epoch = max(starts, key=lambda s: (s[1], s[0]))
        reference = self._schedule_steps_per_epoch
        if steps_in_epoch == reference:
            return epoch * reference + (step - start)
        return epoch * reference + (step - start) * reference / steps_in_epoch

    @override
    def on_train_epoch_start(self) -> None:
        trainer = self.trainer
        epoch = trainer.current_epoch
        if any(e == epoch for e, _, _ in self._epoch_starts):
            return  # resumed inside this epoch: keep where it started
        batches = trainer.num_training_batches
        steps = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        self._epoch_starts.append((epoch, trainer.global_step, steps or self._schedule_steps_per_epoch or 1))

    @override
    def on_train_epoch_end(self) -> None:
        with torch.no_grad():
            squares = [p.detach().double().square().sum() for p in self.parameters() if p.requires_grad]
            norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
        # every rank holds the same weights: no reduction needed
        self.log(WEIGHT_NORM, norm.float(), on_step=False, on_epoch=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lr_schedule_clock"] = {
            "steps_per_epoch": self._schedule_steps_per_epoch,
            "epoch_starts": self._epoch_starts,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        clock = checkpoint.get("lr_schedule_clock")
        if clock is not None:
            self._schedule_steps_per_epoch = clock["steps_per_epoch"]
            self._epoch_starts = [tuple(s) for s in clock["epoch_starts"]]

    def _step_counts(self) -> tuple[float, int]:
        """Total optimiser steps of the run and optimiser steps per epoch."""
        trainer = self.trainer
        total_steps = float(trainer.estimated_stepping_batches)  # also sets up the train dataloader
        batches = trainer.num_training_batches
        if math.isfinite(batches):
            steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        else:
            steps_per_epoch = max(1, int(total_steps)) if math.isfinite(total_steps) else 1
        return total_steps, steps_per_epoch
