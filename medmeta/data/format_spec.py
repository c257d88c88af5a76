"""What an image file format is to medmeta: its suffixes, its preflight check and its MONAI reader.

Each format's own file (``dicom.py``, ``nifti.py``, ``pictures.py``) defines one
:class:`ImageFormat`; ``formats.py`` lists them in ``FORMATS``, the one table discovery,
preflight and the load transforms read. A new format is one new file with its check (and a
reader if MONAI has none for its suffixes) plus its name in ``FORMATS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import ImageReader


class ReadProblem(Exception):
    """Why a format's preflight check cannot use a file: a preflight reason code and one short line of detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageFormat:
    """One image file format.

    Attributes:
        name: what the format is called in messages and docs.
        suffixes: lower-case file name endings (``".nii.gz"`` counts as one).
        check: reads one file fully and returns ``(pixels, spatial axes, slices)``: the pixel
            array (channels last, after the spatial axes), how many of its axes are spatial, and
            the number of slices (1 for a 2D image). Raises :class:`ReadProblem` (or an error with
            ``reason`` and ``detail``) for a file it cannot use; preflight turns any other
            exception into ``unreadable``.
        reader: makes the MONAI ``ImageReader`` that training loads the format with; ``None``
            leaves it to MONAI's own reader for the suffix.
        series: a folder of two or more such files is one 3D volume (DICOM series).
    """

    name: str
    suffixes: tuple[str, ...]
    check: Callable[[Path], tuple[np.ndarray, int, int]]
    reader: Callable[[], ImageReader] | None = None
    series: bool = False

    def matches(self, path: str | Path) -> bool:
        """Whether ``path``'s name ends with one of the format's suffixes (case-insensitive)."""
        return Path(path).name.lower().endswith(self.suffixes)
