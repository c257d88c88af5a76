"""The Conv-4 backbone of Finn et al., 2017 (and most few-shot papers since), in 2D or 3D."""

from __future__ import annotations

from typing import Any

from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medmeta.networks.backbone import Backbone, NormName


class Conv4(Backbone):
    """Four blocks of [conv 3x3, norm, ReLU, max-pool 2] followed by a linear head.

    Args:
        hidden_channels: channels of every conv block (64 in Finn et al., 2017).
        norm: ``"batch"``, ``"group"`` or ``"instance"``.
        shape: ``in_channels``, ``n_way``, ``spatial_dims``, ``image_size`` (sizes the head) and
            ``running_stat_steps``, and ``feature_levels``, as in :class:`~medmeta.networks.backbone.Backbone`.
    """

    def __init__(self, *, hidden_channels: int = 64, norm: NormName = "batch", **shape: Any) -> None:
        super().__init__(**shape)
        conv, pool = Conv[Conv.CONV, self.spatial_dims], Pool[Pool.MAX, self.spatial_dims]
        blocks: list[nn.Module] = []
        channels, side = self.in_channels, self.image_size
        for _ in range(4):
            blocks += [
                conv(channels, hidden_channels, kernel_size=3, padding=1),
                self.norm_layer(norm, hidden_channels),
                nn.ReLU(),
                pool(kernel_size=2, ceil_mode=True),
            ]
            channels, side = hidden_channels, -(-side // 2)
        self.set_features(nn.Sequential(*blocks, nn.Flatten()), hidden_channels * side**self.spatial_dims,
                          stage_channels=(hidden_channels,) * 3)  # fmt: skip

    def last_block_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the last conv block (its conv and norm)."""
        return ("features.12.", "features.13.")

    def stage_names(self) -> tuple[str, ...]:
        """The modules whose outputs are the stages before the last (each block's pooling), for multi-level features."""
        return ("features.3", "features.7", "features.11")
