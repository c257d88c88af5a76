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


# --- 2D: a NIfTI slice loads as the DICOM slice it was made from shows (audit 44, D3 and D6) ---

PLANES = {  # ImageOrientationPatient (LPS) of the standard planes as scanners write them
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}


@pytest.mark.parametrize("plane", PLANES)
def test_a_2d_nifti_slice_loads_as_its_dicom_shows(tmp_path: Path, plane: str) -> None:
    from medmeta.data.dicom import MedmetaDicomReader
    from medmeta.data.preflight import check_image
    from tests.data.test_readers import ct_dataset, stored_image, write

    dicom = write(ct_dataset(stored_image(3, (12, 16)), position=(-5.0, 9.0, 20.0), orientation=PLANES[plane]),
                  tmp_path / "slice.dcm")  # fmt: skip
    array, meta = MedmetaDicomReader().get_data(dicom)  # [column, row] and its RAS affine, as dcm2niix sees it
    as_scanned = nib.Nifti1Image(array[..., None], meta["affine"])
    nib.save(as_scanned, tmp_path / "scanned.nii.gz")
    nib.save(nib.as_closest_canonical(as_scanned), tmp_path / "canonical.nii.gz")  # RAS: 1 x Y x Z when sagittal
    assert nib.load(tmp_path / "canonical.nii.gz").shape.index(1) == {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    chain = load_transforms(image_size=12, window=None, spatial_dims=2)
    expected = chain({"image": str(dicom)})["image"]
    for name in ("scanned.nii.gz", "canonical.nii.gz"):
        assert check_image(tmp_path / name, spatial_dims=2) is None  # preflight and load agree: one 2D slice
        loaded = chain({"image": str(tmp_path / name)})["image"]
        assert loaded.shape == (1, 12, 12) and torch.allclose(loaded, expected, atol=1e-6), (plane, name)


def test_png_and_dicom_of_the_same_pixels_still_load_alike(tmp_path: Path) -> None:
    from tests.data.test_readers import ct_dataset, write

    pixels = np.random.default_rng(4).integers(0, 256, (12, 16)).astype(np.uint16)
    dicom = write(ct_dataset(pixels, intercept=0.0), tmp_path / "a.dcm")
    Image.fromarray(pixels.astype(np.uint8), "L").save(tmp_path / "a.png")
    chain = load_transforms(image_size=12, window=None, spatial_dims=2)
    assert torch.allclose(chain({"image": str(tmp_path / "a.png")})["image"], chain({"image": str(dicom)})["image"],
                          atol=1e-6)  # fmt: skip
