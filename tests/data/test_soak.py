"""Soak test (slow, not in the default run): thousands of episodes through the data pipeline, flat memory."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from medmeta.data.datamodule import EpisodicDataModule


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident set size")
def test_thousands_of_episodes_do_not_grow_memory(tiny_dicom_root: Path) -> None:
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=2, q_query=3, meta_batch_size=8, image_size=32,
                              train_batches_per_epoch=100, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    data.setup("fit")
    loader = data.train_dataloader()
    episodes, readings = 0, []
    for epoch in range(6):  # 6 x 100 meta-batches x 8 = 4,800 augmented episodes
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            episodes += batch["support_x"].shape[0]
            assert batch["query_x"].shape == (8, 9, 1, 32, 32)
        gc.collect()
        readings.append(_rss_mib())
    assert episodes == 4800
    growth = readings[-1] - readings[1]  # after the first epoch warmed the allocator up
    assert growth < 32, f"resident memory grew by {growth:.0f} MiB over {episodes} episodes: {readings}"
