"""DICOM pixels as a viewer shows them (MONOCHROME1, PALETTE COLOR) and multi-frame files ordered by frame position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.sequence import Sequence

from medmeta.data.dicom import DicomReadError, DicomSeriesError, MedmetaDicomReader, read_dicom
from medmeta.data.preflight import check_image
from tests.data.test_readers import SECRET, _load, ct_dataset, stored_image, write

SHOWN = np.zeros((16, 16), np.uint16)
SHOWN[4:12, 4:12] = 4000  # a bright square on a dark background, as a viewer shows it


def _monochrome1(stored: np.ndarray, **kwargs: object) -> Dataset:
    ds = ct_dataset(stored, **kwargs)
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME1"
    return ds


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (1.0, -1024.0), (2.0, 5.0)])
def test_monochrome1_reads_like_the_monochrome2_image_a_viewer_shows(tmp_path: Path, slope: float,
                                                                       intercept: float) -> None:
    m2 = write(ct_dataset(SHOWN, slope=slope, intercept=intercept), tmp_path / "m2.dcm")
    m1 = write(_monochrome1(4095 - SHOWN, slope=slope, intercept=intercept), tmp_path / "m1.dcm")  # 12 bits stored
    expected, spacing = read_dicom(m2)
    array, m1_spacing = read_dicom(m1)
    np.testing.assert_array_equal(array, expected)  # stays in the stored range: [intercept, 4095 * slope + intercept]
    assert m1_spacing == spacing
    assert array[8, 8] > array[0, 0]  # the square is bright
    assert check_image(m1, intensity=None) is None
    np.testing.assert_array_equal(_load(MedmetaDicomReader(), m1).numpy(), expected.T)


def test_monochrome1_series_is_inverted_once_for_the_whole_volume(tmp_path: Path) -> None:
    for k, intercept in enumerate([-1024.0, -1000.0, -1024.0]):  # the rescale may differ between slices
        ds = _monochrome1(4095 - SHOWN - int(intercept + 1024), position=(0.0, 0.0, 2.0 * k), intercept=intercept)
        write(ds, tmp_path / "m1" / f"s{k}.dcm")
        write(ct_dataset(SHOWN, position=(0.0, 0.0, 2.0 * k)), tmp_path / "m2" / f"s{k}.dcm")
    array, _ = read_dicom(tmp_path / "m1")
    expected, _ = read_dicom(tmp_path / "m2")
    np.testing.assert_array_equal(array, expected)  # same pixel, same value on every slice


def test_series_mixing_monochrome1_and_monochrome2_is_rejected(tmp_path: Path) -> None:
    for k in range(3):
        ds = _monochrome1(4095 - SHOWN, position=(0.0, 0.0, 2.0 * k)) if k == 1 else \
            ct_dataset(SHOWN, position=(0.0, 0.0, 2.0 * k))
        write(ds, tmp_path / "series" / f"s{k}.dcm")
    with pytest.raises(DicomSeriesError, match="photometric interpretation"):
        read_dicom(tmp_path / "series")
    problem = check_image(tmp_path / "series", spatial_dims=3, intensity=None)
    assert problem is not None and problem.code == "inconsistent-series"


def test_monochrome1_with_a_modality_lut_inverts_within_the_lut_output_range(tmp_path: Path) -> None:
    ds = _monochrome1(np.arange(256, dtype=np.uint16).reshape(16, 16) % 16)
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsStored, ds.HighBit = 4, 3
    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [16, 0, 16], "US"
    lut.LUTData = np.arange(100, 260, 10, dtype="<u2").tobytes()  # stored 0..15 -> 100..250
    ds.ModalityLUTSequence = Sequence([lut])
    array, _ = read_dicom(write(ds, tmp_path / "lut.dcm"))
    stored = np.arange(256).reshape(16, 16) % 16
    np.testing.assert_array_equal(array, 350 - (100 + 10 * stored))


def test_monochrome1_float_pixels_are_refused(tmp_path: Path) -> None:
    ds = _monochrome1(SHOWN)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsAllocated, ds.FloatPixelData = 32, SHOWN.astype("<f4").tobytes()
    path = write(ds, tmp_path / "float.dcm")
    with pytest.raises(DicomReadError, match="float.dcm.*MONOCHROME1"):
        read_dicom(path)
    problem = check_image(path, intensity=None)
    assert problem is not None and problem.code == "unreadable" and SECRET not in problem.detail


def _palette(tmp_path: Path, bits: int = 16) -> tuple[Path, np.ndarray]:
    """An 8-bit PALETTE COLOR image whose indices are not ordered like brightness; return path and RGB shown."""
    idx = np.zeros((16, 16), np.uint8)
    idx[4:12, 4:12], idx[0:2, :] = 1, 2
    ds = ct_dataset(idx.astype(np.uint16))
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.Modality, ds.PhotometricInterpretation = "US", "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = idx.tobytes()
    top = 2**bits - 1
    colours = {"Red": [top, 0, top // 2], "Green": [top, 0, top // 4], "Blue": [top, 0, 0]}  # white, black, orange
    for name, values in colours.items():
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, bits])
        data = np.asarray(values + [0] * 253, "<u2" if bits == 16 else "u1")
        setattr(ds, f"{name}PaletteColorLookupTableData", data.tobytes())
    return write(ds, tmp_path / "palette.dcm"), apply_color_lut(idx, ds).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_color_dicom_gives_colours_not_indices(tmp_path: Path, bits: int) -> None:
    path, shown = _palette(tmp_path, bits)
    array, spacing = read_dicom(path)
    assert array.shape == (16, 16, 3) and spacing == (0.5, 0.7)
    np.testing.assert_array_equal(array, shown)
    assert array[6, 1].min() == 2**bits - 1 and array[8, 8].max() == 0  # white background, black square
    assert check_image(path, intensity=None) is None
    np.testing.assert_array_equal(_load(MedmetaDicomReader(), path).numpy(), shown.transpose(1, 0, 2))


def test_palette_color_without_its_lookup_table_is_refused(tmp_path: Path) -> None:
    path, _ = _palette(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.RedPaletteColorLookupTableData
    ds.save_as(path)
    with pytest.raises(DicomReadError, match="palette.dcm.*palette"):
        read_dicom(path)
    problem = check_image(path, intensity=None)
    assert problem is not None and problem.code == "unreadable"


N_FRAMES = 6
FRAMES = [stored_image(200 + k, shape=(8, 8)) for k in range(N_FRAMES)]  # frame k lies at z = 3k


def _multiframe(path: Path, order: list[int], z: list[float] | None = None) -> Path:
    """An enhanced-style multi-frame CT with the frames stored in ``order`` and per-frame positions."""
    z = [3.0 * k for k in range(N_FRAMES)] if z is None else z
    ds = ct_dataset(np.stack([FRAMES[k] for k in order]), position=(0.0, 0.0, z[order[0]]), frames=N_FRAMES)
    ds.SpacingBetweenSlices = 1.0  # wrong on purpose: the positions say 3 mm
    items = []
    for k in order:
        plane, item = Dataset(), Dataset()
        plane.ImagePositionPatient = [5.0, -2.0, z[k]]
        item.PlanePositionSequence = Sequence([plane])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    return write(ds, path)


@pytest.mark.parametrize("order", [list(range(N_FRAMES - 1, -1, -1)), [0, 3, 1, 5, 2, 4]],
                         ids=["superior-first", "scrambled"])
def test_multi_frame_is_ordered_by_frame_position_like_a_series(tmp_path: Path, order: list[int]) -> None:
    for k in range(N_FRAMES):
        ds = ct_dataset(FRAMES[k], position=(5.0, -2.0, 3.0 * k), series_uid="1.2.9")
        write(ds, tmp_path / "series" / f"{k}.dcm")
    path = _multiframe(tmp_path / "mf.dcm", order)
    expected, spacing = read_dicom(tmp_path / "series")
    array, mf_spacing = read_dicom(path)
    np.testing.assert_array_equal(array, expected)
    assert mf_spacing == pytest.approx(spacing) and mf_spacing[0] == pytest.approx(3.0)
    ours, reference = _load(MedmetaDicomReader(), path), _load(MedmetaDicomReader(), tmp_path / "series")
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    np.testing.assert_allclose(ours.affine.numpy(), reference.affine.numpy())
    assert check_image(path, spatial_dims=3, intensity=None) is None


@pytest.mark.parametrize(("z", "words"), [([0.0, 3.0, 6.0, 12.0, 15.0, 18.0], "non-uniform slice gaps"),
                                          ([0.0, 3.0, 3.0, 6.0, 9.0, 12.0], "duplicated slice position")],
                         ids=["gap", "duplicate"])
def test_multi_frame_with_irregular_frame_positions_is_rejected(tmp_path: Path, z: list[float], words: str) -> None:
    path = _multiframe(tmp_path / "mf.dcm", list(range(N_FRAMES)), z)
    with pytest.raises(DicomSeriesError, match=words) as info:
        read_dicom(path)
    assert "mf.dcm" in str(info.value) and SECRET not in str(info.value)
    problem = check_image(path, spatial_dims=3, intensity=None)
    assert problem is not None and problem.code == "inconsistent-series"


def test_multi_frame_with_positions_for_only_some_frames_is_rejected(tmp_path: Path) -> None:
    path = _multiframe(tmp_path / "mf.dcm", list(range(N_FRAMES)))
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(path)
    with pytest.raises(DicomSeriesError, match="mf.dcm.*no ImagePositionPatient"):
        read_dicom(path)


def test_multi_frame_with_a_rescale_per_frame_applies_each_frames_own(tmp_path: Path) -> None:
    """An enhanced CT may rescale every frame differently: frame k's HU come from frame k's slope and intercept."""
    intercepts = [-1024.0 + 100 * k for k in range(N_FRAMES)]
    for k in range(N_FRAMES):
        write(ct_dataset(FRAMES[k], position=(5.0, -2.0, 3.0 * k), series_uid="1.2.9", intercept=intercepts[k]),
              tmp_path / "series" / f"{k}.dcm")  # fmt: skip
    path = _multiframe(tmp_path / "mf.dcm", list(range(N_FRAMES)))
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    for item, intercept in zip(ds.PerFrameFunctionalGroupsSequence, intercepts):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1.0, intercept, "HU"
        item.PixelValueTransformationSequence = Sequence([transform])
    ds.save_as(path)
    np.testing.assert_array_equal(read_dicom(path)[0], read_dicom(tmp_path / "series")[0])
