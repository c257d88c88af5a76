"""Frozen episode manifests: the exact test episodes, written once and replayed anywhere.

A manifest lists every episode's index, class names and the opaque ids of its support and query
images, with the seed, the episode shape and a hash of the data set it was drawn from. Replaying
it (``--episodes FILE``) gives the same tasks on any machine, so two methods or two papers are
compared on identical episodes; a data set that changed since is detected from the hash and
refused. Sample ids are hashes of each image's resolved file relative to the data set's own
folder (the data folder, or the folder holding the CSV manifest or ``.npz``), plus the array
item: no file name, path or patient identifier is written.

Why this module is longer than 300 lines: the manifest's format and every check a replay makes
against it (shape, image settings, data hash, ids, classes, patients) are one promise, easiest to
check read together.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmeta.data.episodes import Episode
from medmeta.data.records import ImageRecord, data_folder, resolved
from medmeta.errors import DataError

logger = logging.getLogger(__name__)

FORMAT = "medmeta-episodes/2"
_OLD_FORMATS = ("medmeta-episodes/1",)  # ids by path only: not unique across folders of a CSV manifest
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (resolved path, size, mtime, ctime, inode) -> bytes hash


def dataset_folder(source: Path) -> Path:
    """The data set's own folder (:func:`~medmeta.data.records.data_folder`), links resolved."""
    return resolved(data_folder(source))


def _sample_id(record: ImageRecord, folder: Path) -> str:
    real = resolved(record.path)
    try:
        key = real.relative_to(folder).as_posix()
    except ValueError:  # a manifest row or a link pointing outside the folder: its absolute resolved path
        key = real.as_posix()
    return hashlib.sha256(f"{key}|{record.item}".encode()).hexdigest()[:16]


def sample_id(record: ImageRecord, root: Path) -> str:
    """An opaque id of one image: a hash of its resolved file relative to the folder of ``root`` (and array item).

    The same file gives the same id however it is listed (relative or absolute manifest row, a
    link); files of the same name in different folders get different ids. Inside the data set's
    folder the id is machine-independent; a file outside it is keyed by its absolute path.
    """
    return _sample_id(record, dataset_folder(root))


def sample_ids(records: Sequence[ImageRecord], root: Path) -> list[str]:
    """The ids of ``records`` (see :func:`sample_id`).

    Raises:
        DataError: if two records get the same id (the same file listed twice), naming both.
    """
    folder = dataset_folder(root)
    ids = [_sample_id(record, folder) for record in records]
    first: dict[str, ImageRecord] = {}
    for sid, record in zip(ids, records):
        other = first.setdefault(sid, record)
        if other is not record:
            raise DataError(
                f"{other.path} and {record.path} are the same image (image id {sid}) under {root}: "
                "list each file once"
            )
    return ids


def content_hash(path: Path) -> str:
    """A hash of a file's bytes, or of a DICOM series folder's files (names and bytes).

    Cached in memory by (resolved path, size, modification and change time, inode), so each file
    is read once per process while it is unchanged.
    """
    real = resolved(path)
    if not real.is_dir():
        return _file_hash(real)
    digest = hashlib.blake2b(digest_size=16)
    children = sorted(p for p in real.iterdir() if p.is_file() and not p.name.startswith("."))
    for child in (p for p in children if p.name.upper() != "DICOMDIR"):  # the files the series reader reads
        digest.update(f"{child.name}|{_file_hash(resolved(child))}\n".encode())
    return digest.hexdigest()


def _file_hash(real: Path) -> str:
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    cached = _DIGESTS.get(key)
    if cached is None:
        digest = hashlib.blake2b(digest_size=16)
        with real.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        cached = _DIGESTS[key] = digest.hexdigest()
    return cached


def data_hash(records: Sequence[ImageRecord], ids: Sequence[str]) -> str:
    """Hash of the data set: every image's id, class and bytes (not file times: copies keep the hash).

    Raises:
        DataError: if a file can no longer be read, naming it.
    """
    digest = hashlib.sha256()
    for sid, record in sorted(zip(ids, records), key=lambda pair: pair[0]):
        try:
            content = content_hash(record.path)
        except OSError as error:
            raise DataError(f"cannot read {record.path} to hash the data set: {type(error).__name__}") from error
        digest.update(f"{sid}|{record.label}|{content}\n".encode())
    return digest.hexdigest()[:32]


def image_settings(
    *, image_size: int, in_channels: int, spatial_dims: int, window: Sequence[float] | None, preset: str | None,
    spacing: Sequence[float] | None, roi_size: Sequence[int] | None,
) -> dict[str, object]:  # fmt: skip
    """The settings of the load transforms that decide an image's tensor, JSON-ready, as they take effect.

    A preset overrides the window, and spacing and ROI size apply to volumes only, so an ignored
    setting is ``None``: two configs that load the same tensors give the same settings.
    """
    volume = spatial_dims == 3
    return {
        "image_size": int(image_size), "in_channels": int(in_channels), "spatial_dims": int(spatial_dims),
        "preset": preset, "window": [float(v) for v in window] if window is not None and preset is None else None,
        "spacing": [float(v) for v in spacing] if spacing is not None and volume else None,
        "roi_size": [int(v) for v in roi_size] if roi_size is not None and volume else None,
    }  # fmt: skip


def check_image_settings(manifest: EpisodeManifest, settings: Mapping[str, object], source: Path) -> None:
    """Refuse replaying ``manifest`` under other image ``settings`` (:func:`image_settings`) than it was frozen with.

    A manifest written before image settings were stored is replayed with a warning.

    Raises:
        DataError: naming the manifest and every setting that differs (frozen and now).
    """
    if manifest.images is None:
        logger.warning("episode manifest %s stores no image settings (written by an older medmeta): replayed, but "
                       "its image size and intensity window cannot be checked against this config", source)  # fmt: skip
        return
    differ = [f"{key} {manifest.images.get(key)!r} there, {value!r} now"
              for key, value in settings.items() if manifest.images.get(key) != value]  # fmt: skip
    if differ:
        raise DataError(
            f"episode manifest {source} was frozen with other image settings ({'; '.join(differ)}): its image ids "
            "would load as other images; replay refused: use the image settings of the run that wrote it"
        )


@dataclass(frozen=True)
class EpisodeManifest:
    """The frozen episodes of one meta-split."""

    split: str
    seed: int
    n_way: int
    k_shot: int
    q_query: int
    data_hash: str
    episodes: tuple[dict, ...]
    images: Mapping[str, object] | None = None  # the image settings (``image_settings``); None: an older manifest

    @classmethod
    def freeze(
        cls, episodes: Sequence[Episode], ids: Sequence[str], *, split: str, seed: int, k_shot: int, q_query: int,
        data_hash: str, images: Mapping[str, object] | None = None,
    ) -> EpisodeManifest:  # fmt: skip
        """A manifest of ``episodes``, whose support/query entries index ``ids``, loaded with settings ``images``."""
        frozen = tuple(
            {"index": e.index, "classes": list(e.classes), "support": [ids[i] for i in e.support],
             "query": [ids[i] for i in e.query]}
            for e in episodes
        )  # fmt: skip
        n_way = len(episodes[0].classes) if episodes else 0
        return cls(split, seed, n_way, k_shot, q_query, data_hash, frozen, dict(images) if images is not None else None)

    def write(self, path: Path) -> Path:
        """Write the manifest as JSON (atomically)."""
        body = {"format": FORMAT, "split": self.split, "seed": self.seed, "n_way": self.n_way, "k_shot": self.k_shot,
                "q_query": self.q_query, "data_hash": self.data_hash, "episodes": list(self.episodes)}  # fmt: skip
        if self.images is not None:
            body["images"] = dict(self.images)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(body) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> EpisodeManifest:
        """Read a manifest; a clear ``DataError`` naming the file if it is not one."""
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read episode manifest {path}: {type(error).__name__}: {error}") from error
        if isinstance(body, dict) and body.get("format") in _OLD_FORMATS:
            raise DataError(
                f"{path} was written by an older medmeta ({body['format']}) whose image ids could name the wrong file; "
                "freeze the test episodes again (run `medmeta test` without --episodes)"
            )
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DataError(f"{path} is not a medmeta episode manifest (expected format {FORMAT!r})")
        try:
            episodes = tuple(body["episodes"])
            for e in episodes:
                if not (isinstance(e["index"], int) and len(e["classes"]) == body["n_way"]
                        and len(e["support"]) == body["n_way"] * body["k_shot"]
                        and len(e["query"]) == body["n_way"] * body["q_query"]):  # fmt: skip
                    raise ValueError(f"episode {e.get('index')} does not have the manifest's shape")
            images = body.get("images")
            if images is not None and not isinstance(images, dict):
                raise ValueError(f"images must be an object of image settings, not {type(images).__name__}")
            return cls(str(body["split"]), int(body["seed"]), int(body["n_way"]), int(body["k_shot"]),
                       int(body["q_query"]), str(body["data_hash"]), episodes, images)  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"episode manifest {path} is malformed: {type(error).__name__}: {error}") from error


class ManifestEpisodeSampler:
    """Replays a manifest's episodes against an image bank (same interface as ``EpisodeSampler``)."""

    def __init__(
        self, manifest: EpisodeManifest, ids: Sequence[str], classes: Sequence[str], *, labels: Sequence[str],
        source: Path, patients: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        """Replay ``manifest`` over the images ``ids`` (of classes ``labels``, their patients ``patients``).

        Raises:
            DataError: naming the manifest (and episode) if a class is not a test class here, an id is
                unknown, an episode lists an image twice or under another class than the image's own, or
                (with ``patients``) its support and query share a patient.
        """
        self.manifest, self.seed, self.classes = manifest, manifest.seed, tuple(sorted(classes))
        self.n_way, self.k_shot, self.q_query = manifest.n_way, manifest.k_shot, manifest.q_query
        position = {sid: i for i, sid in enumerate(ids)}
        unknown = {name for e in manifest.episodes for name in e["classes"] if name not in self.classes}
        if unknown:
            raise DataError(
                f"episode manifest {source} uses class(es) {sorted(unknown)} that are not test classes under this data "
                "config (its seed or splits differ from the run that wrote it); a model trained with this config may "
                "have seen them. Use the seed and splits of that run"
            )
        missing = {sid for e in manifest.episodes for sid in (*e["support"], *e["query"]) if sid not in position}
        if missing:
            raise DataError(f"episode manifest {source} does not fit this data set: {len(missing)} image id(s) not found")
        for e in manifest.episodes:
            _refuse_wrong_slots(e, position, labels, manifest, source)
        self._episodes = [
            Episode(
                index=e["index"], classes=tuple(e["classes"]),
                support=np.asarray([position[s] for s in e["support"]]),
                support_labels=np.repeat(np.arange(self.n_way), self.k_shot),
                query=np.asarray([position[s] for s in e["query"]]),
                query_labels=np.repeat(np.arange(self.n_way), self.q_query),
            )  # fmt: skip
            for e in manifest.episodes
        ]
        if patients is not None:
            _refuse_shared_patients(self._episodes, patients, source)

    def __len__(self) -> int:
        return len(self._episodes)

    def episode(self, index: int) -> Episode:
        """The manifest's ``index``-th episode (position in the file)."""
        return self._episodes[index]


def _refuse_wrong_slots(
    episode: Mapping, position: Mapping[str, int], labels: Sequence[str], manifest: EpisodeManifest, source: Path
) -> None:  # fmt: skip
    """Refuse an episode listing an image twice, or under another class than its own (it would get the wrong label)."""
    listed = [*episode["support"], *episode["query"]]
    if len(set(listed)) != len(listed):
        raise DataError(f"episode manifest {source}: episode {episode['index']} lists the same image more than once; "
                        "replay refused")  # fmt: skip
    slots = [*(c for c in episode["classes"] for _ in range(manifest.k_shot)),
             *(c for c in episode["classes"] for _ in range(manifest.q_query))]  # fmt: skip
    for sid, slot in zip(listed, slots):
        actual = labels[position[sid]]
        if actual != slot:
            raise DataError(
                f"episode manifest {source}: episode {episode['index']} lists an image of class {actual!r} as class "
                f"{slot!r}, so it would be scored against the wrong label; replay refused"
            )


def _refuse_shared_patients(episodes: Sequence[Episode], patients: Sequence[str], source: Path) -> None:
    """Refuse a manifest with an episode whose support and query share a patient (frozen by an older medmeta)."""
    for episode in episodes:
        shared = {patients[i] for i in episode.support} & {patients[i] for i in episode.query}
        if shared:
            raise DataError(
                f"episode manifest {source}: episode {episode.index} has {len(shared)} patient(s) in both its support "
                "and its query set (frozen by an older medmeta that kept patients apart only within a class); "
                "replay refused: freeze the test episodes again (run `medmeta test` without --episodes)"
            )
