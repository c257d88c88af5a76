"""DICOM reading that keeps geometry only (files, multi-frame files, series folders), and the DICOM format entry.

Why this module is longer than 300 lines: strict parsing, pixel decoding, geometry, series ordering and
the MONAI plug-in share private helpers and one privacy rule, so DICOM stays one file.

Every DICOM read is complete and strict: the header is parsed with pydicom's reading validation set to
RAISE, the file is checked for elements cut short by the end of the file, and the pixel data is
decoded, so a broken file fails here with a reason code (``err.reason``), never later as a
partial image. No DICOM tag value other than geometry and pixel encoding is read, logged or put
into an error message (trap 5 of the engineering notes).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.data.utils import affine_to_spacing, orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys
from pydicom import config as pydicom_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.tag import Tag

from medmeta.data.format_spec import ImageFormat

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIP_NAMES = {"gdcm": "python-gdcm"}  # pydicom names the import, pip wants the distribution
_TIME_TAGS = (Tag(0x0018, 0x1063), Tag(0x0018, 0x1065))  # FrameTime, FrameTimeVector: frames follow time


class DicomReadError(ValueError):
    """A DICOM file or series cannot be read; ``reason`` is a preflight reason code.

    Attributes:
        path: the file or series folder.
        detail: one short line without the path and without any tag value.
        reason: ``"unreadable"``, ``"not-image"``, ``"truncated"``, ``"inconsistent-series"`` or
            ``"wrong-dims"`` (a cine multi-frame: its frames are time, not slices).
    """

    reason = "unreadable"

    def __init__(self, path: str | Path, detail: str, *, reason: str | None = None) -> None:
        self.path = Path(path)
        self.detail = detail
        if reason is not None:
            self.reason = reason
        super().__init__(f"{self.path}: {detail}")


class DicomTruncatedError(DicomReadError):
    """The file ends before its header or pixel data does."""

    reason = "truncated"


class DicomSeriesError(DicomReadError):
    """A series folder does not hold one complete, regular series."""

    reason = "inconsistent-series"


class DecoderMissingError(RuntimeError):
    """The pixel data is compressed with a transfer syntax whose decoder plugin is not installed.

    Attributes:
        path: the file.
        packages: pip package names to install (may be empty if pydicom names none).
        transfer_syntax: the transfer syntax name, e.g. ``"RLE Lossless"``.
    """

    reason = "decoder-missing"

    def __init__(self, path: str | Path, transfer_syntax: str, packages: Sequence[str]) -> None:
        self.path = Path(path)
        self.transfer_syntax = transfer_syntax
        self.packages = list(packages)
        wanted = ", ".join(self.packages) if self.packages else "a pydicom pixel data plugin"
        self.detail = f"no decoder installed for {transfer_syntax}; install {wanted}"
        super().__init__(f"{self.path}: {self.detail}")


@dataclass(frozen=True)
class DicomImage:
    """Pixel values in real-world units plus the geometry needed for an affine (LPS, mm).

    ``array`` is ``[rows, cols]`` or ``[slices, rows, cols]``, with a trailing samples axis for
    colour images; ``spacing`` has one entry per spatial axis. ``row_cosine`` is the direction of
    increasing column index, ``col_cosine`` that of increasing row index; ``slice_step`` is the
    vector between consecutive slices (``None`` for 2D).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: np.ndarray
    row_cosine: np.ndarray
    col_cosine: np.ndarray
    slice_step: np.ndarray | None = None


def read_dicom(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a DICOM file, multi-frame file or series folder fully, in real-world units.

    Args:
        path: a DICOM file, or a folder holding one series (slices ordered by their position
            along the slice normal, not by file name or instance number).

    Returns:
        A float32 array (``[rows, cols]``, ``[frames, rows, cols]`` or ``[slices, rows, cols]``,
        plus a trailing samples axis for colour) and the spacing in mm, one value per spatial
        axis in array order.

    Raises:
        DicomReadError: not DICOM, no pixel data or undecodable (``reason`` says which);
            subclasses DicomTruncatedError and DicomSeriesError.
        DecoderMissingError: a compressed transfer syntax has no installed decoder.
    """
    image = load_dicom(path)
    return image.array, image.spacing


def load_dicom(path: str | Path) -> DicomImage:
    """Like :func:`read_dicom`, but return the full geometry as a :class:`DicomImage`."""
    path = Path(path)
    if path.is_dir():
        return _read_series(path)
    ds = _read_dataset(path)
    array = _as_shown(_pixels(ds, path), ds, path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    row_cos, col_cos, origin = _orientation(ds)
    in_plane = _pixel_spacing(ds)
    if n_frames == 1:
        return DicomImage(array, in_plane, origin, row_cos, col_cos)
    normal = np.cross(row_cos, col_cos)
    positions = _frame_positions(ds, path, n_frames)
    if positions is None:  # no per-frame positions: frames are taken to follow the slice normal, unless they are time
        if _frames_are_time(ds):
            raise DicomReadError(path, f"a multi-frame file whose {n_frames} frames are a time series (cine), not "
                                       "slices: neither a 2D image nor a 3D volume", reason="wrong-dims")
        gap = _frame_gap(ds)
        return DicomImage(array, (gap, *in_plane), origin, row_cos, col_cos, normal * gap)
    order = np.argsort(positions @ normal, kind="stable")  # like a series: along the normal, not storage order
    array, positions = array[order], positions[order]
    gap = _check_gaps(path, positions @ normal)
    step = (positions[-1] - positions[0]) / (n_frames - 1)
    return DicomImage(array, (gap, *in_plane), positions[0], row_cos, col_cos, step)


def _read_dataset(path: Path) -> Dataset:
    """Parse one file strictly and reject it if any element runs past the end of the file."""
    try:
        try:
            with pydicom_config.strict_reading():
                ds = pydicom.dcmread(path)
        except InvalidDicomError as err:
            if not str(err).startswith(("Expected explicit VR", "Expected implicit VR")):
                raise
            # a VR encoding that differs from the transfer syntax is a common encoder quirk that
            # pydicom reads correctly; the completeness checks below still apply
            logger.debug("%s: VR encoding differs from its transfer syntax; reading leniently", path)
            ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        if "DICM" in str(err) or "File Meta" in str(err):
            raise DicomReadError(path, "not a DICOM file (no DICOM file header)") from err
        raise DicomReadError(path, "malformed DICOM header (InvalidDicomError)") from err
    except (EOFError, struct.error, BytesLengthException) as err:  # cut inside an element's tag, VR or length
        raise DicomTruncatedError(path, "file ends inside the DICOM data set (truncated)") from err
    except Exception as err:  # OSError, or one of the many types pydicom raises on malformed input
        raise DicomReadError(path, f"cannot open or parse the file ({type(err).__name__})") from err
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if (isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH and elem.value is not None
                and len(elem.value) < elem.length):
            raise DicomTruncatedError(path, f"file ends inside element {tag} (truncated)")
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        sop_name = sop_class.name if sop_class is not None else "unknown SOP class"
        if len(ds) == 0 or "Rows" in ds or "Image Storage" in sop_name:
            raise DicomTruncatedError(path, "file ends before the pixel data (truncated)")
        raise DicomReadError(path, f"DICOM file without pixel data ({sop_name})", reason="not-image")
    return ds


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Decode the pixel data and apply the modality rescale (palette colour: the RGB colours); float32."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is None:
        raise DicomReadError(path, "no transfer syntax in the file meta information")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise DicomReadError(path, f"unsupported transfer syntax {syntax.name}") from err
    if not decoder.is_available:
        raise DecoderMissingError(path, syntax.name, _packages(decoder.missing_dependencies))
    try:
        array = ds.pixel_array
    except RuntimeError as err:
        if "missing dependencies" in str(err):
            raise DecoderMissingError(path, syntax.name, _packages(str(err).splitlines()[1:])) from err
        raise DicomReadError(path, f"pixel data cannot be decoded ({type(err).__name__})") from err
    except Exception as err:
        if "less than expected" in str(err) or "truncat" in str(err).lower():
            raise DicomTruncatedError(path, "pixel data is shorter than its header says (truncated)") from err
        raise DicomReadError(path, f"pixel data cannot be decoded ({type(err).__name__})") from err
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        # stored values are indices into the palette, whose colours are the image (no modality rescale applies);
        # the RGB result is then treated like any RGB DICOM, with the palette's bit depth (8 or 16 bits)
        try:
            return np.asarray(apply_color_lut(np.asarray(array), ds), dtype=np.float32)
        except Exception as err:
            raise DicomReadError(path, f"PALETTE COLOR image whose palette cannot be applied ({type(err).__name__})"
                                 ) from err
    return _rescale(np.asarray(array), ds)


def _packages(lines: Sequence[str]) -> list[str]:
    """Pip package names from pydicom's ``'<plugin> - requires a>=1, b and c'`` lines."""
    names: list[str] = []
    for line in lines:
        _, _, deps = line.partition("requires ")
        for dep in re.split(r",\s*|\s+and\s+", deps.strip()):
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dep.strip())
            if match:
                name = _PIP_NAMES.get(match.group(0), match.group(0))
                if name not in names:
                    names.append(name)
    return names


def _rescale(array: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values to real-world units (HU for CT) as float32, like MONAI's PydicomReader."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return array.astype(np.float32)
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(array, ds), dtype=np.float32)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    per_frame = _per_frame_rescale(ds) if slope is None and intercept is None else None
    if per_frame is not None and array.ndim == 3 and len(per_frame) == array.shape[0]:  # each frame its own rescale
        factors = np.asarray(per_frame, dtype=np.float32)
        return array.astype(np.float32) * factors[:, 0, None, None] + factors[:, 1, None, None]
    if slope is None and intercept is None:
        item = _functional_item(ds, "PixelValueTransformationSequence")
        if item is not None:
            slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    out = array.astype(np.float32) * float(1.0 if slope is None else slope)
    return (out + float(0.0 if intercept is None else intercept)).astype(np.float32, copy=False)


def _per_frame_rescale(ds: Dataset) -> list[tuple[float, float]] | None:
    """Each frame's (slope, intercept) when an enhanced file gives them per frame and they differ, else ``None``."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get("PixelValueTransformationSequence"):
        return None
    pairs = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        transform = item.get("PixelValueTransformationSequence")
        if not transform:
            return None
        slope, intercept = transform[0].get("RescaleSlope"), transform[0].get("RescaleIntercept")
        pairs.append((float(1.0 if slope is None else slope), float(0.0 if intercept is None else intercept)))
    return pairs if len(set(pairs)) > 1 else None


def _as_shown(array: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Invert a MONOCHROME1 image (low values display white) so that, like MONOCHROME2, high values are bright.

    Rescaled values ``x`` become ``low + high - x``, where ``[low, high]`` is the range the stored bits can
    represent after the modality rescale or LUT. So the result stays inside the image's own value range and a
    min-max preset shows exactly what a viewer shows; a fixed window applies to the inverted values (a window
    ``[a, b]`` on the original values is ``[low + high - b, low + high - a]`` here). Negating instead would put
    every value below zero, outside any window given for the data. ``ds`` gives the range (a series' first slice:
    one inversion for the whole volume); float pixel data has no representable range and is refused.
    """
    if ds.get("PhotometricInterpretation") != "MONOCHROME1":
        return array
    bits, signed = ds.get("BitsStored"), int(ds.get("PixelRepresentation", 0) or 0) == 1
    if "PixelData" not in ds or not bits:
        raise DicomReadError(path, "MONOCHROME1 image without integer stored values cannot be inverted for display")
    stored_low, stored_high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if stored_high - stored_low < 2**16:  # every representable value: a modality LUT need not be monotonic
        stored = np.arange(stored_low, stored_high + 1)
    else:
        stored = np.array([stored_low, stored_high])
    representable = _rescale(stored, ds)
    total = float(representable.min()) + float(representable.max())
    return (np.float32(total) - array).astype(np.float32, copy=False)


def _functional_item(ds: Dataset, sequence: str) -> Dataset | None:
    """First item of ``sequence`` in the shared (else first per-frame) functional groups."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if ds.get(groups) and sequence in ds[groups][0] and ds[groups][0][sequence].value:
            return ds[groups][0][sequence][0]
    return None


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """``(row, col)`` spacing in mm: PixelSpacing, ImagerPixelSpacing, functional groups, else 1."""
    for value in (ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")):
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    item = _functional_item(ds, "PixelMeasuresSequence")
    if item is not None and item.get("PixelSpacing") is not None:
        return float(item.PixelSpacing[0]), float(item.PixelSpacing[1])
    return 1.0, 1.0


def _frame_positions(ds: Dataset, path: Path, n_frames: int) -> np.ndarray | None:
    """Per-frame ImagePositionPatient (``[frames, 3]``, LPS mm), ``None`` when no frame has one.

    Raises DicomSeriesError when only some frames have a position, when the per-frame groups do not
    match the number of frames, or when frames differ in orientation (one volume cannot hold them).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    found = [item.PlanePositionSequence[0].get("ImagePositionPatient") if item.get("PlanePositionSequence") else None
             for item in per_frame]
    if all(p is None for p in found):
        return None
    if len(found) != n_frames:
        raise DicomSeriesError(path, f"{len(found)} per-frame functional groups for {n_frames} frames")
    if any(p is None or len(p) != 3 for p in found):
        raise DicomSeriesError(path, "some frames have no ImagePositionPatient, so frames cannot be ordered")
    orientations = [item.PlaneOrientationSequence[0].get("ImageOrientationPatient")
                    for item in per_frame if item.get("PlaneOrientationSequence")]
    if orientations:
        first = np.asarray(orientations[0], dtype=float)
        if any(o is None or len(o) != 6 or not np.allclose(np.asarray(o, dtype=float), first, atol=1e-4)
               for o in orientations):
            raise DicomSeriesError(path, "mixed orientation (ImageOrientationPatient) between frames")
    return np.asarray(found, dtype=float)


def _frames_are_time(ds: Dataset) -> bool:
    """Whether a multi-frame file's FrameIncrementPointer names FrameTime or FrameTimeVector (a cine loop)."""
    pointer = ds.get("FrameIncrementPointer")
    if pointer is None:
        return False
    tags = pointer if isinstance(pointer, (list, tuple, MultiValue)) else [pointer]
    return any(tag in _TIME_TAGS for tag in tags)


def _frame_gap(ds: Dataset) -> float:
    """Distance between frames of a multi-frame file (mm), 1.0 when the file does not say."""
    sources = [ds, _functional_item(ds, "PixelMeasuresSequence") or Dataset()]
    values = [src.get(key) for src in sources for key in ("SpacingBetweenSlices", "SliceThickness")]
    return next((float(v) for v in values if v is not None and float(v) > 0), 1.0)


def _orientation(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and position of the first pixel (LPS); axis-aligned if absent."""
    orient, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orient is None:
        item = _functional_item(ds, "PlaneOrientationSequence")
        orient = item.get("ImageOrientationPatient") if item is not None else None
    if position is None:
        item = _functional_item(ds, "PlanePositionSequence")
        position = item.get("ImagePositionPatient") if item is not None else None
    if orient is None or len(orient) != 6:
        row_cos, col_cos = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row_cos, col_cos = np.asarray(orient[:3], dtype=float), np.asarray(orient[3:], dtype=float)
    origin = np.zeros(3) if position is None or len(position) != 3 else np.asarray(position, dtype=float)
    return row_cos, col_cos, origin


def series_slices(folder: Path, files: list[Path] | None = None) -> list[Path]:
    """The files a series folder's volume is read from: visible files but DICOMDIR, non-empty, DICOM by content.

    ``files``: the folder's visible files other than DICOMDIR, when the caller has listed them already.
    """
    files = _series_files(folder) if files is None else files
    return [p for p in files if p.stat().st_size > 0 and is_dicom(p)]


def _series_files(folder: Path) -> list[Path]:
    """A series folder's visible files other than DICOMDIR, sorted (README.txt and the like included)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def _read_series(folder: Path) -> DicomImage:
    """Read one series folder; slices ordered along the slice normal, gaps checked."""
    files = _series_files(folder)
    dicom_files = series_slices(folder, files)
    for p in set(files) - set(dicom_files):  # README.txt and the like are ignored, a bad slice is not
        if p.suffix.lower() in DICOM_SUFFIXES:
            raise DicomSeriesError(folder, f"slice file {p.name} is empty or not DICOM")
    if len(dicom_files) < len(files):
        logger.debug("series %s: ignoring %d non-DICOM files", folder, len(files) - len(dicom_files))
    if not dicom_files:
        raise DicomSeriesError(folder, "series has zero valid slices (no DICOM file in the folder)")
    datasets = [(p, _read_dataset(p)) for p in dicom_files]
    for p, ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomSeriesError(folder, f"{p.name} is a multi-frame file inside a series folder")
        if ds.get("ImagePositionPatient") is None or ds.get("ImageOrientationPatient") is None:
            raise DicomSeriesError(folder, f"{p.name} has no ImagePositionPatient/ImageOrientationPatient, "
                                           "so slices cannot be ordered")
    _check_same(folder, datasets)
    row_cos, col_cos, _ = _orientation(datasets[0][1])
    normal = np.cross(row_cos, col_cos)
    depth = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
                      for _, ds in datasets])
    order = np.argsort(depth, kind="stable")
    datasets, depth = [datasets[i] for i in order], depth[order]
    gap = _check_gaps(folder, depth) if len(datasets) > 1 else _frame_gap(datasets[0][1])
    array = _as_shown(np.stack([_pixels(ds, p) for p, ds in datasets]), datasets[0][1], folder)
    first, last = (np.asarray(datasets[i][1].ImagePositionPatient, dtype=float) for i in (0, -1))
    step = (last - first) / (len(datasets) - 1) if len(datasets) > 1 else normal * gap
    return DicomImage(array, (gap, *_pixel_spacing(datasets[0][1])), first, row_cos, col_cos, step)


def _check_same(folder: Path, datasets: list[tuple[Path, Dataset]]) -> None:
    """One series UID, one patient, one size, one orientation and one pixel spacing (no values in messages)."""
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(uids) > 1:
        raise DicomSeriesError(folder, f"mixed series: {len(uids)} different SeriesInstanceUIDs")
    patients = {str(ds.get("PatientID", "")) for _, ds in datasets}
    if len(patients) > 1:  # one series is one patient: its first slice's would stand for all, in support or query
        raise DicomSeriesError(folder, f"mixed patients: {len(patients)} different PatientIDs")
    photometric = {str(ds.get("PhotometricInterpretation", "")) for _, ds in datasets}
    if len(photometric) > 1:  # e.g. one MONOCHROME1 slice among MONOCHROME2 ones would be read inverted
        raise DicomSeriesError(folder, f"mixed photometric interpretation: {', '.join(sorted(photometric))}")
    checks = (
        ("image size (Rows/Columns)", lambda ds: np.array([ds.get("Rows", 0), ds.get("Columns", 0)], float), 0.0),
        ("orientation (ImageOrientationPatient)", lambda ds: np.asarray(ds.ImageOrientationPatient, float), 1e-4),
        ("pixel spacing", lambda ds: np.asarray(_pixel_spacing(ds), dtype=float), 1e-4),
    )
    ref_path, ref = datasets[0]
    for what, get, tol in checks:
        expected = get(ref)
        for p, ds in datasets[1:]:
            value = get(ds)
            if value.shape != expected.shape or not np.allclose(value, expected, rtol=tol, atol=tol):
                raise DicomSeriesError(folder, f"mixed {what}: {p.name} differs from {ref_path.name}")


def _check_gaps(folder: Path, depth: np.ndarray) -> float:
    """Return the slice gap (mm); raise on duplicated positions or a non-uniform gap."""
    gaps = np.diff(depth)
    median = float(np.median(gaps))
    tolerance = max(0.01 * median, 0.01)
    if np.any(gaps <= 0.01):
        raise DicomSeriesError(folder, f"{int(np.sum(gaps <= 0.01))} duplicated slice position(s)")
    if np.any(np.abs(gaps - median) > tolerance):
        raise DicomSeriesError(folder, f"non-uniform slice gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                                       f"(median {median:.4g} mm): a slice is missing or mixed in")
    return median


class MedmetaDicomReader(ImageReader):
    """MONAI reader plug-in: DICOM files, multi-frame files and series folders via :func:`load_dicom`.

    The axis order follows MONAI's ``PydicomReader`` (``swap_ij=True``): spatial axes reversed, so
    a single-frame image is the transpose of ``pixel_array`` and a volume is ``[col, row, slice]``;
    a colour samples axis stays last (``original_channel_dim = -1``). The metadata holds geometry
    only (affine in RAS, spacing, shape), never a tag value.

    ``LoadImage`` falls back to its other readers whenever ``read`` raises. So ``read`` raises only
    for non-DICOM paths (PNG, NIfTI go to MONAI's readers) and ``get_data`` does the reading: our
    errors (e.g. :class:`DicomSeriesError`) reach the caller, and no other reader silently loads
    a rejected series.
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """True for ``.dcm``/``.dicom``/``.ima`` files and for folders (series)."""
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return bool(names) and all(Path(n).is_dir() or Path(n).suffix.lower() in DICOM_SUFFIXES for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: object) -> list[Path]:
        """Return the paths to read; ``ValueError`` if one is not a DICOM file or folder."""
        paths = [Path(n) for n in ([data] if isinstance(data, (str, Path)) else list(data))]
        for path in paths:
            if not (self.verify_suffix(path) or (path.is_file() and is_dicom(path))):
                raise ValueError(f"{path} is not a DICOM file or series folder")
        return paths

    def get_data(self, img: Sequence[Path] | Path) -> tuple[np.ndarray, dict]:
        """Read the image(s); several are stacked on a new first (channel) axis."""
        paths = [img] if isinstance(img, (str, Path)) else list(img)
        arrays, metas = zip(*(self._one(Path(p)) for p in paths))
        if len(arrays) == 1:
            return arrays[0], metas[0]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"cannot stack DICOM images of different shapes: {[a.shape for a in arrays]}")
        meta = dict(metas[0])
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays), meta

    @staticmethod
    def _one(path: Path) -> tuple[np.ndarray, dict]:
        image = load_dicom(path)
        n_spatial = len(image.spacing)
        has_channels = image.array.ndim > n_spatial
        axes = list(reversed(range(n_spatial))) + ([n_spatial] if has_channels else [])
        array = np.ascontiguousarray(np.transpose(image.array, axes))
        lps = np.eye(4)
        lps[:3, 0] = image.row_cosine * image.spacing[-1]  # axis 0: column index
        lps[:3, 1] = image.col_cosine * image.spacing[-2]  # axis 1: row index
        # the slice axis: between slices, else the slice normal (a single slice's affine stays invertible)
        lps[:3, 2] = image.slice_step if image.slice_step is not None else np.cross(image.row_cosine, image.col_cosine)
        lps[:3, 3] = image.origin
        affine = orientation_ras_lps(lps)
        shape = tuple(int(s) for s in array.shape[:n_spatial])
        meta = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.SPATIAL_SHAPE: shape,
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if has_channels else float("nan"),
            "spacing": affine_to_spacing(affine, r=n_spatial),
        }
        return array, meta


def check_dicom(path: Path) -> tuple[np.ndarray, int, int]:
    """Preflight read of a DICOM file or series folder: pixels, spatial axes, slices (the first axis of a volume)."""
    array, spacing = read_dicom(path)
    return array, len(spacing), array.shape[0] if len(spacing) == 3 else 1


DICOM = ImageFormat("DICOM", DICOM_SUFFIXES, check=check_dicom, reader=MedmetaDicomReader, series=True)
