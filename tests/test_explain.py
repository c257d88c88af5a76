"""Grad-CAM maps on medmeta backbones and their PNG renderings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from medmeta.explain import grad_cam, image_png, overlay_png
from medmeta.networks import Conv4

TARGET = "features.14"  # ReLU of Conv4's last block


def _corner_images(n: int, size: int, spatial_dims: int = 2, seed: int = 0) -> torch.Tensor:
    """Dim noise with a bright square in the top-left corner, ``[n, 1, *spatial]``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 1, *([size] * spatial_dims), generator=g)
    corner = (slice(None), slice(None)) + (slice(1, size // 4 + 1),) * spatial_dims
    x[corner] = 0.8 + 0.2 * torch.rand(x[corner].shape, generator=g)
    return x


def _hooks_left(model: nn.Module) -> list[str]:
    """Names of submodules that still carry any hook."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [n for n, m in model.named_modules() if any(getattr(m, a) for a in names)]


def _conv4_2d() -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=32, norm="batch")


def test_grad_cam_2d_shape_range_and_no_side_effects() -> None:
    model = _conv4_2d().train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)  # a pre-existing gradient must survive
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    images = _corner_images(4, 32)
    cams = grad_cam(model, images, torch.tensor([0, 1, 2, 0]), TARGET)
    assert cams.shape == (4, 1, 32, 32)
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert not cams.requires_grad
    assert _hooks_left(model) == []
    assert all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.requires_grad
        assert p.grad is None if p is not first else torch.equal(p.grad, torch.full_like(p, 7.0))


def test_grad_cam_assembles_each_images_own_class() -> None:
    model, images = _conv4_2d().eval(), _corner_images(3, 32)
    mixed = grad_cam(model, images, torch.tensor([0, 2, 2]), TARGET)
    all_zero = grad_cam(model, images, torch.tensor([0, 0, 0]), TARGET)
    all_two = grad_cam(model, images, torch.tensor([2, 2, 2]), TARGET)
    torch.testing.assert_close(mixed[0], all_zero[0])
    torch.testing.assert_close(mixed[1:], all_two[1:])
    assert not model.training


def test_grad_cam_3d() -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=16, spatial_dims=3, norm="batch")
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    cams = grad_cam(model, _corner_images(2, 16, spatial_dims=3), torch.tensor([1, 2]), TARGET)
    assert cams.shape == (2, 1, 16, 16, 16)
    assert torch.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert _hooks_left(model) == []
    assert all(torch.equal(p, params[k]) and p.grad is None for k, p in model.named_parameters())


def test_grad_cam_rejects_bad_arguments() -> None:
    model, images = _conv4_2d(), _corner_images(2, 32)
    with pytest.raises(ValueError, match="one class index per image"):
        grad_cam(model, images, torch.tensor([0]), TARGET)
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(model, images, torch.tensor([0, 1]), "features.99")


@torch.no_grad()
def _identity_conv4() -> Conv4:
    """A Conv4 whose features pass the input through (centre-tap convs) and whose head sums them.

    With a black background and bright content only in the top-left quadrant, batch norm (zero
    bias) sends the background below the batch mean, so after every ReLU the activations are
    positive in that quadrant only: the decision depends on that region alone.
    """
    model = _conv4_2d()
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            m.weight.zero_()
            m.bias.zero_()
            for k in range(m.out_channels):
                m.weight[k, k if m.in_channels > 1 else 0, 1, 1] = 1.0
    model.head.weight.fill_(1.0)
    model.head.bias.zero_()
    return model


def test_grad_cam_highlights_the_region_the_decision_depends_on() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(4, 1, 32, 32)
    images[:, :, 2:12, 2:12] = 0.5 + 0.5 * torch.rand(4, 1, 10, 10, generator=g)  # only this quadrant varies
    cams = grad_cam(_identity_conv4(), images, torch.zeros(4, dtype=torch.long), TARGET)
    for cam in cams[:, 0]:
        assert cam.max() - cam.min() > 0.5  # not constant
        inside = cam[:16, :16].mean()
        outside = torch.cat([cam[:16, 16:].flatten(), cam[16:].flatten()]).mean()
        assert inside > outside + 0.3
        peak = int(cam.argmax())
        assert peak // 32 < 16 and peak % 32 < 16


def test_overlay_and_image_png_sizes(tmp_path: Path) -> None:
    image = _corner_images(1, 32)[0]
    cam = torch.zeros(1, 32, 32)
    cam[:, :8, :8] = 1.0
    plain = image_png(image, tmp_path / "image.png")
    over = overlay_png(image, cam, tmp_path / "overlay.png", title="query-001 (0123abcd)")
    big = overlay_png(image, cam, tmp_path / "big.png", scale=3)
    with Image.open(plain) as a, Image.open(over) as b, Image.open(big) as c:
        assert a.size == (32, 32) and a.mode == "L"
        assert b.size == (32, 32) and b.mode == "RGB"
        assert c.size == (96, 96)
        assert b.text.get("Title") == "query-001 (0123abcd)"
        rgb = torch.tensor(list(b.getdata()), dtype=torch.float32)
    assert (rgb[:, 0] - rgb[:, 2]).abs().max() > 50  # coloured, not grey
    assert image_png(image, tmp_path / "image3.png", scale=2).exists()
    with Image.open(tmp_path / "image3.png") as d:
        assert d.size == (64, 64)


def test_overlay_png_3d_uses_the_image_plane_size(tmp_path: Path) -> None:
    volume = _corner_images(1, 16, spatial_dims=3)[0]
    cam = torch.rand(1, 16, 16, 16)
    with Image.open(overlay_png(volume, cam, tmp_path / "v.png", scale=2)) as im:
        assert im.size == (32, 32)
    with pytest.raises(ValueError, match="sizes differ"):
        overlay_png(volume, torch.rand(1, 8, 8), tmp_path / "bad.png")
