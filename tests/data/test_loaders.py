"""Episode loaders without Lightning: each rank its share of new episodes, a position kept for resuming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta.data.episodes import EpisodeSampler
from medmeta.data.loaders import EpisodeDataset, EpochEpisodeSampler, per_rank_batch, training_loader


def test_ranks_take_disjoint_new_episodes_every_epoch() -> None:
    ranks = [EpochEpisodeSampler(8, num_replicas=2, rank=r) for r in (0, 1)]
    first = [list(s) for s in ranks]
    assert first == [[0, 2, 4, 6], [1, 3, 5, 7]] and all(len(s) == 4 for s in ranks)
    for sampler in ranks:
        sampler.set_epoch(1)
    assert [list(s) for s in ranks] == [[8, 10, 12, 14], [9, 11, 13, 15]]
    ranks[0].skip = 4  # resumed two meta-batches of 2 episodes into the epoch
    assert list(ranks[0]) == [12, 14] and list(ranks[0]) == [8, 10, 12, 14]  # the skip applies once


def test_a_meta_batch_that_does_not_split_across_ranks_is_refused() -> None:
    assert per_rank_batch(4, 2) == 2
    with pytest.raises(ValueError, match="meta_batch_size=3 does not split evenly across 2 processes"):
        per_rank_batch(3, 2)


def test_the_training_loader_resumes_where_its_state_says() -> None:
    labels = np.repeat(np.arange(4), 4).astype(str).tolist()
    sampler = EpisodeSampler(labels, [f"p{i}" for i in range(16)], sorted(set(labels)), split="train", n_way=2,
                             k_shot=1, q_query=1, seed=0)  # fmt: skip
    dataset = EpisodeDataset(torch.rand(16, 1, 4, 4), sampler, length=6, augment=True)
    loader = training_loader(dataset, meta_batch_size=2, position=lambda: 1)
    assert [b["episode"].tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 1}
    fresh = training_loader(dataset, meta_batch_size=2)
    fresh.load_state_dict(state)
    resumed = [b["episode"].tolist() for b in fresh]
    assert resumed == [[2, 3], [4, 5]]
    again = next(iter(fresh))  # augmentation is a function of (seed, index): the same batch, the same pixels
    assert torch.equal(again["support_x"], next(iter(loader))["support_x"])
