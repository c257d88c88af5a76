"""What kind of images a model was trained on (format family, grey or colour), and a warning for a case of another kind.

At fit time :class:`medmeta.callbacks.SeenClasses` records in every checkpoint (``medmeta_training_images``)
the format families of the training images (``dicom``, ``nifti``, ``picture``: PNG/JPEG/TIFF, ``npz``) and, per
family, their native channel counts (1: grey, 3: colour), read from the file headers of a sample of the
training records. ``diagnose --save-adapted`` carries the record into the bundle's ``metadata.json``
(``training_images``). ``diagnose`` (query and support cases) and ``predict`` (each case) then warn on a
case of a kind the model never saw, such as a colour PNG photo sent to a model trained on grey CT DICOM:
the load transforms convert any image to the model's channels without a word. A checkpoint or bundle
written before this holds no record: nothing is known then, and no case is warned about.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image

from medmeta.data.dicom import series_slices
from medmeta.data.formats import PICTURE, format_of
from medmeta.data.pictures import read_picture
from medmeta.data.records import ImageRecord

logger = logging.getLogger(__name__)

TRAINING_IMAGES_KEY = "medmeta_training_images"  # {"dicom": [1], "picture": [1, 3]}: family -> native channel counts
SAMPLE_PER_FAMILY = 64  # training files whose headers are read per format family
FAMILY_NAMES = {"dicom": "DICOM", "nifti": "NIfTI", "picture": "PNG/JPEG", "npz": "MedMNIST array"}
_GREY_MODES = ("1", "L", "LA", "La", "I", "F")  # PIL modes that convert_picture keeps (or makes) one channel

Kind = tuple[str, int | None]  # (format family, native channels; None when the header does not tell)


def image_kind(path: Path) -> Kind | None:
    """The format family and native channel count of an image file or DICOM series folder, from its header.

    ``None`` for a file of no known format. The channel count is ``None`` when the header cannot be read.
    """
    path = Path(path)
    if path.is_dir():  # a DICOM series folder (3D): its first slice tells
        slices = series_slices(path)
        return "dicom", _channels("dicom", slices[0]) if slices else None
    family = _family(path)
    return None if family is None else (family, _channels(family, path))


def training_kinds(records: Sequence[ImageRecord], arrays: np.ndarray | None = None) -> dict[str, list[int]]:
    """The record of ``records`` (training images): format family -> sorted native channel counts.

    Families come from every record's name; channels from the headers of up to ``SAMPLE_PER_FAMILY``
    records per family, spread over them (``arrays``: the images of a MedMNIST ``.npz``, from their shape).
    """
    groups: dict[str, list[ImageRecord]] = {}
    for record in records:
        family = "npz" if record.item is not None else "dicom" if record.path.is_dir() else _family(record.path)
        if family is not None:
            groups.setdefault(family, []).append(record)
    kinds = {}
    for family, group in groups.items():
        if family == "npz":
            channels = {} if arrays is None else {3 if arrays.ndim == 4 and arrays.shape[-1] == 3 else 1}
        else:
            sample = group[:: max(1, len(group) // SAMPLE_PER_FAMILY)][:SAMPLE_PER_FAMILY]
            channels = {kind[1] for r in sample if (kind := image_kind(r.path)) is not None}
        kinds[family] = sorted(c for c in channels if c is not None)
    return kinds


def trained_kinds(value: object) -> dict[str, list[int]] | None:
    """A stored record (checkpoint or bundle metadata) as family -> channel counts; ``None``: nothing is known."""
    if value is None:
        return None
    valid = isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(c, int) for c in v)
        for k, v in value.items()
    )  # fmt: skip
    if not valid or not value:
        logger.warning("the record of the images the model was trained on cannot be read: no case is checked against it")
        return None
    return {str(k): sorted(int(c) for c in v) for k, v in value.items()}


def kind_warning(kind: Kind | None, trained: Mapping[str, Sequence[int]] | None) -> str | None:
    """The warning for a case of ``kind`` given the ``trained`` record, or ``None`` (same kind, or nothing known)."""
    if kind is None or trained is None:
        return None
    family, channels = kind
    known = trained.get(family)
    if known is not None and (channels is None or not known or channels in known):
        return None
    return (f"a {describe(family, [] if channels is None else [channels])} image, but the model was trained on "
            f"{kinds_text(trained)} images: its prediction may not mean anything")  # fmt: skip


def kinds_text(trained: Mapping[str, Sequence[int]]) -> str:
    """A record in words: ``grey DICOM and colour PNG/JPEG``."""
    return " and ".join(describe(family, channels) for family, channels in sorted(trained.items()))


def describe(family: str, channels: Sequence[int]) -> str:
    """``"grey DICOM"``, ``"grey and colour PNG/JPEG"``: the channel counts in words, then the family."""
    words = [{1: "grey", 3: "colour"}.get(c, f"{c}-channel") for c in channels]
    return " ".join([*([" and ".join(words)] if words else []), FAMILY_NAMES.get(family, family)])


def _family(path: Path) -> str | None:
    """The format family: ``dicom``, ``nifti``, ``picture`` (PNG, JPEG, TIFF: one container of pixels) or ``None``."""
    fmt = format_of(path)
    return None if fmt is None else "picture" if fmt is PICTURE else fmt.name.lower()


def _channels(family: str, path: Path) -> int | None:
    """The native channel count of one file from its header (a palette picture: decoded); ``None`` if unreadable."""
    try:
        if family == "dicom":
            tags = ["SamplesPerPixel", "PhotometricInterpretation"]
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            if ds.get("PhotometricInterpretation") == "PALETTE COLOR":  # shown in the palette's colours
                return 3
            return int(ds.get("SamplesPerPixel", 1) or 1)
        if family == "nifti":
            names = nib.load(path).header.get_data_dtype().names  # RGB(A) NIfTI: a structured voxel type
            return len(names) if names else 1
        if family == "picture":
            with Image.open(path) as image:
                mode = image.mode
            if mode in ("P", "PA"):  # a palette shows grey or colour: convert_picture decides from its pixels
                return 3 if read_picture(path).ndim == 3 else 1
            return 1 if mode in _GREY_MODES or mode.startswith("I;16") else 3
    except Exception:  # noqa: BLE001 - an unreadable header: the channels are unknown, preflight names the file
        return None
    return None
