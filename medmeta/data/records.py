"""Discover labelled image files in ``root/<class>/...`` folders.

Patient identifiers are read from DICOM headers only to keep support and query sets
patient-disjoint; they are kept as salted hashes with a salt that lives in this process only,
so no identifier can reach a log, a cache, a checkpoint or a report.

An image is identified by its file, i.e. its device and inode (engineering notes, trap 15): folder
links are followed, but a file or folder reached twice (through a symbolic or a hard link) is used
once and reported (``duplicate``), and a folder linking to itself, an ancestor or the data folder is
not descended (``symlink-loop``).

Why this module is longer than 300 lines: which files are images, which are the same image and
which patient each belongs to are decided together by one link-safe walk; they are easiest to check
read together.

A file's patient is its DICOM PatientID, else its first sub-folder under the class folder, the same
sub-folder name under any class being one patient (as a PatientID is), else the file itself. In a patient
sub-folder that also holds images without a PatientID, every key found there is one patient: a PNG
export, or a DICOM file whose PatientID was blanked, beside DICOM files with one is the same patient,
and such a folder's PatientIDs join it to any other folder holding them. A sub-folder whose images all
carry a PatientID is split by PatientID, whatever its name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import BytesLengthException

from medmeta.data.formats import DICOM_SUFFIXES, IMAGE_SUFFIXES, format_of
from medmeta.errors import DataError

logger = logging.getLogger(__name__)

DISCOVERY_CODES = ("duplicate", "symlink-loop", "in-series")  # reason codes of discovery, besides the preflight's
IN_SERIES_DETAIL = "an image file inside a DICOM series folder, which 3D reads as one series; move it out to use it"
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
    """A file left out of the data set, the reason code and (optionally) one line of detail."""

    path: Path
    reason: str
    detail: str = ""


def resolved(path: Path) -> Path:
    """The file ``path`` names, links resolved (absolute and normalised when it cannot be resolved)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop
        return Path(os.path.abspath(path))


def file_key(path: Path) -> tuple[int, int] | Path:
    """What identifies the file or folder ``path`` names: its device and inode, links followed, so a
    symbolic or hard link and its target agree; its resolved path when it cannot be read (a missing file).
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return resolved(path)
    return info.st_dev, info.st_ino


def data_folder(source: str | Path) -> Path:
    """A data set's own folder: ``source`` itself, or the folder of a CSV manifest or MedMNIST ``.npz``.

    Sample ids and the paths ``data check`` shows are relative to it.
    """
    source = Path(source).expanduser()
    return source.parent if source.suffix.lower() in (".csv", ".npz") else source


def hash_patient(identifier: str) -> str:
    """A salted, process-local hash of a patient identifier."""
    return hashlib.blake2b(identifier.encode(), key=_SALT, digest_size=8).hexdigest()


def _is_image(path: Path) -> bool:
    """A visible file of a format in the format table (``formats.FORMATS``)."""
    return not path.name.startswith(".") and format_of(path) is not None


def dicom_patient(path: Path) -> str | None:
    """The hashed PatientID of a DICOM file's header, ``None`` if it has none; raises if the header cannot be read."""
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    patient_id = str(getattr(header, "PatientID", "") or "")
    return hash_patient("dicom:" + patient_id) if patient_id else None


def _patient_keys(path: Path, class_dir: Path) -> tuple[str | None, str]:
    """A file's hashed DICOM PatientID (``None`` without one) and the key of its patient folder, else of the file."""
    dicom = dicom_patient(path) if path.name.lower().endswith(DICOM_SUFFIXES) else None
    relative = path.relative_to(class_dir)
    if len(relative.parts) > 1:
        return dicom, hash_patient(f"folder:{relative.parts[0]}")
    return dicom, hash_patient(f"path:{class_dir.name}/{relative}")


def _series_keys(folder: Path, class_dir: Path) -> tuple[str | None, str]:
    """The keys (:func:`_patient_keys`) of a DICOM series folder: its first readable slice's, else its folder's.

    A series that is the class folder itself (two or more slices right in it) is its own patient.
    """
    for slice_path in sorted(p for p in folder.iterdir() if p.name.lower().endswith(DICOM_SUFFIXES)):
        try:
            return _patient_keys(slice_path, class_dir)
        except Exception:  # noqa: BLE001 - any unreadable header: the next slice; the preflight reports the series
            continue
    relative = folder.relative_to(class_dir)
    if relative.parts:
        return None, hash_patient(f"folder:{relative.parts[0]}")
    return None, hash_patient(f"path:{class_dir.name}/.")


def _linked_patients(keys: list[tuple[str | None, str]]) -> list[str]:
    """One patient key per image: in a folder that also holds images without a PatientID (a PNG export, a
    blanked header), every PatientID found there and the folder's key are one patient.

    A folder whose images all carry a PatientID keeps them apart by it, as before: its name then says
    nothing about the patient. Keys linked directly or through other images (a union-find over keys)
    get the same key, one of their own salted hashes, so nothing but salted hashes is ever kept.
    """
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    mixed = {folder for dicom, folder in keys if dicom is None}  # folders whose images are patients by folder
    for dicom, folder in keys:
        if dicom is not None and folder in mixed and root(dicom) != root(folder):
            parent[root(folder)] = root(dicom)
    return [root(dicom if dicom is not None else folder) for dicom, folder in keys]


def series_folders(files: list[Path]) -> set[Path]:
    """Folders holding two or more DICOM files: each is one series (one volume) in 3D."""
    counts: dict[Path, int] = {}
    for path in files:
        if path.name.lower().endswith(DICOM_SUFFIXES):
            counts[path.parent] = counts.get(path.parent, 0) + 1
    return {folder for folder, n in counts.items() if n > 1}


def images_in_series(files: list[Path], series: set[Path]) -> list[Path]:
    """The image files (NIfTI, PNG, ...: not DICOM) right inside a series folder: 3D uses the folder, not them."""
    return [p for p in files if p.parent in series and _is_image(p) and not p.name.lower().endswith(DICOM_SUFFIXES)]


def _at_or_above(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


class _Walk:
    """Files under the class folders, folder links followed, each real file and folder reached once.

    ``seen`` maps a file or folder (:func:`file_key`: device and inode) to the first path it was
    reached by and its class; a second path to it (a symbolic or hard link) is reported
    (``duplicate``), or, under another class, is an error. Loops are found on resolved paths.
    """

    def __init__(self, root: Path, skipped: list[SkippedFile]) -> None:
        self.root, self.root_real, self.skipped = root, resolved(root), skipped
        self.seen: dict[tuple[int, int] | Path, tuple[Path, str]] = {}
        self.classes: set[tuple[int, int] | Path] = set()

    def class_folder(self, class_dir: Path) -> list[Path] | None:
        """The files of one class folder; ``None`` (reported) if it is a loop or another class's folder."""
        real, key = resolved(class_dir), file_key(class_dir)
        if _at_or_above(real, self.root_real):
            self._skip(class_dir, "symlink-loop", "class folder links to the data folder or above it: not a class")
            return None
        if key in self.seen:
            first, label = self.seen[key]
            if key in self.classes:
                self._skip(class_dir, "duplicate", f"same folder as class {label!r} ({first}): not a class")
                return None
            self._ambiguous(class_dir, class_dir.name, first, label, "folder")
        self.seen[key] = (class_dir, class_dir.name)
        self.classes.add(key)
        files: list[Path] = []
        self._folder(class_dir, real, class_dir.name, files)
        return files

    def _folder(self, folder: Path, real: Path, label: str, files: list[Path]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            self._skip(folder, "unreadable", f"cannot list the folder ({type(error).__name__})")
            return
        for entry in entries:
            path = folder / entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
                info = entry.stat() if is_dir or is_file else None  # links followed
            except OSError as error:
                loop = error.errno == errno.ELOOP
                self._skip(path, "symlink-loop" if loop else "unreadable", f"cannot follow ({type(error).__name__})")
                continue
            target = resolved(path) if entry.is_symlink() else real / entry.name  # ``real`` is resolved already
            key = (info.st_dev, info.st_ino) if info is not None else target
            if is_dir:
                if entry.name.startswith("."):  # .thumbnails, .git: not images of the class, as a hidden class folder
                    self._skip(path, "not-image", "hidden folder: its files are not used")
                elif _at_or_above(target, real) or _at_or_above(target, self.root_real):
                    self._skip(path, "symlink-loop", "folder links to itself, a folder above it or the data folder")
                elif key in self.seen:
                    first, first_label = self.seen[key]
                    if first_label != label:
                        self._ambiguous(path, label, first, first_label, "folder")
                    self._skip(path, "duplicate", f"same folder as {first}")
                else:
                    self.seen[key] = (path, label)
                    self._folder(path, target, label, files)
            elif is_file:
                if _is_image(path):
                    if key in self.seen:
                        first, first_label = self.seen[key]
                        if first_label != label:
                            self._ambiguous(path, label, first, first_label, "file")
                        self._skip(path, "duplicate", f"same file as {first}")
                        continue
                    self.seen[key] = (path, label)
                files.append(path)
            elif entry.is_symlink():
                self._skip(path, "unreadable", "broken link: its target does not exist")

    def _skip(self, path: Path, reason: str, detail: str) -> None:
        logger.info("skipping %s: %s (%s)", path, reason, detail)
        self.skipped.append(SkippedFile(path, reason, detail))

    @staticmethod
    def _ambiguous(path: Path, label: str, first: Path, first_label: str, kind: str) -> None:
        raise DataError(
            f"{path} (class {label!r}) is the same {kind} as {first} (class {first_label!r}): an image belongs to "
            "one class; remove one of the two"
        )


def image_files(folder: Path) -> tuple[list[Path], list[SkippedFile]]:
    """The image files under ``folder`` (no classes), walked as class folders are: links followed, each file once.

    Returns:
        The files, sorted, and the paths left out (``duplicate``, ``symlink-loop``, ``unreadable``).
    """
    skipped: list[SkippedFile] = []
    walk = _Walk(folder, skipped)
    walk.seen[file_key(folder)] = (folder, "")
    files: list[Path] = []
    walk._folder(folder, walk.root_real, "", files)
    return sorted(p for p in files if _is_image(p)), skipped


def discover_records(root: str | Path, *, spatial_dims: int = 2) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Image records under ``root/<class>/`` (sorted, so the order never depends on the file system).

    In 3D (``spatial_dims=3``) a folder of DICOM files is one series, i.e. one volume; in 2D
    every file is an image.

    Folder links are followed; every file or folder is used once, however many paths lead to it.

    Returns:
        The records and the files skipped with a reason code (``not-image``, ``empty``,
        ``truncated``, ``unreadable``, ``duplicate``: a second path to a file or folder already
        used; ``symlink-loop``: a folder linking to itself, a folder above it or the data folder;
        ``in-series``, 3D only: a NIfTI, PNG or JPEG file inside a DICOM series folder).
        Pixel data is not read here: that is the preflight's job.

    Raises:
        DataError: if ``root`` is not a folder or holds no class folder with images, or if one
            file or folder is reached from two classes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    found: list[tuple[Path, str, tuple[str | None, str]]] = []  # path, class, patient keys
    skipped: list[SkippedFile] = []
    walk = _Walk(root, skipped)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = walk.class_folder(class_dir)
        if files is None:
            continue
        series = series_folders(files) if spatial_dims == 3 else set()
        candidates = sorted(series | {p for p in files if p.parent not in series})
        for path in images_in_series(files, series):
            logger.info("skipping %s: in-series (%s)", path, IN_SERIES_DETAIL)
            skipped.append(SkippedFile(path, "in-series", IN_SERIES_DETAIL))
        for path in candidates:
            if path.is_dir():  # the patient of the first readable slice; the preflight judges the series
                found.append((path, class_dir.name, _series_keys(path, class_dir)))
            elif not _is_image(path):
                skipped.append(SkippedFile(path, "not-image"))
            elif path.stat().st_size == 0:
                skipped.append(SkippedFile(path, "empty"))
            else:
                try:
                    found.append((path, class_dir.name, _patient_keys(path, class_dir)))
                except (EOFError, struct.error, BytesLengthException) as error:  # cut inside an element
                    logger.warning("skipping %s: truncated (%s)", path, type(error).__name__)
                    skipped.append(SkippedFile(path, "truncated"))
                except Exception as error:  # noqa: BLE001 - any unreadable header; its message may hold the id
                    logger.warning("skipping %s: unreadable (%s)", path, type(error).__name__)
                    detail = f"cannot read the DICOM header ({type(error).__name__})"
                    skipped.append(SkippedFile(path, "unreadable", detail))
    patients = _linked_patients([keys for _, _, keys in found])
    records = [ImageRecord(path, label, patient) for (path, label, _), patient in zip(found, patients)]
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
