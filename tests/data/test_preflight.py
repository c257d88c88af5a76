"""Preflight reads every file fully and names what is wrong with a reason code, never raising."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import RLELossless

from medmeta.data.preflight import REASON_CODES, FileProblem, check_image, window_problem
from medmeta.data.presets import Intensity
from tests.data.test_readers import SECRET, ct_dataset, write

def ct(path: Path, stored: np.ndarray | None = None, *, z: float = 0.0, spacing=(0.5, 0.5),
       frames: int | None = None, compress: bool = False) -> Path:
    """Write a small CT DICOM file (unsigned 12-bit stored values, HU = stored - 1024)."""
    if stored is None:
        stored = np.random.default_rng(int(z * 10) + 1).integers(0, 4096, (16, 16)).astype(np.uint16)
    ds = ct_dataset(stored, position=(0.0, 0.0, z), spacing=spacing, series_uid="1.2.3", frames=frames)
    if compress:
        ds.compress(RLELossless)
    return write(ds, path)


def series(folder: Path, n: int = 4) -> Path:
    for k in range(n):
        ct(folder / f"s{k}.dcm", z=2.0 * k)
    return folder


def nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def png(path: Path, data: np.ndarray) -> Path:
    Image.fromarray(data).save(path)
    return path


def noise(shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 200, shape).astype(dtype)


def png16(path: Path, low: int = 20000, high: int = 30000) -> Path:
    """A 16-bit grey PNG (mode I;16) with values from low to high."""
    Image.fromarray(np.linspace(low, high, 64).reshape(8, 8).astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def one_colour_palette(path: Path) -> Path:
    """A palette PNG whose indices vary but whose 256 palette entries are all the same grey."""
    image = Image.fromarray(noise((8, 8)), "P")
    image.putpalette([90, 90, 90] * 256)
    image.save(path)
    return path


def raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def cut(path: Path, keep: int) -> Path:
    """Keep the first `keep` bytes (negative: drop that many from the end)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


def _decoder_missing(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    decoder = get_decoder(RLELossless)
    path = ct(tmp / "rle.dcm", compress=True)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    return path


def _mixed_spacing(tmp: Path) -> Path:
    folder = series(tmp / "series")
    ct(folder / "s1.dcm", z=2.0, spacing=(0.8, 0.8))
    return folder


def _missing_slice(tmp: Path) -> Path:
    folder = series(tmp / "series")
    (folder / "s2.dcm").unlink()
    return folder


def _sr_without_pixels(tmp: Path) -> Path:
    ds = pydicom.dcmread(ct(tmp / "sr.dcm"))
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.BasicTextSRStorage
    del ds.Rows, ds.Columns
    ds.save_as(tmp / "sr.dcm")
    return tmp / "sr.dcm"


Builder = Callable[[Path, pytest.MonkeyPatch], Path]
BAD: list[tuple[str, Builder, int, str]] = [
    ("zero-byte-dcm", lambda t, m: raw(t / "a.dcm", b""), 2, "empty"),
    ("zero-byte-nii", lambda t, m: raw(t / "a.nii", b""), 2, "empty"),
    ("random-dcm", lambda t, m: raw(t / "r.dcm", noise((700,)).tobytes()), 2, "unreadable"),
    ("dicom-header-cut", lambda t, m: cut(ct(t / "h.dcm"), 300), 2, "truncated"),
    ("dicom-pixels-cut", lambda t, m: cut(ct(t / "p.dcm"), -40), 2, "truncated"),
    ("dicom-sr-no-pixels", lambda t, m: _sr_without_pixels(t), 2, "not-image"),
    ("decoder-missing", lambda t, m: _decoder_missing(t, m), 2, "decoder-missing"),
    ("series-mixed-spacing", lambda t, m: _mixed_spacing(t), 3, "inconsistent-series"),
    ("series-missing-slice", lambda t, m: _missing_slice(t), 3, "inconsistent-series"),
    ("series-no-dicom", lambda t, m: raw(t / "notes.txt", b"x").parent, 3, "inconsistent-series"),
    ("nifti-garbled", lambda t, m: raw(t / "g.nii", noise((700,)).tobytes()), 2, "unreadable"),
    ("nifti-header-cut", lambda t, m: cut(nifti(t / "h.nii", noise((8, 8), np.float32)), 200), 2, "truncated"),
    ("nifti-voxels-cut", lambda t, m: cut(nifti(t / "v.nii", noise((8, 8, 4), np.float32)), -60), 3, "truncated"),
    ("nifti-gz-cut", lambda t, m: cut(nifti(t / "v.nii.gz", noise((8, 8, 4), np.float32)), 300), 3, "truncated"),
    ("nifti-gz-not-gzip", lambda t, m: raw(t / "n.nii.gz", nifti(t / "n.nii", noise((8, 8))).read_bytes()), 2,
     "unreadable"),
    ("nifti-nan", lambda t, m: nifti(t / "nan.nii", np.where(noise((8, 8)) > 100, np.nan, 1.0).astype(np.float32)),
     2, "non-finite"),
    ("nifti-inf", lambda t, m: nifti(t / "inf.nii", np.full((8, 8, 3), np.inf, np.float32)), 3, "non-finite"),
    ("png-constant", lambda t, m: png(t / "c.png", np.full((8, 8), 7, np.uint8)), 2, "constant"),
    ("png-palette-one-colour", lambda t, m: one_colour_palette(t / "p.png"), 2, "constant"),  # indices vary
    ("png-16bit-under-ct-window", lambda t, m: png16(t / "w.png"), 2, "constant-after-window"),
    ("dicom-constant", lambda t, m: ct(t / "c.dcm", np.full((16, 16), 1000, np.uint16)), 2, "constant"),
    ("nifti-3d-as-2d", lambda t, m: nifti(t / "v.nii", noise((8, 8, 4), np.float32)), 2, "wrong-dims"),
    ("multiframe-as-2d", lambda t, m: ct(t / "mf.dcm", noise((3, 16, 16), np.uint16), frames=3), 2, "wrong-dims"),
    ("series-as-2d", lambda t, m: series(t / "s"), 2, "not-image"),
    ("nifti-4d-as-3d", lambda t, m: nifti(t / "t.nii", noise((8, 8, 4, 2), np.float32)), 3, "wrong-dims"),
    ("png-as-3d", lambda t, m: png(t / "a.png", noise((8, 8))), 3, "wrong-dims"),
    ("png-cut", lambda t, m: cut(png(t / "a.png", noise((64, 64))), 200), 2, "truncated"),
    ("png-random", lambda t, m: raw(t / "r.png", noise((300,)).tobytes()), 2, "unreadable"),
    ("text-file", lambda t, m: raw(t / "notes.txt", b"hello"), 2, "not-image"),
]


@pytest.mark.parametrize(("build", "dims", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_gets_its_reason_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture, build: Builder, dims: int, code: str) -> None:
    path = build(tmp_path, monkeypatch)
    with caplog.at_level(logging.DEBUG):
        problem = check_image(path, spatial_dims=dims, intensity=Intensity())  # fit's default window
    assert isinstance(problem, FileProblem) and problem.path == path
    assert problem.code == code, problem
    assert problem.detail and "\n" not in problem.detail
    assert SECRET not in problem.detail and SECRET not in caplog.text


def test_every_reason_code_is_covered() -> None:
    assert {code for *_, code in BAD} == set(REASON_CODES)


def test_decoder_missing_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problem = check_image(_decoder_missing(tmp_path, monkeypatch))
    assert problem is not None and problem.reason == "decoder-missing:pylibjpeg,pylibjpeg-rle"
    assert problem.packages == ("pylibjpeg", "pylibjpeg-rle") and "pylibjpeg-rle" in problem.detail


GOOD: list[tuple[str, Callable[[Path], Path], int]] = [
    ("dicom", lambda t: ct(t / "a.dcm"), 2),
    ("dicom-rle", lambda t: ct(t / "a.dcm", compress=True), 2),
    ("dicom-series-3d", lambda t: series(t / "s"), 3),
    ("dicom-multiframe-3d", lambda t: ct(t / "mf.dcm", noise((3, 16, 16), np.uint16), frames=3), 3),
    ("nifti-2d", lambda t: nifti(t / "a.nii", noise((8, 8), np.float32)), 2),
    ("nifti-2d-xy1", lambda t: nifti(t / "a.nii.gz", noise((8, 8, 1), np.int16)), 2),
    ("nifti-3d", lambda t: nifti(t / "a.nii.gz", noise((8, 8, 4), np.float32)), 3),
    ("png-gray", lambda t: png(t / "a.png", noise((8, 8))), 2),
    ("png-gray-16bit", lambda t: png(t / "a.png", noise((8, 8), np.uint16) * 300), 2),
    ("png-rgb", lambda t: png(t / "a.png", noise((8, 8, 3))), 2),
    ("jpeg", lambda t: png(t / "a.jpg", noise((16, 16, 3))), 2),
]


@pytest.mark.parametrize(("build", "dims"), [g[1:] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_file_passes(tmp_path: Path, build: Callable[[Path], Path], dims: int) -> None:
    assert check_image(build(tmp_path), spatial_dims=dims) is None
    assert check_image(build(tmp_path), spatial_dims=dims, intensity=Intensity()) is None


def test_constant_after_window_depends_on_the_intensity_setting(tmp_path: Path) -> None:
    path = png16(tmp_path / "w.png")
    problem = check_image(path, intensity=Intensity(window=(-1100, 400)))
    assert problem is not None and problem.code == "constant-after-window"
    assert "(every pixel becomes 1)" in problem.detail and "[-1100, 400]" in problem.detail and "20000 to 30000" in problem.detail
    brain = check_image(png16(tmp_path / "b.png", 100, 300), intensity=Intensity(preset="ct-brain"))  # [0, 80]
    assert brain is not None and brain.code == "constant-after-window" and "ct-brain" in brain.detail
    assert check_image(path) is None  # raw values only
    for fitting in (Intensity(preset="xray"), Intensity(window=None), Intensity(window=(0, 65535))):
        assert check_image(path, intensity=fitting) is None, fitting


def test_window_problem() -> None:
    assert window_problem(torch.ones(1, 8, 8)) == "constant after the intensity window (every pixel becomes 1)"
    assert window_problem(np.zeros((8, 8), np.float32)) is not None
    assert window_problem(torch.full((4, 4), float("nan"))) is not None
    assert window_problem(torch.linspace(0, 1, 64).reshape(1, 8, 8)) is None


# --- one slice is never a volume; a cine loop is neither (audit 44, D3 and D4) ---

@pytest.mark.parametrize("shape", [(1, 16, 16), (16, 1, 16), (16, 16, 1)], ids=["1xHxW", "Hx1xW", "HxWx1"])
def test_a_nifti_slice_is_2d_whichever_axis_is_one(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = nifti(tmp_path / "slice.nii.gz", noise(shape, np.float32))
    assert check_image(path, spatial_dims=2) is None
    problem = check_image(path, spatial_dims=3)
    assert problem is not None and problem.reason == "wrong-dims" and "a single slice" in problem.detail


def _cine(path: Path, pointer: str | None) -> Path:
    from pydicom.tag import Tag

    ds = ct_dataset(noise((10, 16, 16), np.uint16), frames=10)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.SpacingBetweenSlices
    ds.Modality, ds.FrameTime = "US", 33.3
    if pointer is not None:
        ds.FrameIncrementPointer = Tag(pointer)
    return write(ds, path)


@pytest.mark.parametrize("pointer", ["FrameTime", "FrameTimeVector"])
def test_a_cine_multi_frame_is_wrong_dims_in_2d_and_3d_as_a_4d_nifti(tmp_path: Path, pointer: str) -> None:
    from medmeta.data.dicom import DicomReadError, read_dicom

    path = _cine(tmp_path / "cine.dcm", pointer)
    for dims in (2, 3):
        problem = check_image(path, spatial_dims=dims)
        assert problem is not None and problem.reason == "wrong-dims", dims
        assert "time series (cine), not slices" in problem.detail and SECRET not in problem.detail
        loop = nifti(tmp_path / "loop.nii.gz", noise((16, 16, 1, 10), np.float32))  # the NIfTI twin: X x Y x 1 x T
        assert check_image(loop, spatial_dims=dims).reason == "wrong-dims"
    with pytest.raises(DicomReadError, match="cine") as error:  # the reader refuses it too
        read_dicom(path)
    assert error.value.reason == "wrong-dims"
    assert check_image(_cine(tmp_path / "frames.dcm", None), spatial_dims=3) is None  # frames not said to be time
