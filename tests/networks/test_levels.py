"""Multi-level features: every stage of a backbone read by hooks, each level unit-length, under functional_call too."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from medmeta.networks import Conv4
from medmeta.networks.levels import check_levels, embedding, multi_level_features
from medmeta.networks.resnet import ResNet12, ResNet18


@pytest.mark.parametrize(
    ("backbone", "stage_widths"),
    [
        (lambda: Conv4(in_channels=3, n_way=2, hidden_channels=4, image_size=16), [4, 4, 4]),
        (lambda: ResNet12(in_channels=3, n_way=2, hidden_channels=2, image_size=16), [2, 4, 8]),
        (lambda: ResNet18(in_channels=3, n_way=2, image_size=32), [64, 128, 256]),
    ],
)
def test_every_stage_is_summarised_and_each_level_has_unit_length(backbone, stage_widths: list[int]) -> None:
    torch.manual_seed(0)
    model = backbone()
    x = torch.rand(3, 3, model.image_size, model.image_size)
    features = multi_level_features(model, model.features, x)
    sizes = [2 * w for w in stage_widths] + [model.feature_dim]  # mean and std per channel, then the final features
    assert features.shape == (3, sum(sizes))
    norms = torch.stack([part.norm(dim=1) for part in features.split(sizes, dim=1)])
    torch.testing.assert_close(norms, torch.ones_like(norms))
    final = nn.functional.normalize(model.features(x).flatten(1), dim=1)
    torch.testing.assert_close(features[:, -model.feature_dim :], final)
    stage = model.get_submodule(model.stage_names()[0])(x) if isinstance(model, ResNet12) else None
    if stage is not None:  # the first block's output, summarised by hand
        std, mean = torch.std_mean(stage, dim=(2, 3), correction=0)
        torch.testing.assert_close(features[:, : sizes[0]], nn.functional.normalize(torch.cat([mean, std], 1), dim=1))
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone afterwards


def test_the_stages_follow_weights_passed_by_functional_call_and_hooks_go_even_on_error() -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=2, hidden_channels=4, image_size=16)
    x = torch.rand(4, 1, 16, 16)
    doubled = {"0.weight": model.features[0].weight * 2}
    plain = multi_level_features(model, model.features, x)
    adapted = multi_level_features(model, lambda images: functional_call(model.features, doubled, (images,), strict=False), x)
    assert not torch.allclose(plain[:, :8], adapted[:, :8])  # the first stage saw the adapted weights

    def broken(images: torch.Tensor) -> torch.Tensor:
        model.features(images)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        multi_level_features(model, broken, x)
    assert not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(embedding(model, model.features, x, "last"), model.features(x))


def test_a_backbone_without_stage_names_or_an_unknown_level_is_refused() -> None:
    plain = nn.Sequential(nn.Flatten())
    check_levels(plain, "last")
    with pytest.raises(ValueError, match="feature_levels='all' needs a backbone that names its stages.*Sequential"):
        check_levels(plain, "all")
    with pytest.raises(ValueError, match="feature_levels must be one of"):
        check_levels(Conv4(in_channels=1, n_way=2, hidden_channels=4, image_size=16), "every")
