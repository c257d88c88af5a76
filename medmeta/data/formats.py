"""The format table: every image file format medmeta reads, in one tuple.

Discovery (which files are images), preflight (how each is checked) and the load transforms (which
MONAI reader loads it) all read ``FORMATS``; each entry lives in its format's own file. To add a
format, write its file with an :class:`~medmeta.data.format_spec.ImageFormat` and add it here.
"""

from __future__ import annotations

from pathlib import Path

from monai.data import ImageReader

from medmeta.data.dicom import DICOM
from medmeta.data.format_spec import ImageFormat, ReadProblem
from medmeta.data.nifti import NIFTI
from medmeta.data.pictures import PICTURE

FORMATS: tuple[ImageFormat, ...] = (DICOM, NIFTI, PICTURE)

IMAGE_SUFFIXES = tuple(suffix for fmt in FORMATS for suffix in fmt.suffixes)
DICOM_SUFFIXES, NIFTI_SUFFIXES, PICTURE_SUFFIXES = DICOM.suffixes, NIFTI.suffixes, PICTURE.suffixes

__all__ = [
    "DICOM", "DICOM_SUFFIXES", "FORMATS", "IMAGE_SUFFIXES", "NIFTI", "NIFTI_SUFFIXES", "PICTURE", "PICTURE_SUFFIXES",
    "ImageFormat", "ReadProblem", "format_of", "monai_readers", "series_format",
]  # fmt: skip


def format_of(path: str | Path) -> ImageFormat | None:
    """The format whose suffix ``path``'s name ends with (the first in ``FORMATS``), else ``None``."""
    return next((fmt for fmt in FORMATS if fmt.matches(path)), None)


def series_format() -> ImageFormat:
    """The format whose folders are 3D series (DICOM)."""
    return next(fmt for fmt in FORMATS if fmt.series)


def monai_readers() -> list[ImageReader]:
    """The MONAI readers of ``FORMATS`` in registration order: the first format's last, as the last is tried first."""
    return [fmt.reader() for fmt in reversed(FORMATS) if fmt.reader is not None]
