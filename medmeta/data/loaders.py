"""Episodes as tensors, and the samplers and loader that feed them to training (torch only, no Lightning).

``EpisodeDataset`` assembles episode ``i`` of a split from the cached images; ``EpochEpisodeSampler``
gives each DDP rank its share of new episodes every epoch; ``ResumableLoader`` remembers its
position so a run resumed mid-epoch continues with the next meta-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from medmeta.data.episode_manifest import ManifestEpisodeSampler
from medmeta.data.episodes import EpisodeSampler
from medmeta.data.transforms import augment_images
from medmeta.errors import DataError


class EpisodeDataset(Dataset):
    """Episode ``i`` of a meta-split as tensors; augmentation is seeded by (seed, split, i)."""

    def __init__(
        self, images: torch.Tensor, sampler: EpisodeSampler | ManifestEpisodeSampler, length: int, augment: bool
    ) -> None:
        self.images, self.sampler, self.length, self.augment = images, sampler, length, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        episode = self.sampler.episode(index)
        support_x, query_x = self.images[episode.support], self.images[episode.query]
        if self.augment:
            state = np.random.SeedSequence([self.sampler.seed, 99, index]).generate_state(2)
            generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            support_x, query_x = augment_images(support_x, generator), augment_images(query_x, generator)
        class_ids = torch.tensor([self.sampler.classes.index(name) for name in episode.classes])
        support_y, query_y = torch.from_numpy(episode.support_labels), torch.from_numpy(episode.query_labels)
        return {
            "support_x": support_x,
            "support_y": support_y,
            "query_x": query_x,
            "query_y": query_y,
            "support_class": class_ids[support_y],  # index among the split's classes (for pre-training)
            "query_class": class_ids[query_y],
            "episode": torch.tensor(episode.index),
        }


class EpochEpisodeSampler(DistributedSampler):
    """This rank's share of episode indices ``epoch * length ... epoch * length + length - 1``.

    New episodes every epoch; under DDP rank ``r`` of ``w`` takes every ``w``-th index from ``r``,
    so the ranks adapt distinct tasks (a ``DistributedSampler``, so Lightning does not wrap it and
    calls its ``set_epoch``). After a resume, the next iteration starts at ``resume_at``, the first
    episode (counted over all epochs) that the checkpointed run had not trained, or ``skip`` episodes
    into the epoch (once).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_replicas, self.rank, self.epoch, self.skip = length, num_replicas, rank, 0, 0
        self.resume_at: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
        if self.resume_at is not None:
            resume_at, self.resume_at = self.resume_at, None
            start = resume_at - self.epoch * self.length
            if not 0 <= start <= self.length:  # never silently train other episodes than the uninterrupted run
                raise DataError(f"cannot resume exactly: Lightning resumes in training epoch {self.epoch}, but the "
                                f"checkpoint's next training episode ({resume_at}) is in epoch {resume_at // self.length} "
                                "(a last.ckpt written at the end of a fit by an older medmeta?); resume from an earlier "
                                "checkpoint, or start the run again")  # fmt: skip
        return iter(range(self.epoch * self.length + start + self.rank, (self.epoch + 1) * self.length, self.num_replicas))

    def __len__(self) -> int:
        return self.length // self.num_replicas


class ResumableLoader(DataLoader):
    """The training loader: Lightning keeps its position in checkpoints and restores it on resume.

    ``position()`` gives the meta-batches already trained in the current epoch (all DDP ranks
    move together); ``episodes_per_batch`` is the episodes of one meta-batch over all ranks.
    """

    def __init__(self, *args: object, position: Callable[[], int], episodes_per_batch: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.position, self.episodes_per_batch = position, episodes_per_batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the meta-batches of it already trained."""
        return {"epoch": self.sampler.epoch, "batches": int(self.position())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next iteration at the first episode the checkpointed run had not trained.

        Counted over all epochs: when the run stopped after the last meta-batch of an epoch, Lightning
        resumes in the next one, which then starts at its first episode.
        """
        self.sampler.resume_at = state["epoch"] * self.sampler.length + state["batches"] * self.episodes_per_batch


def per_rank_batch(meta_batch_size: int, world_size: int) -> int:
    """The episodes each of ``world_size`` processes adapts per meta-step.

    Raises:
        ValueError: if ``meta_batch_size`` does not split evenly across the processes.
    """
    if meta_batch_size % world_size:
        raise ValueError(
            f"meta_batch_size={meta_batch_size} does not split evenly across {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    return meta_batch_size // world_size


def training_loader(
    dataset: EpisodeDataset, *, meta_batch_size: int, world_size: int = 1, rank: int = 0, num_workers: int = 0,
    position: Callable[[], int] = lambda: 0,
) -> ResumableLoader:  # fmt: skip
    """Meta-batches of ``meta_batch_size`` new episodes of ``dataset`` per step, this rank's share of them.

    ``position`` gives the meta-batches already trained in the current epoch (see :class:`ResumableLoader`).
    """
    return ResumableLoader(
        dataset, batch_size=per_rank_batch(meta_batch_size, world_size), shuffle=False,
        sampler=EpochEpisodeSampler(len(dataset), world_size, rank), num_workers=num_workers, persistent_workers=False,
        # a private generator: each new iterator draws its worker seed from it, not from the global RNG, whose
        # restored state would otherwise shift on a mid-epoch resume (tests/test_reliability.py)
        generator=torch.Generator(), position=position, episodes_per_batch=meta_batch_size,
    )  # fmt: skip
