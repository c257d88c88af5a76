"""Class-disjoint meta-splits and N-way K-shot Q-query episodes.

Why this module is longer than 300 lines: the patient-disjoint support/query search and its helpers serve
``EpisodeSampler`` alone and are one idea with it.

Every episode is a pure function of ``(seed, split, index)``: it draws from a local
``numpy.random.Generator`` seeded with exactly those three numbers, never from a global RNG, so
the same index gives the same episode in any process, worker or machine.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmeta.errors import DataError

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
_ATTEMPTS = 8  # draws of an episode's support/query patients before its fixed split is used
_RANDOM_SPLITS = 512  # random support/query assignments tried first when searching a fixed split
_EXHAUSTIVE = 16  # up to this many shared patients, the search for a fixed split tries every assignment
_SEARCH_STEPS = 2000  # steps of the local search beyond that
_COMBINATIONS = 2000  # most N-class combinations checked one by one when linked classes have no common split


@dataclass(frozen=True)
class ClassSplits:
    """Class names of each meta-split; no class is in two splits."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        """The classes of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return getattr(self, split)

    def to_json(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``, JSON-ready."""
        return {split: list(self.of(split)) for split in SPLITS}


def split_classes(
    classes: Sequence[str],
    *,
    ratios: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    explicit: Mapping[str, Sequence[str]] | None = None,
) -> ClassSplits:
    """Assign classes to class-disjoint meta-train/val/test splits.

    Args:
        classes: all class names.
        ratios: fractions for train, val and test (used when ``explicit`` is not given).
        seed: seed of the shuffle that assigns classes to splits.
        explicit: class lists per split (``{"train": [...], "val": [...], "test": [...]}``).
    """
    _check_seed(seed)
    names = sorted(set(classes))
    if explicit is not None:
        unknown_splits = set(explicit) - set(SPLITS)
        if unknown_splits:
            raise DataError(f"unknown meta-split(s) {sorted(unknown_splits)}; use {list(SPLITS)}")
        chosen = {split: tuple(explicit.get(split, ())) for split in SPLITS}
        seen: dict[str, str] = {}
        for split, members in chosen.items():
            for name in members:
                if name not in names:
                    raise DataError(f"class {name!r} of split {split!r} is not in the data set (classes: {names})")
                if name in seen:
                    raise DataError(f"class {name!r} is in both {seen[name]!r} and {split!r} meta-splits")
                seen[name] = split
        return ClassSplits(**chosen)
    if len(ratios) != 3 or not all(math.isfinite(r) and r >= 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"split ratios must be three non-negative numbers, not all zero; got {list(ratios)}")
    order = np.random.default_rng([seed, 7919]).permutation(len(names))
    shuffled = [names[i] for i in order]
    n_train, n_val, n_test = _split_counts(len(names), ratios)
    splits = ClassSplits(
        train=tuple(sorted(shuffled[:n_train])),
        val=tuple(sorted(shuffled[n_train : n_train + n_val])),
        test=tuple(sorted(shuffled[n_train + n_val :])),
    )
    members = [name for split in SPLITS for name in splits.of(split)]
    assert len(members) == len(set(members)) == len(names), "meta-splits must be disjoint and cover every class"
    return splits


def _split_counts(n: int, ratios: Sequence[float]) -> tuple[int, int, int]:
    """Class counts of train, val and test: non-negative and summing to ``n``.

    Val and test are rounded and train takes the rest (the rule of earlier versions, kept so that
    existing meta-splits do not change); when that leaves train negative, or gives train classes at a
    train ratio of 0, the counts are the largest-remainder apportionment of ``n``.
    """
    total = sum(ratios)
    shares = [n * r / total for r in ratios]
    n_val, n_test = round(shares[1]), round(shares[2])
    if n_val + n_test <= n and (ratios[0] > 0 or n_val + n_test == n):
        return n - n_val - n_test, n_val, n_test
    counts = [math.floor(share) for share in shares]
    by_remainder = sorted(range(3), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")


@dataclass(frozen=True)
class Episode:
    """Indices into the image bank of one N-way episode, with labels remapped to ``0..N-1``."""

    index: int
    classes: tuple[str, ...]
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes from the classes of one meta-split.

    Support and query images of an episode never come from the same patient, across all its
    classes: a patient with images in two classes of an episode gives support images or query
    images, never both.

    How an episode is drawn (``episode``): N classes are drawn; whole patients are assigned to
    support or query, class by class in draw order: the class's patients are shuffled, those
    not already assigned by an earlier class of the episode go to support until the class has K
    support images, the rest to query. When a class is then left short, the assignment is drawn
    again (up to 8 times, from the same local generator), then a fixed split found at setup is
    used. In an episode where no patient spans two of its classes this is exactly the per-class
    draw, so such episodes are the same as when patients were kept apart per class only.

    The fixed split is checked at setup, so that no class combination can fail mid-training:
    each group of classes linked by shared patients gets one support/query assignment of its
    shared patients that leaves every class of the group K support and Q query images (or, when
    none exists and a group has more than N classes, one for every N-class combination of it).

    Args:
        labels: class name of every image in the bank.
        patients: patient key of every image in the bank.
        classes: the classes of this split.
        split: ``"train"``, ``"val"`` or ``"test"``.
        n_way, k_shot, q_query: episode shape.
        seed: base seed.

    Raises:
        DataError: if the split has fewer than N classes, a class cannot supply K support and Q
            query images from disjoint patients, or patients shared between classes leave some
            N classes that an episode may draw together without such a split; the message names
            the class and its image and patient counts.
    """

    def __init__(
        self,
        labels: Sequence[str],
        patients: Sequence[str],
        classes: Sequence[str],
        *,
        split: str,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n_way < 2 or k_shot < 1 or q_query < 1:
            raise DataError(f"need n_way >= 2, k_shot >= 1, q_query >= 1; got {n_way}, {k_shot}, {q_query}")
        _check_seed(seed)
        self.split, self.n_way, self.k_shot, self.q_query, self.seed = split, n_way, k_shot, q_query, seed
        self.classes = tuple(sorted(classes))
        if len(self.classes) < n_way:
            raise DataError(
                f"meta-split {split!r} has {len(self.classes)} class(es) {list(self.classes)} but "
                f"n_way={n_way} episodes need at least {n_way}"
            )
        self._keys, self._groups = _patient_groups(labels, patients, self.classes)
        owners: dict[int, list[str]] = {}
        for name in self.classes:
            for key in self._keys[name].tolist():
                owners.setdefault(key, []).append(name)
        self._shared = {
            name: frozenset(k for k in self._keys[name].tolist() if len(owners[k]) > 1) for name in self.classes
        }
        self._fallback = {}
        for name, groups in self._groups.items():
            self._fallback[name] = self._feasible_partition(name, groups)
        # one fixed, episode-wide disjoint split per group of classes linked by shared patients
        self._fixed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._fixed_combinations: dict[frozenset[str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._component: dict[str, tuple[str, ...]] = {}
        search_rng = np.random.default_rng([seed, _SPLIT_CODES[split], 104729])
        for component in _linked_classes(self.classes, owners):
            for name in component:
                self._component[name] = component
            if len(component) == 1:
                self._fixed[component[0]] = self._fallback[component[0]]
                continue
            split_found, report = self._disjoint_split(component, search_rng)
            if split_found is not None:
                self._fixed.update(split_found)
                continue
            if n_way >= len(component):
                raise DataError(f"{report}, and a {n_way}-way episode may draw all of them together")
            count = math.comb(len(component), n_way)
            if count > _COMBINATIONS:
                raise DataError(
                    f"{report}; a {n_way}-way episode draws {n_way} of them, and checking each of the {count} "
                    f"{n_way}-class combinations one by one is beyond the limit of {_COMBINATIONS}"
                )
            for combination in itertools.combinations(component, n_way):
                split_found, report = self._disjoint_split(combination, search_rng)
                if split_found is None:
                    raise DataError(f"{report}, and a {n_way}-way episode may draw exactly these classes")
                self._fixed_combinations[frozenset(combination)] = split_found

    def _feasible_partition(self, name: str, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A support/query patient partition of one class alone (smallest patients to support if that works)."""
        sizes = [len(g) for g in groups]
        chosen = _subset_in_range(sizes, self.k_shot, sum(sizes) - self.q_query)
        if chosen is None:
            raise DataError(
                f"class {name!r} in meta-split {self.split!r} has {sum(sizes)} image(s) from "
                f"{len(groups)} patient(s); a {self.n_way}-way {self.k_shot}-shot {self.q_query}-query "
                f"episode needs {self.k_shot} support + {self.q_query} query = "
                f"{self.k_shot + self.q_query} images, with support and query from different patients"
            )
        return _pools(groups, chosen)

    def _disjoint_split(
        self, names: Sequence[str], rng: np.random.Generator
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]] | None, str]:
        """Support/query pools of ``names`` whose patients are disjoint across all of them, or ``None`` and why not."""
        counts: dict[int, int] = {}
        for name in names:
            for key in self._shared[name]:
                counts[key] = counts.get(key, 0) + 1
        spanning = sorted(key for key, count in counts.items() if count > 1)
        column = {key: i for i, key in enumerate(spanning)}
        k, q = self.k_shot, self.q_query
        weights = np.zeros((len(spanning), len(names)), dtype=np.int64)
        free_total = np.zeros(len(names), dtype=np.int64)
        lowest = np.zeros((len(names), k + 1), dtype=np.int64)  # least free-patient support sum >= lo, lo = 0..K
        for j, name in enumerate(names):
            free = []
            for key, group in zip(self._keys[name].tolist(), self._groups[name]):
                if key in column:
                    weights[column[key], j] = len(group)
                else:
                    free.append(len(group))
            free_total[j] = sum(free)
            lowest[j] = _least_sums_from(free, k)

        def classes_ok(assign: np.ndarray) -> np.ndarray:
            support = assign.astype(np.int64) @ weights
            query = (~assign).astype(np.int64) @ weights
            need = lowest[np.arange(len(names)), np.clip(k - support, 0, k)]
            return need <= free_total - np.clip(q - query, 0, None)

        n = len(spanning)
        draws = rng.random((_RANDOM_SPLITS, n)) < np.linspace(0.2, 0.8, _RANDOM_SPLITS)[:, None]
        ok = classes_ok(draws)
        exhaustive = n <= _EXHAUSTIVE
        if not ok.all(axis=1).any() and exhaustive:
            draws = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
            ok = classes_ok(draws)
        elif not ok.all(axis=1).any():
            draws, ok = _local_search(draws[np.argmax(ok.sum(axis=1))], weights, classes_ok, rng)
        hits = np.flatnonzero(ok.all(axis=1))
        if hits.size:
            assign = draws[hits[0]]
            pools = {}
            for j, name in enumerate(names):
                keys, groups = self._keys[name].tolist(), self._groups[name]
                fixed = {key: bool(assign[column[key]]) for key in keys if key in column}
                support = int(sum(len(g) for key, g in zip(keys, groups) if fixed.get(key) is True))
                query = int(sum(len(g) for key, g in zip(keys, groups) if fixed.get(key) is False))
                unfixed = [i for i, key in enumerate(keys) if key not in column]
                chosen = _subset_in_range([len(groups[i]) for i in unfixed], k - support,
                                          int(free_total[j]) - max(0, q - query))  # fmt: skip
                assert chosen is not None, "classes_ok accepted a split that cannot be completed"
                in_support = {unfixed[i] for i in chosen} | {i for i, key in enumerate(keys) if fixed.get(key) is True}
                pools[name] = _pools(groups, in_support)
            return pools, ""
        short = names[int(np.argmin(ok[np.argmax(ok.sum(axis=1))]))]
        n_images = sum(len(g) for g in self._groups[short])
        n_shared = sum(1 for key in self._keys[short].tolist() if key in column)
        how = "exists" if exhaustive else "was found by a bounded search"
        return None, (
            f"class {short!r} in meta-split {self.split!r} has {n_images} image(s) from {len(self._groups[short])} "
            f"patient(s), {n_shared} of them also in other classes among {list(names)}; support and query of an "
            f"episode never share a patient, and no split of the {n} patient(s) shared by these classes into support "
            f"and query {how} that leaves each class {k} support + {q} query images"
        )

    def episode(self, index: int) -> Episode:
        """The episode number ``index`` of this split: the same for the same (seed, split, index)."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], int(index)])
        chosen = [self.classes[i] for i in rng.choice(len(self.classes), self.n_way, replace=False)]
        shared = [self._shared[name] for name in chosen]
        support, query = [], []
        if len(frozenset().union(*shared)) == sum(len(s) for s in shared):  # no patient spans two classes
            for name in chosen:
                pool_s, pool_q = self._partition(name, rng)
                support.append(rng.choice(pool_s, self.k_shot, replace=False))
                query.append(rng.choice(pool_q, self.q_query, replace=False))
        else:
            for pool_s, pool_q in self._episode_partition(chosen, rng):
                support.append(rng.choice(pool_s, self.k_shot, replace=False))
                query.append(rng.choice(pool_q, self.q_query, replace=False))
        return Episode(
            index=int(index),
            classes=tuple(chosen),
            support=np.concatenate(support),
            support_labels=np.repeat(np.arange(self.n_way), self.k_shot),
            query=np.concatenate(query),
            query_labels=np.repeat(np.arange(self.n_way), self.q_query),
        )

    def _partition(self, name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Support/query pools of one class: shuffled patients to support until K, up to 8 draws, then its fixed split.

        An episode whose first draw leaves Q query images is the same as before redraws were added.
        """
        groups = self._groups[name]
        for _ in range(_ATTEMPTS):
            support: list[int] = []
            query: list[int] = []
            for g in rng.permutation(len(groups)):
                (support if len(support) < self.k_shot else query).extend(groups[g].tolist())
            if len(query) >= self.q_query:
                return np.asarray(support), np.asarray(query)
        return self._fallback[name]

    def _episode_partition(
        self, chosen: Sequence[str], rng: np.random.Generator
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Support/query pools of the classes ``chosen``, with each patient on one side for the whole episode."""
        for _ in range(_ATTEMPTS):
            side: dict[int, bool] = {}
            pools = []
            for name in chosen:
                keys, groups = self._keys[name].tolist(), self._groups[name]
                n_support = sum(len(g) for key, g in zip(keys, groups) if side.get(key) is True)
                for g in rng.permutation(len(groups)).tolist():
                    if keys[g] not in side:
                        side[keys[g]] = n_support < self.k_shot
                        n_support += len(groups[g]) if side[keys[g]] else 0
                support = [groups[g] for g, key in enumerate(keys) if side[key]]
                query = [groups[g] for g, key in enumerate(keys) if not side[key]]
                if n_support < self.k_shot or sum(len(g) for g in query) < self.q_query:
                    break
                pools.append((np.concatenate(support), np.concatenate(query)))
            else:
                return pools
        return self._fixed_partition(chosen)

    def _fixed_partition(self, chosen: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The setup's fixed, episode-wide disjoint pools of the classes ``chosen``."""
        pools = {name: self._fixed[name] for name in chosen if name in self._fixed}
        for component in {self._component[name] for name in chosen if name not in self._fixed}:
            members = [name for name in component if name in chosen]
            others = [name for name in component if name not in members]
            pools.update(self._fixed_combinations[frozenset(members + others[: self.n_way - len(members)])])
        return [pools[name] for name in chosen]


def _patient_groups(
    labels: Sequence[str], patients: Sequence[str], classes: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per class: patient numbers and image indices grouped by patient, in order of first appearance."""
    wanted = set(classes)
    number: dict[str, int] = {}
    groups: dict[str, dict[int, list[int]]] = {name: {} for name in classes}
    for i, (label, patient) in enumerate(zip(labels, patients)):
        if label in wanted:
            key = number.setdefault(patient, len(number))
            groups[label].setdefault(key, []).append(i)
    keys = {name: np.asarray(list(g), dtype=np.int64) for name, g in groups.items()}
    return keys, {name: [np.asarray(m) for m in g.values()] for name, g in groups.items()}


def _linked_classes(classes: Sequence[str], owners: Mapping[int, Sequence[str]]) -> list[tuple[str, ...]]:
    """Classes grouped into components linked by patients with images in more than one of them."""
    parent = {name: name for name in classes}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for names in owners.values():
        for other in names[1:]:
            parent[root(other)] = root(names[0])
    components: dict[str, list[str]] = {}
    for name in classes:
        components.setdefault(root(name), []).append(name)
    return [tuple(members) for members in components.values()]


def _reachable_sums(sizes: Sequence[int]) -> list[int]:
    """Bitsets of the subset sums of ``sizes[:i]`` for i = 0..len(sizes)."""
    reach = [1]
    for size in sizes:
        reach.append(reach[-1] | (reach[-1] << size))
    return reach


def _least_sums_from(sizes: Sequence[int], k: int) -> np.ndarray:
    """For lo = 0..k, the least subset sum of ``sizes`` that is >= lo (a huge number when none is)."""
    reach = _reachable_sums(sizes)[-1]
    out = np.full(k + 1, 2**40, dtype=np.int64)
    best = None
    for lo in range(k, -1, -1):
        if lo == k:
            rest = reach >> k
            best = k + (rest & -rest).bit_length() - 1 if rest else None
        elif reach >> lo & 1:
            best = lo
        if best is not None:
            out[lo] = best
    return out


def _subset_in_range(sizes: Sequence[int], lo: int, hi: int) -> set[int] | None:
    """Indices of a subset of ``sizes`` whose sum is in ``[lo, hi]``: the smallest first if that works, else any."""
    if hi < max(lo, 0):
        return None
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    chosen, total = set(), 0
    for i in order:
        if total >= lo:
            break
        chosen.add(i)
        total += sizes[i]
    if lo <= total <= hi:
        return chosen
    reach = _reachable_sums(sizes)
    target = next((t for t in range(max(lo, 0), hi + 1) if reach[-1] >> t & 1), None)
    if target is None:
        return None
    chosen = set()
    for i in range(len(sizes), 0, -1):
        if not reach[i - 1] >> target & 1:
            chosen.add(i - 1)
            target -= sizes[i - 1]
    return chosen


def _pools(groups: Sequence[np.ndarray], in_support: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Support and query image indices when the patients ``in_support`` give support, smallest patients first."""
    support: list[int] = []
    query: list[int] = []
    for i in sorted(range(len(groups)), key=lambda i: len(groups[i])):
        (support if i in in_support else query).extend(groups[i].tolist())
    return np.asarray(support), np.asarray(query)


def _local_search(
    start: np.ndarray, weights: np.ndarray, classes_ok, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip shared patients of a short class, one at a time, towards a split that serves every class."""
    assign = start.copy()
    ok = classes_ok(assign[None])[0]
    for _ in range(_SEARCH_STEPS):
        if ok.all():
            break
        short = rng.choice(np.flatnonzero(~ok))
        candidates = np.flatnonzero(weights[:, short])
        flips = np.repeat(assign[None], len(candidates), axis=0)
        flips[np.arange(len(candidates)), candidates] ^= True
        flip_ok = classes_ok(flips)
        score = flip_ok.sum(axis=1) + rng.random(len(candidates)) * 0.5
        best = int(np.argmax(score))
        assign, ok = flips[best], flip_ok[best]
    return assign[None], ok[None]
