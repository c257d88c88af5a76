"""The cases of a cohort to predict: image files, folders, DICOM series folders (3D) and CSV manifests.

Each case is named by its path relative to its input root: the folder given, the folder of a
manifest, or (for a file given on its own) its file name. ``medmeta predict`` writes these ids
into its outputs and skips the ids it already wrote when it resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medmeta.data.formats import format_of
from medmeta.data.manifest import manifest_rows
from medmeta.data.records import IN_SERIES_DETAIL, file_key, image_files, images_in_series, series_folders
from medmeta.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One case of the cohort: its id (path relative to its input root) and its file or series folder."""

    case_id: str
    path: Path


def find_cases(inputs: Sequence[Path], spatial_dims: int) -> list[Case]:
    """The cases of ``inputs`` in order, each file or series once (links followed); ids must be unique.

    A folder is searched recursively, folder links followed as in training discovery (each folder
    once, loops not descended), for files of a known image format (others and hidden files are
    ignored); in 3D a folder holding two or more DICOM files is one series, one case, and another image file
    in it (a NIfTI, a PNG) is left out with a warning. A ``.csv`` input is a manifest. A file is a case named
    by its file name.
    """
    cases: list[Case] = []
    seen: set[tuple[int, int] | Path] = set()
    ids: dict[str, Path] = {}
    for root in inputs:
        if not root.exists():
            raise DataError(f"input {root} does not exist")
        if root.is_dir():
            found = _folder_cases(root, spatial_dims)
        elif root.suffix.lower() == ".csv":
            found = _manifest_cases(root)
        else:
            found = [Case(root.name, root)]
        for case in found:
            real = file_key(case.path)
            if real in seen:
                continue
            if case.case_id in ids:
                raise DataError(
                    f"two cases have the same id (their path relative to their input): one under {ids[case.case_id]}, "
                    f"one under {root}; give their common parent folder as one input instead"
                )
            seen.add(real)
            ids[case.case_id] = root
            cases.append(case)
    if not cases:
        raise DataError(f"no image files found in {', '.join(map(str, inputs))}")
    return cases


def _folder_cases(root: Path, spatial_dims: int) -> list[Case]:
    """The cases under a folder, walked as training discovery walks a class folder (links followed, loop-safe)."""
    files, skipped = image_files(root)
    # a broken link to an image is a case all the same: its row says it was not predicted, and why
    broken = [s.path for s in skipped if s.reason != "duplicate" and format_of(s.path) and not s.path.is_dir()]
    files = sorted(files + broken)
    if len(skipped) > len(broken):
        logger.info("left out %d path(s) under %s (duplicates, link loops or hidden folders)",
                    len(skipped) - len(broken), root)  # fmt: skip
    series = series_folders(files) if spatial_dims == 3 else set()  # one case each, as in training discovery
    if series:
        beside = images_in_series(files, series)
        if beside:  # a count: a file name may hold a patient's name
            logger.warning("left out %d image file(s) under %s: %s", len(beside), root, IN_SERIES_DETAIL)
    paths = sorted(series | {p for p in files if p.parent not in series})
    return [Case(root.name if p == root else p.relative_to(root).as_posix(), p) for p in paths]


def _manifest_cases(manifest: Path) -> list[Case]:
    """The rows of a CSV manifest's ``path`` column, relative to its folder (an absolute path stays absolute)."""
    columns, rows = manifest_rows(manifest)
    if "path" not in columns:
        raise DataError(f"manifest {manifest} has no 'path' column; found {columns}")
    cases = []
    for number, row in rows:
        value = row.get("path", "")
        if not value:
            raise DataError(f"manifest {manifest} row {number}: empty path")
        given = Path(value).expanduser()
        path = given if given.is_absolute() else manifest.parent / given
        case_id = given.as_posix() if given.is_absolute() else Path(os.path.normpath(given)).as_posix()
        cases.append(Case(case_id, path))
    return cases
