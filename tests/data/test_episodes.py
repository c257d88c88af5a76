"""Episodes: shape, labels, patient-disjoint support/query, class-disjoint splits, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medmeta.data.episodes import SPLITS, Episode, EpisodeSampler, split_classes
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


def _shared_patient_bank(n_patients: int, n_classes: int, per_patient: int, seed: int) -> tuple[list[str], list[str]]:
    """Every patient has 1-2 images in each of ``per_patient`` random classes (different diagnoses, one patient)."""
    rng = np.random.default_rng(seed)
    labels, patients = [], []
    for p in range(n_patients):
        for c in rng.choice(n_classes, per_patient, replace=False):
            for _ in range(int(rng.integers(1, 3))):
                labels.append(f"class{c}")
                patients.append(f"p{p}")
    return labels, patients


def _shared_patients(episode: Episode, patients: list[str]) -> set[str]:
    return {patients[i] for i in episode.support} & {patients[i] for i in episode.query}


@pytest.mark.parametrize(
    ("n_patients", "n_classes", "per_patient"),
    [(12, 6, 4), (40, 8, 3)],  # 12 shared patients (searched exhaustively at setup), 40 (searched randomly)
)
def test_no_patient_gives_both_support_and_query_of_an_episode(
    n_patients: int, n_classes: int, per_patient: int
) -> None:
    labels, patients = _shared_patient_bank(n_patients, n_classes, per_patient, seed=n_patients)
    sampler = EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=4, k_shot=1, q_query=2)
    episodes = [sampler.episode(index) for index in range(1000)]
    assert sum(bool(_shared_patients(e, patients)) for e in episodes) == 0
    for e in episodes:
        assert [labels[i] for i in e.support] == [e.classes[c] for c in e.support_labels]
        assert [labels[i] for i in e.query] == [e.classes[c] for c in e.query_labels]
        assert len(set(e.support) | set(e.query)) == 4 * (1 + 2)


def test_the_docs_example_keeps_support_and_query_patients_apart() -> None:
    # docs/data.md, "Episodes are pure functions of (seed, split, index)"
    labels = ["cyst"] * 4 + ["met"] * 4 + ["ham"] * 4
    patients = ["p1", "p1", "p2", "p3"] * 3
    sampler = EpisodeSampler(labels, patients, ["cyst", "met", "ham"], split="test", n_way=3, k_shot=1, q_query=2)
    assert sum(bool(_shared_patients(sampler.episode(i), patients)) for i in range(100)) == 0
    a = sampler.episode(7)
    assert a.classes == ("met", "ham", "cyst")
    assert (a.support.tolist(), a.query.tolist()) == ([6, 10, 2], [5, 7, 8, 11, 3, 0])


def test_linked_classes_without_a_common_split_are_refused_naming_the_class() -> None:
    # p1 is in a and b, p2 in b and c, p3 in c and a: each class alone splits 1 + 1, but a 3-way episode
    # (all three classes) needs p1, p2 and p3 pairwise on different sides, which two sides cannot give
    labels = ["a", "b", "b", "c", "c", "a"]
    patients = ["p1", "p1", "p2", "p2", "p3", "p3"]
    message = r"class '[abc]' in meta-split 'val' has 2 image\(s\) from 2 patient\(s\), 2 of them.*\['a', 'b', 'c'\]"
    with pytest.raises(DataError, match=message + r".*1 support \+ 1 query.*3-way episode may draw all of them"):
        EpisodeSampler(labels, patients, ["a", "b", "c"], split="val", n_way=3, k_shot=1, q_query=1)


def test_linked_classes_served_per_combination_when_no_split_serves_them_all() -> None:
    # the same cycle of patients, but 2-way: every pair of classes has a split, the three together have none
    labels = ["a", "b", "b", "c", "c", "a", "d", "d"]
    patients = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p5"]
    sampler = EpisodeSampler(labels, patients, ["a", "b", "c", "d"], split="val", n_way=2, k_shot=1, q_query=1)
    assert sum(bool(_shared_patients(sampler.episode(i), patients)) for i in range(300)) == 0
    assert {sampler.episode(i).classes for i in range(300)} >= {("a", "b"), ("b", "c"), ("c", "a")}


def _ring(n_classes: int) -> tuple[list[str], list[str]]:
    """Patient i has one image in class i and one in class i+1 (mod n): each class has two shared patients."""
    labels, patients = [], []
    for i in range(n_classes):
        labels += [f"c{i:02d}", f"c{(i + 1) % n_classes:02d}"]
        patients += [f"p{i}", f"p{i}"]
    return labels, patients


def test_many_shared_patients_get_a_split_by_search() -> None:
    # 20 shared patients (beyond the exhaustive search): only the two alternating assignments serve every class
    labels, patients = _ring(20)
    sampler = EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=5, k_shot=1, q_query=1)
    assert sum(bool(_shared_patients(sampler.episode(i), patients)) for i in range(500)) == 0
    pools = sampler._fixed_partition(sampler.classes)
    assert not {patients[i] for s, _ in pools for i in s} & {patients[i] for _, q in pools for i in q}
    # an odd ring has no such assignment; 21-way episodes would draw every class together
    labels, patients = _ring(21)
    with pytest.raises(DataError, match=r"class 'c\d\d'.* 2 patient\(s\), 2 of them.*bounded search.*21-way episode"):
        EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=21, k_shot=1, q_query=1)


def test_fixed_split_of_every_class_combination_is_patient_disjoint() -> None:
    # the split used when an episode's own draws keep failing: check it for every combination of classes
    labels, patients = _shared_patient_bank(12, 6, 4, seed=12)
    for n_way, k_shot, q_query in [(4, 1, 2), (6, 2, 2), (2, 3, 3)]:
        sampler = EpisodeSampler(labels, patients, sorted(set(labels)), split="test", n_way=n_way, k_shot=k_shot,
                                 q_query=q_query)  # fmt: skip
        for chosen in itertools.combinations(sampler.classes, n_way):
            pools = sampler._fixed_partition(chosen)
            support = {patients[i] for pool_s, _ in pools for i in pool_s}
            query = {patients[i] for _, pool_q in pools for i in pool_q}
            assert not support & query
            for name, (pool_s, pool_q) in zip(chosen, pools):
                assert len(pool_s) >= k_shot and len(pool_q) >= q_query
                assert {labels[i] for i in (*pool_s, *pool_q)} == {name}


def test_episodes_with_shared_patients_depend_only_on_seed_split_and_index() -> None:
    labels, patients = _shared_patient_bank(12, 6, 4, seed=12)
    make = lambda seed, split: EpisodeSampler(  # noqa: E731
        labels, patients, sorted(set(labels)), split=split, n_way=4, k_shot=1, q_query=2, seed=seed
    )
    first, second = make(0, "train"), make(0, "train")
    for index in (0, 5, 999):
        a, b, c = first.episode(index), first.episode(index), second.episode(index)
        for other in (b, c):
            assert a.classes == other.classes
            assert np.array_equal(a.support, other.support) and np.array_equal(a.query, other.query)
        assert not _shared_patients(a, patients)
    a = first.episode(5)
    assert all(not np.array_equal(a.query, o.query) for o in [first.episode(6), make(1, "train").episode(5)])


@pytest.mark.parametrize(
    ("n", "ratios"),
    [(3, (0.0, 0.5, 0.5)), (7, (0.0, 0.5, 0.5)), (5, (0.0, 1.0, 1.0)), (1, (0.0, 0.5, 0.5)), (12, (0.6, 0.2, 0.2))],
)
def test_ratio_splits_never_overlap_even_with_a_zero_train_ratio(n: int, ratios: tuple[float, float, float]) -> None:
    classes = [f"c{i}" for i in range(n)]
    for seed in range(5):
        splits = split_classes(classes, ratios=ratios, seed=seed)
        members = [name for split in SPLITS for name in splits.of(split)]
        assert sorted(members) == sorted(classes)  # each class in exactly one meta-split
        if ratios[0] == 0:
            assert splits.train == ()
    assert [len(s) for s in split_classes([f"c{i}" for i in range(12)], seed=0).to_json().values()] == [8, 2, 2]


@pytest.mark.parametrize("ratios", [(0.0, 0.0, 0.0), (-1.0, 1.0, 1.0), (float("nan"), 0.5, 0.5), (0.5, 0.5)])
def test_impossible_split_ratios_are_refused(ratios: tuple[float, ...]) -> None:
    with pytest.raises(DataError, match="split ratios must be three non-negative numbers"):
        split_classes(["a", "b", "c"], ratios=ratios)


def test_a_negative_seed_is_refused_naming_the_setting() -> None:
    with pytest.raises(DataError, match="seed must be a non-negative integer, got -1"):
        split_classes(["a", "b", "c"], seed=-1)
    labels, patients = _bank()
    with pytest.raises(DataError, match="seed must be a non-negative integer, got -3"):
        EpisodeSampler(labels, patients, sorted(set(labels)), split="train", n_way=2, k_shot=1, q_query=1, seed=-3)


def test_a_short_first_draw_is_redrawn_before_the_fixed_split_so_equal_patients_give_support_alike() -> None:
    """Class x: 25 images from patients of 10, 5, 3, 3, 2, 1, 1 images; K=5, Q=15 (one draw is short 19% of the time)."""
    sizes = [10, 5, 3, 3, 2, 1, 1]
    patients = [f"x{p}" for p, n in enumerate(sizes) for _ in range(n)] + [f"b{p}" for p in range(6) for _ in range(4)]
    labels = [p[0] for p in patients]
    sampler = EpisodeSampler(labels, patients, ["b", "x"], split="test", n_way=2, k_shot=5, q_query=15)
    fixed = {patients[i] for i in sampler._fallback["x"][0].tolist()}
    gives_support = {"x2": 0, "x3": 0}  # the two 3-image patients
    as_fixed, n = 0, 2000
    for index in range(n):
        episode = sampler.episode(index)
        x = episode.classes.index("x")
        support = {patients[i] for i in episode.support[episode.support_labels == x]}
        query = {patients[i] for i in episode.query[episode.query_labels == x]}
        as_fixed += support <= fixed and not query & fixed
        for patient in gives_support:
            gives_support[patient] += patient in support
    assert as_fixed / n < 0.05  # one draw then the fixed split: 0.21
    assert abs(gives_support["x2"] - gives_support["x3"]) / n < 0.05  # one draw: 0.43 against 0.25
