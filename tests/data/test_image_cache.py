"""The image cache on its own: in memory for one process, one shared memory-mapped file for several."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
import torch

from medmeta.data import image_cache
from medmeta.data.image_cache import cache_key, cached_images
from medmeta.data.records import ImageRecord
from tests.data.test_readers import write_series

SETTINGS = {"image_size": 8, "window": (0.0, 1.0), "preset": None, "spatial_dims": 2, "in_channels": 1,
            "spacing": None, "roi_size": None}  # fmt: skip


@pytest.fixture
def records(tmp_path: Path) -> list[ImageRecord]:
    files = []
    for i in range(3):
        path = tmp_path / "data" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * (10 + i))
        files.append(ImageRecord(path, "a", "p"))
    return files


class Transform:
    """Counts its calls; image ``i`` is filled with ``i``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        self.calls += 1
        return torch.arange(len(records), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()


def test_one_process_transforms_in_memory_and_writes_nothing(records: list[ImageRecord], tmp_path: Path) -> None:
    transform = Transform()
    images = cached_images(records, transform, settings=SETTINGS, cache_dir=tmp_path / "cache")
    assert transform.calls == 1 and images.shape == (3, 1, 8, 8)
    assert not (tmp_path / "cache").exists()


def test_rank_zero_writes_once_and_every_rank_maps_the_same_file(records: list[ImageRecord], tmp_path: Path) -> None:
    cache, waited = tmp_path / "cache", []
    transform = Transform()
    zero = cached_images(records, transform, settings=SETTINGS, world_size=2, is_zero=True,
                         barrier=lambda: waited.append(0), cache_dir=cache)  # fmt: skip
    other = cached_images(records, transform, settings=SETTINGS, world_size=2, is_zero=False,
                          barrier=lambda: waited.append(1), cache_dir=cache)  # fmt: skip
    assert transform.calls == 1 and waited == [0, 1]
    assert [p.name for p in (cache / "tensors").iterdir()] == [f"{cache_key(records, SETTINGS)}.pt"]
    assert torch.equal(zero, other) and zero[2].max() == 2
    cached_images(records, transform, settings=SETTINGS, world_size=2, is_zero=True, barrier=lambda: None,
                  cache_dir=cache)  # fmt: skip
    assert transform.calls == 1  # reused, not written again


def test_several_processes_need_a_barrier(records: list[ImageRecord], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="barrier"):
        cached_images(records, Transform(), settings=SETTINGS, world_size=2, cache_dir=tmp_path)


def test_the_key_follows_files_settings_and_cache_version(
    records: list[ImageRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = cache_key(records, SETTINGS)
    assert cache_key(records, dict(SETTINGS)) == key
    assert cache_key(records, {**SETTINGS, "image_size": 16}) != key
    assert cache_key(records[:2], SETTINGS) != key
    os.utime(records[0].path, ns=(0, 10**9))
    touched = cache_key(records, SETTINGS)
    assert touched != key
    monkeypatch.setattr(image_cache, "IMAGE_CACHE_VERSION", image_cache.IMAGE_CACHE_VERSION + 1)
    assert cache_key(records, SETTINGS) != touched
    assert all(str(r.path) not in key for r in records)


def test_the_key_follows_every_slice_of_a_series_folder(tmp_path: Path) -> None:
    folder = tmp_path / "class0" / "patient0"
    write_series(folder, n=3)
    records = [ImageRecord(folder, "class0", "p")]
    key, folder_stat = cache_key(records, SETTINGS), folder.stat()
    slice_file = sorted(folder.glob("*.dcm"))[1]
    ds = pydicom.dcmread(slice_file)
    ds.PixelData = bytes(len(ds.PixelData))  # rewritten in place: same name, same size
    ds.save_as(slice_file)
    os.utime(slice_file, ns=(0, slice_file.stat().st_mtime_ns + 10**9))
    assert (folder.stat().st_size, folder.stat().st_mtime_ns) == (folder_stat.st_size, folder_stat.st_mtime_ns)
    assert cache_key(records, SETTINGS) != key
