"""The cached transform chain maps Hounsfield units through the CT window, with no metadata left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor

from medmeta.data.transforms import augment_transforms, load_transforms


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


def test_augmentation_is_seeded_and_label_preserving() -> None:
    image = torch.arange(16.0).reshape(1, 4, 4)
    outputs = []
    for _ in range(2):
        augment = augment_transforms()
        augment.set_random_state(seed=5)
        outputs.append([augment({"image": image})["image"] for _ in range(8)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert all(sorted(o.flatten().tolist()) == list(range(16)) for o in outputs[0])  # same pixels, moved
    assert any(not torch.equal(o, image) for o in outputs[0])
