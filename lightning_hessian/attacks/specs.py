"""Which evaluation attacks exist, and the small typed record that configures one.

:class:`AttackSpec` is a plain dataclass so that a list of them can be written in a LightningCLI
YAML config::

    attacks:
      - name: linf_pgd
        epsilons: [0.0, 0.01, 0.03]
        steps: 10
      - name: l2_deepfool
        epsilons: [0.5, 1.0]

Fixed-epsilon attacks (``fgsm``, ``linf_pgd``, ``l2_pgd``) give a robust accuracy per epsilon.
Minimal-perturbation attacks (``linf_deepfool``, ``l2_deepfool``, ``l2_cw``) look for the
smallest adversarial perturbation of each sample; robust accuracy at epsilon counts the samples
whose smallest perturbation found is larger than epsilon, and they also give the median
perturbation norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ATTACKS", "AttackInfo", "AttackSpec"]


@dataclass(frozen=True)
class AttackInfo:
    """Static facts about an attack name.

    Attributes:
        norm: the norm its epsilons are measured in.
        minimal: whether it searches the minimal perturbation (DeepFool, CW) rather than
            attacking at a fixed epsilon.
        native: whether :mod:`lightning_hessian.attacks.native` implements it (fast path).
        needs_logits: whether it is only meaningful on logits (CW's margin loss).
    """

    norm: Literal["linf", "l2"]
    minimal: bool
    native: bool
    needs_logits: bool = False


#: Every attack the evaluation knows, by name.
ATTACKS: dict[str, AttackInfo] = {
    "fgsm": AttackInfo(norm="linf", minimal=False, native=True),
    "linf_pgd": AttackInfo(norm="linf", minimal=False, native=True),
    "l2_pgd": AttackInfo(norm="l2", minimal=False, native=True),
    "linf_deepfool": AttackInfo(norm="linf", minimal=True, native=False),
    "l2_deepfool": AttackInfo(norm="l2", minimal=True, native=False),
    "l2_cw": AttackInfo(norm="l2", minimal=True, native=False, needs_logits=True),
}

# defaults of the attack parameters, per attack (None: the parameter does not apply)
_DEFAULT_STEPS = {"linf_pgd": 10, "l2_pgd": 10, "linf_deepfool": 50, "l2_deepfool": 50, "l2_cw": 100}


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack and the epsilons it is evaluated at.

    Args:
        name: one of ``fgsm``, ``linf_pgd``, ``l2_pgd``, ``linf_deepfool``, ``l2_deepfool``,
            ``l2_cw`` (see :data:`ATTACKS`).
        epsilons: perturbation budgets in the model's input space (pixel space [0, 1]), measured
            in the attack's norm; each must be >= 0.
        steps: iterations; ``None`` picks 10 for PGD, 50 for DeepFool (maximum), 100 per binary
            search step for CW. FGSM takes exactly one step.
        step_size: PGD's absolute step; ``None`` uses ``2.5 * epsilon / steps`` for each epsilon
            (Madry et al.; foolbox's default ``epsilon / 30`` is too small for few steps).
            For CW, Adam's learning rate (default 0.01).
        random_start: PGD starts from a uniform random point of the epsilon ball.
        overshoot: DeepFool's overshoot past the decision boundary.
        candidates: DeepFool's number of most likely classes considered.
        binary_search_steps: CW's binary search steps over the trade-off constant.
        initial_const: CW's initial trade-off constant.
    """

    name: str
    epsilons: list[float] = field(default_factory=list)
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    overshoot: float = 0.02
    candidates: int | None = 10
    binary_search_steps: int = 5
    initial_const: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; valid attacks: {', '.join(ATTACKS)}")
        # a tuple, so that the frozen spec is really immutable (and hashable)
        object.__setattr__(self, "epsilons", tuple(float(eps) for eps in self.epsilons))
        if not self.epsilons:
            raise ValueError(f"attack {self.name!r} needs at least one epsilon, e.g. epsilons: [0.0, 0.03]")
        for eps in self.epsilons:
            if not eps >= 0:  # also catches NaN
                raise ValueError(f"attack {self.name!r}: epsilon must be >= 0, got {eps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"attack {self.name!r}: steps must be >= 1 or None, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"attack {self.name!r}: step_size must be > 0 or None, got {self.step_size}")
        if self.candidates is not None and self.candidates < 2:
            raise ValueError(f"attack {self.name!r}: candidates must be >= 2 or None, got {self.candidates}")
        if self.binary_search_steps < 1:
            raise ValueError(f"attack {self.name!r}: binary_search_steps must be >= 1, got {self.binary_search_steps}")

    @property
    def info(self) -> AttackInfo:
        return ATTACKS[self.name]

    @property
    def num_steps(self) -> int:
        """The iterations actually used (``steps`` or the attack's default)."""
        if self.name == "fgsm":
            return 1
        return self.steps if self.steps is not None else _DEFAULT_STEPS[self.name]

    def pgd_step_size(self, epsilon: float) -> float:
        """PGD's absolute step at ``epsilon``: ``step_size`` or ``2.5 * epsilon / steps``."""
        if self.name == "fgsm":
            return epsilon
        return self.step_size if self.step_size is not None else 2.5 * epsilon / self.num_steps

    def check_bounds(self, bounds: tuple[float, float], input_shape: tuple[int, ...] | None = None) -> None:
        """Raise if an epsilon cannot be a perturbation of inputs in ``bounds``.

        Linf: epsilon at most ``upper - lower``. L2: at most ``(upper - lower) * sqrt(n)`` for
        ``n`` input features (checked when ``input_shape`` (without batch) is known).

        Raises:
            ValueError: if an epsilon is larger than that limit.
        """
        lower, upper = bounds
        width = upper - lower
        limit = width
        unit = "the input range width"
        if self.info.norm == "l2":
            if input_shape is None:
                return
            n = 1
            for size in input_shape:
                n *= size
            limit = width * n**0.5
            unit = f"the L2 diameter of the input box ({width} * sqrt({n}))"
        for eps in self.epsilons:
            if eps > limit:
                raise ValueError(
                    f"attack {self.name!r}: epsilon {eps} is larger than {unit} = {limit:g} for inputs in "
                    f"[{lower}, {upper}]; epsilons are in the model's input space (pixel space [0, 1]), "
                    f"e.g. 8/255 = {8 / 255:.4f}, not 8"
                )
