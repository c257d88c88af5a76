"""Frozen episode manifests: the exact test episodes, written once and replayed anywhere.

A manifest lists every episode's index, class names and the opaque ids of its support and query
images, with the seed, the episode shape and a hash of the data set it was drawn from. Replaying
it (``--episodes FILE``) gives the same tasks on any machine, so two methods or two papers are
compared on identical episodes; a data set that changed since is detected from the hash and
refused. Sample ids are hashes of each file's path inside the data folder: no file name, path or
patient identifier is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmeta.data.episodes import Episode
from medmeta.data.records import ImageRecord
from medmeta.errors import DataError

FORMAT = "medmeta-episodes/1"


def sample_id(record: ImageRecord, root: Path) -> str:
    """An opaque, machine-independent id of one image: a hash of its path inside ``root`` (and array item)."""
    try:
        relative = record.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # a manifest (CSV) may point outside the root: the file name is what stays stable
        relative = record.path.name
    return hashlib.sha256(f"{relative}|{record.item}".encode()).hexdigest()[:16]


def data_hash(records: Sequence[ImageRecord], ids: Sequence[str]) -> str:
    """Hash of the data set: every image's id, class and file size (not times: copies keep the hash)."""
    digest = hashlib.sha256()
    for sid, record in sorted(zip(ids, records), key=lambda pair: pair[0]):
        size = record.path.stat().st_size if record.path.is_file() else sum(
            f.stat().st_size for f in record.path.rglob("*") if f.is_file()
        )  # fmt: skip
        digest.update(f"{sid}|{record.label}|{size}\n".encode())
    return digest.hexdigest()[:32]


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

    @classmethod
    def freeze(
        cls, episodes: Sequence[Episode], ids: Sequence[str], *, split: str, seed: int, k_shot: int, q_query: int,
        data_hash: str,
    ) -> EpisodeManifest:  # fmt: skip
        """A manifest of ``episodes``, whose support/query entries index ``ids``."""
        frozen = tuple(
            {"index": e.index, "classes": list(e.classes), "support": [ids[i] for i in e.support],
             "query": [ids[i] for i in e.query]}
            for e in episodes
        )  # fmt: skip
        n_way = len(episodes[0].classes) if episodes else 0
        return cls(split, seed, n_way, k_shot, q_query, data_hash, frozen)

    def write(self, path: Path) -> Path:
        """Write the manifest as JSON (atomically)."""
        body = {"format": FORMAT, "split": self.split, "seed": self.seed, "n_way": self.n_way, "k_shot": self.k_shot,
                "q_query": self.q_query, "data_hash": self.data_hash, "episodes": list(self.episodes)}  # fmt: skip
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
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise DataError(f"{path} is not a medmeta episode manifest (expected format {FORMAT!r})")
        try:
            episodes = tuple(body["episodes"])
            for e in episodes:
                if not (isinstance(e["index"], int) and len(e["classes"]) == body["n_way"]
                        and len(e["support"]) == body["n_way"] * body["k_shot"]
                        and len(e["query"]) == body["n_way"] * body["q_query"]):  # fmt: skip
                    raise ValueError(f"episode {e.get('index')} does not have the manifest's shape")
            return cls(str(body["split"]), int(body["seed"]), int(body["n_way"]), int(body["k_shot"]),
                       int(body["q_query"]), str(body["data_hash"]), episodes)  # fmt: skip
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"episode manifest {path} is malformed: {type(error).__name__}: {error}") from error


class ManifestEpisodeSampler:
    """Replays a manifest's episodes against an image bank (same interface as ``EpisodeSampler``)."""

    def __init__(self, manifest: EpisodeManifest, ids: Sequence[str], classes: Sequence[str], *, source: Path) -> None:
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

    def __len__(self) -> int:
        return len(self._episodes)

    def episode(self, index: int) -> Episode:
        """The manifest's ``index``-th episode (position in the file)."""
        return self._episodes[index]
