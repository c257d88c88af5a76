"""Discover labelled image files in ``root/<class>/...`` folders.

Patient identifiers are read from DICOM headers only to keep support and query sets
patient-disjoint; they are kept as salted hashes with a salt that lives in this process only,
so no identifier can reach a log, a cache, a checkpoint or a report.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError

from medmeta.data.preflight import NIFTI_SUFFIXES, PICTURE_SUFFIXES
from medmeta.data.readers import DICOM_SUFFIXES
from medmeta.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (*DICOM_SUFFIXES, *NIFTI_SUFFIXES, *PICTURE_SUFFIXES)
_SALT = secrets.token_bytes(16)


@dataclass(frozen=True)
class ImageRecord:
    """One image: its file (or DICOM series folder), class name and a salted hash of its patient.

    ``split`` fixes the class's meta-split when a manifest says so; ``item`` indexes an image
    inside an array file (MedMNIST ``.npz``).
    """

    path: Path
    label: str
    patient: str
    split: str | None = None
    item: int | None = None


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of the data set and the reason code."""

    path: Path
    reason: str


def hash_patient(identifier: str) -> str:
    """A salted, process-local hash of a patient identifier."""
    return hashlib.blake2b(identifier.encode(), key=_SALT, digest_size=8).hexdigest()


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def _patient_of(path: Path, class_dir: Path) -> str:
    """The patient a file belongs to: DICOM PatientID, else its sub-folder, else the file itself."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        patient_id = str(getattr(header, "PatientID", "") or "")
        if patient_id:
            return hash_patient("dicom:" + patient_id)
    relative = path.relative_to(class_dir)
    key = relative.parts[0] if len(relative.parts) > 1 else str(relative)
    return hash_patient(f"path:{class_dir.name}/{key}")


def _series_patient(folder: Path, class_dir: Path) -> str:
    """The patient of a DICOM series folder: from its first readable slice, else from the folder path."""
    for slice_path in sorted(p for p in folder.iterdir() if p.name.lower().endswith(DICOM_SUFFIXES)):
        try:
            return _patient_of(slice_path, class_dir)
        except (InvalidDicomError, OSError, ValueError, LookupError, EOFError, struct.error, BytesLengthException):
            continue
    relative = folder.relative_to(class_dir)
    return hash_patient(f"path:{class_dir.name}/{relative.parts[0]}")


def _series_folders(class_dir: Path) -> set[Path]:
    """Folders holding two or more DICOM files: each is one series (one volume) in 3D."""
    counts: dict[Path, int] = {}
    for path in class_dir.rglob("*"):
        if path.is_file() and path.name.lower().endswith(DICOM_SUFFIXES):
            counts[path.parent] = counts.get(path.parent, 0) + 1
    return {folder for folder, n in counts.items() if n > 1}


def discover_records(root: str | Path, *, spatial_dims: int = 2) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Image records under ``root/<class>/`` (sorted, so the order never depends on the file system).

    In 3D (``spatial_dims=3``) a folder of DICOM files is one series, i.e. one volume; in 2D
    every file is an image.

    Returns:
        The records and the files skipped with a reason code (``not-image``, ``empty``,
        ``unreadable``). Pixel data is not read here: that is the preflight's job.

    Raises:
        DataError: if ``root`` is not a folder or holds no class folder with images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        series = _series_folders(class_dir) if spatial_dims == 3 else set()
        candidates = sorted(series | {p for p in class_dir.rglob("*") if p.is_file() and p.parent not in series})
        for path in candidates:
            if path.is_dir():  # the patient of the first readable slice; the preflight judges the series
                records.append(ImageRecord(path, class_dir.name, _series_patient(path, class_dir)))
            elif not _is_image(path):
                skipped.append(SkippedFile(path, "not-image"))
            elif path.stat().st_size == 0:
                skipped.append(SkippedFile(path, "empty"))
            else:
                try:
                    records.append(ImageRecord(path, class_dir.name, _patient_of(path, class_dir)))
                except (EOFError, struct.error, BytesLengthException) as error:  # cut inside an element
                    logger.warning("skipping %s: truncated (%s)", path, type(error).__name__)
                    skipped.append(SkippedFile(path, "truncated"))
                except (InvalidDicomError, OSError, ValueError, LookupError) as error:
                    logger.warning("skipping %s: unreadable (%s)", path, type(error).__name__)
                    skipped.append(SkippedFile(path, "unreadable"))
    if not records:
        raise DataError(
            f"no images found under {root}: expected one sub-folder per class holding "
            f"{', '.join(IMAGE_SUFFIXES)} files"
        )
    if skipped:
        logger.info("skipped %d file(s) under %s (%s)", len(skipped), root, _count_reasons(skipped))
    return records, skipped


def _count_reasons(skipped: list[SkippedFile]) -> str:
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
