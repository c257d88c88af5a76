"""Class-disjoint meta-splits and N-way K-shot Q-query episodes.

Every episode is a pure function of ``(seed, split, index)``: it draws from a local
``numpy.random.Generator`` seeded with exactly those three numbers, never from a global RNG, so
the same index gives the same episode in any process, worker or machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmeta.errors import DataError

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class ClassSplits:
    """Class names of each meta-split; no class is in two splits."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def of(self, split: str) -> tuple[str, ...]:
        """The classes of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return getattr(self, split)


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
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"split ratios must be three non-negative numbers, got {list(ratios)}")
    order = np.random.default_rng([seed, 7919]).permutation(len(names))
    shuffled = [names[i] for i in order]
    total = sum(ratios)
    n_val = round(len(names) * ratios[1] / total)
    n_test = round(len(names) * ratios[2] / total)
    n_train = len(names) - n_val - n_test
    return ClassSplits(
        train=tuple(sorted(shuffled[:n_train])),
        val=tuple(sorted(shuffled[n_train : n_train + n_val])),
        test=tuple(sorted(shuffled[n_train + n_val :])),
    )


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

    Support and query images of a class never come from the same patient.

    Args:
        labels: class name of every image in the bank.
        patients: patient key of every image in the bank.
        classes: the classes of this split.
        split: ``"train"``, ``"val"`` or ``"test"``.
        n_way, k_shot, q_query: episode shape.
        seed: base seed.

    Raises:
        DataError: if the split has fewer than N classes, or a class cannot supply K support
            and Q query images from disjoint patients.
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
        self.split, self.n_way, self.k_shot, self.q_query, self.seed = split, n_way, k_shot, q_query, seed
        self.classes = tuple(sorted(classes))
        if len(self.classes) < n_way:
            raise DataError(
                f"meta-split {split!r} has {len(self.classes)} class(es) {list(self.classes)} but "
                f"n_way={n_way} episodes need at least {n_way}"
            )
        self._groups = {name: _patient_groups(labels, patients, name) for name in self.classes}
        self._fallback = {}
        for name, groups in self._groups.items():
            self._fallback[name] = self._feasible_partition(name, groups)

    def _feasible_partition(self, name: str, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A support/query patient partition that works (smallest patients go to support)."""
        n_images = sum(len(g) for g in groups)
        support: list[int] = []
        query: list[int] = []
        for group in sorted(groups, key=len):
            (support if len(support) < self.k_shot else query).extend(group.tolist())
        if len(support) < self.k_shot or len(query) < self.q_query:
            raise DataError(
                f"class {name!r} in meta-split {self.split!r} has {n_images} image(s) from "
                f"{len(groups)} patient(s); a {self.n_way}-way {self.k_shot}-shot {self.q_query}-query "
                f"episode needs {self.k_shot} support + {self.q_query} query = "
                f"{self.k_shot + self.q_query} images, with support and query from different patients"
            )
        return np.asarray(support), np.asarray(query)

    def episode(self, index: int) -> Episode:
        """The episode number ``index`` of this split: the same for the same (seed, split, index)."""
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], int(index)])
        chosen = [self.classes[i] for i in rng.choice(len(self.classes), self.n_way, replace=False)]
        support, query = [], []
        for name in chosen:
            pool_s, pool_q = self._partition(name, rng)
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
        groups = self._groups[name]
        support: list[int] = []
        query: list[int] = []
        for g in rng.permutation(len(groups)):
            (support if len(support) < self.k_shot else query).extend(groups[g].tolist())
        if len(query) < self.q_query:
            return self._fallback[name]
        return np.asarray(support), np.asarray(query)


def _patient_groups(labels: Sequence[str], patients: Sequence[str], name: str) -> list[np.ndarray]:
    """Image indices of class ``name`` grouped by patient, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, (label, patient) in enumerate(zip(labels, patients)):
        if label == name:
            groups.setdefault(patient, []).append(i)
    return [np.asarray(members) for members in groups.values()]
