r"""
Loss landscape
^^^^^^^^^^^^^^

Draw the loss (and accuracy) of any LightningModule around its current weights at epoch end:
1-D curves :math:`t \mapsto L(\theta + t d)` and 2-D surfaces
:math:`(a, b) \mapsto L(\theta + a d_1 + b d_2)` along the top Hessian eigenvectors, the gradient
and filter-normalised random directions (Li et al. 2018), plus Keskar et al.'s
:math:`\epsilon`-sharpness. The pictures of Yao et al. (NeurIPS 2018): large-batch minima are
sharper along the top eigenvector.

:math:`L` is the mean loss over a fixed, seeded sample that stays on the device across epochs;
all grid points are evaluated many at a time (``vmap`` over stacked parameters), the model is
never written to, and its weights and buffers are bit-identical afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_hessian import metrics as tags
from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback, batch_loss
from lightning_hessian.callbacks.budget import TimeBudget
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.curvature.context import analysis_mode
from lightning_hessian.errors import UserInputError
from lightning_hessian.landscape import (
    Direction,
    LossCurve,
    LossSurface,
    eigenvector_directions,
    epsilon_sharpness,
    gradient_direction,
    loss_curve,
    loss_surface,
    normalize_direction,
    plot_contour,
    plot_curves,
    plot_surface_3d,
    random_direction,
    save_landscape,
    trainable_parameters,
)
from lightning_hessian.metrics import Split

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = ["LossLandscapeCallback"]

_DIRECTION_NAME = re.compile(r"^(eig|random)([1-9][0-9]*)$|^gradient$")
_NORMALIZATIONS = ("auto", "filter", "unit")


def _check_direction(name: str) -> str:
    if not isinstance(name, str) or not _DIRECTION_NAME.match(name):
        raise UserInputError(
            f"LossLandscapeCallback: unknown direction {name!r}; use 'eig<k>' (k-th top Hessian eigenvector,"
            " k >= 1), 'gradient', or 'random<k>' (k-th filter-normalised random direction)."
        )
    return name


class LossLandscapeCallback(EpochAnalysisCallback):
    r"""Log 1-D/2-D loss landscapes and :math:`\epsilon`-sharpness every ``every_n_epochs`` epochs.

    Directions are named ``"eig<k>"`` (the k-th top Hessian eigenvector), ``"gradient"`` and
    ``"random<k>"`` (the k-th filter-normalised Gaussian direction, seeded, the same on every
    rank and every epoch). Eigenvectors come from a :class:`HessianSpectrumCallback` attached to
    the same trainer when it has at least as many (put it *before* this callback in
    ``callbacks=[...]`` so that its analysis of the same epoch runs first); otherwise they are
    computed here with Lanczos, warm-started from the previous epoch.

    The loss is ``pl_module.hessian_loss(batch)`` when the module defines it, else the
    cross-entropy of ``pl_module(x)`` against ``y``. Accuracy is ``pl_module.hessian_accuracy(batch)``
    when the module defines it, else top-1 of ``pl_module(x)`` against integer targets for
    modules without ``hessian_loss``, else not computed (NaN); ``accuracy=False`` turns it off.
    The analysis runs in eval mode (BatchNorm running statistics) with autocast and TF32 off.

    Logged metrics (scalars to every logger, at ``trainer.global_step``):

    - ``landscape/loss``: loss of the model itself on the analysis sample.
    - ``landscape/rise/{direction}``: the largest loss on the curve minus ``landscape/loss``.
    - ``landscape/curvature/{direction}``: second difference of the curve at ``t = 0``,
      :math:`(L(h) + L(-h) - 2 L(0)) / h^2`; along a unit eigenvector it approximates its eigenvalue.
    - ``landscape/eig_{k}``: eigenvalues of the eigenvector directions used.
    - ``landscape/sharpness``: Keskar's :math:`\epsilon`-sharpness in percent (``sharpness=True``).
    - ``landscape/seconds``: wall time of the analysis.

    Under ``trainer.validate``/``trainer.test`` the tags name the split of the samples after the
    group (``landscape/test/loss``, :func:`lightning_hessian.metrics.split_tag`).

    Figures (TensorBoard images): ``landscape/curves`` (all 1-D curves, loss and accuracy), and
    for every surface ``landscape/contour/{d1}_{d2}`` and ``landscape/surface3d/{d1}_{d2}``. Raw
    numbers go to ``<log_dir>/landscape/epoch_XXX.npz`` (``validate_``/``test_`` prefixes under
    ``trainer.validate``/``trainer.test``; the ``.npz`` also holds ``split``, where the samples
    came from) with ``_curves.csv`` and ``_surface_{d1}_{d2}.csv`` next to it (see
    :func:`lightning_hessian.landscape.save_landscape`).

    Args:
        curves: directions of the 1-D curves.
        surfaces: pairs of directions of the 2-D surfaces, e.g. ``[("eig1", "eig2")]``,
            ``[("eig1", "gradient")]`` or ``[("random1", "random2")]``.
        curve_range: curves span ``t`` in ``[-curve_range, curve_range]``.
        curve_points: points per curve (odd, so that ``t = 0``, the model, is on it).
        surface_range: surfaces span ``[-surface_range, surface_range]`` on both axes.
        surface_points: points per surface axis (odd); ``surface_points ** 2`` evaluations.
        normalization: ``"auto"``: random directions filter-normalised (Li et al.), eigenvectors
            and gradient of unit Euclidean norm (``t`` is then a distance in parameter space);
            ``"filter"`` or ``"unit"``: that normalisation for all directions.
        sharpness: also compute :math:`\epsilon`-sharpness (``sharpness_steps`` gradient passes).
        sharpness_epsilon: the box size :math:`\epsilon` (Keskar et al. use 1e-3 and 5e-4).
        sharpness_steps: projected ascent iterations.
        eig_tol: Lanczos tolerance when the eigenvectors are computed here.
        eig_max_iter: cap on Hessian-vector products for them (``None``: the engine's default).
        chunk_size: parameter sets per batched forward pass (memory grows with it; halved
            automatically on out-of-memory).
        evaluation: ``"auto"`` (vmap, falling back to one point per pass for models vmap cannot
            run), ``"vmap"`` or ``"sequential"``.
        accuracy: also evaluate the accuracy along the curves and surfaces (see above).
        log_figures: log the figures to TensorBoard.
        save_raw: write the ``.npz``/``.csv`` files.
        analyse_on_train_end: when ``fit`` ends on weights that no scheduled analysis has seen,
            analyse them once more (``every_n_epochs=None`` with this: one landscape of the final
            weights per run, whatever its number of epochs, e.g. under early stopping).
        every_n_epochs, every_n_train_steps, num_samples, split, seed, analysis_batch_size,
            time_budget: see :class:`~lightning_hessian.callbacks.base.EpochAnalysisCallback`;
            with a ``time_budget`` the surfaces and sharpness that no longer fit are skipped.

    Raises:
        ValueError: for bad options (in ``__init__``), a model without trainable parameters or a
            ``*-true`` half precision (in ``setup``).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_hessian import HessianSpectrumCallback, LossLandscapeCallback
        >>> spectrum = HessianSpectrumCallback(top_k=2)
        >>> landscape = LossLandscapeCallback(surfaces=[("eig1", "eig2")], every_n_epochs=5)
        >>> trainer = Trainer(callbacks=[spectrum, landscape])
    """

    def __init__(
        self,
        *,
        curves: Sequence[str] = ("eig1", "gradient", "random1"),
        surfaces: Sequence[Sequence[str]] = (("eig1", "eig2"),),
        curve_range: float = 1.0,
        curve_points: int = 41,
        surface_range: float = 1.0,
        surface_points: int = 21,
        normalization: Literal["auto", "filter", "unit"] = "auto",
        sharpness: bool = False,
        sharpness_epsilon: float = 1e-3,
        sharpness_steps: int = 10,
        eig_tol: float = 1e-3,
        eig_max_iter: int | None = None,
        chunk_size: int = 16,
        evaluation: Literal["auto", "vmap", "sequential"] = "auto",
        accuracy: bool = True,
        log_figures: bool = True,
        save_raw: bool = True,
        analyse_on_train_end: bool = False,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_samples: int | None = 1024,
        split: Split = "train",
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
        if isinstance(curves, str):
            curves = [curves]
        self.curves = [_check_direction(name) for name in curves]
        pairs = []
        for pair in surfaces:
            pair = pair.split(",") if isinstance(pair, str) else list(pair)
            if len(pair) != 2 or pair[0] == pair[1]:
                raise UserInputError(
                    f"LossLandscapeCallback: a surface needs two different directions, got {pair!r};"
                    " e.g. surfaces=[('eig1', 'eig2')]."
                )
            pairs.append((_check_direction(pair[0].strip()), _check_direction(pair[1].strip())))
        self.surfaces = pairs
        if not self.curves and not self.surfaces and not sharpness:
            raise UserInputError("LossLandscapeCallback: nothing to compute; give curves, surfaces or sharpness=True.")
        for name, value in (("curve_points", curve_points), ("surface_points", surface_points)):
            if value < 3 or value % 2 == 0:
                raise UserInputError(
                    f"LossLandscapeCallback: {name}={value} must be an odd number >= 3 so that t = 0 (the"
                    f" model itself) is a grid point; use {max(3, value + 1 - value % 2)}."
                )
        for name, number in (
            ("curve_range", curve_range),
            ("surface_range", surface_range),
            ("sharpness_epsilon", sharpness_epsilon),
            ("eig_tol", eig_tol),
        ):
            if not number > 0:
                raise UserInputError(f"LossLandscapeCallback: {name}={number} must be > 0.")
        if normalization not in _NORMALIZATIONS:
            raise UserInputError(
                f"LossLandscapeCallback: normalization={normalization!r} is not one of {_NORMALIZATIONS}."
            )
        if evaluation not in ("auto", "vmap", "sequential"):
            raise UserInputError(
                f"LossLandscapeCallback: evaluation={evaluation!r} is not 'auto', 'vmap' or 'sequential'."
            )
        if sharpness_steps < 1 or chunk_size < 1:
            raise UserInputError(
                f"LossLandscapeCallback: sharpness_steps={sharpness_steps} and chunk_size={chunk_size} must be >= 1."
            )
        if eig_max_iter is not None and eig_max_iter < 1:
            raise UserInputError(f"LossLandscapeCallback: eig_max_iter={eig_max_iter} must be >= 1 or None.")
        self.curve_range = float(curve_range)
        self.curve_points = curve_points
        self.surface_range = float(surface_range)
        self.surface_points = surface_points
        self.normalization = normalization
        self.sharpness = sharpness
        self.sharpness_epsilon = sharpness_epsilon
        self.sharpness_steps = sharpness_steps
        self.eig_tol = eig_tol
        self.eig_max_iter = eig_max_iter
        self.chunk_size = chunk_size
        self.evaluation = evaluation
        self.accuracy = accuracy
        self.log_figures = log_figures
        self.save_raw = save_raw
        self.analyse_on_train_end = analyse_on_train_end
        self._eigenvectors: list[Direction] | None = None  # our own, for the next warm start
        self._last_curves: list[LossCurve] = []
        self._last_surfaces: list[LossSurface] = []

    # ----------------------------------------------------------------------------------------
    # public state

    @property
    def needed_eigenvectors(self) -> int:
        """How many top eigenvectors the configured curves and surfaces use."""
        names = [*self.curves, *(n for pair in self.surfaces for n in pair)]
        return max((int(n[3:]) for n in names if n.startswith("eig")), default=0)

    @property
    def last_curves(self) -> list[LossCurve]:
        """The 1-D curves of the last analysis."""
        return list(self._last_curves)

    @property
    def last_surfaces(self) -> list[LossSurface]:
        """The 2-D surfaces of the last analysis."""
        return list(self._last_surfaces)

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def unavailable_metrics(self) -> dict[str, float]:
        return (
            {tags.LANDSCAPE_LOSS: math.nan, tags.SHARPNESS: math.nan}
            if self.sharpness
            else {tags.LANDSCAPE_LOSS: math.nan}
        )

    @override
    def setup(self, trainer: AnyTrainer, pl_module: AnyLightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise UserInputError(
                f"LossLandscapeCallback: {type(pl_module).__name__} has no parameters with requires_grad=True;"
                " there is no landscape to draw. Unfreeze the parameters to analyse."
            )
        spectrum, own_index = self._spectrum_callback(trainer)
        if spectrum is not None and self.needed_eigenvectors:
            if getattr(spectrum, "top_k", 0) < self.needed_eigenvectors:
                rank_zero_warn(
                    f"LossLandscapeCallback: the attached HessianSpectrumCallback computes top_k={spectrum.top_k}"
                    f" eigenvectors but the landscape uses {self.needed_eigenvectors}; they are computed again"
                    f" here. Set HessianSpectrumCallback(top_k={self.needed_eigenvectors}) to share them."
                )
            # Lightning sets Trainer.callbacks in its callback connector without declaring it on the Trainer
            elif trainer.callbacks.index(spectrum) > own_index:  # type: ignore[union-attr]
                rank_zero_warn(
                    "LossLandscapeCallback comes before HessianSpectrumCallback in the trainer's callbacks, so it"
                    " uses the eigenvectors of the spectrum's previous analysis. List the spectrum callback first."
                )

    @override
    def on_train_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if self.analyse_on_train_end and trainer.global_step > 0 and trainer.global_step != self._analysed_step:
            self._run(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["analysed_step"] = self._analysed_step
        state["eigenvectors"] = (
            None
            if self._eigenvectors is None
            else [{n: t.detach().cpu() for n, t in v.items()} for v in self._eigenvectors]
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._eigenvectors = state_dict.pop("eigenvectors", None)
        self._analysed_step = state_dict.pop("analysed_step", -1)
        super().load_state_dict(state_dict)

    # ----------------------------------------------------------------------------------------
    # the analysis

    @override
    def analyse(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> dict[str, float]:
        budget = self.start_budget(trainer, pl_module)
        all_reduce = budget.all_reduce
        micro_batches = samples.micro_batches(self.analysis_batch_size)
        # batch_loss=None: the module's hooks decide the loss and accuracy (one forward pass for
        # the default cross-entropy and its accuracy)
        eval_kwargs: dict[str, Any] = {
            "batch_loss": None,
            "accuracy": self.accuracy,
            "method": self.evaluation,
            "chunk_size": self.chunk_size,
            "all_reduce": all_reduce,
        }
        metrics: dict[str, float] = {}
        # analysis_mode(tensors=True): the parameters and buffers are bit-identical afterwards
        # even if a model's forward writes into its buffers.
        with analysis_mode(pl_module, tensors=True):
            directions, eigenvalues = self._directions(trainer, pl_module, micro_batches, all_reduce)
            metrics.update(
                {tags.landscape_eigenvalue_tag(i): v for i, v in enumerate(eigenvalues, start=1) if v is not None}
            )

            curves: list[LossCurve] = []
            steps = self._grid(self.curve_range, self.curve_points)
            for name in self.curves:
                if self._out_of_time(budget, f"curve {name}"):
                    break
                curves.append(loss_curve(pl_module, directions[name], steps, micro_batches, name=name, **eval_kwargs))
            surfaces: list[LossSurface] = []
            axis = self._grid(self.surface_range, self.surface_points)
            for first, second in self.surfaces:
                if self._out_of_time(budget, f"surface {first} x {second}"):
                    break
                surfaces.append(
                    loss_surface(
                        pl_module,
                        directions[first],
                        directions[second],
                        axis,
                        axis,
                        micro_batches,
                        names=(first, second),
                        **eval_kwargs,
                    )
                )
            if self.sharpness and not self._out_of_time(budget, "sharpness"):
                result = epsilon_sharpness(
                    pl_module,
                    micro_batches,
                    epsilon=self.sharpness_epsilon,
                    steps=self.sharpness_steps,
                    batch_loss=batch_loss,
                    all_reduce=all_reduce,
                )
                metrics[tags.SHARPNESS] = result.sharpness
                metrics[tags.LANDSCAPE_LOSS] = result.loss

        for curve in curves:
            centre = self.curve_points // 2
            h = curve.steps[centre + 1] - curve.steps[centre]
            metrics[tags.LANDSCAPE_LOSS] = float(curve.loss[centre])  # the model itself: t = 0
            metrics[tags.rise_tag(curve.name)] = float(np.max(curve.loss) - curve.loss[centre])
            metrics[tags.curvature_tag(curve.name)] = float(
                (curve.loss[centre + 1] + curve.loss[centre - 1] - 2 * curve.loss[centre]) / h**2
            )
        if surfaces and tags.LANDSCAPE_LOSS not in metrics:
            centre = self.surface_points // 2
            metrics[tags.LANDSCAPE_LOSS] = float(surfaces[0].loss[centre, centre])
        metrics[tags.LANDSCAPE_SECONDS] = budget.elapsed()
        self._last_curves, self._last_surfaces, self._last_metrics = curves, surfaces, dict(metrics)
        if trainer.is_global_zero:
            self._publish(trainer, curves, surfaces, metrics)
        return metrics

    # ----------------------------------------------------------------------------------------
    # internals

    def _spectrum_callback(self, trainer: AnyTrainer) -> tuple[HessianSpectrumCallback | None, int]:
        # Lightning sets Trainer.callbacks in its callback connector without declaring it on the Trainer
        callbacks: list[object] = trainer.callbacks  # type: ignore[union-attr]
        own_index = next((i for i, c in enumerate(callbacks) if c is self), len(callbacks))
        for callback in callbacks:
            if isinstance(callback, HessianSpectrumCallback):
                return callback, own_index
        return None, own_index

    @staticmethod
    def _grid(half_width: float, points: int) -> np.ndarray:
        grid = np.linspace(-half_width, half_width, points)
        grid[points // 2] = 0.0  # exactly the model, whatever linspace rounds to
        return grid

    def _out_of_time(self, budget: TimeBudget, what: str) -> bool:
        """Whether the budget is spent (on any rank: every rank takes the same decision), with a
        warning naming what is skipped.

        Returns:
            ``True`` when ``what`` is to be skipped.
        """
        if budget.spent():
            rank_zero_warn(
                f"LossLandscapeCallback: time_budget={self.time_budget} s spent; skipping {what} and what follows."
            )
            return True
        return False

    def _directions(
        self, trainer: AnyTrainer, pl_module: AnyLightningModule, micro_batches: list[Any], all_reduce: Any
    ) -> tuple[dict[str, Direction], list[float | None]]:
        params = trainable_parameters(pl_module)
        wanted = {*self.curves, *(n for pair in self.surfaces for n in pair)}
        directions: dict[str, Direction] = {}
        eig_norm = "unit" if self.normalization == "auto" else self.normalization
        random_norm = "filter" if self.normalization == "auto" else self.normalization

        eigenvalues: list[float | None] = []
        k = self.needed_eigenvectors
        if k:
            vectors = self._shared_eigenvectors(trainer, params, k)
            if vectors is None:
                init = self._eigenvectors if self._eigenvectors is not None and len(self._eigenvectors) >= k else None
                values, vectors = eigenvector_directions(
                    pl_module,
                    micro_batches,
                    k,
                    batch_loss=batch_loss,
                    all_reduce=all_reduce,
                    tol=self.eig_tol,
                    max_iter=self.eig_max_iter,
                    init=None if init is None else init[:k],
                    seed=self.seed,
                )
                self._eigenvectors = [{n: t.detach() for n, t in v.items()} for v in vectors]
                eigenvalues = list(values)
            for index, vector in enumerate(vectors[:k], start=1):
                name = f"eig{index}"
                if name in wanted:
                    directions[name] = normalize_direction(vector, params, eig_norm)
        if "gradient" in wanted:
            directions["gradient"] = gradient_direction(
                pl_module, micro_batches, batch_loss=batch_loss, all_reduce=all_reduce, normalization="none"
            )
            directions["gradient"] = normalize_direction(directions["gradient"], params, eig_norm)
        for name in sorted(n for n in wanted if n.startswith("random")):
            # seed + 1000 k: independent of the sample choice (seed) and of each other
            directions[name] = random_direction(
                params, seed=self.seed + 1000 * int(name[6:]), normalization=random_norm
            )
        return directions, eigenvalues

    def _shared_eigenvectors(self, trainer: AnyTrainer, params: dict[str, Tensor], k: int) -> list[Direction] | None:
        """The spectrum callback's last eigenvectors, on the parameters' device, if they fit."""
        spectrum, _ = self._spectrum_callback(trainer)
        vectors = None if spectrum is None else spectrum.eigenvectors
        if not vectors or len(vectors) < k:
            return None
        shared = []
        for vector in vectors[:k]:
            if set(vector) != set(params) or any(vector[n].shape != params[n].shape for n in params):
                return None
            shared.append({n: vector[n].to(device=params[n].device, dtype=params[n].dtype) for n in params})
        return shared

    def _file_stem(self, trainer: AnyTrainer) -> str:
        fn = trainer.state.fn
        # keys by value: TrainerFn is a str enum, and the trainer may be of either Lightning package
        prefixes: dict[str | None, str] = {TrainerFn.VALIDATING: "validate_", TrainerFn.TESTING: "test_"}
        prefix = prefixes.get(fn, "")
        stem = f"{prefix}epoch_{trainer.current_epoch:03d}"
        if self.every_n_train_steps and fn == TrainerFn.FITTING:
            stem += f"_step_{trainer.global_step:07d}"
        return stem

    def _publish(
        self, trainer: AnyTrainer, curves: list[LossCurve], surfaces: list[LossSurface], metrics: dict[str, float]
    ) -> None:
        label = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        if self.save_raw:
            run_dir = self.run_dir(trainer)
            if run_dir is not None:
                extra: dict[str, Any] = {k.replace("/", "__"): v for k, v in metrics.items() if math.isfinite(v)}
                extra["split"] = self._split_for(trainer)  # which samples: hessian-report names it
                save_landscape(run_dir / "landscape" / self._file_stem(trainer), curves, surfaces, extra)
        if not self.log_figures:
            return
        if curves:
            self.log_figure(trainer, tags.LANDSCAPE_CURVES, plot_curves(curves, title=f"loss landscape ({label})"))
        for surface in surfaces:
            self.log_figure(trainer, tags.contour_tag(surface.name), plot_contour(surface, title=f"loss, {label}"))
            self.log_figure(trainer, tags.surface3d_tag(surface.name), plot_surface_3d(surface, title=f"loss, {label}"))
