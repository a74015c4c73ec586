r"""
Hessian spectrum
^^^^^^^^^^^^^^^^

Log the spectrum of the loss Hessian of any LightningModule at epoch end: the top-k eigenvalues
:math:`\lambda_1 \ge \dots \ge \lambda_k` of :math:`H = \nabla^2_\theta L(\theta)` (Lanczos,
warm-started from last epoch's eigenvectors), the smallest eigenvalue, the trace
:math:`\operatorname{tr} H` (adaptive Hutchinson/Hutch++), the spectral density (stochastic
Lanczos quadrature), the top eigenvalue of the Hessian with respect to the input and the
input-gradient norm, and per-layer spectra (the diagonal blocks of :math:`H` of selected modules).

:math:`L` is the mean loss over a fixed, seeded sample of the training (or validation) set that
stays on the device across epochs, so successive points of a curve compare like with like.

This module holds the callback: its options, its state, and the order in which the quantities
share the time budget. The engine calls are in :mod:`~lightning_hessian.callbacks.spectrum_engine`,
the density histogram, figure and custom-scalars layout in
:mod:`~lightning_hessian.callbacks.spectrum_output`, the time budget in
:mod:`~lightning_hessian.callbacks.budget` and the progress lines in
:mod:`~lightning_hessian.callbacks.progress`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_hessian import metrics as tags
from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback
from lightning_hessian.callbacks.budget import TimeBudget
from lightning_hessian.callbacks.progress import AnalysisProgress
from lightning_hessian.callbacks.spectrum_engine import (
    budgeted_top_eigenvalues,
    input_hessian_means,
    padded_flags,
    sample_operator,
    select_layers,
    stability_metrics,
    vectors_to_cpu,
)
from lightning_hessian.callbacks.spectrum_output import log_density, spectrum_layout
from lightning_hessian.curvature import EigenResult, HessianOperator, hessian_trace, spectral_density
from lightning_hessian.density_histogram import density_histogram
from lightning_hessian.errors import UserInputError
from lightning_hessian.metrics import Split

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = ["BACKENDS", "QUANTITIES", "HessianSpectrumCallback", "density_histogram"]

#: The quantities :class:`HessianSpectrumCallback` can compute, in the order they are computed
#: (under a time budget, the earlier ones get the time first).
QUANTITIES: tuple[str, ...] = ("eigenvalues", "smallest_eigenvalue", "trace", "density", "input_hessian")
#: ``"native"``: this package's Lanczos/trace/SLQ engine. ``"pyhessian"``: PyHessian's power
#: iteration and Hutchinson trace on the same samples, for comparison.
BACKENDS: tuple[str, ...] = ("native", "pyhessian")
# PyHessian 0.1 has no smallest eigenvalue, no input-space quantities, and its density calls
# ``torch.eig``, removed in torch 2.x.
_PYHESSIAN_QUANTITIES = ("eigenvalues", "trace")
# The trainer functions besides fit in which the callback may analyse once at the end.
_EVALUATION_STAGES = ("validate", "test")
# Lightning precision settings whose parameters are not float32/float64.
_LOW_PRECISION_PARAMS = (torch.float16, torch.bfloat16)


class HessianSpectrumCallback(EpochAnalysisCallback):
    r"""Log the Hessian spectrum of the model at the end of every ``every_n_epochs``-th epoch.

    The loss of a batch is ``pl_module.hessian_loss(batch)`` when the module defines it (any batch
    structure, any differentiable scalar loss averaged over the batch), otherwise the cross-entropy
    of ``pl_module(x)`` against ``y`` for ``(x, y)`` batches. The model is analysed unwrapped (never
    the DDP wrapper), in eval mode (BatchNorm running statistics, no dropout), with autocast and TF32
    off, and every piece of state it touches is restored bit for bit: attaching the callback does
    not change training.

    Logged metrics (scalars to every logger, at ``trainer.global_step``):

    - ``hessian/eig_1`` .. ``hessian/eig_{top_k}``: top eigenvalues, largest first (``eigenvalues``).
    - ``hessian/eig_min``: smallest (most negative) eigenvalue (``smallest_eigenvalue``).
    - ``hessian/trace``, ``hessian/trace_stderr``: trace estimate (adaptive Hutchinson/Hutch++)
      and its standard error.
    - ``hessian/input_eig_1``, ``hessian/input_grad_norm``: mean over the analysis samples of the top
      eigenvalue of the per-sample input Hessian and of the input-gradient norm (``input_hessian``).
    - ``hessian/layer/{module}/eig_{i}``: top ``layer_top_k`` eigenvalues of each selected module's
      diagonal Hessian block (``layers``).
    - ``hessian/eig_1_x_lr``, ``hessian/stability`` (``stability=True``, during ``fit``): the top
      eigenvalue times the learning rate of the last step, and its ratio to the optimizer's
      quadratic stability limit, ``eig_1 * lr / (2 (1 + momentum))`` for SGD with heavy-ball
      momentum (Nesterov: ``eig_1 * lr (1 + 2 momentum) / (2 + 2 momentum)``); above 1 the step is
      beyond the limit (Cohen et al. 2021, "edge of stability"). For Adam/AdamW,
      ``hessian/preconditioned_eig_1``, the top eigenvalue of ``P^-1/2 H P^-1/2`` with Adam's
      preconditioner ``P``, and ``stability = preconditioned_eig_1 * lr (1 - beta1) / (2 + 2 beta1)``
      (Cohen et al. 2022). Read from the live optimizer; NaN for other optimizers (see
      :mod:`lightning_hessian.callbacks.stability`).
    - ``hessian/hvps``: Hessian-vector products spent (each one a pass over the samples).
    - ``hessian/seconds``: wall time of the analysis.
    - ``hessian/converged``: fraction of the requested eigenpairs that met ``eig_tol`` (less than 1
      when the time budget or ``max_iter`` stopped Lanczos early).
    - ``hessian/budget_exhausted``: 1 when the time budget skipped or cut short a quantity.

    Under ``trainer.validate``/``trainer.test`` (``hessian-train test`` on the last checkpoint) the
    same metrics are logged with the split of their samples after the group, ``hessian/test/eig_1``,
    ``hessian/test/trace``, ... (:func:`lightning_hessian.metrics.split_tag`): a test logs at the
    checkpoint's step and must not replace the fit's last analysis of the training samples there.

    With ``density``, TensorBoard also gets the spectral density each time as a histogram
    (``hessian/density``: bucket counts are numbers of eigenvalues, so the Histograms and
    Distributions tabs show the spectrum evolving) and as a figure (``hessian/density_plot``). A
    custom-scalars layout groups the eigenvalue curves. Loggers that cannot take figures get the
    scalars, and one warning.

    Precision: under ``16-mixed``/``bf16-mixed`` the parameters are float32 and the analysis runs in
    float32 (autocast off). Under ``16-true``/``bf16-true`` the Hessian of a half-precision model
    is too inaccurate to be worth logging and :meth:`setup` raises; train with a ``-mixed``
    precision instead.

    Args:
        top_k: number of top eigenvalues (``eigenvalues``).
        quantities: which of :data:`QUANTITIES` to compute.
        every_n_epochs: analyse at the end of every n-th training epoch (``None``: never by epoch).
        every_n_train_steps: analyse every n optimizer steps instead (or as well).
        num_samples: size of the fixed analysis sample (over all ranks); ``None``: the whole split.
        split: ``"train"``, ``"val"`` or ``"test"``: the dataset the sample is drawn from.
        seed: seed of the sample selection and of the random start/probe vectors.
        analysis_batch_size: micro-batch size of the HVP passes (memory, not maths).
        time_budget: seconds one analysis may take. Quantities run in the order of
            :data:`QUANTITIES` (per-layer spectra last); the top eigenvalues always get at least one
            Lanczos step, whatever is not reached is logged as NaN, and ``hessian/converged`` /
            ``hessian/budget_exhausted`` say so. Under DDP the budget is checked between quantities
            (a collective decision), not inside Lanczos.
        eig_tol: Lanczos stops when every wanted pair has ``||Hv - \theta v|| \le`` ``eig_tol``
            times ``|\theta|``, its own Ritz value (what that guarantees:
            :func:`~lightning_hessian.curvature.top_eigenvalues`).
        max_iter: cap on the Hessian-vector products of one Lanczos run (``None``: the engine's
            default, ``max(300, 50 k)``).
        lanczos_block_size: vectors per Lanczos step, pushed through one batched HVP pass; larger
            blocks spend more products but fewer passes over the samples, which pays on GPUs.
        trace_rel_tol: relative standard error at which the trace estimate stops (the engine's
            adaptive trace: a pilot of 8 Hutchinson probes, then Hutchinson or Hutch++, whichever
            the pilot predicts needs fewer products).
        trace_max_probes: cap on the trace's probe vectors.
        density_probes: number of SLQ probe vectors.
        density_steps: Lanczos steps per SLQ probe.
        density_grid: number of points of the density grid (and histogram buckets).
        density_sigma: Gaussian broadening of the density (``None``: the engine's default).
        layers: module names or ``fnmatch`` patterns (``"layer1.*"``, ``"fc"``) whose diagonal
            Hessian blocks get their own top eigenvalues; ``None``: no per-layer spectra.
        layer_top_k: number of eigenvalues per selected module.
        backend: one of :data:`BACKENDS`.
        warm_start: start Lanczos from the previous analysis's eigenvectors.
        stability: also log the optimizer's stability ratio (see the logged metrics above).
        analyse_on_train_end: when ``fit`` ends on weights that no scheduled analysis has seen
            (``max_epochs`` not a multiple of ``every_n_epochs``, early stopping, ``max_steps``),
            analyse them once more: every run's curve ends at its final weights.
        progress_interval: seconds between progress log lines during a long analysis.
        evaluation_stages: in which of ``"validate"`` and ``"test"`` the callback analyses once at
            the end (on ``split``, or the validation split without training data, and on the test
            split). ``()`` analyses during ``fit`` only, e.g. an expensive end-of-training spectrum
            whose test-sample counterpart is not wanted.

    Raises:
        ValueError: on bad options (in ``__init__``) and, in :meth:`setup`, on a
            ``*-true`` half precision, a model without trainable parameters, or a ``layers``
            pattern that matches no module (the message lists the valid values).

    Example::

        >>> from pytorch_lightning import Trainer
        >>> from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
        >>> spectrum = HessianSpectrumCallback(top_k=3, quantities=["eigenvalues", "trace"], num_samples=2048)
        >>> trainer = Trainer(callbacks=[spectrum])
    """

    def __init__(
        self,
        *,
        top_k: int = 1,
        quantities: Sequence[str] = ("eigenvalues",),
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_samples: int | None = 4096,
        split: Split = "train",
        seed: int = 0,
        analysis_batch_size: int = 512,
        time_budget: float | None = None,
        eig_tol: float = 1e-3,
        max_iter: int | None = None,
        lanczos_block_size: int = 1,
        trace_rel_tol: float = 1e-2,
        trace_max_probes: int = 200,
        density_probes: int = 4,
        density_steps: int = 64,
        density_grid: int = 256,
        density_sigma: float | None = None,
        layers: Sequence[str] | str | None = None,
        layer_top_k: int = 1,
        backend: str = "native",
        warm_start: bool = True,
        analyse_on_train_end: bool = True,
        stability: bool = True,
        progress_interval: float = 30.0,
        evaluation_stages: Sequence[str] = ("validate", "test"),
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
        if isinstance(quantities, str):
            quantities = [quantities]
        unknown = [q for q in quantities if q not in QUANTITIES]
        if unknown:
            raise UserInputError(
                f"HessianSpectrumCallback: unknown quantities {unknown}; choose from {list(QUANTITIES)}."
            )
        if not quantities and layers is None:
            raise UserInputError(
                f"HessianSpectrumCallback: nothing to compute; pass quantities from {list(QUANTITIES)} or `layers`."
            )
        if backend not in BACKENDS:
            raise UserInputError(f"HessianSpectrumCallback: unknown backend {backend!r}; choose from {list(BACKENDS)}.")
        if backend == "pyhessian":
            unsupported = [q for q in quantities if q not in _PYHESSIAN_QUANTITIES]
            if unsupported or layers is not None:
                raise UserInputError(
                    f"HessianSpectrumCallback: backend='pyhessian' computes only {list(_PYHESSIAN_QUANTITIES)}"
                    f" (no per-layer spectra); got {unsupported or 'layers'}. Use backend='native'."
                )
        _check_int("top_k", top_k, 1)
        _check_int("layer_top_k", layer_top_k, 1)
        _check_int("lanczos_block_size", lanczos_block_size, 1)
        _check_int("trace_max_probes", trace_max_probes, 2)
        _check_int("density_probes", density_probes, 1)
        _check_int("density_steps", density_steps, 2)
        _check_int("density_grid", density_grid, 2)
        if max_iter is not None:
            _check_int("max_iter", max_iter, 1)
        for name, value in (
            ("eig_tol", eig_tol),
            ("trace_rel_tol", trace_rel_tol),
            ("progress_interval", progress_interval),
        ):
            if not value > 0:
                raise UserInputError(f"HessianSpectrumCallback: `{name}` must be > 0, got {value}.")
        if density_sigma is not None and not density_sigma > 0:
            raise UserInputError(f"HessianSpectrumCallback: `density_sigma` must be > 0, got {density_sigma}.")
        if isinstance(layers, str):
            layers = [layers]
        if isinstance(evaluation_stages, str):
            evaluation_stages = [evaluation_stages]
        bad_stages = [stage for stage in evaluation_stages if stage not in _EVALUATION_STAGES]
        if bad_stages:
            raise UserInputError(
                f"HessianSpectrumCallback: evaluation_stages {bad_stages} are not among {list(_EVALUATION_STAGES)};"
                " pass a subset, or [] to analyse during fit only."
            )

        # keep the canonical order so the time budget favours the cheap, important ones
        self.quantities = tuple(q for q in QUANTITIES if q in quantities)
        self.top_k = top_k
        self.eig_tol = eig_tol
        self.max_iter = max_iter
        self.lanczos_block_size = lanczos_block_size
        self.trace_rel_tol = trace_rel_tol
        self.trace_max_probes = trace_max_probes
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.density_grid = density_grid
        self.density_sigma = density_sigma
        self.layers = None if layers is None else list(layers)
        self.layer_top_k = layer_top_k
        self.backend = backend
        self.warm_start = warm_start
        self.analyse_on_train_end = analyse_on_train_end
        self.stability = stability
        self.progress_interval = progress_interval
        self.evaluation_stages = tuple(stage for stage in _EVALUATION_STAGES if stage in evaluation_stages)

        self._eigenvectors: list[dict[str, Tensor]] | None = None
        self._smallest_eigenvector: list[dict[str, Tensor]] | None = None
        self._layer_eigenvectors: dict[str, list[dict[str, Tensor]]] = {}
        self._layer_params: dict[str, list[str]] = {}
        self._layout_writers: set[int] = set()

    # ----------------------------------------------------------------------------------------
    # public state

    @property
    @override
    def state_key(self) -> str:
        # several instances (e.g. a cheap every-epoch one and a full one every 10 epochs) may share
        # a trainer and a checkpoint
        options: dict[str, Any] = {}
        if self.evaluation_stages != _EVALUATION_STAGES:  # the keys of earlier checkpoints stay valid
            options["evaluation_stages"] = self.evaluation_stages
        return self._generate_state_key(
            quantities=self.quantities,
            top_k=self.top_k,
            layers=self.layers,
            split=self.split,
            num_samples=self.num_samples,
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
            backend=self.backend,
            warm_start=self.warm_start,
            **options,
        )

    @property
    def eigenvectors(self) -> list[dict[str, Tensor]] | None:
        """Top-k eigenvectors of the last analysis, largest eigenvalue first, keyed by parameter
        name (unit norm over all parameters together); ``None`` before the first analysis or when
        ``eigenvalues`` is not computed. The loss-landscape callback reads these directions."""
        return self._eigenvectors

    @property
    def metric_names(self) -> list[str]:
        """Names of the scalar metrics this configuration logs (before per-layer names are known)."""
        names: list[str] = []
        if "eigenvalues" in self.quantities:
            names += [tags.eigenvalue_tag(i) for i in range(1, self.top_k + 1)]
            if self.stability:
                names += [tags.EIG_1_X_LR, tags.STABILITY, tags.PRECONDITIONED_EIG_1]
        if "smallest_eigenvalue" in self.quantities:
            names.append(tags.EIG_MIN)
        if "trace" in self.quantities:
            names += [tags.TRACE, tags.TRACE_STDERR]
        if "input_hessian" in self.quantities:
            names += [tags.INPUT_EIG_1, tags.INPUT_GRAD_NORM]
        for layer in self._layer_params:
            names += [tags.layer_eigenvalue_tag(layer, i) for i in range(1, self.layer_top_k + 1)]
        return [*names, tags.HVPS, tags.HESSIAN_SECONDS, tags.CONVERGED, tags.BUDGET_EXHAUSTED]

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def unavailable_metrics(self) -> dict[str, float]:
        return dict.fromkeys(self.metric_names, math.nan)

    @override
    def setup(self, trainer: AnyTrainer, pl_module: AnyLightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # options, num_samples vs split, *-true precision
        trainable = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if not trainable:
            raise UserInputError(
                f"HessianSpectrumCallback: {type(pl_module).__name__} has no parameters with requires_grad=True;"
                " there is no Hessian to analyse. Unfreeze the parameters to analyse."
            )
        half = sorted({str(p.dtype) for _, p in trainable if p.dtype in _LOW_PRECISION_PARAMS})
        if half:
            raise UserInputError(
                f"HessianSpectrumCallback: trainable parameters in {half}; the analysis needs float32 or"
                " float64 parameters. Keep the model in float32 and use precision='bf16-mixed'/'16-mixed'."
            )
        num_trainable = sum(p.numel() for _, p in trainable)
        if "eigenvalues" in self.quantities and self.top_k > num_trainable:
            raise UserInputError(
                f"HessianSpectrumCallback: top_k={self.top_k} exceeds the {num_trainable} trainable parameters of"
                f" {type(pl_module).__name__}; use top_k <= {num_trainable}."
            )
        if self.backend == "pyhessian" and trainer.world_size > 1:
            raise UserInputError(
                "HessianSpectrumCallback: backend='pyhessian' cannot all-reduce across processes; use"
                f" backend='native' under {type(trainer.strategy).__name__} (world size {trainer.world_size})."
            )
        if self.layers is not None:
            self._layer_params = select_layers(pl_module, self.layers)

    @override
    def on_validation_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if "validate" in self.evaluation_stages:
            super().on_validation_start(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if "validate" in self.evaluation_stages:
            super().on_validation_epoch_end(trainer, pl_module)

    @override
    def on_test_start(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if "test" in self.evaluation_stages:
            super().on_test_start(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if "test" in self.evaluation_stages:
            super().on_test_epoch_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: AnyTrainer, pl_module: AnyLightningModule) -> None:
        if self.analyse_on_train_end and trainer.global_step > 0 and trainer.global_step != self._analysed_step:
            self._run(trainer, pl_module)

    @override
    def analyse(self, trainer: AnyTrainer, pl_module: AnyLightningModule, samples: AnalysisSamples) -> dict[str, float]:
        budget = self.start_budget(trainer, pl_module)
        progress = AnalysisProgress(
            self.progress_interval, f"HessianSpectrumCallback epoch {trainer.current_epoch}", budget.start
        )
        micro_batches = samples.micro_batches(self.analysis_batch_size)
        metrics = dict.fromkeys(self.metric_names, math.nan)
        operator = sample_operator(pl_module, micro_batches, budget.all_reduce)

        loss = float(operator.loss())  # a NaN check on all ranks before any HVP is spent
        if not math.isfinite(loss):
            rank_zero_warn(
                f"HessianSpectrumCallback: the loss on the {samples.num_global} analysis samples is {loss}"
                f" at epoch {trainer.current_epoch}; logging NaN Hessian metrics, training goes on."
            )
            metrics.update({tags.HVPS: 0.0, tags.HESSIAN_SECONDS: budget.elapsed()})
            self._last_metrics = metrics
            return metrics

        hvps = 0
        converged: list[bool] = []
        top_values: list[float] = []
        top_pairs: EigenResult | None = None

        # One analysis context for all the quantities of the parameter-space Hessian: the retained
        # first-order graph is built once and serves the Lanczos runs, the trace and the density.
        with operator.analysis():
            if "eigenvalues" in self.quantities:
                # The headline number: with the budget already spent it still gets one Lanczos step
                # (a rough, unconverged estimate) rather than nothing.
                result = self._lanczos(
                    operator, self.top_k, "largest", self._eigenvectors, budget, progress.with_base(hvps)
                )
                hvps += result.hvp_count
                top_pairs = result
                top_values = [float(v) for v in result.eigenvalues]
                metrics.update({tags.eigenvalue_tag(i): v for i, v in enumerate(top_values, start=1)})
                converged += padded_flags(result.converged, self.top_k)
                if len(result.eigenvectors) == self.top_k:
                    self._eigenvectors = [{n: t.detach() for n, t in v.items()} for v in result.eigenvectors]
                progress.report("top eigenvalues", hvps)
                if self.stability and top_values:
                    # for Adam, one more Lanczos run on the preconditioned Hessian
                    stability_progress = progress.with_base(hvps)

                    def preconditioned(scaled: HessianOperator) -> EigenResult:
                        return self._lanczos(scaled, 1, "largest", None, budget, stability_progress)

                    stability, spent = stability_metrics(trainer, pl_module, operator, top_values[0], preconditioned)
                    metrics.update(stability)
                    hvps += spent

            if "smallest_eigenvalue" in self.quantities:
                if budget.spent():
                    converged.append(False)
                else:
                    result = self._lanczos(
                        operator, 1, "smallest", self._smallest_eigenvector, budget, progress.with_base(hvps)
                    )
                    hvps += result.hvp_count
                    if result.eigenvectors:
                        self._smallest_eigenvector = [{n: t.detach() for n, t in result.eigenvectors[0].items()}]
                    metrics[tags.EIG_MIN] = float(result.eigenvalues[0])
                    converged += padded_flags(result.converged, 1)
                    progress.report("smallest eigenvalue", hvps)

            if "trace" in self.quantities and not budget.spent():
                trace = hessian_trace(
                    operator,
                    method="auto",
                    rel_tol=self.trace_rel_tol,
                    max_probes=self.trace_max_probes,
                    seed=self.seed,
                    # the top eigenpairs just found carry most of Hutchinson's variance: their span's
                    # trace is their sum, the probes cover the rest
                    deflate_with=top_pairs,
                    backend=self.backend,
                )
                hvps += trace.hvp_count
                metrics[tags.TRACE] = float(trace.estimate)
                metrics[tags.TRACE_STDERR] = float(trace.stderr)
                progress.report("trace", hvps)

            if "density" in self.quantities and not budget.spent():
                density = spectral_density(
                    operator,
                    num_probes=self.density_probes,
                    lanczos_steps=min(self.density_steps, operator.num_params),
                    grid_size=self.density_grid,
                    sigma=self.density_sigma,
                    seed=self.seed,
                )
                hvps += density.hvp_count
                log_density(self, trainer, density, operator.num_params, top_values)
                progress.report("density", hvps)

        if "input_hessian" in self.quantities and not budget.spent():
            metrics[tags.INPUT_EIG_1], metrics[tags.INPUT_GRAD_NORM] = input_hessian_means(
                pl_module,
                samples,
                budget.all_reduce,
                batch_size=self.analysis_batch_size,
                tol=self.eig_tol,
                seed=self.seed,
            )
            progress.report("input Hessian", hvps)

        for layer, names in self._layer_params.items():
            if budget.spent():
                converged += [False] * self.layer_top_k
                continue
            layer_operator = sample_operator(pl_module, micro_batches, budget.all_reduce, names)
            init = self._layer_eigenvectors.get(layer)
            result = self._lanczos(layer_operator, self.layer_top_k, "largest", init, budget, progress.with_base(hvps))
            hvps += result.hvp_count
            metrics.update(
                {tags.layer_eigenvalue_tag(layer, i): float(v) for i, v in enumerate(result.eigenvalues, start=1)}
            )
            converged += padded_flags(result.converged, self.layer_top_k)
            if len(result.eigenvectors) == self.layer_top_k:
                self._layer_eigenvectors[layer] = [{n: t.detach() for n, t in v.items()} for v in result.eigenvectors]
            progress.report(f"layer {layer}", hvps)

        metrics[tags.HVPS] = float(hvps)
        metrics[tags.HESSIAN_SECONDS] = budget.elapsed()
        metrics[tags.CONVERGED] = float(sum(converged)) / len(converged) if converged else math.nan
        metrics[tags.BUDGET_EXHAUSTED] = float(budget.exhausted)
        if budget.exhausted:
            rank_zero_warn(
                f"HessianSpectrumCallback: time budget of {self.time_budget} s spent at epoch {trainer.current_epoch}"
                f" ({metrics[tags.HESSIAN_SECONDS]:.1f} s); quantities not reached are logged as NaN,"
                f" hessian/converged = {metrics[tags.CONVERGED]:.2f}."
            )
        self._log_layout(trainer)
        progress.done(hvps)
        self._last_metrics = metrics
        return metrics

    # ----------------------------------------------------------------------------------------
    # checkpointing

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["eigenvectors"] = vectors_to_cpu(self._eigenvectors)
        state["smallest_eigenvector"] = vectors_to_cpu(self._smallest_eigenvector)
        state["layer_eigenvectors"] = {k: vectors_to_cpu(v) for k, v in self._layer_eigenvectors.items()}
        state["analysed_step"] = self._analysed_step
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        eigenvectors = state_dict.pop("eigenvectors", None)
        smallest_eigenvector = state_dict.pop("smallest_eigenvector", None)
        layer_eigenvectors = state_dict.pop("layer_eigenvectors", {})
        self._analysed_step = state_dict.pop("analysed_step", -1)
        super().load_state_dict(state_dict)
        # moved to the model's device by the operator (``flatten``) at the next warm start
        self._eigenvectors = eigenvectors
        self._smallest_eigenvector = smallest_eigenvector
        self._layer_eigenvectors = dict(layer_eigenvectors)

    # ----------------------------------------------------------------------------------------
    # internals

    def _lanczos(
        self,
        operator: HessianOperator,
        k: int,
        which: str,
        init: list[dict[str, Tensor]] | None,
        budget: TimeBudget,
        progress: AnalysisProgress,
    ) -> EigenResult:
        """Lanczos with this callback's options (:func:`~.spectrum_engine.budgeted_top_eigenvalues`)."""
        return budgeted_top_eigenvalues(
            operator,
            k,
            which,
            budget=budget,
            progress=progress,
            init=init if self.warm_start else None,
            tol=self.eig_tol,
            max_iter=self.max_iter,
            seed=self.seed,
            block_size=self.lanczos_block_size,
            backend=self.backend,
        )

    def _log_layout(self, trainer: AnyTrainer) -> None:
        """Once per TensorBoard writer: a custom-scalars layout grouping the eigenvalue curves."""
        writer = self.tensorboard(trainer)
        if writer is None or id(writer) in self._layout_writers:
            return
        self._layout_writers.add(id(writer))
        writer.add_custom_scalars(spectrum_layout(self.quantities, per_layer=bool(self._layer_params)))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"HessianSpectrumCallback: `{name}` must be an integer >= {minimum}, got {value!r}.")
