"""The time budget of one analysis, with decisions every DDP rank agrees on.

``EpochAnalysisCallback(time_budget=seconds)`` caps one analysis. Each callback spends it its own
way, all through :class:`TimeBudget` (made by
:meth:`~lightning_hessian.callbacks.base.EpochAnalysisCallback.start_budget` when an analysis
starts):

* :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback` checks it between
  quantities, and gives Lanczos the time left (:meth:`TimeBudget.local_remaining`);
* :class:`~lightning_hessian.callbacks.robustness.AdversarialRobustnessCallback` between attacks;
* :class:`~lightning_hessian.callbacks.landscape.LossLandscapeCallback` between curves, surfaces
  and the sharpness.

What is skipped is the callback's to say (and to warn about).

Under DDP each rank reads its own clock. Had one rank skipped a step that another runs, the
next collective would hang, so :meth:`TimeBudget.spent` sums the ranks' out-of-time flags (one
tiny all-reduce): the budget is spent on every rank as soon as it is on one. For the same reason
an engine call gets no clock of its own under DDP (:meth:`TimeBudget.local_remaining` is ``None``):
its per-rank check could stop the ranks at different steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TimeBudget"]


class TimeBudget:
    """Seconds one analysis may take, from the moment this object is made.

    Args:
        seconds: the budget; ``None``: unlimited (:meth:`spent` is always False).
        all_reduce: a function summing a tensor over the processes (``None``: one process).
        device: where the collective runs: the model's device (NCCL needs CUDA tensors).

    Attributes:
        start: ``time.perf_counter()`` when the budget started.
        exhausted: whether the budget is known to be spent (on every rank).
    """

    def __init__(
        self,
        seconds: float | None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a time budget must be a positive number of seconds or None, got {seconds}")
        self.seconds = seconds
        self.all_reduce = all_reduce
        self.device = torch.device(device)
        self.start = time.perf_counter()
        self.exhausted = False

    @property
    def distributed(self) -> bool:
        """Whether the decisions are collective (an ``all_reduce`` was given)."""
        return self.all_reduce is not None

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether the budget is used up on any rank (then on all: the answer is collective).

        Every rank must call it at the same point (it all-reduces until the budget is spent;
        afterwards the answer is remembered and no collective runs). Always False without a budget.

        Returns:
            ``True`` once the budget is spent.
        """
        if self.seconds is None:
            return False
        if not self.exhausted:
            flag = torch.tensor([float(self.elapsed() >= self.seconds)], dtype=torch.float64)
            if self.all_reduce is not None:
                flag = self.all_reduce(flag.to(self.device)).cpu()
            self.exhausted = bool(flag.item() > 0)
        return self.exhausted

    def local_remaining(self) -> float | None:
        """The seconds left for an engine call that watches the clock itself (Lanczos'
        ``time_budget``): ``None`` without a budget, and under DDP (see the module docstring).

        Returns:
            The seconds left (0 when spent), or ``None``.
        """
        if self.seconds is None or self.distributed:
            return None
        return max(self.seconds - self.elapsed(), 0.0)

    def note_stopped_early(self) -> None:
        """An engine call stopped before it finished (not converged): if the budget has run out
        meanwhile, the clock stopped it, and the budget counts as spent. Single process only:
        under DDP the flag must stay collective (:meth:`spent`)."""
        if self.seconds is not None and not self.distributed and self.elapsed() >= self.seconds:
            self.exhausted = True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seconds={self.seconds}, elapsed={self.elapsed():.3f}, exhausted={self.exhausted})"
        )
