r"""
Adversarial robustness
^^^^^^^^^^^^^^^^^^^^^^

Log the robust accuracy of any LightningModule under FGSM, PGD (Linf and L2), DeepFool (Linf and
L2) and Carlini-Wagner (L2) attacks at epoch end (and once under ``trainer.validate``/``test``),
on a fixed, seeded sample of the validation set, in pixel space [0, 1].

Robust accuracy at :math:`\epsilon` is the fraction of samples :math:`(x, y)` that the model
classifies correctly both clean and at the attack's adversarial point
:math:`x' \in B_p(x, \epsilon) \cap [0, 1]^n`. Minimal-perturbation attacks (DeepFool, CW) also
give the median over the samples of the smallest adversarial perturbation norm found (0 for a
misclassified sample, :math:`\infty` where the attack failed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_hessian import metrics as tags
from lightning_hessian.attacks.evaluation import Backend, check_logits, evaluate_attack
from lightning_hessian.attacks.foolbox_adapter import check_inputs_in_bounds
from lightning_hessian.attacks.preprocessing import NormalizedInput, to_pixel_space
from lightning_hessian.attacks.specs import ATTACKS, AttackSpec
from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback
from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.errors import UserInputError
from lightning_hessian.metrics import Split

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = ["AdversarialRobustnessCallback", "default_attacks"]

_BACKENDS = ("native", "foolbox")


def default_attacks() -> list[AttackSpec]:
    """FGSM and 10-step Linf PGD at 0, 1/255, 2/255, 4/255 and 8/255."""
    epsilons = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
    return [AttackSpec(name="fgsm", epsilons=epsilons), AttackSpec(name="linf_pgd", epsilons=epsilons, steps=10)]


class AdversarialRobustnessCallback(EpochAnalysisCallback):
    r"""Log adversarial robustness of the model at the end of every ``every_n_epochs``-th epoch.

    The model is attacked unwrapped (never the DDP wrapper), in eval mode, with autocast and TF32
    off; its parameters are frozen during the attacks, and its flags, ``.grad`` and the RNG states
    are restored bit for bit afterwards, so attaching the callback does not change training.
    The model's input must be pixel space (``bounds``, default [0, 1]) with any normalisation
    inside the model, or the data's normalisation given as ``mean``/``std``; epsilons are in
    pixel space.

    Logged metrics (scalars to every logger, at ``trainer.global_step``):

    - ``robust/clean_acc``: accuracy on the clean samples.
    - ``robust/{attack}/eps_{epsilon}``: robust accuracy of each attack at each epsilon
      (``{epsilon}`` formatted with ``%g``, e.g. ``robust/linf_pgd/eps_0.0313725``).
    - ``robust/{attack}/median_norm``: median minimal perturbation norm, for ``linf_deepfool``,
      ``l2_deepfool`` and ``l2_cw`` (lower median; ``inf`` when most attacks failed).
    - ``robust/seconds``: wall time of the evaluation.

    Under ``trainer.validate``/``trainer.test`` the tags name the split of the samples after the
    group: ``robust/test/clean_acc``, ``robust/test/fgsm/eps_0.1``, ``robust/test/l2_cw/median_norm``
    (:func:`lightning_hessian.metrics.split_tag`); during ``fit`` they are unqualified (the samples
    of ``split``, the validation split by default).

    Figures (TensorBoard): ``robust/{attack}/curve``, robust accuracy against epsilon.

    Under DDP every rank attacks its shard of the samples and the counts of correct and total
    samples are summed over the ranks (minimal norms are gathered for the median).

    Args:
        attacks: the attacks, each an :class:`~lightning_hessian.attacks.AttackSpec` (or a dict
            of its fields): ``name`` in ``fgsm``, ``linf_pgd``, ``l2_pgd``, ``linf_deepfool``,
            ``l2_deepfool``, ``l2_cw``, its ``epsilons`` and parameters (``steps``,
            ``step_size``, ...). Default: :func:`default_attacks`.
        backend: ``"native"`` runs FGSM/PGD with this package's batched implementation (same
            algorithm as foolbox, FGSM bit-identical, at the cost of a hand-written PGD loop;
            foolbox measured 1.83x that on an H100); ``"foolbox"`` runs them through foolbox.
            DeepFool and CW always use foolbox.
        bounds: the range of the model's inputs.
        mean, std: only when the data module normalises (``(x - mean) / std`` per channel) and the
            model expects normalised inputs: the samples are mapped back to pixel space and the
            attacks run on ``model((x - mean) / std)``, like foolbox's ``preprocessing``. Leave
            ``None`` when the normalisation is inside the model (``ImageClassifier``).
        split: where samples come from during ``fit`` (default ``"val"``).
        num_samples, seed, every_n_epochs, every_n_train_steps, analysis_batch_size,
            time_budget: see :class:`~lightning_hessian.callbacks.base.EpochAnalysisCallback`.
            With a ``time_budget`` the attacks run in order until it is spent; later attacks are
            skipped for that epoch (with a warning).

    Raises:
        ValueError: in ``__init__`` for an unknown attack (the valid names are listed), a
            negative epsilon, a Linf epsilon wider than ``bounds``, or an unknown backend; before
            the first attack (at fit/validate/test start) for samples outside ``bounds``, an L2
            epsilon beyond the input box's diameter, or CW on a model whose outputs are
            probabilities rather than logits.

    Example::

        from lightning_hessian.attacks import AttackSpec
        from lightning_hessian.callbacks.robustness import AdversarialRobustnessCallback

        callback = AdversarialRobustnessCallback(
            attacks=[AttackSpec("linf_pgd", epsilons=[0, 2 / 255, 8 / 255], steps=10),
                     AttackSpec("l2_deepfool", epsilons=[0.25, 0.5])],
            num_samples=1000,
        )
        trainer = AnyTrainer(callbacks=[callback])
    """

    def __init__(
        self,
        attacks: Sequence[AttackSpec] | None = None,
        *,
        backend: Backend = "native",
        bounds: tuple[float, float] = (0.0, 1.0),
        mean: list[float] | None = None,
        std: list[float] | None = None,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_samples: int | None = 1024,
        split: Split = "val",
        seed: int = 0,
        analysis_batch_size: int = 512,
        time_budget: float | None = None,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            num_samples=num_samples,
            split=split,
            seed=seed,
            analysis_batch_size=analysis_batch_size,
            time_budget=time_budget,
        )
        if backend not in _BACKENDS:
            raise UserInputError(f"unknown backend {backend!r}; valid backends: {', '.join(_BACKENDS)}")
        lower, upper = (float(b) for b in bounds)
        if not lower < upper:
            raise UserInputError(f"bounds must be (lower, upper) with lower < upper, got {tuple(bounds)}")
        specs = default_attacks() if attacks is None else [self._as_spec(attack) for attack in attacks]
        if not specs:
            raise UserInputError(f"give at least one attack; valid attacks: {', '.join(ATTACKS)}")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise UserInputError(f"each attack may appear once (merge their epsilons), got {names}")
        for spec in specs:
            spec.check_bounds((lower, upper))
        self.attacks: list[AttackSpec] = specs
        self.backend: Backend = backend
        self.bounds = (lower, upper)
        if (mean is None) != (std is None):
            raise UserInputError(
                f"give both mean and std of the data normalisation, or neither; got mean={mean}, std={std}"
            )
        if std is not None and any(value <= 0 for value in std):
            raise UserInputError(f"std must be positive, got {std}")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]

    @property
    @override
    def state_key(self) -> str:
        # distinct keys let several instances (say, a native and a foolbox one) share a checkpoint
        return self._generate_state_key(
            attacks=[(spec.name, spec.epsilons) for spec in self.attacks], backend=self.backend, split=self.split
        )

    @staticmethod
    def _as_spec(attack: AttackSpec | Mapping[str, Any]) -> AttackSpec:
        if isinstance(attack, AttackSpec):
            return attack
        if isinstance(attack, Mapping):
            return AttackSpec(**attack)
        raise UserInputError(
            f"attacks must be AttackSpec objects or dicts of their fields, got {type(attack).__name__}"
        )

    def _attacked(self, pl_module: AnyLightningModule, inputs: Tensor) -> tuple[torch.nn.Module, Tensor]:
        """The model with a pixel-space input, and ``inputs`` in pixel space."""
        if self.mean is None or self.std is None:
            return pl_module, inputs
        return NormalizedInput(pl_module, self.mean, self.std), to_pixel_space(inputs, self.mean, self.std)

    # ----------------------------------------------------------------------------------------
    # checks before the first attack

    @override
    def check_samples(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> None:
        """Inputs within ``bounds``, epsilons that fit the inputs, logits for CW: checked on the
        samples before training/evaluation starts."""
        model, inputs = self._attacked(pl_module, samples.inputs_and_targets(pl_module, type(self).__name__)[0])
        check_inputs_in_bounds(inputs, self.bounds)
        for spec in self.attacks:
            spec.check_bounds(self.bounds, tuple(inputs.shape[1:]))
        logit_attacks = [spec.name for spec in self.attacks if spec.info.needs_logits]
        if logit_attacks:
            with analysis_mode(pl_module), torch.no_grad():
                outputs = model(inputs[: min(len(inputs), self.analysis_batch_size)].clone())
            check_logits(outputs, logit_attacks[0])

    # ----------------------------------------------------------------------------------------
    # the analysis

    @override
    def unavailable_metrics(self) -> dict[str, float]:
        metrics = {tags.CLEAN_ACC: math.nan}
        for spec in self.attacks:
            metrics.update({tags.robust_accuracy_tag(spec.name, e): math.nan for e in spec.epsilons})
        return metrics

    @override
    def analyse(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> dict[str, float]:
        budget = self.start_budget(trainer, pl_module)
        reduce = budget.all_reduce
        inputs, targets = samples.inputs_and_targets(pl_module, type(self).__name__)
        model, inputs = self._attacked(pl_module, inputs)
        device = inputs.device
        generator = torch.Generator(device=device).manual_seed(self.seed + trainer.global_rank)

        with torch.no_grad():
            clean_correct = torch.cat(
                [
                    model(inputs[i : i + self.analysis_batch_size]).argmax(dim=-1)
                    == targets[i : i + self.analysis_batch_size]
                    for i in range(0, len(inputs), self.analysis_batch_size)
                ]
            )
        counts = [clean_correct.sum().double(), torch.tensor(float(len(inputs)), dtype=torch.float64, device=device)]
        curves: dict[str, list[float]] = {}
        norms: dict[str, Tensor] = {}
        done: list[AttackSpec] = []
        for spec in self.attacks:
            if budget.spent():
                skipped = [s.name for s in self.attacks if s not in done]
                rank_zero_warn(
                    f"{type(self).__name__}: time_budget={self.time_budget}s spent; skipped {skipped} this time"
                )
                break
            outcome = evaluate_attack(
                model,
                inputs,
                targets,
                spec,
                backend=self.backend,
                bounds=self.bounds,
                batch_size=self.analysis_batch_size,
                generator=generator,
            )
            counts.append(outcome.robust_correct.sum(dim=1).double())
            if outcome.norms is not None:
                norms[spec.name] = self._gather(trainer, outcome.norms, reduce)
            done.append(spec)

        flat = torch.cat([count.reshape(-1) for count in counts])
        if reduce is not None:
            flat = reduce(flat)
        clean, total = flat[0].item(), flat[1].item()
        metrics = {tags.CLEAN_ACC: clean / total}
        offset = 2
        for spec in done:
            accuracies = (flat[offset : offset + len(spec.epsilons)] / total).tolist()
            offset += len(spec.epsilons)
            curves[spec.name] = accuracies
            for epsilon, accuracy in zip(spec.epsilons, accuracies, strict=True):
                metrics[tags.robust_accuracy_tag(spec.name, epsilon)] = accuracy
            if spec.name in norms:
                metrics[tags.median_norm_tag(spec.name)] = norms[spec.name].median().item()
        metrics[tags.ROBUST_SECONDS] = budget.elapsed()
        if trainer.is_global_zero:
            for spec in done:
                self._log_curve(trainer, spec, curves[spec.name], metrics[tags.CLEAN_ACC])
        return metrics

    @staticmethod
    def _gather(trainer: AnyTrainer, local: Tensor, reduce: Any) -> Tensor:
        """All ranks' values of ``local`` in one ``(num_global,)`` tensor, by summing placed copies."""
        if reduce is None:
            return local.double()
        sizes = torch.zeros(trainer.world_size, dtype=torch.float64, device=local.device)
        sizes[trainer.global_rank] = local.numel()
        sizes = reduce(sizes).long().tolist()
        offset = sum(sizes[: trainer.global_rank])
        placed = torch.zeros(sum(sizes), dtype=torch.float64, device=local.device)
        placed[offset : offset + local.numel()] = local.double()
        return reduce(placed)

    def _log_curve(self, trainer: AnyTrainer, spec: AttackSpec, accuracies: list[float], clean_acc: float) -> None:
        if not trainer.loggers:
            return
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(4.5, 3.2))
        axes.plot(spec.epsilons, accuracies, marker="o", label=spec.name)
        axes.axhline(clean_acc, color="grey", linestyle="--", linewidth=1, label="clean")
        axes.set_xlabel(f"epsilon ({spec.info.norm})")
        axes.set_ylabel("robust accuracy")
        axes.set_ylim(-0.02, 1.02)
        axes.set_title(f"{spec.name}, epoch {trainer.current_epoch}")
        axes.legend()
        figure.tight_layout()
        self.log_figure(trainer, tags.robust_curve_tag(spec.name), figure)
