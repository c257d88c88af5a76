"""Replay checks: the test episodes of a frozen manifest, refused if their shape, image settings or the data set differ.

Everything comes in as arguments (the manifest file, the records, the data folder, the episode
shape), so the checks run without a data module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from medmeta.data.episode_manifest import (
    EpisodeManifest,
    ManifestEpisodeSampler,
    check_image_settings,
    data_hash,
    sample_ids,
)  # fmt: skip
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.records import ImageRecord
from medmeta.errors import DataError


def dataset_hash(records: Sequence[ImageRecord], root: Path) -> str:
    """The hash of the data set ``records`` (every usable image of it) under ``root`` (see ``data_hash``)."""
    return data_hash(records, sample_ids(records, root))


def replayed_episodes(
    path: Path, records: Sequence[ImageRecord], classes: Sequence[str], *, all_records: Sequence[ImageRecord],
    root: Path, n_way: int, k_shot: int, q_query: int, images: Mapping[str, object],
) -> ManifestEpisodeSampler:  # fmt: skip
    """The sampler replaying the manifest at ``path`` over ``records`` (the split's images, of ``classes``).

    Raises:
        DataError: if the manifest's episode shape is not ``n_way``-way ``k_shot``-shot
            ``q_query``-query, if it was frozen with other image settings than ``images``
            (``episode_manifest.image_settings``; a manifest without them is replayed with a warning),
            if it was frozen on another data set than ``all_records`` under ``root``, or if an episode
            lists an image under another class than its own (see ``ManifestEpisodeSampler``).
    """
    manifest = EpisodeManifest.read(path)
    shape, wanted = (manifest.n_way, manifest.k_shot, manifest.q_query), (n_way, k_shot, q_query)
    if shape != wanted:
        raise DataError(
            f"episode manifest {path} holds {shape[0]}-way {shape[1]}-shot {shape[2]}-query episodes "
            f"but the data config asks for {wanted[0]}-way {wanted[1]}-shot {wanted[2]}-query"
        )
    check_image_settings(manifest, images, path)
    current = dataset_hash(all_records, root)
    if manifest.data_hash != current:
        raise DataError(
            f"episode manifest {path} was frozen on a different data set (hash {manifest.data_hash}, "
            f"this data set {current}): files were added, removed, relabelled or changed; replay refused"
        )
    return ManifestEpisodeSampler(manifest, sample_ids(records, root), classes, labels=[r.label for r in records],
                                  source=path, patients=[r.patient for r in records])  # fmt: skip


def frozen_episodes(
    sampler: EpisodeSampler | ManifestEpisodeSampler, count: int, records: Sequence[ImageRecord], *,
    all_records: Sequence[ImageRecord], root: Path, seed: int, k_shot: int, q_query: int, split: str = "test",
    images: Mapping[str, object] | None = None,
) -> EpisodeManifest:  # fmt: skip
    """The manifest of the first ``count`` episodes of ``sampler`` over ``records``; a replayed one as it was read.

    ``images`` are the image settings the episodes are loaded with (``episode_manifest.image_settings``).
    """
    if isinstance(sampler, ManifestEpisodeSampler):
        return sampler.manifest
    episodes = [sampler.episode(i) for i in range(count)]
    return EpisodeManifest.freeze(episodes, sample_ids(records, root), split=split, seed=seed, k_shot=k_shot,
                                  q_query=q_query, data_hash=dataset_hash(all_records, root),
                                  images=images)  # fmt: skip
