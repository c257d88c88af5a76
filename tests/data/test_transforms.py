"""The cached transform chain maps Hounsfield units through the CT window, with no metadata left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medmeta.data.transforms import augment_images, load_transforms


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
