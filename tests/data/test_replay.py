"""Replay checks without a data module: frozen episodes come back identical; another shape or data set is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medmeta.data.episode_manifest import ManifestEpisodeSampler, image_settings
from medmeta.data.inventory import Inventory, take_inventory
from medmeta.data.replay import dataset_hash, frozen_episodes, replayed_episodes
from medmeta.errors import DataError

SHAPE = {"n_way": 3, "k_shot": 2, "q_query": 3}
IMAGES = image_settings(image_size=16, in_channels=1, spatial_dims=2, window=(-1100, 400), preset=None, spacing=None,
                        roi_size=None)  # fmt: skip


@pytest.fixture(scope="module")
def inventory(tiny_dicom_root: Path) -> Inventory:
    return take_inventory(tiny_dicom_root, split_ratios=(0.5, 0.25, 0.25), seed=0, preflight=False, **SHAPE)


def _frozen(inventory: Inventory, tmp_path: Path, count: int = 5) -> Path:
    sampler = inventory.episode_sampler("test", seed=0, **SHAPE)
    manifest = frozen_episodes(sampler, count, inventory.split_records("test"), all_records=inventory.records,
                               root=inventory.source, seed=0, k_shot=2, q_query=3, images=IMAGES)  # fmt: skip
    return manifest.write(tmp_path / "test_episodes.json")


def _replay(inventory: Inventory, path: Path, **overrides: object) -> ManifestEpisodeSampler:
    settings = {**SHAPE, "images": IMAGES, **overrides}
    return replayed_episodes(path, inventory.split_records("test"), inventory.class_splits.test,
                             all_records=inventory.records, root=inventory.source, **settings)  # fmt: skip


def test_frozen_episodes_replay_identically(inventory: Inventory, tmp_path: Path) -> None:
    path = _frozen(inventory, tmp_path)
    drawn = inventory.episode_sampler("test", seed=0, **SHAPE)
    replayed = _replay(inventory, path)
    assert len(replayed) == 5
    for i in range(5):
        a, b = drawn.episode(i), replayed.episode(i)
        assert a.classes == b.classes and np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    again = frozen_episodes(replayed, len(replayed), inventory.split_records("test"), all_records=inventory.records,
                            root=inventory.source, seed=0, k_shot=2, q_query=3, images=IMAGES)  # fmt: skip
    assert again is replayed.manifest  # a replayed manifest is written back as it was read


def test_another_episode_shape_is_refused(inventory: Inventory, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3-way 2-shot 3-query episodes but the data config asks for 3-way 1-shot"):
        _replay(inventory, _frozen(inventory, tmp_path), k_shot=1)


def test_another_data_set_is_refused(inventory: Inventory, tmp_path: Path) -> None:
    path = _frozen(inventory, tmp_path)
    fewer = [r for r in inventory.records if r not in inventory.split_records("train")[:1]]
    assert dataset_hash(fewer, inventory.source) != dataset_hash(inventory.records, inventory.source)
    with pytest.raises(DataError, match="frozen on a different data set"):
        replayed_episodes(path, inventory.split_records("test"), inventory.class_splits.test, all_records=fewer,
                          root=inventory.source, images=IMAGES, **SHAPE)  # fmt: skip


def test_other_image_settings_are_refused_and_ignored_ones_are_not(inventory: Inventory, tmp_path: Path) -> None:
    path = _frozen(inventory, tmp_path)
    with pytest.raises(DataError, match=r"frozen with other image settings \(image_size 16 there, 8 now\)"):
        _replay(inventory, path, images={**IMAGES, "image_size": 8})
    # a preset overrides the window, spacing and ROI size apply to volumes only: settings that change no image
    preset = image_settings(image_size=16, in_channels=1, spatial_dims=2, window=(0, 1), preset="ct-lung",
                            spacing=(1.0, 1.0, 1.0), roi_size=(8, 8, 8))  # fmt: skip
    assert preset == {**IMAGES, "preset": "ct-lung", "window": None}
    volume = image_settings(image_size=16, in_channels=1, spatial_dims=3, window=None, preset=None, spacing=(1, 1, 2),
                            roi_size=(8, 8, 8))  # fmt: skip
    assert volume["spacing"] == [1.0, 1.0, 2.0] and volume["roi_size"] == [8, 8, 8]
