"""Real radiology JPEGs (mednist-mini, present in development checkouts only) flow through the pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta.data.datamodule import EpisodicDataModule

MEDNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mednist-mini"


@pytest.mark.skipif(not MEDNIST.is_dir(), reason="mednist-mini is only present in development checkouts")
def test_mednist_mini_episodes() -> None:
    data = EpisodicDataModule(
        str(MEDNIST), n_way=2, k_shot=1, q_query=5, eval_batch_size=4, image_size=32, window=None, test_episodes=8,
        splits={"train": ["AbdomenCT", "BreastMRI"], "val": ["CXR", "ChestCT"], "test": ["Hand", "HeadCT"]},
    )  # fmt: skip
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["support_x"].shape == (4, 2, 1, 32, 32)
    assert batch["query_x"].shape == (4, 10, 1, 32, 32)
    assert float(batch["query_x"].min()) >= 0.0 and float(batch["query_x"].max()) <= 1.0
    assert torch.isfinite(batch["query_x"]).all() and batch["query_x"].std() > 0.05
