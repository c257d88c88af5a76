"""The base of medmeta's own backbones: the episode shape medmeta passes in, the feature interface, the norm layers.

A backbone maps images ``[B, C, *spatial]`` to ``n_way`` logits as ``head(features(x))``, with
``features(x)`` the embedding ``[B, feature_dim]``. medmeta fills the episode shape (the arguments
of :class:`Backbone`) from the data; a subclass adds its own settings as keyword arguments and
passes ``**shape`` on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medmeta.networks.norm import EpisodeBatchNorm, EpisodeInstanceNorm

NormName = Literal["batch", "group", "instance"]


class Backbone(nn.Module):
    """The episode shape and ``forward = head(features(x))``; subclasses set ``features``, ``feature_dim`` and ``head``.

    Args:
        in_channels: image channels.
        n_way: number of output classes (the head size).
        spatial_dims: 2 for images, 3 for volumes.
        image_size: input side length.
        running_stat_steps: per-step running-statistic slots of batch norm (0: transductive).
    """

    features: nn.Module
    head: nn.Linear
    feature_dim: int

    def __init__(
        self, *, in_channels: int = 1, n_way: int = 5, spatial_dims: int = 2, image_size: int = 32,
        running_stat_steps: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.in_channels, self.n_way, self.spatial_dims = in_channels, n_way, spatial_dims
        self.image_size, self.running_stat_steps = image_size, running_stat_steps

    def norm_layer(self, norm: NormName, channels: int) -> nn.Module:
        """A normalisation layer of ``channels`` for this backbone's dimensions (see :func:`norm_layer`)."""
        return norm_layer(norm, channels, self.spatial_dims, self.running_stat_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, n_way]`` for images ``[B, C, *spatial]``."""
        return self.head(self.features(x))


def norm_layer(norm: NormName, channels: int, spatial_dims: int, running_stat_steps: int = 0) -> nn.Module:
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
