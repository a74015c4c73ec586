"""Ghost BatchNorm (Hoffer et al. 2017, "Train longer, generalize better"): BatchNorm statistics
over fixed-size slices ("virtual batches") of the batch.

In training mode a batch of ``N`` samples is cut along dim 0 into consecutive chunks of
``v = virtual_batch_size`` samples, ``x = [x_1; ...; x_K]``, and every chunk is normalised with
its own statistics, as plain BatchNorm would normalise it as a batch of its own:

.. math::

    y_k = \\gamma \\odot \\frac{x_k - \\mu_k}{\\sqrt{\\sigma_k^2 + \\epsilon}} + \\beta, \\qquad
    \\mu_k = \\operatorname{mean}(x_k), \\quad \\sigma_k^2 = \\operatorname{var}_{\\text{biased}}(x_k),

per channel, the mean and variance over the chunk's ``v`` samples (and all spatial positions:
``m = v * H * W`` values per channel for images). So a step at ``B = 8192`` on one device sees the
statistics of ``B / 128`` batches of 128, as when the authors of Yao et al. (2018) accumulate
128-sample micro-batches, without 64 accumulation steps.

**Exactly as accumulation.** Forward output, gradients and running statistics equal those of
feeding the chunks ``x_1, ..., x_K`` one after the other, as separate micro-batches, through a
plain ``nn.BatchNorm`` in training mode (with the mean loss of the whole batch, i.e. the sum of
the micro-batch gradients of the micro-batch mean losses weighted by ``|x_k| / N``):

* output ``y = [y_1; ...; y_K]``; the gradients of ``gamma`` and ``beta`` are the sums over the
  chunks (the layer's parameters are shared by all chunks);
* one running-statistics update per chunk, in batch order, with the module's ``momentum``:
  ``r <- (1 - m) r + m s_k`` for ``k = 1 .. K``, with ``s_k = mu_k`` for ``running_mean`` and the
  *unbiased* variance ``s_k = sigma_k^2 m_k / (m_k - 1)`` for ``running_var`` (``m_k`` values per
  channel in chunk ``k``), as ``nn.BatchNorm`` does. In closed form (what is computed: one update
  of the buffers, not ``K``)

  .. math::

      r_K = (1 - m)^K r_0 + \\sum_{k=1}^{K} m (1 - m)^{K - k} s_k;

  with ``momentum=None`` (BatchNorm's cumulative moving average, factor ``1 / t`` at its ``t``-th
  update) ``r_{T+K} = (T r_T + \\sum_k s_k) / (T + K)``, ``T`` = ``num_batches_tracked`` before;
* ``num_batches_tracked`` grows by ``K``, the number of chunks (one per micro-batch).

The chunk statistics ``mu_k`` and the unbiased variances come from BatchNorm's own kernel (the same
call that normalises, with scratch buffers updated at momentum 1). The closed form equals the ``K``
sequential updates in exact arithmetic; in floating point the two differ by rounding (about
``1e-7`` relative in float32, ``1e-16`` in float64). The outputs (hence the training trajectory) do
not depend on the running statistics.

Cost: one BatchNorm call for the full chunks (chunk ``k``'s channel ``c`` becomes channel
``k C + c`` of a batch of ``v`` samples), plus a copy of the input and of the output for that
layout (and of their gradients): about twice a plain BatchNorm layer, e.g. +20% for a whole
``lenet5`` step at ``B = 16384`` on a CPU, instead of ``B / v`` sequential micro-batches.

**A batch that is not a multiple of ``v``**: the last chunk is smaller (``N mod v`` samples), as
the last micro-batch of an accumulation would be. It gets its own statistics and running-statistics
update, last. A batch of at most ``v`` samples is one chunk: plain BatchNorm, bit for bit. A last
chunk of one value per channel (``BatchNorm1d`` on ``(N, C)`` with ``N mod v == 1``) is refused by
BatchNorm's own check, as a one-sample micro-batch would be. (``hessian-train``'s training loader
drops the incomplete last batch of an epoch, so every training batch is the full per-device batch.)

**Evaluation** (eval mode with running statistics) is plain BatchNorm: the running statistics are
used, whatever the batch size, so the Hessian analyses and attacks, which run in eval mode, are
unchanged. The parameters and buffers are those of ``nn.BatchNorm1d``/``2d`` (same
``state_dict`` keys, shapes and dtypes): checkpoints load into either. Under DDP the chunks are
cut from each device's own batch (per-device batch ``B / devices``). Not combined with
``SyncBatchNorm`` (which normalises over all devices, the opposite).

:func:`convert_to_ghost_batch_norm` swaps the ``nn.BatchNorm1d``/``2d`` layers of a built network
for these modules, keeping their parameters, buffers and settings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.errors import UserInputError

__all__ = [
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "check_virtual_batch_size",
    "convert_to_ghost_batch_norm",
]


def check_virtual_batch_size(virtual_batch_size: Any, name: str = "bn_virtual_batch_size") -> int:
    """Return ``virtual_batch_size`` as an ``int`` if it is a positive integer.

    Raises:
        UserInputError: anything else (naming the value and the fix).
    """
    valid = isinstance(virtual_batch_size, int) and not isinstance(virtual_batch_size, bool)
    if not valid or virtual_batch_size < 1:
        raise UserInputError(
            f"{name} must be a positive integer (samples per BatchNorm statistics group, e.g. 128 for the "
            f"authors' 128-sample micro-batches), got {virtual_batch_size!r}; or leave it unset (null) for "
            "BatchNorm over the whole per-device batch"
        )
    return int(virtual_batch_size)


class _GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The shared implementation of :class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d` (see
    the module docstring for the maths)."""

    virtual_batch_size: int

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size, "virtual_batch_size")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        uses_batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_statistics or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)  # plain BatchNorm: eval mode, or a single chunk

        size = self.virtual_batch_size
        full, rest = divmod(input.shape[0], size)
        channels = input.shape[1]
        tail = tuple(input.shape[2:])
        track = self.training and self.track_running_stats and self.running_mean is not None
        # The full chunks in one BatchNorm call: chunk k's channel c becomes channel k*C + c of a
        # batch of `size` samples, so BatchNorm's per-channel statistics are the per-chunk ones.
        head = (
            input[: full * size]
            .reshape(full, size, channels, *tail)
            .transpose(0, 1)
            .reshape(size, full * channels, *tail)
        )
        weight = self.weight.repeat(full) if self.weight is not None else None
        bias = self.bias.repeat(full) if self.bias is not None else None
        # Scratch running statistics updated with momentum 1 (r <- 0 r + 1 s = s) receive each
        # chunk's mean and unbiased variance from BatchNorm's own kernel, in the same pass.
        means, variances = self._scratch(full * channels) if track else (None, None)
        out = F.batch_norm(head, means, variances, weight, bias, True, 1.0, self.eps)
        out = out.reshape(size, full, channels, *tail).transpose(0, 1).reshape(full * size, channels, *tail)
        if rest:
            last_means, last_variances = self._scratch(channels) if track else (None, None)
            last = F.batch_norm(
                input[full * size :], last_means, last_variances, self.weight, self.bias, True, 1.0, self.eps
            )
            out = torch.cat([out, last])
            # (the scratch statistics are tensors exactly when `track`)
            if means is not None and variances is not None and last_means is not None and last_variances is not None:
                means, variances = torch.cat([means, last_means]), torch.cat([variances, last_variances])
        if means is not None and variances is not None:  # track
            self._update_running_statistics(means.view(-1, channels), variances.view(-1, channels))
        return out

    def _scratch(self, size: int) -> tuple[Tensor, Tensor]:
        assert self.running_mean is not None
        like = self.running_mean
        return torch.zeros(size, dtype=like.dtype, device=like.device), torch.ones(
            size, dtype=like.dtype, device=like.device
        )

    @torch.no_grad()
    def _update_running_statistics(self, means: Tensor, variances: Tensor) -> None:
        """The sequential BatchNorm updates with the chunks' means and unbiased variances (rows of
        ``means``/``variances``, in batch order), in closed form (module docstring)."""
        assert self.running_mean is not None and self.running_var is not None
        count = means.shape[0]
        dtype = torch.promote_types(means.dtype, torch.float32)
        if self.momentum is None:  # cumulative moving average over all updates so far
            tracked = float(self.num_batches_tracked) if self.num_batches_tracked is not None else 0.0
            keep = tracked / (tracked + count)
            weights = torch.full((count, 1), 1.0 / (tracked + count), dtype=dtype, device=means.device)
        else:
            momentum = float(self.momentum)
            keep = (1.0 - momentum) ** count
            powers = torch.arange(count - 1, -1, -1, dtype=dtype, device=means.device)
            weights = (momentum * (1.0 - momentum) ** powers)[:, None]
        new_mean = keep * self.running_mean.to(dtype) + (weights * means.to(dtype)).sum(0)
        new_var = keep * self.running_var.to(dtype) + (weights * variances.to(dtype)).sum(0)
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(count)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (inputs ``(N, C)`` or ``(N, C, L)``) with statistics per
    ``virtual_batch_size`` samples in training (see the module docstring)."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (inputs ``(N, C, H, W)``) with statistics per ``virtual_batch_size``
    samples in training (see the module docstring)."""


_GHOST_OF: dict[type[nn.Module], type[_GhostBatchNorm]] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
}


def _ghost_copy(module: nn.modules.batchnorm._BatchNorm, virtual_batch_size: int) -> _GhostBatchNorm:
    reference = module.running_mean if module.running_mean is not None else module.weight
    # recent torch: BatchNorm may be affine without a shift (`bias=False`)
    extra: dict[str, Any] = {"bias": False} if module.affine and module.bias is None else {}
    ghost = _GHOST_OF[type(module)](
        module.num_features,
        virtual_batch_size,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None else None,
        **extra,
    )
    ghost.load_state_dict(module.state_dict())
    for name, parameter in module.named_parameters(recurse=False):
        getattr(ghost, name).requires_grad_(parameter.requires_grad)
    ghost.train(module.training)
    return ghost


def convert_to_ghost_batch_norm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` by a
    :class:`GhostBatchNorm1d`/:class:`GhostBatchNorm2d` with statistics per
    ``virtual_batch_size`` samples, carrying over parameters, buffers, ``eps``, ``momentum``,
    ``affine``, ``track_running_stats`` and the train/eval mode.

    Exactly these two classes are replaced (not their subclasses such as ``SyncBatchNorm``; a
    Ghost BatchNorm already there gets the new virtual batch size). The children are replaced in
    place. A ``virtual_batch_size`` that is not a positive integer raises
    :class:`~lightning_hessian.errors.UserInputError` (:func:`check_virtual_batch_size`).

    Returns:
        ``module``, or its replacement if ``module`` is itself a BatchNorm layer.
    """
    size = check_virtual_batch_size(virtual_batch_size)
    if isinstance(module, _GhostBatchNorm):
        module.virtual_batch_size = size
        return module
    # exactly nn.BatchNorm1d/2d (the isinstance, always true then, tells the type checker so)
    if type(module) in _GHOST_OF and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _ghost_copy(module, size)
    for name, child in module.named_children():
        replacement = convert_to_ghost_batch_norm(child, size)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
