"""Grad-CAM maps on medmeta backbones and their PNG renderings."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medmeta.data.loading import transform_images
from medmeta.data.records import ImageRecord
from medmeta.explain import grad_cam, image_png, overlay_png
from medmeta.networks import Conv4
from tests.data.test_readers import ct_dataset, write

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


# Figures are laid out as a viewer shows the image. Inputs are built as files and read with medmeta's own
# readers and load transforms, whose tensors are [C, x=column, y=row] in 2D and [C, R, A, S] in 3D.


def load_files(paths: list[Path], size: int, spatial_dims: int) -> torch.Tensor:
    """The images at ``paths`` as training and diagnose read them (min-max intensity), ``[n, 1, *spatial]``."""
    records = [ImageRecord(path=p, label="a", patient=str(i)) for i, p in enumerate(paths)]
    return transform_images(records, image_size=size, window=None, preset=None, spatial_dims=spatial_dims,
                            in_channels=1)  # fmt: skip


def top_row_picture(n: int = 12) -> np.ndarray:
    """A viewer's picture ``[rows, cols]`` in 0..255: a bright top row and one grey pixel off the diagonal."""
    picture = np.zeros((n, n), np.uint8)
    picture[0] = 255
    picture[n - 3, 2] = 128
    return picture


def write_picture_as(kind: str, picture: np.ndarray, path: Path) -> Path:
    """``picture`` as a PNG, or as a single-frame axial CT DICOM whose rows and columns are the picture's."""
    if kind == "png":
        Image.fromarray(picture).save(path)
        return path
    return write(ct_dataset(picture.astype(np.uint16) * 4, spacing=(1.0, 1.0)), path)


def axial_anatomy(n: int = 16) -> np.ndarray:
    """Viewer slices ``[slice (feet to head), rows, cols]``: a block through every slice, and an L-shaped marker
    (a long bar along row 1, a short one down column 1) on the middle slice ``n // 2`` only; values 0..1000."""
    slices = np.zeros((n, n, n), np.float32)
    slices[:, 6:10, 9:13] = 300.0
    slices[n // 2, 1, 1:n - 3] = 1000.0
    slices[n // 2, 1:n // 2, 1] = 1000.0
    return slices


def write_axial_series(slices: np.ndarray, folder: Path) -> Path:
    """An axial CT series (rows: anterior to posterior, columns: patient's right to left), one file per slice."""
    for k, viewer in enumerate(slices):
        write(ct_dataset(viewer.astype(np.uint16), position=(0.0, 0.0, float(k)), spacing=(1.0, 1.0), instance=k + 1),
              folder / f"IM{k:03d}.dcm")  # fmt: skip
    return folder


def write_ras_nifti(slices: np.ndarray, path: Path) -> Path:
    """The same anatomy as a NIfTI with RAS voxel axes: voxel (i, j, k) is at (x=i, y=j, z=k) mm, x to the right."""
    ras = np.ascontiguousarray(slices[:, ::-1, ::-1].transpose(2, 1, 0))  # [i, j, k] = viewer[k, n-1-j, n-1-i]
    nib.save(nib.Nifti1Image(ras, np.eye(4)), str(path))
    return path


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("kind", ["png", "dcm"])
def test_image_png_of_a_2d_file_is_the_picture_a_viewer_shows(tmp_path: Path, kind: str) -> None:
    picture = top_row_picture()
    image = load_files([write_picture_as(kind, picture, tmp_path / f"bar.{kind}")], 12, 2)[0]
    shown = png_pixels(image_png(image, tmp_path / "shown.png"))
    assert (shown[0] == 255).all() and not (shown[1:, 0] == 255).any()  # the bright row on top, not the left column
    np.testing.assert_allclose(shown, picture, atol=1)


@pytest.mark.parametrize("kind", ["series", "nifti"])
def test_3d_png_is_the_middle_axial_slice_as_a_viewer_shows_it(tmp_path: Path, kind: str) -> None:
    slices = axial_anatomy()
    source = write_axial_series(slices, tmp_path / "series") if kind == "series" else (
        write_ras_nifti(slices, tmp_path / "volume.nii.gz"))  # fmt: skip
    volume = load_files([source], 16, 3)[0]
    viewer = slices[8] / 1000.0
    np.testing.assert_allclose(png_pixels(image_png(volume, tmp_path / "image.png")) / 255, viewer, atol=0.003)
    marker = torch.as_tensor(volume > 0.9).float()  # a map of the volume's layout, bright on the marker only
    rgb = png_pixels(overlay_png(volume, marker, tmp_path / "overlay.png"))
    np.testing.assert_array_equal(rgb[..., 0] > rgb[..., 2], viewer > 0.9)  # red heat exactly on the marker
    np.testing.assert_allclose(rgb[..., 1] / 255, 0.6 * viewer, atol=0.003)  # the grey part: jet has no green at 0, 1


def test_grad_cam_overlay_shows_the_heat_where_the_picture_varies(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):  # only the viewer's top-right quadrant differs between the images
        picture = np.zeros((32, 32), np.uint8)
        picture[2:12, 20:30] = rng.integers(128, 256, (10, 10))
        paths.append(tmp_path / f"q{i}.png")
        Image.fromarray(picture).save(paths[-1])
    images = load_files(paths, 32, 2)
    cams = grad_cam(_identity_conv4(), images, torch.zeros(4, dtype=torch.long), TARGET)
    rgb = png_pixels(overlay_png(images[0], cams[0], tmp_path / "overlay.png"))
    row, col = np.unravel_index(np.argmax(rgb[..., 0] - rgb[..., 2]), rgb.shape[:2])  # the hottest pixel
    assert row < 16 <= col


def test_array_images_are_drawn_as_stored(tmp_path: Path) -> None:
    picture = top_row_picture()
    flat = transform_images([ImageRecord(Path("x.npz"), "a", "p", item=0)], image_size=12, window=None, preset=None,
                            spatial_dims=2, in_channels=1, arrays=picture[None])[0]  # fmt: skip
    np.testing.assert_allclose(png_pixels(image_png(flat, tmp_path / "a.png", from_array=True)), picture, atol=1)
    cube = np.zeros((16, 16, 16), np.float32)  # MedMNIST 3D: (D, H, W)
    cube[8] = top_row_picture(16)
    volume = transform_images([ImageRecord(Path("x.npz"), "a", "p", item=0)], image_size=16, window=None, preset=None,
                              spatial_dims=3, in_channels=1, arrays=cube[None])[0]  # fmt: skip
    np.testing.assert_allclose(png_pixels(image_png(volume, tmp_path / "v.png", from_array=True)), cube[8], atol=1)
