"""The Conv-4 backbone of Finn et al., 2017 (and most few-shot papers since), in 2D or 3D."""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medmeta.networks.norm import EpisodeBatchNorm, EpisodeInstanceNorm

NormName = Literal["batch", "group", "instance"]


def _norm_layer(norm: NormName, channels: int, spatial_dims: int, running_stat_steps: int = 0) -> nn.Module:
    """A normalisation layer; batch norm is transductive unless ``running_stat_steps > 0``.

    Batch norm is :class:`EpisodeBatchNorm`: batch statistics everywhere (the transductive setting
    of Finn et al., 2017), or per-step running statistics for query forwards at evaluation.
    Instance and group norm never use running statistics. Batch and instance norm are written from
    ``var_mean`` ops so that ``vmap`` over tasks gives exact second-order meta-gradients.
    """
    if norm == "batch":
        return EpisodeBatchNorm(channels, running_stat_steps=running_stat_steps)
    if norm == "instance":
        return EpisodeInstanceNorm(channels)
    if norm == "group":
        return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels)
    raise ValueError(f"unknown norm {norm!r}; choose 'batch', 'group' or 'instance'")


class Conv4(nn.Module):
    """Four blocks of [conv 3x3, norm, ReLU, max-pool 2] followed by a linear head.

    Args:
        in_channels: image channels.
        n_way: number of output classes (the head size).
        hidden_channels: channels of every conv block (64 in Finn et al., 2017).
        spatial_dims: 2 for images, 3 for volumes.
        norm: ``"batch"``, ``"group"`` or ``"instance"``.
        image_size: input side length, used to size the head.
        running_stat_steps: per-step running-statistic slots of batch norm (0: transductive).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        n_way: int = 5,
        hidden_channels: int = 64,
        spatial_dims: int = 2,
        norm: NormName = "batch",
        image_size: int = 32,
        running_stat_steps: int = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        conv, pool = Conv[Conv.CONV, spatial_dims], Pool[Pool.MAX, spatial_dims]
        blocks: list[nn.Module] = []
        channels, side = in_channels, image_size
        for _ in range(4):
            blocks += [
                conv(channels, hidden_channels, kernel_size=3, padding=1),
                _norm_layer(norm, hidden_channels, spatial_dims, running_stat_steps),
                nn.ReLU(),
                pool(kernel_size=2, ceil_mode=True),
            ]
            channels, side = hidden_channels, -(-side // 2)
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = hidden_channels * side**spatial_dims
        self.head = nn.Linear(self.feature_dim, n_way)

    def last_block_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the last conv block (its conv and norm)."""
        return ("features.12.", "features.13.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, n_way]`` for images ``[B, C, *spatial]``."""
        return self.head(self.features(x))
