"""ResNet-12 (2D/3D) and ResNet-18 (2D) backbones: shapes, purity, local weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from medmeta.algorithms.maml import MAML
from medmeta.networks.resnet import ResNet12, ResNet18

NORMS = ["batch", "group", "instance"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("spatial_dims", "side"), [(2, 20), (3, 16)])
def test_resnet12_shapes_and_no_running_statistics(norm: str, spatial_dims: int, side: int) -> None:
    model = ResNet12(in_channels=2, n_way=3, hidden_channels=4, spatial_dims=spatial_dims, norm=norm, image_size=side)
    x = torch.randn(2, 2, *(side,) * spatial_dims)
    features = model.features(x)
    assert model.feature_dim == 32 and features.shape == (2, 32)
    assert torch.allclose(model(x), model.head(features))
    assert list(model.buffers()) == []


def test_resnet12_widths_override_and_bad_arguments() -> None:
    model = ResNet12(widths=(3, 5, 6, 7), n_way=2)
    assert model.feature_dim == 7 and model(torch.randn(2, 1, 16, 16)).shape == (2, 2)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(widths=(4, 4, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNet12(spatial_dims=1)
    with pytest.raises(ValueError, match="unknown norm"):
        ResNet12(norm="layer")  # type: ignore[arg-type]


@pytest.mark.parametrize("norm", NORMS)
def test_resnet18_shapes_and_no_running_statistics(norm: str) -> None:
    side = 64 if norm == "instance" else 32  # layer4 runs at side ceil(side / 32)
    model = ResNet18(in_channels=1, n_way=4, hidden_channels=64, norm=norm, image_size=side)
    x = torch.randn(2, 1, side, side)
    features = model.features(x)
    assert model.feature_dim == 512 and features.shape == (2, 512)
    assert torch.allclose(model(x), model.head(features))
    assert list(model.buffers()) == []
    assert model.head.out_features == 4


def test_resnet18_is_2d_only_and_checks_instance_norm_size() -> None:
    with pytest.raises(ValueError, match="2D only"):
        ResNet18(spatial_dims=3)
    with pytest.raises(ValueError, match="instance norm"):
        ResNet18(norm="instance", image_size=32)
    with pytest.raises(ValueError, match="instance norm"):
        ResNet12(norm="instance", image_size=8)


@pytest.mark.parametrize("name", ["resnet12", "resnet18"])
def test_functional_call_and_maml_step(name: str) -> None:
    torch.manual_seed(0)
    model = {"resnet12": ResNet12, "resnet18": ResNet18}[name](in_channels=1, n_way=2, hidden_channels=4, image_size=16)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    params = dict(model.named_parameters())
    base = functional_call(model, params, (x,))
    first_conv = next(k for k, v in params.items() if v.dim() == 4)
    changed = {**params, first_conv: params[first_conv] + 0.5}
    assert not torch.allclose(functional_call(model, changed, (x,)), base)
    assert torch.equal(functional_call(model, params, (x,)), base)  # nothing was mutated
    maml = MAML(model, inner_lr=0.1, inner_steps=1)
    maml.outer_loss(x[None], y[None], x[None], y[None]).backward()  # second order
    assert all(p.grad is not None for p in model.parameters())


def test_resnet18_loads_local_state_dict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = ResNet18(in_channels=1, n_way=2, norm="group")
    path = tmp_path / "trunk.pt"
    torch.save(source.features.state_dict(), path)
    target = ResNet18(in_channels=1, n_way=2, norm="group", weights_path=str(path))
    target.head.load_state_dict(source.head.state_dict())
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(target(x), source(x))
    # a torchvision-style file: 3-channel conv1 and fc do not fit and are skipped with a warning
    state = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    del state["features.conv1.weight"]
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    state["fc.weight"] = torch.zeros(1000, 512)
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="medmeta.networks.resnet"):
        partial = ResNet18(in_channels=1, n_way=2, norm="group", weights_path=str(path))
    assert "conv1.weight" in caplog.text and "fc.weight" in caplog.text
    assert torch.equal(partial.features.layer4[1].conv2.weight, source.features.layer4[1].conv2.weight)
    assert not torch.equal(partial.features.conv1.weight, source.features.conv1.weight)


def test_resnet18_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ResNet18(weights_path=str(missing))
