"""CSV manifests: ``path,label[,patient_id][,study_id][,split]``, one row per image.

Relative paths are resolved against the manifest's folder, so one data set can mix formats and
folders. Patient and study identifiers are hashed as soon as they are read. A file listed twice
(a repeated row, or once relative and once absolute, or through a symbolic or hard link) is one
image: the later rows are reported as ``duplicate``; the same file under two classes is an error.
A manifest is UTF-8 text (a byte order mark is allowed).
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

from medmeta.data.episodes import SPLITS
from medmeta.data.formats import DICOM_SUFFIXES
from medmeta.data.records import ImageRecord, SkippedFile, dicom_patient, file_key, hash_patient, resolved
from medmeta.errors import DataError

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "study_id", "split")


def read_manifest(manifest: str | Path) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Image records listed in a CSV manifest, each file once, and the duplicate rows left out.

    Patients come from ``patient_id``, else ``study_id``, else (a DICOM file) the PatientID of its
    header, as in folder discovery, else each file is its own patient.
    ``split`` (``train``/``val``/``test``), when present, fixes each class's meta-split. Rows are
    identified by the file they name (device and inode, links followed): a second row naming a
    file already listed is skipped with reason ``duplicate``.

    Raises:
        DataError: on a manifest that is not UTF-8 CSV, a missing column, an empty manifest, an
            unknown split value, a class listed under two splits, or one file listed under two
            classes or two patients; the message names the manifest and the row(s).
    """
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    first: dict[tuple[int, int] | Path, tuple[int, ImageRecord, str]] = {}
    columns, rows = manifest_rows(manifest)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"manifest {manifest} lacks column(s) {missing}; found {columns}")
    for row_number, row in rows:
        record, key, source = _record(manifest, row_number, row)
        if key not in first:
            first[key] = (row_number, record, source)
            records.append(record)
            continue
        earlier, kept, kept_source = first[key]
        if record.label != kept.label:
            raise DataError(
                f"manifest {manifest} rows {earlier} and {row_number} list the same file {record.path} under "
                f"classes {kept.label!r} and {record.label!r}: an image belongs to one class"
            )
        if source == kept_source != "file" and record.patient != kept.patient:
            raise DataError(
                f"manifest {manifest} rows {earlier} and {row_number} list the same file {record.path} "
                f"under two different {source} values"
            )
        detail = f"manifest row {row_number}: same file as row {earlier}"
        skipped.append(SkippedFile(record.path, "duplicate", detail))
    if not records:
        raise DataError(f"manifest {manifest} lists no images")
    _check_one_split_per_class(manifest, records)
    return records, skipped


def manifest_rows(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The column names of a CSV manifest and its rows (numbered from 2, the header being row 1), stripped.

    Raises:
        DataError: if the file cannot be read, is not UTF-8 text or is not valid CSV; the message
            names the manifest and the byte or line.
    """
    try:
        data = manifest.read_bytes()
    except OSError as error:
        raise DataError(f"manifest {manifest} cannot be read ({type(error).__name__})") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"manifest {manifest} is not UTF-8 text: byte {offset} (line {line}) is {data[offset]:#04x}; save it as "
            "UTF-8 (in Excel: 'CSV UTF-8')"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [
            (number, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
            for number, row in enumerate(reader, start=2)
        ]
    except csv.Error as error:
        raise DataError(f"manifest {manifest} line {reader.reader.line_num}: not valid CSV ({error})") from None
    return columns, rows


def _record(
    manifest: Path, row_number: int, row: dict[str, str]
) -> tuple[ImageRecord, tuple[int, int] | Path, str]:
    """The row's record, its file (:func:`~medmeta.data.records.file_key`) and the origin of its patient key.

    The origin is ``patient_id``, ``study_id``, ``dicom`` (the PatientID of a DICOM file's header,
    hashed as folder discovery hashes it) or ``file``.
    """
    if not row.get("path") or not row.get("label"):
        raise DataError(f"manifest {manifest} row {row_number}: empty path or label")
    path = Path(row["path"]).expanduser()
    path = path if path.is_absolute() else manifest.parent / path
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise DataError(f"manifest {manifest} row {row_number}: split {split!r} is not one of {list(SPLITS)}")
    if row.get("patient_id"):
        patient, source = hash_patient("manifest-patient:" + row["patient_id"]), "patient_id"
    elif row.get("study_id"):
        patient, source = hash_patient("manifest-study:" + row["study_id"]), "study_id"
    else:
        patient, source = _dicom_patient(path), "dicom"
        if patient is None:
            patient, source = hash_patient(f"manifest-file:{resolved(path)}"), "file"
    return ImageRecord(path=path, label=row["label"], patient=patient, split=split), file_key(path), source


def _dicom_patient(path: Path) -> str | None:
    """The hashed header PatientID of a DICOM file, ``None`` for another file or one without a readable PatientID.

    A file that cannot be read is left to the preflight, which reports it.
    """
    if not path.name.lower().endswith(DICOM_SUFFIXES):
        return None
    try:
        return dicom_patient(path)
    except Exception:  # noqa: BLE001 - any unreadable header; never shown (its message may hold the id)
        return None


def _check_one_split_per_class(manifest: Path, records: list[ImageRecord]) -> None:
    splits: dict[str, set[str]] = {}
    for record in records:
        splits.setdefault(record.label, set()).add(record.split or "")
    for label, values in sorted(splits.items()):
        if len(values) > 1:
            raise DataError(
                f"manifest {manifest}: class {label!r} has rows in several meta-splits "
                f"{sorted(v or '<none>' for v in values)}; a class belongs to exactly one"
            )
