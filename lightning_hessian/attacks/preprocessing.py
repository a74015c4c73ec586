"""Attack a model fed normalised data in pixel space, like foolbox's ``preprocessing`` argument.

Attacks and their epsilons live in pixel space [0, 1]. When a data module normalises the images
(``x_n = (x - mean) / std`` per channel) and the model expects normalised inputs, the samples are
mapped back with :func:`to_pixel_space` and the model is wrapped in :class:`NormalizedInput`,
whose input is pixel space: ``NormalizedInput(model)(x) = model((x - mean) / std)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NormalizedInput", "to_pixel_space"]


def _channel_view(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    tensor = torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1)
    if tensor.numel() not in (1, like.shape[1]):
        raise ValueError(f"expected 1 or {like.shape[1]} per-channel values, got {tensor.numel()}")
    return tensor.view(1, -1, *([1] * (like.ndim - 2)))


def to_pixel_space(inputs: Tensor, mean: Sequence[float], std: Sequence[float], tolerance: float = 1e-4) -> Tensor:
    """``inputs * std + mean`` per channel (dim 1), clipped to [0, 1] where rounding left it.

    Returns:
        The pixel-space inputs, in [0, 1].

    Raises:
        ValueError: if the result leaves [0, 1] by more than ``tolerance``: ``mean``/``std`` do
            not describe the data module's normalisation.
    """
    pixels = inputs * _channel_view(std, inputs) + _channel_view(mean, inputs)
    low, high = pixels.min().item(), pixels.max().item()
    if low < -tolerance or high > 1 + tolerance:
        raise ValueError(
            f"un-normalised inputs lie in [{low:.4g}, {high:.4g}], not [0, 1]: mean={list(mean)}, std={list(std)} "
            "are not the data module's normalisation"
        )
    return pixels.clamp(0.0, 1.0)


class NormalizedInput(nn.Module):
    """``model`` with a pixel-space input: ``forward(x) = model((x - mean) / std)``."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.model = model
        self.mean = list(mean)
        self.std = list(std)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - _channel_view(self.mean, x)) / _channel_view(self.std, x))
