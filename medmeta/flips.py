"""Flips of images: more labelled views of the few support images at adaptation, and flip-averaged predictions."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def flip_views(images: Tensor) -> list[Tensor]:
    """``images [B, C, *spatial]`` and its flips along every non-empty set of spatial axes (2D: 4 views, 3D: 8)."""
    axes = list(range(2, images.dim()))
    views = [images]
    for mask in range(1, 2 ** len(axes)):
        views.append(images.flip([axis for i, axis in enumerate(axes) if mask >> i & 1]))
    return views


def flipped(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Every flip view of ``images`` (see :func:`flip_views`) stacked, with the labels repeated to match."""
    views = flip_views(images)
    return torch.cat(views), labels.repeat(len(views))


def flip_averaged(logits: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Test-time augmentation: ``log`` of the class probabilities averaged over every flip view of ``images``, ``[B, N]``.

    A softmax of the result is that average; each row still depends on its own image only. The
    unflipped images go last, so the last of the ``len(flip_views(images))`` forwards sees them as
    they are (Grad-CAM reads that forward's activations).
    """
    log_probabilities = torch.stack([logits(view).log_softmax(dim=-1) for view in reversed(flip_views(images))])
    return torch.logsumexp(log_probabilities, dim=0) - math.log(len(log_probabilities))  # no log(0) when all underflow


def flip_view_count(spatial_dims: int) -> int:
    """How many views :func:`flip_views` gives of an image with ``spatial_dims`` spatial axes (the image included)."""
    return 2**spatial_dims
