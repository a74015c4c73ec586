"""Progress log lines during a long analysis.

An analysis of a large model can take minutes (a Lanczos run of hundreds of Hessian-vector
products, a trace, a density). :class:`AnalysisProgress` writes a line every ``interval`` seconds,
from rank zero, through Lightning's ``rank_zero_info`` (the ``pytorch_lightning`` logger at
level INFO)::

    HessianSpectrumCallback epoch 3: Lanczos (largest), 1 converged, Ritz values [41.2, 17.9]; 35 HVPs, 30.2 s

A line names the stage, the Hessian-vector products done so far in the whole analysis, and the
seconds since it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lightning_hessian.curvature import LanczosProgress

__all__ = ["AnalysisProgress"]


class AnalysisProgress:
    """Periodic log lines (stage, HVPs done, seconds) during one analysis, from rank zero.

    Args:
        interval: seconds between two lines.
        label: what the lines start with, e.g. ``"HessianSpectrumCallback epoch 3"``.
        start: ``time.perf_counter()`` when the analysis started (the seconds are counted from it).
    """

    def __init__(self, interval: float, label: str, start: float) -> None:
        if not interval > 0:
            raise ValueError(f"the progress interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.label = label
        self.start = start
        self.last = start
        self.base_hvps = 0

    def with_base(self, hvps: int) -> AnalysisProgress:
        """Count the products of the next engine call on top of ``hvps`` done before it."""
        self.base_hvps = hvps
        return self

    def report(self, stage: str, hvps: int, force: bool = False) -> None:
        """Log ``stage`` when ``interval`` seconds have passed since the last line (or ``force``)."""
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last = now
            rank_zero_info(f"{self.label}: {stage}; {hvps} HVPs, {now - self.start:.1f} s")

    def lanczos_callback(self, which: str) -> Callable[[LanczosProgress], None]:
        """A ``callback`` for :func:`~lightning_hessian.curvature.top_eigenvalues`: reports the
        converged count and the leading Ritz values after each Lanczos step.

        Returns:
            The callback, reporting under the label ``which``.
        """

        def on_step(state: LanczosProgress) -> None:
            values = ", ".join(f"{float(v):.4g}" for v in state.eigenvalues[:3])
            self.report(
                f"Lanczos ({which}), {state.num_converged} converged, Ritz values [{values}]",
                self.base_hvps + state.hvp_count,
            )

        return on_step

    def done(self, hvps: int) -> None:
        """A closing line, for analyses that took at least one ``interval``."""
        if time.perf_counter() - self.start >= self.interval:
            self.report("done", hvps, force=True)
