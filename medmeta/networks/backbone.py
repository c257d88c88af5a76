"""The base of medmeta's own backbones: the episode shape medmeta passes in, the feature interface, the norm layers.

A backbone maps images ``[B, C, *spatial]`` to ``n_way`` logits as ``head(features(x))``, with
``features(x)`` the embedding ``[B, feature_dim]``. medmeta fills the episode shape (the arguments
of :class:`Backbone`) from the data; a subclass adds its own settings as keyword arguments and
passes ``**shape`` on, then sets its trunk with :meth:`Backbone.set_features`.

Every such backbone takes ``feature_levels``: ``"all"`` makes ``features`` give every stage's
summary beside the last stage's features (``medmeta.networks.levels``), so that any learner, its
inner loop included, adapts a head on them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medmeta.networks.levels import FeatureLevels, MultiLevelSequential, check_level_name
from medmeta.networks.norm import EpisodeBatchNorm, EpisodeInstanceNorm

NormName = Literal["batch", "group", "instance"]


class Backbone(nn.Module):
    """The episode shape and ``forward = head(features(x))``; subclasses call :meth:`set_features`.

    Args:
        in_channels: image channels.
        n_way: number of output classes (the head size).
        spatial_dims: 2 for images, 3 for volumes.
        image_size: input side length.
        running_stat_steps: per-step running-statistic slots of batch norm (0: transductive).
        feature_levels: ``"last"``: ``features`` is the trunk's output; ``"all"``: every stage's
            (``stage_names()``) per-channel mean and standard deviation and the trunk's output, each
            L2-normalised and concatenated (:class:`~medmeta.networks.levels.MultiLevelSequential`).
    """

    features: nn.Module
    head: nn.Linear
    feature_dim: int

    def __init__(
        self, *, in_channels: int = 1, n_way: int = 5, spatial_dims: int = 2, image_size: int = 32,
        running_stat_steps: int = 0, feature_levels: FeatureLevels = "last",
    ) -> None:  # fmt: skip
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        check_level_name(feature_levels)
        self.feature_levels = feature_levels
        self.in_channels, self.n_way, self.spatial_dims = in_channels, n_way, spatial_dims
        self.image_size, self.running_stat_steps = image_size, running_stat_steps

    def set_features(self, trunk: nn.Sequential, feature_dim: int, stage_channels: tuple[int, ...]) -> None:
        """Set ``features`` (``trunk``, multi-level under ``feature_levels="all"``), ``feature_dim`` and a new ``head``.

        ``feature_dim`` is the trunk's output width; ``stage_channels`` the channels of the stages
        that ``stage_names()`` names (children of ``trunk`` as ``features.<child>``), in order.
        """
        if self.feature_levels == "all":
            names = self.stage_names() if callable(getattr(self, "stage_names", None)) else ()
            if not names or len(names) != len(stage_channels):
                raise ValueError(
                    f"feature_levels='all' needs {type(self).__name__}.stage_names() to name the {len(stage_channels)} "
                    f"stages before the last (got {tuple(names)}); use feature_levels='last'"
                )
            trunk = MultiLevelSequential(trunk, [name.removeprefix("features.") for name in names])
            feature_dim += 2 * sum(stage_channels)
        self.features, self.feature_dim = trunk, feature_dim
        self.head = nn.Linear(feature_dim, self.n_way)

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
