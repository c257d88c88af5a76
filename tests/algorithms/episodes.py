"""Random episode tensors shared by the algorithm tests (a leading task dimension T)."""

from __future__ import annotations

import torch


def random_episodes(
    tasks: int = 2, n_way: int = 3, k: int = 2, q: int = 2, side: int = 12, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``support_x [T, N*K, 1, side, side]``, ``support_y``, ``query_x``, ``query_y`` (labels sorted by class)."""
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, n_way * k, 1, side, side, generator=g, dtype=dtype)
    qx = torch.randn(tasks, n_way * q, 1, side, side, generator=g, dtype=dtype)
    sy = torch.arange(n_way).repeat_interleave(k).expand(tasks, -1).clone()
    qy = torch.arange(n_way).repeat_interleave(q).expand(tasks, -1).clone()
    return sx, sy, qx, qy
