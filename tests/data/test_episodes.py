"""Episodes: shape, labels, patient-disjoint support/query, class-disjoint splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta.data.episodes import SPLITS, EpisodeSampler, split_classes
from medmeta.errors import DataError


def _bank(n_classes: int = 8, patients: int = 4, images: int = 3) -> tuple[list[str], list[str]]:
    labels, patient_keys = [], []
    for c in range(n_classes):
        for p in range(patients):
            for _ in range(images):
                labels.append(f"class{c}")
                patient_keys.append(f"c{c}p{p}")
    return labels, patient_keys


def test_episode_shape_labels_and_patient_disjointness() -> None:
    labels, patients = _bank()
    sampler = EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=5, k_shot=2, q_query=4, seed=1)
    for index in range(200):
        episode = sampler.episode(index)
        assert len(set(episode.classes)) == 5
        assert list(episode.support_labels) == [c for c in range(5) for _ in range(2)]
        assert list(episode.query_labels) == [c for c in range(5) for _ in range(4)]
        for label, name in enumerate(episode.classes):
            support = episode.support[episode.support_labels == label]
            query = episode.query[episode.query_labels == label]
            assert {labels[i] for i in support} == {labels[i] for i in query} == {name}
            assert not {patients[i] for i in support} & {patients[i] for i in query}
        assert len(set(episode.support) | set(episode.query)) == 5 * (2 + 4)


def test_same_seed_split_index_gives_same_episode_and_others_differ() -> None:
    labels, patients = _bank()
    make = lambda seed, split: EpisodeSampler(  # noqa: E731
        labels, patients, sorted(set(labels)), split=split, n_way=5, k_shot=1, q_query=3, seed=seed
    )
    a, b = make(0, "test").episode(17), make(0, "test").episode(17)
    assert a.classes == b.classes and np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    others = [make(0, "test").episode(18), make(1, "test").episode(17), make(0, "val").episode(17)]
    assert all(not np.array_equal(a.query, o.query) for o in others)


def test_uneven_patients_still_give_disjoint_support_and_query() -> None:
    # one patient holds almost every image: only the fallback partition is feasible
    labels = ["a"] * 16 + ["b"] * 16
    patients = ["a1"] + ["a2"] * 15 + ["b1"] + ["b2"] * 15
    sampler = EpisodeSampler(labels, patients, ["a", "b"], split="test", n_way=2, k_shot=1, q_query=15)
    for index in range(50):
        episode = sampler.episode(index)
        assert not {patients[i] for i in episode.support} & {patients[i] for i in episode.query}


def test_small_class_raises_naming_the_class_and_counts() -> None:
    labels, patients = _bank(n_classes=6, patients=4, images=3)
    labels += ["rare"] * 3
    patients += ["r1", "r2", "r3"]
    with pytest.raises(DataError, match=r"class 'rare'.*3 image\(s\) from 3 patient\(s\).*1 support \+ 5 query = 6"):
        EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=5, k_shot=1, q_query=5)


def test_single_patient_class_is_refused() -> None:
    labels, patients = ["a"] * 10 + ["b"] * 10, ["a1"] * 10 + ["b1", "b2"] * 5
    with pytest.raises(DataError, match="class 'a'.*1 patient"):
        EpisodeSampler(labels, patients, ["a", "b"], split="val", n_way=2, k_shot=1, q_query=2)


def test_more_ways_than_classes_is_refused() -> None:
    labels, patients = _bank(n_classes=4)
    with pytest.raises(DataError, match="meta-split 'test' has 4 class.*n_way=5"):
        EpisodeSampler(labels, patients, sorted(set(labels)), split="test", n_way=5, k_shot=1, q_query=1)


def test_ratio_splits_are_class_disjoint_cover_everything_and_follow_the_seed() -> None:
    classes = [f"c{i}" for i in range(30)]
    splits = split_classes(classes, ratios=(0.6, 0.2, 0.2), seed=4)
    parts = [set(splits.of(s)) for s in SPLITS]
    assert [len(p) for p in parts] == [18, 6, 6]
    assert set.union(*parts) == set(classes)
    assert sum(len(p) for p in parts) == len(classes)
    assert split_classes(classes, seed=4) == splits
    assert split_classes(classes, seed=5) != splits


def test_explicit_splits_and_overlap_refused() -> None:
    splits = split_classes(["a", "b", "c", "d"], explicit={"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    assert splits.train == ("a", "b") and splits.test == ("d",)
    with pytest.raises(DataError, match="class 'a' is in both 'train' and 'test'"):
        split_classes(["a", "b"], explicit={"train": ["a"], "test": ["a", "b"]})
    with pytest.raises(DataError, match="class 'z'"):
        split_classes(["a", "b"], explicit={"train": ["z"]})
