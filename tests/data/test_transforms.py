"""The cached transform chain maps Hounsfield units through the CT window, with no metadata left."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from medmeta.data.transforms import ConformImaged, augment_images, load_transforms


def test_window_is_applied_to_hounsfield_units(tiny_dicom_root: Path) -> None:
    path = sorted(tiny_dicom_root.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = load_transforms(image_size=32, window=(-1100, 400))({"image": str(path)})["image"]
    expected = np.clip((hu.T - (-1100)) / 1500, 0, 1)  # readers put the column axis first
    assert type(image) is torch.Tensor and not isinstance(image, MetaTensor)
    assert image.shape == (1, 32, 32)
    np.testing.assert_allclose(image[0].numpy(), expected, atol=1e-5)


def test_resize_and_minmax_without_window(tiny_dicom_root: Path) -> None:
    path = sorted(tiny_dicom_root.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    hu = (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
    native = load_transforms(image_size=32, window=None)({"image": str(path)})["image"]
    np.testing.assert_allclose(native[0].numpy(), (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-5)
    small = load_transforms(image_size=16, window=None)({"image": str(path)})["image"]
    assert small.shape == (1, 16, 16)
    np.testing.assert_allclose(small[0].numpy(), native[0].numpy().reshape(16, 2, 16, 2).mean(axis=(1, 3)), atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 1, 4, 4), (6, 1, 4, 4, 4)])
def test_augmentation_is_seeded_per_image_and_label_preserving(shape: tuple[int, ...]) -> None:
    images = torch.arange(float(np.prod(shape[1:]))).reshape(1, *shape[1:]).repeat(shape[0], *([1] * (len(shape) - 1)))
    first = augment_images(images, torch.Generator().manual_seed(5))
    again = augment_images(images, torch.Generator().manual_seed(5))
    other = augment_images(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    for original, moved in zip(images, first):  # same pixels, moved around
        assert torch.equal(original.flatten().sort().values, moved.flatten().sort().values)
    assert len({tuple(x.flatten().tolist()) for x in first}) > 1  # images get different draws
    assert torch.equal(images[0], images[-1])  # the input is untouched


def test_3d_volumes_are_oriented_to_ras_and_resampled(tmp_path: Path) -> None:
    volume = np.zeros((8, 8, 4), dtype=np.float32)
    volume[0, 0, 0] = 1000.0  # a marker in the first voxel of an LPS volume with 2 mm slices
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume, lps), tmp_path / "v.nii.gz")
    chain = load_transforms(image_size=8, window=(0, 1000), spatial_dims=3, spacing=(1.0, 1.0, 1.0), roi_size=(8, 8, 8))
    image = chain({"image": str(tmp_path / "v.nii.gz")})["image"]
    assert image.shape == (1, 8, 8, 8)
    peak = np.unravel_index(int(image.argmax()), image.shape[1:])
    assert peak[:2] == (7, 7)  # L->R and P->A flipped the first two axes
    resampled = load_transforms(image_size=8, window=(0, 1000), spatial_dims=3, spacing=(1.0, 1.0, 1.0), roi_size=None)
    inner = resampled.transforms[:-3]  # before intensity, resize and the metadata drop
    data = {"image": str(tmp_path / "v.nii.gz")}
    for step in inner:
        data = step(data)
    assert tuple(data["image"].shape[1:]) == (8, 8, 7)  # 4 slices 2 mm apart become 7 at 1 mm


def test_rgb_becomes_grey_as_pil_converts_to_l() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    rgb[0, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]  # pure colours: 76, 150, 29 in PIL's L, not 85 each
    grey = ConformImaged("image", in_channels=1, spatial_dims=2)({"image": torch.as_tensor(rgb).permute(2, 0, 1)})
    pil = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    assert grey["image"].shape == (1, 16, 16)
    np.testing.assert_allclose(grey["image"][0].numpy(), pil, atol=0.51)  # PIL rounds to integers
