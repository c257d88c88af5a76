"""DICOM reading: HU, spacing, series order along the slice normal, compressed syntaxes, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from monai.data import PydicomReader
from monai.transforms import EnsureChannelFirstd, LoadImaged
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medmeta.data.dicom import (
    DecoderMissingError,
    DicomReadError,
    DicomSeriesError,
    DicomTruncatedError,
    MedmetaDicomReader,
    read_dicom,
)
from medmeta.data.pictures import MedmetaPictureReader, convert_picture, read_picture

SECRET = "SECRET-PATIENT-4711"  # a tag value that must never reach metadata or messages
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_dataset(stored: np.ndarray, *, position=(0.0, 0.0, 0.0), orientation=AXIAL, spacing=(0.5, 0.7),
               series_uid: str = "1.2.3.4", instance: int = 1, slope: float = 1.0, intercept: float = -1024.0,
               frames: int | None = None) -> Dataset:
    """A CT dataset with unsigned 16-bit stored values ([rows, cols] or [frames, rows, cols])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.PatientID, ds.PatientName, ds.StudyDate = SECRET, f"{SECRET}^Name", "20010203"
    ds.SeriesInstanceUID, ds.InstanceNumber = series_uid, instance
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(position), list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = stored.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames, ds.SpacingBetweenSlices = frames, 3.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def stored_image(seed: int, shape=(12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)


def write_series(folder: Path, *, n: int = 6, gap: float = 2.5, orientation=AXIAL, seed: int = 0) -> list[np.ndarray]:
    """Write n slices with file names and instance numbers shuffled against position; return HU per position."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    rng = np.random.default_rng(seed)
    names, instances = rng.permutation(n), rng.permutation(n)
    expected = []
    for k in range(n):
        stored = stored_image(100 + k)
        position = np.array([-3.0, 7.0, 11.0]) + k * gap * normal
        write(ct_dataset(stored, position=position, orientation=orientation, instance=int(instances[k]) + 1),
              folder / f"slice{names[k]:02d}.dcm")
        expected.append(stored.astype(np.float32) - 1024)
    return expected


def test_single_frame_is_in_hounsfield_units_with_row_col_spacing(tmp_path: Path) -> None:
    stored = stored_image(1)
    path = write(ct_dataset(stored, slope=2.0, intercept=-1000.0), tmp_path / "a.dcm")
    array, spacing = read_dicom(path)
    assert array.dtype == np.float32 and array.shape == (12, 16)
    np.testing.assert_array_equal(array, stored.astype(np.float32) * 2 - 1000)
    assert spacing == (0.5, 0.7)


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)],  # axial; oblique coronal (normal in the x-y plane, z constant)
    ids=["axial", "oblique"],
)
def test_series_is_ordered_along_the_slice_normal(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    expected = write_series(tmp_path / "series", orientation=orientation)
    array, spacing = read_dicom(tmp_path / "series")
    assert array.shape == (6, 12, 16)
    np.testing.assert_array_equal(array, np.stack(expected))
    assert spacing == pytest.approx((2.5, 0.5, 0.7))


def test_multi_frame_file_is_a_volume(tmp_path: Path) -> None:
    stored = np.stack([stored_image(k) for k in range(4)])
    path = write(ct_dataset(stored, frames=4), tmp_path / "mf.dcm")
    array, spacing = read_dicom(path)
    assert array.shape == (4, 12, 16)
    np.testing.assert_array_equal(array, stored.astype(np.float32) - 1024)
    assert spacing == (3.0, 0.5, 0.7)


def _remove_middle(folder: Path) -> None:
    by_depth = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    by_depth[2].unlink()


def _mix_spacing(folder: Path) -> None:
    path = sorted(folder.iterdir())[1]
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(path)


def _mix_series(folder: Path) -> None:
    path = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "1.2.3.999"
    ds.save_as(path)


def _mix_patients(folder: Path) -> None:
    path = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(path)
    ds.PatientID = SECRET + "-other"
    ds.save_as(path)


def _duplicate(folder: Path) -> None:
    first = sorted(folder.iterdir())[0]
    shutil.copy(first, folder / "copy.dcm")


def _corrupt_slice(folder: Path) -> None:
    sorted(folder.iterdir())[2].write_bytes(b"\x00" * 200)


def _no_dicom(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()
    (folder / "notes.txt").write_text("not an image")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_remove_middle, "non-uniform slice gaps"),
        (_mix_spacing, "mixed pixel spacing"),
        (_mix_series, "mixed series"),
        (_mix_patients, "mixed patients"),
        (_duplicate, "duplicated slice position"),
        (_corrupt_slice, "empty or not DICOM"),
        (_no_dicom, "zero valid slices"),
    ],
)
def test_bad_series_is_rejected_naming_the_folder(tmp_path: Path, damage, words: str) -> None:
    folder = tmp_path / "series"
    write_series(folder)
    damage(folder)
    with pytest.raises(DicomSeriesError) as info:
        read_dicom(folder)
    assert isinstance(info.value, ValueError) and info.value.reason == "inconsistent-series"
    assert str(folder) in str(info.value) and words in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.keyword)
def test_compressed_files_decode_to_the_original(tmp_path: Path, syntax) -> None:
    stored = stored_image(7, shape=(32, 32))  # openjpeg refuses to encode images smaller than 32 px
    ds = ct_dataset(stored)
    ds.compress(syntax)
    path = write(ds, tmp_path / "c.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    array, _ = read_dicom(path)
    np.testing.assert_array_equal(array, stored.astype(np.float32) - 1024)


def _bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never the network: only files shipped with pydicom
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_bundled_lossless_files_equal_the_uncompressed_one(name: str) -> None:
    reference, _ = read_dicom(_bundled("MR_small.dcm"))
    array, spacing = read_dicom(_bundled(name))
    assert array.shape == (64, 64) and spacing == (0.3125, 0.3125)
    np.testing.assert_array_equal(array, reference)


def test_bundled_ct_and_jpeg_baseline() -> None:
    ds = pydicom.dcmread(_bundled("CT_small.dcm"))
    array, _ = read_dicom(_bundled("CT_small.dcm"))
    np.testing.assert_array_equal(array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    rgb, spacing = read_dicom(_bundled("SC_rgb_jpeg_dcmtk.dcm"))
    assert pydicom.dcmread(_bundled("SC_rgb_jpeg_dcmtk.dcm")).file_meta.TransferSyntaxUID.keyword == "JPEGBaseline8Bit"
    assert rgb.shape == (100, 100, 3) and len(spacing) == 2 and np.ptp(rgb) > 0


def test_bundled_truncated_file_is_reported_as_truncated() -> None:
    with pytest.raises(DicomTruncatedError) as info:
        read_dicom(_bundled("MR_truncated.dcm"))
    assert info.value.reason == "truncated"


@pytest.mark.parametrize("cut", ["header", "pixels"])
def test_truncated_files(tmp_path: Path, cut: str) -> None:
    data = write(ct_dataset(stored_image(2)), tmp_path / "a.dcm").read_bytes()
    end = 300 if cut == "header" else len(data) - 50
    (tmp_path / "cut.dcm").write_bytes(data[:end])
    with pytest.raises(DicomTruncatedError, match="cut.dcm"):
        read_dicom(tmp_path / "cut.dcm")


def test_non_dicom_and_non_image_dicom(tmp_path: Path) -> None:
    (tmp_path / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(600))
    with pytest.raises(DicomReadError) as info:
        read_dicom(tmp_path / "noise.dcm")
    assert info.value.reason == "unreadable"
    report = ct_dataset(stored_image(3))
    del report.PixelData, report.Rows, report.Columns
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    with pytest.raises(DicomReadError) as info:
        read_dicom(write(report, tmp_path / "sr.dcm"))
    assert info.value.reason == "not-image" and SECRET not in str(info.value)


@pytest.mark.parametrize("where", ["decoder", "pixel_array"])
def test_missing_decoder_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    ds = ct_dataset(stored_image(4))
    ds.compress(RLELossless)
    path = write(ds, tmp_path / "rle.dcm")
    decoder = get_decoder(RLELossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0"),
                                                  "gdcm": ("gdcm>=3.0.10",)})
    if where == "pixel_array":  # the decoder claims to be usable, pydicom's decode raises instead
        monkeypatch.setattr(type(decoder), "is_available", property(lambda self: True))
    with pytest.raises(DecoderMissingError) as info:
        read_dicom(path)
    assert isinstance(info.value, RuntimeError)
    assert info.value.packages == ["pylibjpeg", "pylibjpeg-rle", "python-gdcm"]
    assert "rle.dcm" in str(info.value) and "pylibjpeg-rle" in str(info.value)


def _load(reader, path: Path) -> torch.Tensor:
    return LoadImaged("image", reader=reader, image_only=True)({"image": str(path)})["image"]


def test_loadimaged_matches_monai_pydicom_reader_and_keeps_geometry_only(tmp_path: Path) -> None:
    path = write(ct_dataset(stored_image(5), position=(-10.0, 20.0, 30.0)), tmp_path / "ct.dcm")
    ours, theirs = _load(MedmetaDicomReader(), path), _load(PydicomReader(prune_metadata=True), path)
    assert ours.shape == (16, 12)  # the transpose of pixel_array, like PydicomReader(swap_ij=True)
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy())
    np.testing.assert_allclose(ours.meta["spacing"], theirs.meta["spacing"])
    allowed = {"affine", "original_affine", "spatial_shape", "spacing", "original_channel_dim", "space",
               "filename_or_obj"}
    assert set(ours.meta) <= allowed
    assert SECRET not in repr(ours.meta) and "20010203" not in repr(ours.meta)
    assert EnsureChannelFirstd("image")({"image": ours})["image"].shape == (1, 16, 12)


def test_loadimaged_reads_series_and_raises_our_error(tmp_path: Path) -> None:
    expected = write_series(tmp_path / "series")
    volume = _load(MedmetaDicomReader(), tmp_path / "series")
    assert volume.shape == (16, 12, 6)  # [col, row, slice]
    np.testing.assert_array_equal(volume.numpy(), np.stack(expected).transpose(2, 1, 0))
    np.testing.assert_allclose(volume.meta["spacing"], (0.7, 0.5, 2.5))
    _remove_middle(tmp_path / "series")
    with pytest.raises(DicomSeriesError):  # not swallowed by LoadImage's fallback to other readers
        _load(MedmetaDicomReader(), tmp_path / "series")


def test_loadimaged_hands_other_formats_to_monai_readers(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (8, 12)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = _load(MedmetaDicomReader(), tmp_path / "a.png")
    np.testing.assert_array_equal(image.numpy(), pixels.T)  # MONAI's PILReader, as without our reader


def test_verify_suffix(tmp_path: Path) -> None:
    reader = MedmetaDicomReader()
    assert reader.verify_suffix("a.dcm") and reader.verify_suffix(["a.DICOM", "b.ima"])
    assert reader.verify_suffix(tmp_path)
    assert not reader.verify_suffix("a.nii.gz") and not reader.verify_suffix(["a.dcm", "b.png"])


def test_16bit_pictures_keep_their_values(tmp_path: Path) -> None:
    values = np.linspace(300, 65000, 48).reshape(6, 8).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    np.testing.assert_array_equal(read_picture(tmp_path / "a.png"), values)  # not clipped or scaled to 8 bit
    big_endian = Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B" and convert_picture(big_endian).mode == "I;16"
    np.testing.assert_array_equal(np.asarray(convert_picture(big_endian)), values)
    loaded = _load(MedmetaPictureReader(), tmp_path / "a.png")
    np.testing.assert_array_equal(loaded.numpy(), values.T)


def test_picture_reader_gives_palette_colours_not_indices(tmp_path: Path) -> None:
    colours = np.random.default_rng(0).integers(0, 255, (8, 12, 3)).astype(np.uint8)
    Image.fromarray(colours).quantize(colors=8).save(tmp_path / "p.png")
    shown = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(read_picture(tmp_path / "p.png"), shown)
    loaded = _load(MedmetaPictureReader(), tmp_path / "p.png")
    np.testing.assert_array_equal(loaded.numpy(), shown.transpose(1, 0, 2))  # MONAI's axes: [cols, rows, channels]
