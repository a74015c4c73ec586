r"""
Hessian spectrum
^^^^^^^^^^^^^^^^

Log the spectrum of the loss Hessian of any LightningModule at epoch end: the top-k eigenvalues
:math:`\lambda_1 \ge \dots \ge \lambda_k` of :math:`H = \nabla^2_\theta L(\theta)` (Lanczos,
warm-started from last epoch's eigenvectors), the smallest eigenvalue, the trace
:math:`\operatorname{tr} H` (Hutch++), the spectral density (stochastic Lanczos quadrature), the
top eigenvalue of the Hessian with respect to the input and the input-gradient norm, and per-layer
spectra (the diagonal blocks of :math:`H` of selected modules).

:math:`L` is the mean loss over a fixed, seeded sample of the training (or validation) set that
stays on the device across epochs, so successive points of a curve compare like with like.

"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_hessian.callbacks.base import AnalysisSamples, EpochAnalysisCallback
from lightning_hessian.callbacks.packages import trainer_fn
from lightning_hessian.callbacks.stability import stability_limit
from lightning_hessian.curvature import (
    DensityResult,
    EigenResult,
    HessianOperator,
    LanczosProgress,
    hessian_trace,
    input_curvature,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.curvature.objective import BatchLoss, batch_loss, has_custom_loss, replace_inputs
from lightning_hessian.curvature.preconditioned import DiagonallyScaledOperator
from lightning_hessian.errors import UserInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BACKENDS", "QUANTITIES", "HessianSpectrumCallback", "density_histogram"]

#: The quantities :class:`HessianSpectrumCallback` can compute, in the order they are computed
#: (under a time budget, the earlier ones get the time first).
QUANTITIES: tuple[str, ...] = ("eigenvalues", "smallest_eigenvalue", "trace", "density", "input_hessian")
#: ``"native"``: this package's Lanczos/Hutch++/SLQ engine. ``"pyhessian"``: PyHessian's power
#: iteration and Hutchinson trace on the same samples, for comparison.
BACKENDS: tuple[str, ...] = ("native", "pyhessian")
# PyHessian 0.1 has no smallest eigenvalue, no input-space quantities, and its density calls
# ``torch.eig``, removed in torch 2.x.
_PYHESSIAN_QUANTITIES = ("eigenvalues", "trace")
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
    - ``hessian/trace``, ``hessian/trace_stderr``: Hutch++ trace estimate and its standard error.
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
        eig_tol: Lanczos stops when every wanted pair has ``||Hv - \lambda v|| \le`` ``eig_tol``
            times the largest Ritz magnitude (an estimate of ``||H||``).
        max_iter: cap on the Hessian-vector products of one Lanczos run (``None``: the engine's
            default, ``max(300, 50 k)``).
        lanczos_block_size: vectors per Lanczos step, pushed through one batched HVP pass; larger
            blocks spend more products but fewer passes over the samples, which pays on GPUs.
        trace_rel_tol: relative standard error at which Hutch++ stops.
        trace_max_probes: cap on Hutch++ probe vectors.
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

    metric_prefix = "hessian"

    def __init__(
        self,
        *,
        top_k: int = 1,
        quantities: Sequence[str] = ("eigenvalues",),
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        num_samples: int | None = 4096,
        split: str = "train",
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
            raise UserInputError(
                f"HessianSpectrumCallback: unknown backend {backend!r}; choose from {list(BACKENDS)}."
            )
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
        for name, value in (("eig_tol", eig_tol), ("trace_rel_tol", trace_rel_tol), ("progress_interval", progress_interval)):
            if not value > 0:
                raise UserInputError(f"HessianSpectrumCallback: `{name}` must be > 0, got {value}.")
        if density_sigma is not None and not density_sigma > 0:
            raise UserInputError(f"HessianSpectrumCallback: `density_sigma` must be > 0, got {density_sigma}.")
        if isinstance(layers, str):
            layers = [layers]

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

        self._eigenvectors: list[dict[str, Tensor]] | None = None
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
            names += [f"hessian/eig_{i}" for i in range(1, self.top_k + 1)]
            if self.stability:
                names += ["hessian/eig_1_x_lr", "hessian/stability", "hessian/preconditioned_eig_1"]
        if "smallest_eigenvalue" in self.quantities:
            names.append("hessian/eig_min")
        if "trace" in self.quantities:
            names += ["hessian/trace", "hessian/trace_stderr"]
        if "input_hessian" in self.quantities:
            names += ["hessian/input_eig_1", "hessian/input_grad_norm"]
        for layer in self._layer_params:
            names += [f"hessian/layer/{layer}/eig_{i}" for i in range(1, self.layer_top_k + 1)]
        return names + ["hessian/hvps", "hessian/seconds", "hessian/converged", "hessian/budget_exhausted"]

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def unavailable_metrics(self) -> dict[str, float]:
        return dict.fromkeys(self.metric_names, math.nan)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
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
            self._layer_params = _select_layers(pl_module, self.layers)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.analyse_on_train_end and trainer.global_step > 0 and trainer.global_step != self._analysed_step:
            self._run(trainer, pl_module)

    @override
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, samples: AnalysisSamples) -> dict[str, float]:
        budget = _Budget(self.time_budget, self.all_reduce_sum(trainer), pl_module.device)
        progress = _Progress(self.progress_interval, f"epoch {trainer.current_epoch}", budget.start)
        micro_batches = samples.micro_batches(self.analysis_batch_size)
        metrics = dict.fromkeys(self.metric_names, math.nan)
        operator = self._operator(pl_module, micro_batches, budget.all_reduce)

        loss = float(operator.loss())  # a NaN check on all ranks before any HVP is spent
        if not math.isfinite(loss):
            rank_zero_warn(
                f"HessianSpectrumCallback: the loss on the {samples.num_global} analysis samples is {loss}"
                f" at epoch {trainer.current_epoch}; logging NaN Hessian metrics, training goes on."
            )
            metrics.update({"hessian/hvps": 0.0, "hessian/seconds": budget.elapsed()})
            self._last_metrics = metrics
            return metrics

        hvps = 0
        converged: list[bool] = []
        top_values: list[float] = []

        if "eigenvalues" in self.quantities:
            # The headline number: with the budget already spent it still gets one Lanczos step
            # (a rough, unconverged estimate) rather than nothing.
            result = self._top_eigenvalues(operator, self.top_k, "largest", self._eigenvectors, budget, progress.with_base(hvps))
            hvps += result.hvp_count
            top_values = [float(v) for v in result.eigenvalues]
            metrics.update({f"hessian/eig_{i}": v for i, v in enumerate(top_values, start=1)})
            converged += _padded_flags(result.converged, self.top_k)
            if len(result.eigenvectors) == self.top_k:
                self._eigenvectors = [{n: t.detach() for n, t in v.items()} for v in result.eigenvectors]
            progress.report("top eigenvalues", hvps)
            if self.stability and top_values:
                hvps += self._stability(trainer, pl_module, operator, top_values[0], metrics, budget, progress.with_base(hvps))

        if "smallest_eigenvalue" in self.quantities:
            if budget.spent():
                converged.append(False)
            else:
                result = self._top_eigenvalues(operator, 1, "smallest", None, budget, progress.with_base(hvps))
                hvps += result.hvp_count
                metrics["hessian/eig_min"] = float(result.eigenvalues[0])
                converged += _padded_flags(result.converged, 1)
                progress.report("smallest eigenvalue", hvps)

        if "trace" in self.quantities and not budget.spent():
            trace = hessian_trace(
                operator,
                method="hutch++",
                rel_tol=self.trace_rel_tol,
                max_probes=self.trace_max_probes,
                seed=self.seed,
                backend=self.backend,
            )
            hvps += trace.hvp_count
            metrics["hessian/trace"] = float(trace.estimate)
            metrics["hessian/trace_stderr"] = float(trace.stderr)
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
            self._log_density(trainer, density, operator.num_params, top_values)
            progress.report("density", hvps)

        if "input_hessian" in self.quantities and not budget.spent():
            metrics["hessian/input_eig_1"], metrics["hessian/input_grad_norm"] = self._input_quantities(
                pl_module, samples, budget.all_reduce
            )
            progress.report("input Hessian", hvps)

        for layer, names in self._layer_params.items():
            if budget.spent():
                converged += [False] * self.layer_top_k
                continue
            layer_operator = self._operator(pl_module, micro_batches, budget.all_reduce, names)
            init = self._layer_eigenvectors.get(layer)
            result = self._top_eigenvalues(layer_operator, self.layer_top_k, "largest", init, budget, progress.with_base(hvps))
            hvps += result.hvp_count
            metrics.update({f"hessian/layer/{layer}/eig_{i}": float(v) for i, v in enumerate(result.eigenvalues, start=1)})
            converged += _padded_flags(result.converged, self.layer_top_k)
            if len(result.eigenvectors) == self.layer_top_k:
                self._layer_eigenvectors[layer] = [{n: t.detach() for n, t in v.items()} for v in result.eigenvectors]
            progress.report(f"layer {layer}", hvps)

        metrics["hessian/hvps"] = float(hvps)
        metrics["hessian/seconds"] = budget.elapsed()
        metrics["hessian/converged"] = float(sum(converged)) / len(converged) if converged else math.nan
        metrics["hessian/budget_exhausted"] = float(budget.exhausted)
        if budget.exhausted:
            rank_zero_warn(
                f"HessianSpectrumCallback: time budget of {self.time_budget} s spent at epoch {trainer.current_epoch}"
                f" ({metrics['hessian/seconds']:.1f} s); quantities not reached are logged as NaN,"
                f" hessian/converged = {metrics['hessian/converged']:.2f}."
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
        state["eigenvectors"] = _to_cpu(self._eigenvectors)
        state["layer_eigenvectors"] = {k: _to_cpu(v) for k, v in self._layer_eigenvectors.items()}
        state["analysed_step"] = self._analysed_step
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        eigenvectors = state_dict.pop("eigenvectors", None)
        layer_eigenvectors = state_dict.pop("layer_eigenvectors", {})
        self._analysed_step = state_dict.pop("analysed_step", -1)
        super().load_state_dict(state_dict)
        # moved to the model's device by the operator (``flatten``) at the next warm start
        self._eigenvectors = eigenvectors
        self._layer_eigenvectors = dict(layer_eigenvectors)

    # ----------------------------------------------------------------------------------------
    # engine calls

    def _operator(
        self,
        pl_module: pl.LightningModule,
        micro_batches: list[Any],
        all_reduce: Callable[[Tensor], Tensor] | None,
        param_names: Sequence[str] | None = None,
    ) -> HessianOperator:
        selected = None if param_names is None else set(param_names)
        return HessianOperator(
            pl_module,
            loss_fn=None,
            batches=micro_batches,
            batch_loss=batch_loss,
            param_filter=None if selected is None else (lambda name, _param: name in selected),
            all_reduce=all_reduce,
        )

    def _stability(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        operator: HessianOperator,
        top_eigenvalue: float,
        metrics: dict[str, float],
        budget: _Budget,
        progress: _Progress,
    ) -> int:
        """Fill the stability metrics from the live optimizer; returns the products spent."""
        if trainer_fn(trainer) != "fit" or not trainer.optimizers:
            return 0
        named = dict(pl_module.named_parameters())
        limit = stability_limit(trainer.optimizers[0], [named[n] for n in operator.param_names])
        if limit is None:
            return 0
        metrics["hessian/eig_1_x_lr"] = top_eigenvalue * limit.lr
        if limit.preconditioner is None:
            metrics["hessian/stability"] = top_eigenvalue * limit.lr / limit.threshold
            return 0
        scaled = DiagonallyScaledOperator(operator, limit.preconditioner.rsqrt())
        result = self._top_eigenvalues(scaled, 1, "largest", None, budget, progress)  # type: ignore[arg-type]
        metrics["hessian/preconditioned_eig_1"] = float(result.eigenvalues[0])
        metrics["hessian/stability"] = float(result.eigenvalues[0]) * limit.lr / limit.threshold
        return result.hvp_count

    def _top_eigenvalues(
        self,
        operator: HessianOperator,
        k: int,
        which: str,
        init: list[dict[str, Tensor]] | None,
        budget: _Budget,
        progress: _Progress,
    ) -> EigenResult:
        time_budget, max_iter = budget.lanczos_limits(self.max_iter)
        result = top_eigenvalues(
            operator,
            k=min(k, operator.num_params),
            which=which,
            tol=self.eig_tol,
            max_iter=max_iter,
            init=_warm_start(init, operator) if self.warm_start else None,
            seed=self.seed,
            time_budget=time_budget,
            callback=progress.lanczos_callback(which),
            block_size=self.lanczos_block_size,
            backend=self.backend,
        )
        budget.note_lanczos(result)
        return result

    def _input_quantities(
        self, pl_module: pl.LightningModule, samples: AnalysisSamples, all_reduce: Callable[[Tensor], Tensor] | None
    ) -> tuple[float, float]:
        """Means over all analysis samples (all ranks) of the per-sample top eigenvalue of the
        input Hessian and of the per-sample input-gradient norm: local sums, one all-reduce."""
        inputs, targets = samples.inputs_and_targets(pl_module, "HessianSpectrumCallback's input_hessian quantity")
        loss: BatchLoss = batch_loss
        if has_custom_loss(pl_module):
            # hessian_loss sees the user's batch structure, restricted to the rows being
            # differentiated and with the perturbed inputs put in place of the originals
            rebuild = replace_inputs(pl_module, samples.batch)
            targets = torch.arange(samples.num_local, device=inputs.device)

            def loss(module: torch.nn.Module, pair: Any) -> Tensor:
                return batch_loss(module, rebuild(pair[0], pair[1]))

        curvature = input_curvature(
            pl_module,
            None,
            inputs,
            targets,
            batch_loss=loss,
            batch_size=self.analysis_batch_size,
            tol=self.eig_tol,
            seed=self.seed,
        )
        totals = torch.tensor(
            [float(curvature.largest.eigenvalues.sum()), float(curvature.gradient_norms.sum()), samples.num_local],
            dtype=torch.float64,
            device=pl_module.device,
        )
        if all_reduce is not None:
            totals = all_reduce(totals)
        return float(totals[0] / totals[2]), float(totals[1] / totals[2])

    # ----------------------------------------------------------------------------------------
    # TensorBoard extras

    def _log_density(self, trainer: pl.Trainer, density: DensityResult, num_params: int, top_values: list[float]) -> None:
        """Spectral density as a TensorBoard histogram (counts = numbers of eigenvalues) and a figure."""
        if trainer.global_rank != 0:
            return
        grid = torch.as_tensor(density.grid, dtype=torch.float64).cpu()
        values = torch.as_tensor(density.density, dtype=torch.float64).cpu()
        writer = self.tensorboard(trainer)
        if writer is not None:
            histogram = density_histogram(grid, values, num_params)
            writer.add_histogram_raw("hessian/density", global_step=self.log_step(trainer), **histogram)
        self.log_figure(trainer, "hessian/density_plot", _density_figure(grid, values, top_values, trainer.current_epoch))

    def _log_layout(self, trainer: pl.Trainer) -> None:
        """Once per TensorBoard writer: a custom-scalars layout grouping the eigenvalue curves."""
        writer = self.tensorboard(trainer)
        if writer is None or id(writer) in self._layout_writers:
            return
        self._layout_writers.add(id(writer))
        charts: dict[str, list[Any]] = {}
        if "eigenvalues" in self.quantities or "smallest_eigenvalue" in self.quantities:
            charts["eigenvalues"] = ["Multiline", [r"hessian/eig_\d+$", "hessian/eig_min"]]
        if "trace" in self.quantities:
            charts["trace"] = ["Multiline", ["hessian/trace"]]
        if "input_hessian" in self.quantities:
            charts["input space"] = ["Multiline", ["hessian/input_eig_1", "hessian/input_grad_norm"]]
        if self._layer_params:
            charts["per-layer top eigenvalue"] = ["Multiline", [r"hessian/layer/.*/eig_1$"]]
        charts["cost"] = ["Multiline", ["hessian/hvps", "hessian/seconds"]]
        writer.add_custom_scalars({"hessian spectrum": charts})


# --------------------------------------------------------------------------------------------
# helpers


def density_histogram(grid: Tensor, density: Tensor, num_params: int) -> dict[str, Any]:
    r"""Arguments of ``SummaryWriter.add_histogram_raw`` for a spectral density on a uniform grid.

    Bucket :math:`i` covers :math:`(g_i - \Delta/2, g_i + \Delta/2]` and counts
    :math:`n \rho(g_i) \Delta / \sum_j \rho(g_j) \Delta` eigenvalues (:math:`n` = number of
    parameters), so the counts sum to :math:`n` and ``sum`` is the trace of the smoothed density.
    """
    grid = grid.double()
    density = density.double().clamp_min(0.0)
    spacing = (grid[-1] - grid[0]) / max(len(grid) - 1, 1)
    mass = density / density.sum() if density.sum() > 0 else torch.full_like(density, 1.0 / len(density))
    counts = mass * num_params
    return {
        "min": float(grid[0] - spacing / 2),
        "max": float(grid[-1] + spacing / 2),
        "num": int(num_params),
        "sum": float((counts * grid).sum()),
        "sum_squares": float((counts * grid.square()).sum()),
        "bucket_limits": (grid + spacing / 2).tolist(),
        "bucket_counts": counts.tolist(),
    }


def _density_figure(grid: Tensor, density: Tensor, top_values: list[float], epoch: int) -> Figure:
    """A log-scale plot of the density (matplotlib ``Figure`` without pyplot: no global state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.add_subplot()
    floor = 1e-8
    axes.semilogy(grid.numpy(), density.clamp_min(floor).numpy(), color="C0")
    for value in top_values:
        axes.axvline(value, color="C3", linestyle=":", linewidth=0.8)
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density")
    axes.set_title(f"Hessian spectral density, epoch {epoch}")
    figure.tight_layout()
    return figure


def _select_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """Module name -> names of its trainable parameters, for every module matching a pattern.

    Modules without trainable parameters of their own subtree are skipped; a pattern matching
    none raises, listing the module names that have trainable parameters.
    """
    selected: dict[str, list[str]] = {}
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        params = [f"{name}.{p_name}" for p_name, p in module.named_parameters() if p.requires_grad]
        if not params:
            continue
        candidates.append(name)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            selected[name] = params
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in selected)]
    if unmatched:
        raise UserInputError(
            f"HessianSpectrumCallback: `layers` patterns {unmatched} match no module with trainable parameters;"
            f" valid module names: {candidates}."
        )
    return selected


def _warm_start(vectors: list[dict[str, Tensor]] | None, operator: HessianOperator) -> list[dict[str, Tensor]] | None:
    """Last analysis's eigenvectors as a Lanczos start, or ``None`` when they do not fit the
    operator (the set of trainable parameters or their shapes changed: start cold)."""
    if not vectors:
        return None
    shapes = dict(zip(operator.param_names, operator.param_shapes))
    for vector in vectors:
        if set(vector) != set(shapes) or any(vector[n].shape != shapes[n] for n in shapes):
            return None
    return vectors


def _to_cpu(vectors: list[dict[str, Tensor]] | None) -> list[dict[str, Tensor]] | None:
    if vectors is None:
        return None
    return [{n: t.detach().cpu().clone() for n, t in v.items()} for v in vectors]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserInputError(f"HessianSpectrumCallback: `{name}` must be an integer >= {minimum}, got {value!r}.")


def _padded_flags(flags: Tensor, count: int) -> list[bool]:
    """Convergence flags of ``count`` requested pairs: those Lanczos did not reach count as False."""
    values = [bool(f) for f in flags]
    return values + [False] * (count - len(values))


class _Budget:
    """The analysis' time budget, with decisions every DDP rank agrees on.

    Ranks read their own clocks; if one rank skipped a quantity that another computes, the next
    all-reduce would hang. :meth:`spent` therefore sums the ranks' out-of-time flags (one tiny
    all-reduce), and under DDP Lanczos gets no wall-clock limit of its own (its per-rank check could
    stop the ranks at different steps); there the budget acts between quantities.
    """

    def __init__(self, seconds: float | None, all_reduce: Callable[[Tensor], Tensor] | None, device: torch.device) -> None:
        self.seconds = seconds
        self.all_reduce = all_reduce
        self.device = device  # where collectives run: the model's device (NCCL needs CUDA tensors)
        self.start = time.perf_counter()
        self.exhausted = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """Whether the budget is used up on any rank (then on all: the answer is collective)."""
        if self.seconds is None:
            return False
        if not self.exhausted:
            flag = torch.tensor([float(self.elapsed() >= self.seconds)], dtype=torch.float64)
            if self.all_reduce is not None:
                flag = self.all_reduce(flag.to(self.device)).cpu()
            self.exhausted = bool(flag.item() > 0)
        return self.exhausted

    def lanczos_limits(self, max_iter: int | None) -> tuple[float | None, int | None]:
        """``(time_budget, max_iter)`` for one Lanczos run: the time left (single process), or one
        step once the budget is spent."""
        if self.seconds is None:
            return None, max_iter
        if self.spent():
            return None, 1
        if self.all_reduce is not None:
            return None, max_iter
        return max(self.seconds - self.elapsed(), 0.0), max_iter

    def note_lanczos(self, result: EigenResult) -> None:
        """A Lanczos run stopped by the clock counts as the budget spent (single process only:
        under DDP Lanczos has no clock and the flag must stay collective)."""
        if self.seconds is not None and self.all_reduce is None and not bool(result.converged.all()) and self.elapsed() >= self.seconds:
            self.exhausted = True


class _Progress:
    """Periodic log lines (stage, HVPs done, seconds) during a long analysis, from rank zero."""

    def __init__(self, interval: float, label: str, start: float) -> None:
        self.interval = interval
        self.label = label
        self.start = start
        self.last = start
        self.base_hvps = 0

    def with_base(self, hvps: int) -> _Progress:
        """Count the products of the next engine call on top of ``hvps`` done before it."""
        self.base_hvps = hvps
        return self

    def report(self, stage: str, hvps: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last = now
            rank_zero_info(f"HessianSpectrumCallback {self.label}: {stage}; {hvps} HVPs, {now - self.start:.1f} s")

    def lanczos_callback(self, which: str) -> Callable[[LanczosProgress], None]:
        def on_step(state: LanczosProgress) -> None:
            values = ", ".join(f"{float(v):.4g}" for v in state.eigenvalues[:3])
            self.report(
                f"Lanczos ({which}), {state.num_converged} converged, Ritz values [{values}]",
                self.base_hvps + state.hvp_count,
            )

        return on_step

    def done(self, hvps: int) -> None:
        if time.perf_counter() - self.start >= self.interval:
            self.report("done", hvps, force=True)
