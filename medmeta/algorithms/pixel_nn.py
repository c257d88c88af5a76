"""Nearest neighbour on raw pixels: the floor a learned model has to beat."""

from __future__ import annotations

import torch
from torch import Tensor


def pixel_nearest_neighbour(support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
    """Predicted labels ``[T, N*Q]``: each query takes the label of the closest support image (L2 on pixels)."""
    support = support_x.flatten(start_dim=2).float()
    query = query_x.flatten(start_dim=2).float()
    nearest = torch.cdist(query, support).argmin(dim=-1)
    return torch.gather(support_y, 1, nearest)
