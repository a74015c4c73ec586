"""How ``HessianOperator(hvp_mode="auto")`` chooses how to compute Hessian-vector products.

``"auto"`` starts from the retained graph and switches only where another mode is measurably
faster on this model. The candidates are the graph-based mode this sample can run (the retained
graph, or double backward where it does not fit in memory), ``torch.func``, and, on CUDA for more
than one vector per call, ``vmap`` over the retained graph; a mode that cannot run the model is
dropped. The choice is made by a trial (:class:`ModeTrial`) from real calls:

* every call during the trial computes the products the caller asked for with one candidate, so
  tuning costs no extra products, only the time of the slower candidates' calls;
* ``torch.func`` goes first (its first call also finds out whether it can run the model at all);
  each mode gets one untimed warm-up call followed directly by a timed one, then the candidates
  alternate, so that load changes on a shared machine hit all of them alike;
* after :data:`_TUNING_TIMED_CALLS` (3) timed calls of every candidate the default (the
  graph-based mode) is kept unless another mode's median time per product is at least
  :data:`_TUNING_MARGIN` (15%) below its median; after two calls already, the fastest mode is
  chosen if its slowest call beats every other mode's fastest call by
  :data:`_TUNING_CLEAR_RATIO` (1.5).

The choice is kept per model (:func:`model_tuning`, while the model lives) and, within a model,
per parameter set, precision, device, micro-batch size and K range (:func:`tuning_key`,
:func:`k_bucket`), so repeated analyses neither re-tune nor flip; a trial not yet decided is kept
with the model too, so that analyses with few calls each (a new operator every epoch) still
finish it. Which mode runs for a call, and the fallbacks where a mode fails, are the operator's
(:mod:`lightning_hessian.curvature.operator`).
"""

from __future__ import annotations

import statistics
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModeTrial", "ModelTuning", "k_bucket", "known_errors", "model_tuning", "tuning_key"]

# Mode choice of hvp_mode="auto": timed calls per candidate after one warm-up call, the margin by
# which another mode's median must beat the default's, and the ratio that decides after two calls.
_TUNING_TIMED_CALLS = 3
_TUNING_MARGIN = 0.15
_TUNING_CLEAR_RATIO = 1.5


def k_bucket(num_vectors: int) -> str:
    """The range of vectors per call that one ``hvp_mode="auto"`` choice covers.

    Args:
        num_vectors: K, the number of vectors in one ``matmat``.

    Returns:
        ``"1"``, ``"2-4"``, ``"5-16"`` or ``"17+"``: the relative cost of the modes changes with K
        (``vmap`` shares more work for larger K), so each range is tuned separately.
    """
    if num_vectors <= 1:
        return "1"
    if num_vectors <= 4:
        return "2-4"
    if num_vectors <= 16:
        return "5-16"
    return "17+"


def tuning_key(
    param_names: Sequence[str],
    param_shapes: Sequence[torch.Size],
    dtype: torch.dtype,
    device: torch.device,
    micro_batch_size: int,
    bucket: str,
) -> tuple:
    """The key of one ``"auto"`` choice within a model's :class:`ModelTuning`.

    One choice per parameter set, precision, device, micro-batch size and K range.

    Args:
        param_names: the names of the analysed parameters, in order.
        param_shapes: their shapes.
        dtype: the precision of the analysis.
        device: the device of the analysis.
        micro_batch_size: the largest micro-batch's sample count.
        bucket: the K range, from :func:`k_bucket`.

    Returns:
        A hashable tuple of these.
    """
    return (
        tuple(zip(param_names, map(tuple, param_shapes), strict=True)),
        str(dtype),
        str(device),
        micro_batch_size,
        bucket,
    )


@dataclass
class ModeTrial:
    """Timings of the candidate modes for one model and K range, from real calls.

    Every call during the trial computes the products the caller asked for with one candidate,
    so tuning costs no extra products (all of them are in ``hvp_count``), only the time of the
    slower candidates' calls (on the small CNN of ``benchmarks/hvp_cost.py``, a top-5 Lanczos
    took 10% longer on a model's first analysis). ``torch.func`` goes
    first (its first call also finds out whether it can run the model at all); each mode gets one
    untimed warm-up call followed directly by a timed one, then the candidates alternate, so that
    load changes on a shared machine hit all of them alike.
    """

    warmed: set[str] = field(default_factory=set)
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def next_mode(self, candidates: Sequence[str]) -> str:
        """The candidate the next call should run."""
        order = sorted(candidates, key=lambda mode: mode != "func")  # stable: func first
        for mode in order:
            if mode not in self.warmed or not self.seconds.get(mode):
                return mode
        return min(order, key=lambda mode: len(self.seconds.get(mode, [])))

    def record(self, mode: str, seconds_per_product: float) -> None:
        """Add one call's time per product (the first call of a mode is its warm-up, not kept)."""
        if mode not in self.warmed:
            self.warmed.add(mode)
        else:
            self.seconds.setdefault(mode, []).append(seconds_per_product)

    def decision(self, candidates: Sequence[str], default: str) -> str | None:
        """The mode to keep, or ``None`` while more calls are needed.

        After :data:`_TUNING_TIMED_CALLS` timed calls of every candidate: ``default`` unless
        another mode's median time per product is at least :data:`_TUNING_MARGIN` below its
        median. After two calls already, if the fastest mode's slowest call beats every other
        mode's fastest call by :data:`_TUNING_CLEAR_RATIO`.

        Returns:
            One of ``candidates``, or ``None`` while some candidate has fewer than two timed calls
            or no mode is yet clearly fastest.
        """
        samples = {mode: self.seconds.get(mode, []) for mode in candidates}
        fewest = min(len(values) for values in samples.values())
        if fewest < 2:
            return None
        medians = {mode: statistics.median(values) for mode, values in samples.items()}
        fastest = min(medians, key=medians.__getitem__)
        if fewest < _TUNING_TIMED_CALLS:
            clear = all(
                max(samples[fastest]) * _TUNING_CLEAR_RATIO <= min(values)
                for mode, values in samples.items()
                if mode != fastest
            )
            return fastest if clear else None
        if fastest != default and medians[fastest] <= (1.0 - _TUNING_MARGIN) * medians[default]:
            return fastest
        return default


@dataclass
class ModelTuning:
    """What ``hvp_mode="auto"`` learnt about one model, kept while the model lives.

    Attributes:
        choices: the chosen mode per (parameters, dtype, device, micro-batch size, K range).
        trials: the timings so far where no choice is made yet; kept with the model, so that
            analyses with few calls each (a new operator every epoch) still finish the trial.
        errors: modes this model cannot run (``"func"``, ``"graph"``, ``"vmap"``), with the reason.
    """

    choices: dict[tuple, str] = field(default_factory=dict)
    trials: dict[tuple, ModeTrial] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# Keyed by the model object: a new model (or one garbage-collected and replaced) is tuned afresh.
_MODEL_TUNING: weakref.WeakKeyDictionary[nn.Module, ModelTuning] = weakref.WeakKeyDictionary()


def model_tuning(model: nn.Module) -> ModelTuning:
    """The record of ``model``, created empty on first use and dropped with the model.

    Args:
        model: the analysed module (the key is the object, not its weights).

    Returns:
        The same :class:`ModelTuning` for every operator on ``model``.
    """
    record = _MODEL_TUNING.get(model)
    if record is None:
        record = _MODEL_TUNING[model] = ModelTuning()
    return record


def known_errors(model: nn.Module) -> Mapping[str, str]:
    """The modes ``model`` is known not to run (:attr:`ModelTuning.errors`), without creating a record.

    Args:
        model: the analysed module.

    Returns:
        The record's ``errors`` (live), or an empty mapping for a model without a record.
    """
    return _MODEL_TUNING[model].errors if model in _MODEL_TUNING else {}
