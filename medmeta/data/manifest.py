"""CSV manifests: ``path,label[,patient_id][,study_id][,split]``, one row per image.

Relative paths are resolved against the manifest's folder, so one data set can mix formats and
folders. Patient and study identifiers are hashed as soon as they are read. A file listed twice
(a repeated row, or once relative and once absolute, or through a link) is one image: the later
rows are reported as ``duplicate``; the same file under two classes is an error.
"""

from __future__ import annotations

import csv
from pathlib import Path

from medmeta.data.episodes import SPLITS
from medmeta.data.records import ImageRecord, SkippedFile, hash_patient, resolved
from medmeta.errors import DataError

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "study_id", "split")


def read_manifest(manifest: str | Path) -> tuple[list[ImageRecord], list[SkippedFile]]:
    """Image records listed in a CSV manifest, each file once, and the duplicate rows left out.

    Patients come from ``patient_id``, else ``study_id``, else each file is its own patient.
    ``split`` (``train``/``val``/``test``), when present, fixes each class's meta-split. Rows are
    identified by the file they name (links resolved): a second row naming a file already listed
    is skipped with reason ``duplicate``.

    Raises:
        DataError: on a missing column, an empty manifest, an unknown split value, a class listed
            under two splits, or one file listed under two classes or two patients; the message
            names the manifest and the row(s).
    """
    manifest = Path(manifest).expanduser()
    if not manifest.is_file():
        raise DataError(f"manifest {manifest} does not exist")
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    first: dict[Path, tuple[int, ImageRecord, str]] = {}
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"manifest {manifest} lacks column(s) {missing}; found {columns}")
        for row_number, row in enumerate(reader, start=2):
            record, real, source = _record(manifest, row_number, row)
            if real not in first:
                first[real] = (row_number, record, source)
                records.append(record)
                continue
            earlier, kept, kept_source = first[real]
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


def _record(manifest: Path, row_number: int, row: dict[str, str]) -> tuple[ImageRecord, Path, str]:
    """The row's record, its resolved file and the origin of its patient key (``patient_id``/``study_id``/``file``)."""
    row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    if not row.get("path") or not row.get("label"):
        raise DataError(f"manifest {manifest} row {row_number}: empty path or label")
    path = Path(row["path"]).expanduser()
    path = path if path.is_absolute() else manifest.parent / path
    real = resolved(path)
    split = row.get("split") or None
    if split is not None and split not in SPLITS:
        raise DataError(f"manifest {manifest} row {row_number}: split {split!r} is not one of {list(SPLITS)}")
    if row.get("patient_id"):
        patient = hash_patient("manifest-patient:" + row["patient_id"])
    elif row.get("study_id"):
        patient = hash_patient("manifest-study:" + row["study_id"])
    else:
        patient = hash_patient(f"manifest-file:{real}")
    source = "patient_id" if row.get("patient_id") else "study_id" if row.get("study_id") else "file"
    return ImageRecord(path=path, label=row["label"], patient=patient, split=split), real, source


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
