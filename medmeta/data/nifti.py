"""NIfTI-1/2 (``.nii``, ``.nii.gz``): the preflight check and the format entry (trained with MONAI's nibabel reader)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medmeta.data.format_spec import ImageFormat, ReadProblem

_NIFTI_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def check_nifti(path: Path) -> tuple[np.ndarray, int, int]:
    """Decompress and parse a NIfTI-1/2 image, then read every voxel (nibabel alone is lazy).

    An ``X x Y x 1`` (``x 1 ...``) image counts as 2D, and so does one slice whose singleton axis is not the
    last (``1 x Y x Z``, ``X x 1 x Z``: a sagittal or coronal slice, numpy's channel-first habit): it is one
    plane, never a volume. The load transforms drop that axis too (``transforms.NiftiDisplayPlaned``).
    """
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        if raw[:2] != b"\x1f\x8b":
            raise ReadProblem("unreadable", "named .nii.gz but not gzip-compressed")
        try:
            raw = gzip.decompress(raw)
        except EOFError as err:
            raise ReadProblem("truncated", "gzip stream ends early (truncated)") from err
        except (OSError, zlib.error) as err:
            raise ReadProblem("unreadable", f"corrupt gzip stream ({type(err).__name__})") from err
        if not raw:
            raise ReadProblem("empty", "gzip stream holds no data")
    header_size = next((size for size in _NIFTI_HEADER_SIZES for order in "<>"
                        if len(raw) >= 4 and struct.unpack(f"{order}i", raw[:4])[0] == size), None)
    if header_size is None:
        raise ReadProblem("unreadable", "not a NIfTI header")
    if len(raw) < header_size:
        raise ReadProblem("truncated", "NIfTI header cut short (truncated)")
    try:
        image = _NIFTI_HEADER_SIZES[header_size].from_bytes(raw)
    except Exception as err:
        raise ReadProblem("unreadable", f"NIfTI header rejected ({type(err).__name__})") from err
    try:
        data = image.get_fdata(dtype=np.float32)
    except OSError as err:
        raise ReadProblem("truncated", "NIfTI voxel data shorter than the header says (truncated)") from err
    shape = list(data.shape)
    while len(shape) > 2 and shape[-1] == 1:  # X x Y x 1 (x 1 ...) is a 2D image
        shape.pop()
    if len(shape) == 3 and 1 in shape:  # 1 x Y x Z or X x 1 x Z: one slice, whichever axis is 1
        shape.remove(1)
    return data.reshape(shape), len(shape), shape[2] if len(shape) == 3 else 1


NIFTI = ImageFormat("NIfTI", (".nii", ".nii.gz"), check=check_nifti)  # reader: MONAI's NibabelReader
