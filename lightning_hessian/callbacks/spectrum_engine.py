"""How :class:`~lightning_hessian.callbacks.spectrum.HessianSpectrumCallback` calls the curvature engine.

One function per kind of engine call, each on the callback's fixed analysis sample:

* :func:`sample_operator`: the Hessian of the module's loss
  (:func:`~lightning_hessian.curvature.objective.batch_loss`) over the sample, optionally restricted to
  some parameters (per-layer spectra);
* :func:`budgeted_top_eigenvalues`: Lanczos within the analysis'
  :class:`~lightning_hessian.callbacks.budget.TimeBudget`, warm-started when the previous eigenvectors
  still fit;
* :func:`stability_metrics`: the optimizer's stability ratio (:mod:`lightning_hessian.callbacks.stability`);
* :func:`input_hessian_means`: the input-space quantities, averaged over all ranks' samples;
* :func:`select_layers`: which parameters a ``layers`` pattern selects.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_hessian import metrics as tags
from lightning_hessian.callbacks.base import AnalysisSamples
from lightning_hessian.callbacks.budget import TimeBudget
from lightning_hessian.callbacks.packages import trainer_fn
from lightning_hessian.callbacks.progress import AnalysisProgress
from lightning_hessian.callbacks.stability import stability_limit
from lightning_hessian.curvature import EigenResult, HessianOperator, input_curvature, top_eigenvalues
from lightning_hessian.curvature.objective import BatchLoss, batch_loss, has_custom_loss, replace_inputs
from lightning_hessian.curvature.preconditioned import DiagonallyScaledOperator
from lightning_hessian.errors import UserInputError

if TYPE_CHECKING:
    from lightning_hessian.callbacks.packages import AnyLightningModule, AnyTrainer

__all__ = [
    "budgeted_top_eigenvalues",
    "input_hessian_means",
    "padded_flags",
    "sample_operator",
    "select_layers",
    "stability_metrics",
    "vectors_to_cpu",
    "warm_start",
]

#: An eigenvector as the callbacks keep it: parameter name -> tensor of that parameter's shape.
Eigenvector = dict[str, Tensor]


def sample_operator(
    pl_module: nn.Module,
    micro_batches: list[Any],
    all_reduce: Callable[[Tensor], Tensor] | None,
    param_names: Sequence[str] | None = None,
) -> HessianOperator:
    """The Hessian of ``batch_loss(pl_module, batch)`` averaged over ``micro_batches`` (and ranks).

    Args:
        pl_module: the (unwrapped) module.
        micro_batches: the analysis sample, cut into micro-batches.
        all_reduce: sums a tensor over the processes (``None``: one process).
        param_names: restrict the Hessian to these parameters (a diagonal block); ``None``: all
            trainable parameters.

    Returns:
        The operator (nothing is computed yet).
    """
    selected = None if param_names is None else set(param_names)
    return HessianOperator(
        pl_module,
        loss_fn=None,
        batches=micro_batches,
        batch_loss=batch_loss,
        param_filter=None if selected is None else (lambda name, _param: name in selected),
        all_reduce=all_reduce,
    )


def budgeted_top_eigenvalues(
    operator: HessianOperator,
    k: int,
    which: str,
    *,
    budget: TimeBudget,
    progress: AnalysisProgress,
    init: list[Eigenvector] | None = None,
    tol: float,
    max_iter: int | None,
    seed: int,
    block_size: int,
    backend: str,
) -> EigenResult:
    """Lanczos (:func:`~lightning_hessian.curvature.top_eigenvalues`) within the time budget.

    With time left, Lanczos gets it as its own ``time_budget`` (one process; under DDP the budget
    acts between calls only). Once the budget is spent it still gets one step, a rough estimate,
    flagged unconverged. A run the clock stopped marks the budget spent.

    Args:
        operator: the Hessian.
        k: eigenpairs wanted (capped at the operator's size).
        which: ``"largest"`` or ``"smallest"``.
        budget: the analysis' time budget.
        progress: reports the Lanczos steps.
        init: start vectors (the last analysis's eigenvectors); ignored when they do not fit
            ``operator`` (:func:`warm_start`).
        tol, max_iter, seed, block_size, backend: as for :func:`~lightning_hessian.curvature.top_eigenvalues`.

    Returns:
        The engine's result.
    """
    time_budget: float | None = None
    if budget.seconds is not None:
        if budget.spent():
            max_iter = 1
        else:
            time_budget = budget.local_remaining()
    result = top_eigenvalues(
        operator,
        k=min(k, operator.num_params),
        which=which,
        tol=tol,
        max_iter=max_iter,
        init=warm_start(init, operator),
        seed=seed,
        time_budget=time_budget,
        callback=progress.lanczos_callback(which),
        block_size=block_size,
        backend=backend,
    )
    if not bool(result.converged.all()):
        budget.note_stopped_early()
    return result


def stability_metrics(
    trainer: AnyTrainer,
    pl_module: AnyLightningModule,
    operator: HessianOperator,
    top_eigenvalue: float,
    lanczos: Callable[[HessianOperator], EigenResult],
) -> tuple[dict[str, float], int]:
    """The stability metrics of the live optimizer (during ``fit`` only) and the products spent.

    For SGD: ``eig_1 * lr`` and its ratio to the quadratic stability limit. For Adam: the top
    eigenvalue of the preconditioned Hessian ``P^-1/2 H P^-1/2`` (one more ``lanczos`` call) and
    its ratio. Nothing for other optimizers, or outside ``fit``.

    Args:
        trainer: the trainer (its first optimizer is read).
        pl_module: the module whose parameters ``operator`` covers.
        operator: the Hessian.
        top_eigenvalue: its top eigenvalue.
        lanczos: computes the top eigenpair of an operator (the callback's budgeted Lanczos).

    Returns:
        ``(metrics, hvps)``: the metrics (empty when there are none) and the Hessian-vector
        products spent on them.
    """
    if trainer_fn(trainer) != "fit" or not trainer.optimizers:
        return {}, 0
    named = dict(pl_module.named_parameters())
    limit = stability_limit(trainer.optimizers[0], [named[n] for n in operator.param_names])
    if limit is None:
        return {}, 0
    metrics = {tags.EIG_1_X_LR: top_eigenvalue * limit.lr}
    if limit.preconditioner is None:
        metrics[tags.STABILITY] = top_eigenvalue * limit.lr / limit.threshold
        return metrics, 0
    scaled = DiagonallyScaledOperator(operator, limit.preconditioner.rsqrt())
    result = lanczos(scaled)  # type: ignore[arg-type]
    metrics[tags.PRECONDITIONED_EIG_1] = float(result.eigenvalues[0])
    metrics[tags.STABILITY] = float(result.eigenvalues[0]) * limit.lr / limit.threshold
    return metrics, result.hvp_count


def input_hessian_means(
    pl_module: AnyLightningModule,
    samples: AnalysisSamples,
    all_reduce: Callable[[Tensor], Tensor] | None,
    *,
    batch_size: int,
    tol: float,
    seed: int,
) -> tuple[float, float]:
    """Means over all analysis samples (all ranks) of the per-sample top eigenvalue of the input
    Hessian and of the per-sample input-gradient norm: local sums, one all-reduce.

    A module with its own ``hessian_loss`` sees its own batch structure, restricted to the rows
    being differentiated and with the perturbed inputs put in place of the originals.

    Returns:
        ``(mean top input-Hessian eigenvalue, mean input-gradient norm)``.
    """
    inputs, targets = samples.inputs_and_targets(pl_module, "HessianSpectrumCallback's input_hessian quantity")
    loss: BatchLoss = batch_loss
    if has_custom_loss(pl_module):
        rebuild = replace_inputs(pl_module, samples.batch)
        targets = torch.arange(samples.num_local, device=inputs.device)

        def loss(module: torch.nn.Module, pair: Any) -> Tensor:
            return batch_loss(module, rebuild(pair[0], pair[1]))

    curvature = input_curvature(
        pl_module, None, inputs, targets, batch_loss=loss, batch_size=batch_size, tol=tol, seed=seed
    )
    totals = torch.tensor(
        [float(curvature.largest.eigenvalues.sum()), float(curvature.gradient_norms.sum()), samples.num_local],
        dtype=torch.float64,
        device=pl_module.device,
    )
    if all_reduce is not None:
        totals = all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def select_layers(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """Module name -> names of its trainable parameters, for every module matching a pattern.

    Modules without trainable parameters in their subtree are skipped.

    Args:
        model: the module whose submodules are matched (by their ``named_modules`` names).
        patterns: module names or ``fnmatch`` patterns (``"layer1.*"``).

    Returns:
        The matched modules' names, each with its trainable parameters' full names.

    Raises:
        UserInputError: a pattern matches no module; the message lists the module names that
            have trainable parameters.
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


def warm_start(vectors: list[Eigenvector] | None, operator: HessianOperator) -> list[Eigenvector] | None:
    """The last analysis's eigenvectors as a Lanczos start, or ``None`` when there are none or they
    do not fit the operator (the set of trainable parameters or their shapes changed: start cold).

    Returns:
        ``vectors`` itself, or ``None``.
    """
    if not vectors:
        return None
    shapes = dict(zip(operator.param_names, operator.param_shapes, strict=True))
    for vector in vectors:
        if set(vector) != set(shapes) or any(vector[n].shape != shapes[n] for n in shapes):
            return None
    return vectors


def vectors_to_cpu(vectors: list[Eigenvector] | None) -> list[Eigenvector] | None:
    """Detached CPU copies (for checkpoints)."""
    if vectors is None:
        return None
    return [{n: t.detach().cpu().clone() for n, t in v.items()} for v in vectors]


def padded_flags(flags: Tensor, count: int) -> list[bool]:
    """Convergence flags of ``count`` requested pairs: those Lanczos did not reach count as False."""
    values = [bool(f) for f in flags]
    return values + [False] * (count - len(values))
