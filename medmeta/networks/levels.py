"""Multi-level features: each stage of a backbone summarised, L2-normalised and concatenated with the final features.

Under a domain shift the last stage's features are the most specific to the meta-train images;
the earlier stages (edges, colour, texture) transfer better (e.g. Adler et al., 2020; Zou et
al., 2021, on cross-domain few-shot learning). :func:`multi_level_features` reads the outputs of
the backbone's stages (``stage_names()``, module names within the backbone) with forward hooks,
so it works under ``torch.func.functional_call`` with adapted weights, and in an exported copy.
Each stage's output ``[B, C, *spatial]`` is summarised by its per-channel mean and standard
deviation over space ``[B, 2C]``; every summary and the final features are L2-normalised
separately, so each level weighs the same whatever its width.

A learner can put its head on these features at adaptation (the fine-tune baseline's
``feature_levels``), or the backbone can give them as its own ``features`` (a backbone's
``feature_levels="all"``, :class:`MultiLevelSequential`), so that every learner, an inner loop
included, adapts a head on every stage.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureLevels = Literal["last", "all"]  # the backbone's features, or every stage (see the module docstring)
LEVELS = ("last", "all")
STD_EPS = 1e-5  # added to each channel's variance before its square root (as batch norm does)


def check_level_name(levels: str) -> None:
    """Refuse a ``feature_levels`` that is not one of :data:`LEVELS`."""
    if levels not in LEVELS:
        raise ValueError(f"feature_levels must be one of {LEVELS}, got {levels!r}")


def check_levels(model: nn.Module, levels: str) -> None:
    """Refuse an unknown ``levels``, ``"all"`` twice, or ``"all"`` on a backbone that does not name its stages."""
    check_level_name(levels)
    if levels == "all" and getattr(model, "feature_levels", "last") == "all":
        raise ValueError(
            f"feature_levels='all' twice: the {type(model).__name__} backbone already gives every stage's features "
            "(its own feature_levels: all); leave the learner's feature_levels at 'last'"
        )
    if levels == "all" and not callable(getattr(model, "stage_names", None)):
        raise ValueError(
            f"feature_levels='all' needs a backbone that names its stages (`stage_names()`); {type(model).__name__} "
            "does not: use feature_levels='last' or add stage_names to the backbone"
        )


def multi_level_features(model: nn.Module, features: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``[B, D]``: every stage of ``model`` (pooled mean and std per channel) and ``features(x)``, each L2-normalised.

    ``features`` is the forward giving the final features (``model.features``, or a
    ``functional_call`` of it with adapted weights); the stage outputs are those of that forward.
    """
    captured: list[Tensor] = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda _m, _i, out: captured.append(out))
             for name in model.stage_names()]  # fmt: skip
    try:
        final = features(x).flatten(start_dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([*map(stage_summary, captured), F.normalize(final, dim=1)], dim=1)


def stage_summary(stage: Tensor) -> Tensor:
    """``[B, 2C]``: a stage output ``[B, C, *spatial]`` as its per-channel mean and standard deviation, L2-normalised.

    The standard deviation is ``sqrt(var + STD_EPS)``: a channel constant over an image (a dead ReLU)
    would otherwise give a NaN second derivative, and so a NaN second-order meta-gradient.
    """
    var, mean = torch.var_mean(stage, dim=tuple(range(2, stage.dim())), correction=0)
    return F.normalize(torch.cat([mean, (var + STD_EPS).sqrt()], dim=1), dim=1)


class MultiLevelSequential(nn.Sequential):
    """The children of a sequential trunk, giving :func:`multi_level_features` of it as its output.

    The children keep their names, so the weights' names (and a plain trunk's checkpoint) are
    unchanged. ``stages`` names the children whose outputs are summarised (:func:`stage_summary`);
    the last child's output is flattened. No hooks: it runs under ``functional_call`` and ``vmap``.
    """

    def __init__(self, trunk: nn.Sequential, stages: Sequence[str]) -> None:
        super().__init__(OrderedDict(trunk.named_children()))
        unknown = sorted(set(stages) - set(self._modules))
        if unknown:
            raise ValueError(f"stages {unknown} are not children of the trunk ({', '.join(self._modules)})")
        self.stages = tuple(stages)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, D]``: every stage's summary and the trunk's output, each L2-normalised, concatenated."""
        levels = []
        for name, module in self.named_children():
            x = module(x)
            if name in self.stages:
                levels.append(stage_summary(x))
        return torch.cat([*levels, F.normalize(x.flatten(start_dim=1), dim=1)], dim=1)


def embedding(model: nn.Module, features: Callable[[Tensor], Tensor], x: Tensor, levels: str) -> Tensor:
    """The features a head is fitted on: ``features(x)`` flattened (``"last"``) or :func:`multi_level_features` (``"all"``)."""
    if levels == "all":
        return multi_level_features(model, features, x)
    return features(x).flatten(start_dim=1)
