"""Support-set augmentation at adaptation: more labelled views of the few support images."""

from __future__ import annotations

from torch import Tensor
import torch


def flipped(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``images [B, C, *spatial]`` and their flips along every non-empty set of spatial axes (2D: 4x, 3D: 8x), with labels."""
    axes = list(range(2, images.dim()))
    views = [images]
    for mask in range(1, 2 ** len(axes)):
        views.append(images.flip([axis for i, axis in enumerate(axes) if mask >> i & 1]))
    return torch.cat(views), labels.repeat(len(views))
