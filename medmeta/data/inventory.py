"""What a data source can give: usable images, skipped files with reasons, class splits, feasibility.

One function, ``take_inventory``, serves both ``medmeta data check`` and the data module's setup,
so the command and training always agree on which files are used.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from medmeta.data.dicom import series_slices
from medmeta.data.episodes import SPLITS, ClassSplits, EpisodeSampler, split_classes
from medmeta.data.formats import DICOM_SUFFIXES
from medmeta.data.loading import array_channel_dim
from medmeta.data.manifest import read_manifest
from medmeta.data.medmnist import load_medmnist, medmnist_records
from medmeta.data.preflight import FileProblem, check_image, pixel_value_problem
from medmeta.data.presets import DEFAULT_WINDOW, Intensity
from medmeta.data.records import ImageRecord, data_folder, discover_records
from medmeta.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class Inventory:
    """The usable records of a source, what was skipped and why, and the meta-splits."""

    source: Path
    records: list[ImageRecord]
    problems: list[FileProblem]
    class_splits: ClassSplits
    feasibility: dict[str, str | None] = field(default_factory=dict)
    arrays: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        """Whether every meta-split can supply the configured episodes."""
        return all(message is None for message in self.feasibility.values())

    def split_records(self, split: str) -> list[ImageRecord]:
        """The usable records of ``split``'s classes, in inventory order."""
        classes = self.class_splits.of(split)
        return [r for r in self.records if r.label in classes]

    def episode_sampler(self, split: str, *, n_way: int, k_shot: int, q_query: int, seed: int) -> EpisodeSampler:
        """The episodes of ``split``, drawn over :meth:`split_records`; ``DataError`` if they cannot be drawn."""
        records = self.split_records(split)
        return EpisodeSampler(
            [r.label for r in records], [r.patient for r in records], self.class_splits.of(split),
            split=split, n_way=n_way, k_shot=k_shot, q_query=q_query, seed=seed,
        )  # fmt: skip

    def classes(self) -> dict[str, tuple[int, int]]:
        """Usable images and distinct patients per class."""
        images = Counter(r.label for r in self.records)
        patients = {label: len({r.patient for r in self.records if r.label == label}) for label in images}
        return {label: (images[label], patients[label]) for label in sorted(images)}

    def summary_line(self) -> str:
        """One line: usable images, classes, and skipped files counted by reason."""
        reasons = Counter(p.reason for p in self.problems)
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
        line = f"{len(self.records)} usable images in {len(self.classes())} classes under {self.source}"
        return line + (f"; skipped {len(self.problems)} ({skipped})" if self.problems else "")

    def to_json(self) -> dict[str, object]:
        """A JSON-ready report (counts and file paths; never a patient key or tag value)."""
        return {
            "source": str(self.source),
            "usable_images": len(self.records),
            "classes": {k: {"images": n, "patients": p} for k, (n, p) in self.classes().items()},
            "skipped": [{"path": str(p.path), "reason": p.reason, "detail": p.detail} for p in self.problems],
            "class_splits": self.class_splits.to_json(),
            "feasibility": self.feasibility,
            "ok": self.ok,
        }


def take_inventory(
    source: str | Path,
    *,
    spatial_dims: int = 2,
    n_way: int = 5,
    k_shot: int = 1,
    q_query: int = 15,
    split_ratios: Sequence[float] = (0.6, 0.2, 0.2),
    splits: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    preflight: bool = True,
    require_deidentified: bool = False,
    skip_undecodable: bool = False,
    window: Sequence[float] | None = DEFAULT_WINDOW,
    preset: str | None = None,
) -> Inventory:
    """Discover, fully read (preflight) and split a folder, CSV manifest or MedMNIST ``.npz``.

    Args:
        skip_undecodable: list compressed DICOM files whose decoder is missing among the skipped
            files (``decoder-missing:<packages>``) instead of stopping with an error.
        window: the intensity window training uses (``fit``'s ``--data.window``); ``None`` for
            per-image min/max. Preflight skips an image that is constant after it
            (``constant-after-window``).
        preset: the intensity preset training uses (``--data.preset``), overriding ``window``.

    Raises:
        DataError: when the source cannot be read at all, a required decoder is missing (unless
            ``skip_undecodable``), or (with ``require_deidentified``) a DICOM file is not marked
            de-identified.
    """
    source = Path(source).expanduser()
    intensity = Intensity(preset=preset, window=window)  # checked before any file is read
    arrays = None
    problems: list[FileProblem] = []
    if source.suffix.lower() == ".npz":
        arrays, labels = load_medmnist(source)
        records = medmnist_records(source, labels)
        records, problems = _check_arrays(records, arrays, spatial_dims, source)
    else:
        if source.suffix.lower() == ".csv":
            records, skipped = read_manifest(source)
        else:
            records, skipped = discover_records(source, spatial_dims=spatial_dims)
        problems = [FileProblem(s.path, s.reason, s.detail or "skipped at discovery") for s in skipped]
        if preflight:
            records, found = _preflight(records, spatial_dims, skip_undecodable, intensity)
            problems += found
        if require_deidentified:  # after preflight: checks exactly the files that are used
            _require_deidentified(records)
    if not records:
        raise DataError(_nothing_usable(source, problems, spatial_dims))
    class_splits = _class_splits(records, split_ratios=split_ratios, splits=splits, seed=seed)
    inventory = Inventory(source, records, problems, class_splits, arrays=arrays)
    for split in SPLITS:
        inventory.feasibility[split] = _feasibility(inventory, split, n_way, k_shot, q_query, seed)
    return inventory


def _preflight(
    records: list[ImageRecord], spatial_dims: int, skip_undecodable: bool, intensity: Intensity
) -> tuple[list[ImageRecord], list[FileProblem]]:
    usable, problems = [], []
    for record in records:
        problem = check_image(record.path, spatial_dims=spatial_dims, intensity=intensity)
        if problem is None:
            usable.append(record)
        elif problem.reason.startswith("decoder-missing") and not skip_undecodable:
            raise DataError(f"cannot decode {record.path}: {problem.detail}")
        else:
            problems.append(problem)
    return usable, problems


def _check_arrays(
    records: list[ImageRecord], arrays: np.ndarray, spatial_dims: int, source: Path
) -> tuple[list[ImageRecord], list[FileProblem]]:
    """The usable array images; ``DataError`` (naming ``source``) if their shape does not fit ``spatial_dims``."""
    array_channel_dim(arrays.shape[1:], spatial_dims, source)  # one shape for all: (H, W[, 1|3]) or (D, H, W)
    usable, problems = [], []
    for record in records:
        problem = pixel_value_problem(arrays[record.item])
        if problem is None:
            usable.append(record)
        else:
            reason, detail = problem
            problems.append(FileProblem(record.path, reason, f"image {record.item}: {detail}"))
    return usable, problems


def _require_deidentified(records: list[ImageRecord]) -> None:
    """``DataError`` naming the file unless every DICOM file the records are read from is marked de-identified."""
    for record in records:
        path = record.path
        try:
            for path in _dicom_files(record.path):
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientIdentityRemoved"])
                if str(getattr(header, "PatientIdentityRemoved", "")).upper() != "YES":
                    raise DataError(
                        f"{path} is not marked de-identified (PatientIdentityRemoved != YES) and "
                        "require_deidentified is set; de-identify the export or unset the option"
                    )
        except DataError:
            raise
        except Exception as error:  # never a raw traceback; no message text (it may hold tag values)
            raise DataError(
                f"{path} cannot be read to check that it is de-identified ({type(error).__name__}) and "
                "require_deidentified is set; fix or remove the file"
            ) from error


def _dicom_files(path: Path) -> list[Path]:
    """The DICOM files an image is read from: a file with a DICOM suffix, or every slice of a series folder."""
    if not path.is_dir():
        return [path] if path.name.lower().endswith(DICOM_SUFFIXES) else []
    return series_slices(path)


def _class_splits(
    records: list[ImageRecord], *, split_ratios: Sequence[float], splits: Mapping[str, Sequence[str]] | None, seed: int
) -> ClassSplits:
    labels = [r.label for r in records]
    if splits is None and any(r.split for r in records):
        from_manifest: dict[str, set[str]] = {s: set() for s in SPLITS}
        for record in records:
            if record.split is None:
                raise DataError(f"{record.path}: the manifest gives a split for some rows but not this one")
            from_manifest[record.split].add(record.label)
        splits = {s: sorted(names) for s, names in from_manifest.items()}
    return split_classes(labels, ratios=split_ratios, seed=seed, explicit=splits)


def _feasibility(inventory: Inventory, split: str, n_way: int, k_shot: int, q_query: int, seed: int) -> str | None:
    try:
        inventory.episode_sampler(split, n_way=n_way, k_shot=k_shot, q_query=q_query, seed=seed)
    except DataError as error:
        return str(error)
    return None


def shown_path(path: Path, source: Path) -> str:
    """``path`` relative to the source's folder (``data_folder``) when it lies inside it, else as given."""
    base = data_folder(source)
    for candidate, root in ((Path(path), base), (Path(path).absolute(), base.absolute())):
        try:
            return str(candidate.relative_to(root))
        except ValueError:
            continue
    return str(path)


def _nothing_usable(source: Path, problems: Sequence[FileProblem], spatial_dims: int, shown: int = 3) -> str:
    """One line: why no image of ``source`` is usable (reason counts, the first files, a hint on wrong dims)."""
    if not problems:
        return f"no usable images under {source}: no image files found"
    codes = Counter(p.code for p in problems)
    counts = ", ".join(f"{code}: {n}" for code, n in codes.most_common())
    examples = "; ".join(f"{shown_path(p.path, source)}: {p.reason} ({p.detail})" for p in problems[:shown])
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    line = f"no usable images under {source}: all {len(problems)} file(s) skipped ({counts}): {examples}{more}"
    if codes["wrong-dims"] * 2 > len(problems):
        other = 5 - spatial_dims
        line += (
            f". Most are wrong-dims: the files look {other}D but {spatial_dims}D was asked for; "
            f"try --spatial-dims {other} (data check) or --data.spatial_dims {other} (fit)"
        )
    return line
