"""Preflight: read every image fully and say, with a reason code, why it cannot be used.

Reason codes (``FileProblem.code``) and what they come from:

``not-image``
    a suffix of no format in ``medmeta.data.formats.FORMATS``: DICOM (``.dcm .dicom .ima``),
    NIfTI (``.nii .nii.gz``), PNG/JPEG (``.png .jpg .jpeg``); a DICOM file without pixel data (e.g. a structured report); a folder
    checked as 2D (folders are read only as 3D DICOM series).
``empty``
    a zero-byte file, or an image with no pixels.
``truncated``
    a DICOM file ending inside its header or pixel data; a NIfTI whose header or voxel data is
    cut short, or a ``.nii.gz`` whose gzip stream ends early; a PNG/JPEG cut short.
``decoder-missing``
    compressed DICOM pixel data whose pydicom decoder plugin is not installed. ``reason`` then
    reads ``decoder-missing:<pkg1>,<pkg2>`` and ``packages`` lists the pip packages.
``non-finite``
    NaN or Inf in the pixel values (after rescaling).
``constant``
    every pixel has the same value.
``constant-after-window``
    the raw values vary, but every pixel maps to one value (spread at most ``1e-6``) after the
    intensity step training uses (the preset or window, :func:`window_problem`): e.g. a 16-bit
    PNG under a CT window, all clipped to white. Checked only when ``check_image`` is given the
    intensity setting (``medmeta data check`` and ``fit``/``test`` setup always give it).
``wrong-dims``
    a volume with more than one slice checked as 2D, or a 2D image (a single slice) checked as 3D;
    data with more than three spatial axes, or a DICOM multi-frame whose frames are a time series
    (cine), in either. A NIfTI of shape ``X x Y x 1`` counts as 2D, and so does one slice stored
    ``1 x Y x Z`` or ``X x 1 x Z``; an RGB image is 2D with channels.
``inconsistent-series``
    a DICOM series folder with no valid slice, mixed series/size/orientation/spacing, duplicated
    positions or a missing slice.
``unreadable``
    everything else: random bytes under an image suffix, a ``.nii.gz`` that is not gzip at all
    (nothing was cut: the bytes are not what the name says) or a corrupt gzip stream, a NIfTI
    header nibabel rejects, undecodable pixel data, unsupported transfer syntaxes, any other error.

Each file is read by its format's check (the format table, ``formats.py``).
PNG/JPEG are read as they show (:func:`medmeta.data.pictures.read_picture`, the conversion
training uses), not as they store: palette colours, not indices; CMYK as RGB; alpha composited
on black; 16-bit values kept.

``check_image`` never raises for a bad file and never puts a DICOM tag value in ``detail``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmeta.data.dicom import DecoderMissingError, DicomReadError
from medmeta.data.formats import ReadProblem, format_of, series_format
from medmeta.data.presets import Intensity

logger = logging.getLogger(__name__)

REASON_CODES = (
    "not-image", "empty", "truncated", "decoder-missing", "non-finite", "constant", "constant-after-window",
    "wrong-dims", "inconsistent-series", "unreadable",
)
MIN_WINDOWED_SPREAD = 1e-6  # max - min after the intensity step at or below this: one constant image


@dataclass(frozen=True)
class FileProblem:
    """Why one file (or series folder) cannot be used.

    Attributes:
        path: the file or folder.
        reason: a reason code from ``REASON_CODES``; for a missing decoder with known packages,
            ``decoder-missing:<pkg1>,<pkg2>`` (``code`` gives the bare code).
        detail: one short human line, without any tag value.
        packages: pip packages to install (``decoder-missing`` only).
    """

    path: Path
    reason: str
    detail: str
    packages: tuple[str, ...] = ()

    @property
    def code(self) -> str:
        """The bare reason code: one of ``REASON_CODES``, or of ``records.DISCOVERY_CODES`` for discovery."""
        return self.reason.split(":", 1)[0]


def check_image(path: Path, *, spatial_dims: int = 2, intensity: Intensity | None = None) -> FileProblem | None:
    """Fully read one image (file, or DICOM series folder when spatial_dims == 3) and say what is wrong, or None.

    Args:
        path: an image file, or a folder holding one DICOM series.
        spatial_dims: 2 or 3, the dimensionality the data set is used with.
        intensity: the intensity setting the image is used with; when given, an image that is
            constant after it is a problem (``constant-after-window``). ``None`` checks raw
            values only.

    Returns:
        None if the image is usable, else a :class:`FileProblem` (never raises for a bad file).
    """
    path = Path(path)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    try:
        array, n_spatial, slices = _read(path, spatial_dims)
        _check_pixels(array, n_spatial, slices, spatial_dims)
        if intensity is not None:
            _check_windowed(array, intensity)
    except ReadProblem as problem:
        return _found(FileProblem(path, problem.reason, problem.detail))
    except DicomReadError as err:
        return _found(FileProblem(path, err.reason, err.detail))
    except DecoderMissingError as err:
        reason = f"decoder-missing:{','.join(err.packages)}" if err.packages else "decoder-missing"
        return _found(FileProblem(path, reason, err.detail, tuple(err.packages)))
    except Exception as err:  # a preflight must report, not crash; no message text (may hold values)
        return _found(FileProblem(path, "unreadable", f"cannot be read ({type(err).__name__})"))
    return None


def _found(problem: FileProblem) -> FileProblem:
    logger.debug("preflight: %s: %s (%s)", problem.path, problem.reason, problem.detail)
    return problem


def _read(path: Path, spatial_dims: int) -> tuple[np.ndarray, int, int]:
    """Return the pixel array, its number of spatial axes (the rest are channels) and slices: the format's check."""
    if path.is_dir():
        if spatial_dims != 3:
            raise ReadProblem("not-image", "a folder (DICOM series folders are read only when spatial_dims == 3)")
        return series_format().check(path)
    if not path.is_file():
        raise ReadProblem("unreadable", "no such file")
    if path.stat().st_size == 0:
        raise ReadProblem("empty", "zero-byte file")
    fmt = format_of(path)
    if fmt is None:
        raise ReadProblem("not-image", f"not an image file type ({path.suffix or 'no suffix'})")
    return fmt.check(path)


def _check_pixels(array: np.ndarray, n_spatial: int, slices: int, spatial_dims: int) -> None:
    """Raise a ReadProblem for empty, wrong-dims, non-finite or constant pixels."""
    if array.size == 0:
        raise ReadProblem("empty", "image has no pixels")
    if n_spatial > 3:
        raise ReadProblem("wrong-dims", f"{n_spatial}D data, but {spatial_dims}D images are configured")
    if spatial_dims == 2 and slices > 1:
        raise ReadProblem("wrong-dims", f"a 3D volume with {slices} slices, but 2D images are configured")
    if spatial_dims == 3 and slices < 2:
        raise ReadProblem("wrong-dims", f"a 2D image, a single slice (shape {tuple(array.shape)}), but 3D volumes "
                                        "are configured")
    problem = pixel_value_problem(array)
    if problem is not None:
        raise ReadProblem(*problem)


def pixel_value_problem(array: np.ndarray) -> tuple[str, str] | None:
    """``("non-finite" | "constant", detail)`` for pixel values no normalisation can use, else None."""
    finite = np.isfinite(array)
    if not finite.all():
        return "non-finite", f"{int(np.size(array) - finite.sum())} NaN/Inf pixel value(s)"
    if array.min() == array.max():
        return "constant", "every pixel has the same value"
    return None


def _check_windowed(array: np.ndarray, intensity: Intensity) -> None:
    """Raise a ``constant-after-window`` ReadProblem if the intensity step makes the image one constant."""
    windowed = intensity.transform("image")({"image": torch.as_tensor(np.asarray(array, dtype=np.float32)[None])})
    detail = window_problem(windowed["image"])
    if detail is not None:
        low, high = float(np.min(array)), float(np.max(array))
        raise ReadProblem("constant-after-window", f"{detail}: {intensity.describe()}, raw values {low:g} to {high:g}; "
                                                "choose a preset or window that fits these images")


def window_problem(image: torch.Tensor | np.ndarray) -> str | None:
    """Say why an image after the intensity window/preset is unusable, else None.

    Args:
        image: pixel values after the intensity step (any shape), e.g. a transformed query image.

    Returns:
        A one-line detail (reason code ``constant-after-window``) when every value is non-finite
        or ``max - min <= MIN_WINDOWED_SPREAD``: the image became one constant, such as a 16-bit
        PNG clipped to white by a CT window. None when the image still varies.
    """
    values = torch.as_tensor(image).detach().float()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return "no finite pixel value after the intensity window"
    low, high = float(values.min()), float(values.max())
    if high - low <= MIN_WINDOWED_SPREAD:
        return f"constant after the intensity window (every pixel becomes {low:.3g})"
    return None
