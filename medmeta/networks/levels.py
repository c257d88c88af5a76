"""Multi-level features: each stage of a backbone summarised, L2-normalised and concatenated with the final features.

Under a domain shift the last stage's features are the most specific to the meta-train images;
the earlier stages (edges, colour, texture) transfer better (e.g. Adler et al., 2020; Zou et
al., 2021, on cross-domain few-shot learning). :func:`multi_level_features` reads the outputs of
the backbone's stages (``stage_names()``, module names within the backbone) with forward hooks,
so it works under ``torch.func.functional_call`` with adapted weights, and in an exported copy.
Each stage's output ``[B, C, *spatial]`` is summarised by its per-channel mean and standard
deviation over space ``[B, 2C]``; every summary and the final features are L2-normalised
separately, so each level weighs the same whatever its width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FeatureLevels = Literal["last", "all"]  # the backbone's features, or every stage (see the module docstring)
LEVELS = ("last", "all")


def check_levels(model: nn.Module, levels: str) -> None:
    """Refuse an unknown ``levels``, or ``"all"`` on a backbone that does not name its stages."""
    if levels not in LEVELS:
        raise ValueError(f"feature_levels must be one of {LEVELS}, got {levels!r}")
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
    levels = []
    for stage in captured:
        std, mean = torch.std_mean(stage, dim=tuple(range(2, stage.dim())), correction=0)
        levels.append(F.normalize(torch.cat([mean, std], dim=1), dim=1))
    return torch.cat([*levels, F.normalize(final, dim=1)], dim=1)


def embedding(model: nn.Module, features: Callable[[Tensor], Tensor], x: Tensor, levels: str) -> Tensor:
    """The features a head is fitted on: ``features(x)`` flattened (``"last"``) or :func:`multi_level_features` (``"all"``)."""
    if levels == "all":
        return multi_level_features(model, features, x)
    return features(x).flatten(start_dim=1)
