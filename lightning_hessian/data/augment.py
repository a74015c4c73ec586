"""Batched data augmentation on whatever device the batch is on (CPU or GPU).

Per-sample random translations (zero padding + random crop, as in the standard CIFAR recipe)
and horizontal flips are drawn for the whole batch at once and applied with one gather, so a
GPU-resident dataset is augmented without leaving the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(images: Tensor, *, padding: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Randomly translate each image by up to ``padding`` pixels (zero fill) and flip it
    horizontally with probability 1/2.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` applied
    per sample.

    Args:
        images: batch ``(N, C, H, W)``.
        padding: maximal shift in pixels; 0 disables the crop.
        flip: whether to flip.
        generator: random generator on ``images.device`` (default: the global one).

    Returns:
        The augmented batch, of the shape of ``images`` (``images`` itself when nothing is enabled).
    """
    n, c, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        top = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
        left = torch.randint(0, 2 * padding + 1, (n,), device=device, generator=generator)
        rows = (top[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None]  # (N, 1, H, 1)
        cols = (left[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :]  # (N, 1, 1, W)
        batch_index = torch.arange(n, device=device)[:, None, None, None]
        channel_index = torch.arange(c, device=device)[None, :, None, None]
        out = padded[batch_index, channel_index, rows, cols]
    if flip:
        flips = torch.rand(n, device=device, generator=generator) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(3), out)
    return out
