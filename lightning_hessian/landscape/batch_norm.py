"""BatchNorm running statistics for weights the model was not trained at.

A point off a training trajectory, such as ``theta(alpha)`` between two models
(:mod:`~lightning_hessian.landscape.interpolation`), has no running statistics of its own.
Interpolating the two models' statistics is exact only at the end points; outside ``[0, 1]`` a
running variance can fall to zero (it is clamped there), and BatchNorm then divides by
``sqrt(eps)``: the loss explodes for a reason that has nothing to do with the weights.
:func:`recompute_batch_norm_statistics` gives a point the statistics of its own weights on data,
as stochastic weight averaging does (Izmailov et al. 2018, ``torch.optim.swa_utils.update_bn``)
and as mode-connectivity studies do along their paths (Garipov et al. 2018):

.. math::

    \\hat\\mu = \\frac{1}{T} \\sum_{t=1}^{T} \\mu_t, \\qquad
    \\hat\\sigma^2 = \\frac{1}{T} \\sum_{t=1}^{T} \\frac{m_t}{m_t - 1} \\sigma_t^2,

the cumulative averages (BatchNorm's ``momentum=None``) of the batch means and unbiased batch
variances of the ``T`` batches a forward pass in training mode normalises with: each batch given,
or each virtual batch of a Ghost BatchNorm layer
(:mod:`lightning_hessian.models.ghost_batch_norm`), as in training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_hessian.curvature.objective import BatchLoss, batch_loss

__all__ = ["has_running_statistics", "recompute_batch_norm_statistics"]


def _running_batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    ]


def has_running_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that normalises with running statistics in eval mode.

    Returns:
        ``True`` for any ``nn.BatchNorm1d/2d/3d`` (or subclass, e.g. Ghost BatchNorm) with
        ``track_running_stats``.
    """
    return bool(_running_batch_norms(model))


def recompute_batch_norm_statistics(model: nn.Module, batches: Iterable[Any], *, loss: BatchLoss | None = None) -> int:
    """Replace the running statistics of every BatchNorm layer of ``model`` by those of its
    current weights on ``batches`` (see the module docstring for the formula).

    Each batch goes through ``loss(model, batch)`` (default:
    :func:`~lightning_hessian.curvature.objective.batch_loss`, the module's ``hessian_loss`` hook
    or cross-entropy on ``(x, y)``), so any batch the analyses accept works, without gradients,
    with only the BatchNorm layers in training mode: dropout and every other layer stay as they
    are. The layers' ``momentum`` and modes are restored afterwards; ``num_batches_tracked``
    counts the batches averaged.

    Every batch (every virtual batch under Ghost BatchNorm) counts once in the averages, whatever
    its size, as in BatchNorm's own cumulative average: give batches of one size (drop a partial
    last one, as training does; a batch of one sample has no variance and BatchNorm refuses it).

    Args:
        model: the model, with the weights whose statistics are wanted.
        batches: the data, e.g. training samples in micro-batches of one size.
        loss: how a batch goes through the model.

    Returns:
        The number of BatchNorm layers updated (0: the model has none with running statistics).

    Raises:
        ValueError: ``batches`` is empty while the model has such layers.
    """
    layers = _running_batch_norms(model)
    if not layers:
        return 0
    saved = [(layer, layer.momentum, layer.training) for layer in layers]
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over all batches seen
            layer.train()
        seen = 0
        with torch.no_grad():
            for batch in batches:
                (loss or batch_loss)(model, batch)
                seen += 1
        if seen == 0:
            raise ValueError("recompute_batch_norm_statistics: no batches to compute the statistics on")
    finally:
        for layer, momentum, training in saved:
            layer.momentum = momentum
            layer.train(training)
    return len(layers)
