"""Robust training: the loss of a batch with part of it replaced by perturbed samples.

:class:`AdversarialTraining` is a small frozen dataclass (configurable from YAML through
jsonargparse) that turns a clean batch ``(x, y)`` into the loss to minimise:

- ``none``: :math:`\\mathrm{CE}(f(x), y)`, plain training.
- ``fgsm``: Goodfellow et al. (2015), :math:`x' = x + \\epsilon\\,\\mathrm{sign}\\nabla_x \\mathrm{CE}`.
- ``fgsm_rs``: Wong, Rice & Kolter (2020), "Fast is better than free": FGSM from a uniform random
  start in the Linf ball, step ``step_size`` (default :math:`1.25\\,\\epsilon`), projected back.
- ``pgd``: Madry et al. (2018), ``steps`` Linf PGD steps of ``step_size`` (default
  :math:`2.5\\,\\epsilon/\\text{steps}`) from a random start.
- ``trades``: Zhang et al. (2019),
  :math:`\\mathrm{CE}(f(x), y) + \\beta\\,\\mathrm{KL}(p(x)\\,\\Vert\\,p(x'))` where :math:`x'`
  maximises the KL term in the Linf ball (PGD from :math:`x + 0.001\\,\\mathcal N(0, I)`), as in
  the authors' code (``KLDivLoss(log_softmax(f(x')), softmax(f(x)))``).
- ``gaussian_noise``: :math:`x' = x + \\epsilon\\,\\mathcal N(0, I)` (``epsilon`` is the standard
  deviation); ``uniform_noise``: :math:`x' = x + U(-\\epsilon, \\epsilon)^n`. The reviewers'
  baseline: is random noise as good as adversarial noise?

Every perturbed input is clipped to ``input_range``. ``ratio`` is the fraction of each batch
replaced by perturbed samples (the first ``round(ratio * B)`` samples), as in the authors' code;
the rest stay clean and the loss is the mean over the whole batch.

Perturbations are generated with the model in eval mode (BatchNorm running statistics, no
dropout) through ``torch.autograd.grad`` with respect to the input only, so no parameter
``.grad`` is left behind and DDP's gradient hooks never fire; the training mode is restored
before the returned loss is computed, so the loss goes through the normal training step. No
collective call happens (each sample's perturbation depends only on itself), so it works under
DDP; under bf16-mixed autocast the attack runs in the active autocast and its losses in float32.
``attack_batch_size`` runs the attack's passes in slices of the batch (the same perturbations up
to rounding, since eval mode makes each sample's depend only on itself): faster on a CPU when a
large batch's activations do not fit the cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.attacks.native import eval_mode, forward_in_micro_batches, pgd
from lightning_hessian.errors import UserInputError

__all__ = ["ADVERSARIAL_TRAINING_METHODS", "PIXEL_RANGE", "AdversarialTraining", "TrainingLoss"]

#: The input range that ``epsilon`` refers to: the package's pixel space.
PIXEL_RANGE: tuple[float, float] = (0.0, 1.0)

#: Valid values of :attr:`AdversarialTraining.method`.
ADVERSARIAL_TRAINING_METHODS: tuple[str, ...] = (
    "none",
    "fgsm",
    "fgsm_rs",
    "pgd",
    "trades",
    "gaussian_noise",
    "uniform_noise",
)
_NOISE_METHODS = ("gaussian_noise", "uniform_noise")
_MULTI_STEP_METHODS = ("pgd", "trades")


class TrainingLoss(NamedTuple):
    """What :meth:`AdversarialTraining.training_loss` returns.

    Attributes:
        loss: the scalar to minimise.
        logits: the model's output on the batch actually trained on (for accuracy metrics).
        targets: the labels of that batch.
    """

    loss: Tensor
    logits: Tensor
    targets: Tensor


@dataclass(frozen=True)
class AdversarialTraining:
    """Robust-training options of a classifier, and the loss they define.

    Args:
        method: one of ``none``, ``fgsm``, ``fgsm_rs``, ``pgd``, ``trades``, ``gaussian_noise``,
            ``uniform_noise`` (see the module docstring for the maths).
        epsilon: Linf radius of the perturbation in the model's input space (pixel space [0, 1]);
            for ``gaussian_noise`` the standard deviation, for ``uniform_noise`` the half width.
            A value above the pixel range width 1 is refused (``8/255``, not ``8``).
        steps: attack steps for ``pgd`` and ``trades`` (FGSM variants take one step).
        step_size: absolute attack step; ``None`` picks the method's usual default: ``epsilon``
            (fgsm), ``1.25 * epsilon`` (fgsm_rs, Wong et al.), ``2.5 * epsilon / steps`` (pgd,
            Madry et al.), ``epsilon / 4`` (trades, ``0.007`` for ``0.031`` in Zhang et al.).
        ratio: fraction of each batch replaced by perturbed samples, in (0, 1].
        beta: weight of the TRADES robustness term (Zhang et al. use 6 on CIFAR-10).
        attack_batch_size: run the attack's forward and backward passes on slices of this many
            samples (``None``: the whole perturbed part of the batch at once). The perturbations
            are the same up to rounding, which may flip the sign of an almost-zero gradient entry
            (most often in TRADES's first step, next to the clean input). On a CPU, slices whose
            activations fit the cache are faster (``benchmarks/robust_training_step.py``); on a
            GPU, leave ``None``.

    Example::

        adversarial = AdversarialTraining(method="pgd", epsilon=8 / 255, steps=7)
        loss, logits, targets = adversarial.training_loss(model, x, y)
    """

    method: str = "none"
    epsilon: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    ratio: float = 1.0
    beta: float = 6.0
    attack_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ADVERSARIAL_TRAINING_METHODS:
            raise UserInputError(
                f"unknown adversarial training method {self.method!r}; "
                f"valid methods: {', '.join(ADVERSARIAL_TRAINING_METHODS)}"
            )
        if not self.epsilon >= 0:
            raise UserInputError(f"epsilon must be >= 0 (pixel space [0, 1]), got {self.epsilon}")
        self.check_bounds(PIXEL_RANGE)
        if not 1 <= self.steps:
            raise UserInputError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise UserInputError(f"step_size must be > 0 or None for the method's default, got {self.step_size}")
        if not 0 < self.ratio <= 1:
            raise UserInputError(f"ratio (fraction of the batch perturbed) must be in (0, 1], got {self.ratio}")
        if not self.beta >= 0:
            raise UserInputError(f"beta (TRADES weight) must be >= 0, got {self.beta}")
        size = self.attack_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserInputError(
                f"attack_batch_size must be a whole number >= 1 or null (the whole batch), got {size!r}"
            )

    def check_bounds(self, input_range: tuple[float, float]) -> None:
        """Raise :class:`UserInputError` if ``epsilon`` is wider than ``input_range``.

        A Linf radius (or noise scale) of the whole range width or more replaces the image by
        noise clipped to the range: training "works" at chance accuracy. The same rule as
        :meth:`~lightning_hessian.attacks.specs.AttackSpec.check_bounds` for evaluation attacks.

        Raises:
            UserInputError: if training is enabled and ``epsilon`` exceeds the range's width.
        """
        lower, upper = input_range
        width = upper - lower
        if self.enabled and self.epsilon > width:
            raise UserInputError(
                f"adversarial training: epsilon {self.epsilon:g} is larger than the input range width {width:g} for "
                f"inputs in [{lower:g}, {upper:g}]; epsilon is in the model's input space (pixel space [0, 1]), "
                f"e.g. 8/255 = {8 / 255:.4f}, not 8"
            )

    @property
    def enabled(self) -> bool:
        """Whether training differs from plain cross-entropy training."""
        return self.method != "none"

    @property
    def effective_step_size(self) -> float:
        """The attack step actually used: ``step_size`` or the method's default."""
        if self.step_size is not None:
            return self.step_size
        return {
            "fgsm": self.epsilon,
            "fgsm_rs": 1.25 * self.epsilon,
            "pgd": 2.5 * self.epsilon / self.steps,
            "trades": self.epsilon / 4,
        }.get(self.method, self.epsilon)

    def num_perturbed(self, batch_size: int) -> int:
        """How many samples of a batch of ``batch_size`` are replaced: ``round(ratio * B)``."""
        return 0 if not self.enabled else min(batch_size, round(self.ratio * batch_size))

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, input_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
        """Perturbed copies of all of ``x`` (for ``trades``: the KL-maximising ``x'``), detached.

        Gradient-based methods run ``model`` in eval mode and restore its modes afterwards.

        Returns:
            A tensor of the shape of ``x``: ``x`` itself (detached) for ``"none"`` or a zero
            ``epsilon``, else the perturbed inputs, in ``input_range``.
        """
        lower, upper = input_range
        x = x.detach()
        eps = self.epsilon
        if self.method == "none" or eps == 0:
            return x
        if self.method == "gaussian_noise":
            return torch.clamp(x + eps * torch.randn_like(x), lower, upper)
        if self.method == "uniform_noise":
            return torch.clamp(x + eps * (2 * torch.rand_like(x) - 1), lower, upper)
        slices = self.attack_batch_size
        # what every method's attack shares: the model, the step, the bounds, the slicing
        attack = functools.partial(
            pgd, model, step_size=self.effective_step_size, bounds=input_range, micro_batch_size=slices
        )
        with eval_mode(model):
            if self.method == "fgsm":
                return attack(x, y, eps, steps=1, random_init=False)
            if self.method == "fgsm_rs":
                return attack(x, y, eps, steps=1, random_init=True)
            if self.method == "pgd":
                return attack(x, y, eps, steps=self.steps, random_init=True)
            # trades: maximise KL(p(x) || p(x')) from a small Gaussian start, as in Zhang et al.
            with torch.no_grad():
                clean_probs = F.softmax(forward_in_micro_batches(model, x, slices).float(), dim=1)

            def kl_objective(logits: Tensor) -> Tensor:
                return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_probs, reduction="sum")

            start = torch.clamp(x + 0.001 * torch.randn_like(x), lower, upper)
            start = torch.clamp(start, x - eps, x + eps)
            return attack(start, None, eps, steps=self.steps, random_init=False, objective=kl_objective)

    def training_loss(
        self, model: nn.Module, x: Tensor, y: Tensor, input_range: tuple[float, float] = (0.0, 1.0)
    ) -> TrainingLoss:
        """The loss to minimise on the batch ``(x, y)``, computed in ``model``'s current mode.

        Args:
            model: the network (the unwrapped module, not a DDP wrapper); inputs in ``input_range``.
            x: clean inputs, shape ``(B, ...)``.
            y: integer labels, shape ``(B,)``.
            input_range: bounds every perturbed input is clipped to.

        Returns:
            :class:`TrainingLoss`: the loss and the logits/targets of the batch trained on (for
            ``trades``: the clean logits, on which its cross-entropy term is computed).
        """
        batch_size = x.shape[0]
        num_perturbed = self.num_perturbed(batch_size)
        if num_perturbed == 0:
            logits = model(x)
            return TrainingLoss(F.cross_entropy(logits.float(), y), logits, y)

        if self.method == "trades":
            x_adv = self.perturb(model, x[:num_perturbed], y[:num_perturbed], input_range)
            # one forward for clean and perturbed samples: BatchNorm sees both, as in Zhang et al.
            logits_all = model(torch.cat([x, x_adv]))
            logits, logits_adv = logits_all[:batch_size], logits_all[batch_size:]
            natural = F.cross_entropy(logits.float(), y)
            # sum over the perturbed samples / B: unperturbed samples have x' = x and KL 0
            robust = (
                F.kl_div(
                    F.log_softmax(logits_adv.float(), dim=1),
                    F.softmax(logits[:num_perturbed].float(), dim=1),
                    reduction="sum",
                )
                / batch_size
            )
            return TrainingLoss(natural + self.beta * robust, logits, y)

        x_perturbed = self.perturb(model, x[:num_perturbed], y[:num_perturbed], input_range)
        x_train = x_perturbed if num_perturbed == batch_size else torch.cat([x_perturbed, x[num_perturbed:]])
        logits = model(x_train)
        return TrainingLoss(F.cross_entropy(logits.float(), y), logits, y)
