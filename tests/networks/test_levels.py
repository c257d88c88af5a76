"""Multi-level features: every stage of a backbone read by hooks, each level unit-length, under functional_call too;
and a backbone's own ``feature_levels="all"``, the same features as its ``features``, for every learner."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from medmeta.algorithms import FineTune
from medmeta.networks import Backbone, Conv4, build_backbone
from medmeta.networks.levels import STD_EPS, MultiLevelSequential, check_levels, embedding, multi_level_features, stage_summary
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
        var, mean = torch.var_mean(stage, dim=(2, 3), correction=0)
        by_hand = nn.functional.normalize(torch.cat([mean, (var + STD_EPS).sqrt()], 1), dim=1)
        torch.testing.assert_close(features[:, : sizes[0]], by_hand)
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


BACKBONES = {  # a backbone class and its settings (small widths)
    "conv4": (Conv4, {"hidden_channels": 4}),
    "resnet12": (ResNet12, {"hidden_channels": 2}),
    "resnet18": (ResNet18, {}),
}


@pytest.mark.parametrize(("name", "spatial_dims"), [("conv4", 2), ("conv4", 3), ("resnet12", 2), ("resnet12", 3), ("resnet18", 2)])
def test_a_backbone_with_every_level_gives_them_as_its_features_with_the_same_weight_names(name: str, spatial_dims: int) -> None:
    cls, settings = BACKBONES[name]
    shape = {"in_channels": 2, "n_way": 3, "spatial_dims": spatial_dims, "image_size": 16 if spatial_dims == 3 else 32}
    torch.manual_seed(0)
    plain = cls(**settings, **shape)
    levelled = cls(**settings, **shape, feature_levels="all")
    trunk = {k: v for k, v in plain.state_dict().items() if not k.startswith("head.")}
    assert set(levelled.state_dict()) == set(plain.state_dict())  # a plain backbone's checkpoint fits
    levelled.load_state_dict(trunk, strict=False)
    x = torch.rand(3, 2, *[shape["image_size"]] * spatial_dims)
    features = levelled.features(x)
    torch.testing.assert_close(features, multi_level_features(plain, plain.features, x))  # the fine-tune head's features
    assert features.shape == (3, levelled.feature_dim) and levelled.head.in_features == levelled.feature_dim
    torch.testing.assert_close(levelled(x), levelled.head(features))
    assert levelled.feature_levels == "all" and plain.feature_levels == "last"


def test_resnet18_as_a_sequence_of_its_children_is_torchvision_s_forward() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    ours = ResNet18(in_channels=3, n_way=2, image_size=32)
    reference = resnet18(weights=None, num_classes=2)
    reference.fc = nn.Identity()
    loaded = reference.load_state_dict(ours.features.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(k.endswith(("running_mean", "running_var")) for k in loaded.missing_keys)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours.features(x), reference.train()(x))  # medmeta's batch norm: batch statistics


def test_stage_summary_of_a_constant_channel_has_finite_second_derivatives() -> None:
    stage = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    stage[:, 1] = 0.5  # a dead channel: no variance over space
    stage.requires_grad_(True)
    summary = stage_summary(stage)
    (first,) = torch.autograd.grad(summary.pow(2).sum() + summary[:, 0].sum(), stage, create_graph=True)
    (second,) = torch.autograd.grad(first.pow(2).sum(), stage)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    var, mean = torch.var_mean(stage.detach(), dim=(2, 3), correction=0)
    torch.testing.assert_close(summary.detach(), nn.functional.normalize(torch.cat([mean, (var + STD_EPS).sqrt()], 1), dim=1))


def test_levels_twice_a_stage_that_is_not_a_child_or_an_unknown_setting_are_refused() -> None:
    levelled = Conv4(in_channels=1, n_way=2, hidden_channels=4, image_size=16, feature_levels="all")
    with pytest.raises(ValueError, match="feature_levels='all' twice: the Conv4 backbone already gives every stage"):
        FineTune(levelled, feature_levels="all")
    FineTune(levelled)  # its head on the backbone's (multi-level) features
    with pytest.raises(ValueError, match=r"stages \['9'\] are not children of the trunk"):
        MultiLevelSequential(nn.Sequential(nn.Identity(), nn.Flatten()), ["0", "9"])

    class Unnamed(Backbone):  # a backbone of one's own that names no stages
        def __init__(self, **shape: object) -> None:
            super().__init__(**shape)
            self.set_features(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), 2 * 14 * 14, stage_channels=(2,))

    Unnamed(image_size=16)
    with pytest.raises(ValueError, match=r"feature_levels='all' needs Unnamed.stage_names\(\) to name the 1 stages"):
        Unnamed(image_size=16, feature_levels="all")
    with pytest.raises(ValueError, match="feature_levels must be one of"):
        build_backbone({"class_path": "conv4", "init_args": {"feature_levels": "every"}}, in_channels=1, n_way=2,
                       spatial_dims=2, image_size=16)  # fmt: skip
