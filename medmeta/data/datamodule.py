"""Lightning data module: folders of images in, batches of few-shot episodes out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from monai.data import CacheDataset
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from medmeta.data.episode_manifest import EpisodeManifest, ManifestEpisodeSampler, data_hash, sample_ids
from medmeta.data.episodes import SPLITS, ClassSplits, EpisodeSampler
from medmeta.data.inventory import Inventory, take_inventory
from medmeta.data.presets import DEFAULT_WINDOW
from medmeta.data.records import ImageRecord
from medmeta.data.transforms import KEY, augment_images, load_transforms
from medmeta.errors import DataError

logger = logging.getLogger(__name__)

# Bumped whenever reading or transforming changes pixel values (2: pictures converted through their PIL mode, grey
# as ITU-R 601 luma), so a memory-mapped image cache written by an older medmeta is never reused.
IMAGE_CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """Where medmeta keeps generated data: ``$MEDMETA_CACHE``, else ``$XDG_CACHE_HOME/medmeta``, else ``~/.cache/medmeta``."""
    if os.environ.get("MEDMETA_CACHE"):
        return Path(os.environ["MEDMETA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medmeta"


def synthetic_root(seed: int, spatial_dims: int = 2) -> Path:
    """Folder of the built-in synthetic lesion data set (2D DICOM or 3D NIfTI) for ``seed``."""
    kind = "synthetic-lesions" if spatial_dims == 2 else "synthetic-lesions-3d"
    return default_cache_dir() / f"{kind}-v1-seed{seed}"


class EpisodeDataset(Dataset):
    """Episode ``i`` of a meta-split as tensors; augmentation is seeded by (seed, split, i)."""

    def __init__(self, images: torch.Tensor, sampler: EpisodeSampler, length: int, augment: bool) -> None:
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
    calls its ``set_epoch``). After a mid-epoch resume, the next iteration starts ``skip``
    episodes into the epoch (once).
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_replicas, self.rank, self.epoch, self.skip = length, num_replicas, rank, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
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
        """Start the next iteration where the checkpointed run stopped."""
        self.sampler.skip = state["batches"] * self.episodes_per_batch


class EpisodicDataModule(L.LightningDataModule):
    """N-way K-shot Q-query episodes from ``root/<class>/<files>`` over class-disjoint meta-splits.

    Args:
        root: a folder with one sub-folder per class, a CSV manifest
            (``path,label[,patient_id][,study_id][,split]``) or a MedMNIST ``.npz``; ``None`` uses
            the built-in synthetic lesion data set, generated on first use in the medmeta cache.
        n_way: classes per episode.
        k_shot: support images per class.
        q_query: query images per class.
        meta_batch_size: episodes (tasks) per meta-step, over all DDP processes together.
        eval_batch_size: episodes per validation/test batch.
        image_size: side length images are resized to.
        in_channels: image channels.
        spatial_dims: 2 (images) or 3 (volumes).
        window: intensity window ``[low, high]`` mapped to [0, 1] (HU for CT); ``null`` for per-image min/max.
        preset: named intensity preset (``ct-lung``, ``ct-mediastinum``, ``ct-soft-tissue``,
            ``ct-bone``, ``ct-brain``, ``ct-abdomen``, ``mr-zscore``, ``mr-percentile``, ``xray``,
            ``photo``); overrides ``window``.
        spacing: 3D only: resample volumes to this voxel spacing (mm).
        roi_size: 3D only: centre crop / pad volumes to this size before resizing.
        split_ratios: train/val/test fractions of the classes.
        splits: explicit class lists per meta-split (overrides ``split_ratios``).
        seed: seed of the class split and of every episode.
        train_batches_per_epoch: meta-batches in one training epoch.
        val_episodes: frozen validation episodes.
        test_episodes: frozen test episodes (written to ``test_episodes.json`` in the run folder).
        episodes_file: replay the test episodes of this manifest (a ``test_episodes.json``) instead
            of drawing them: identical tasks on any machine; refused if the data set changed.
        augment: random flips/rotations of training images.
        num_workers: data-loader worker processes.
        synthetic_seed: seed of the generated data set when ``root`` is ``None``.
        preflight: read every file fully at setup and skip bad ones (with a one-line summary).
        require_deidentified: refuse DICOM files not marked ``PatientIdentityRemoved = YES``.
        skip_undecodable: skip (and report) compressed DICOM files whose decoder is missing
            instead of stopping with an error naming the packages to install.
    """

    def __init__(
        self,
        root: str | None = None,
        *,
        n_way: int = 5,
        k_shot: int = 1,
        q_query: int = 15,
        meta_batch_size: int = 4,
        eval_batch_size: int = 8,
        image_size: int = 32,
        in_channels: int = 1,
        spatial_dims: int = 2,
        window: tuple[float, float] | None = DEFAULT_WINDOW,
        preset: str | None = None,
        spacing: tuple[float, float, float] | None = None,
        roi_size: tuple[int, int, int] | None = None,
        split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
        splits: dict[str, list[str]] | None = None,
        seed: int = 0,
        train_batches_per_epoch: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        episodes_file: str | None = None,
        augment: bool = True,
        num_workers: int = 0,
        synthetic_seed: int = 0,
        preflight: bool = True,
        require_deidentified: bool = False,
        skip_undecodable: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # kept in checkpoints: `medmeta diagnose` reads the image settings from there
        self.root = Path(root).expanduser() if root is not None else None
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.meta_batch_size, self.eval_batch_size = meta_batch_size, eval_batch_size
        self.image_size, self.in_channels, self.spatial_dims = image_size, in_channels, spatial_dims
        self.window = tuple(window) if window is not None else None
        self.preset, self.spacing, self.roi_size = preset, spacing, roi_size
        self.preflight, self.require_deidentified = preflight, require_deidentified
        self.skip_undecodable = skip_undecodable
        self.split_ratios, self.explicit_splits, self.seed = tuple(split_ratios), splits, seed
        self.train_batches_per_epoch = train_batches_per_epoch
        self.episodes = {"val": val_episodes, "test": test_episodes}
        self.episodes_file = Path(episodes_file).expanduser() if episodes_file else None
        self.augment, self.num_workers, self.synthetic_seed = augment, num_workers, synthetic_seed
        self.inventory: Inventory | None = None
        self._datasets: dict[str, EpisodeDataset] = {}
        self._test_records: Sequence[ImageRecord] = ()

    @property
    def class_splits(self) -> ClassSplits | None:
        """The class-disjoint meta-splits (after ``setup``)."""
        return self.inventory.class_splits if self.inventory is not None else None

    @property
    def data_root(self) -> Path:
        """The folder images are read from."""
        return self.root if self.root is not None else synthetic_root(self.synthetic_seed, self.spatial_dims)

    def prepare_data(self) -> None:
        """Generate the built-in synthetic data set if it is used and missing."""
        target = synthetic_root(self.synthetic_seed, self.spatial_dims)
        if self.root is not None or target.exists():
            return
        logger.info("generating the synthetic lesion data set at %s", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.spatial_dims == 3:
            from medmeta.data.synthetic3d import generate_synthetic_volumes

            generate_synthetic_volumes(target, seed=self.synthetic_seed)
        else:
            from medmeta.data.synthetic import generate_synthetic_dataset

            generate_synthetic_dataset(target, seed=self.synthetic_seed)

    def setup(self, stage: str | None = None) -> None:
        """Preflight the source, split classes, check episode feasibility and cache the images needed."""
        if self.inventory is None:
            if self.root is None:
                self.prepare_data()  # Python users may call setup() directly; Lightning has already run it
            self.inventory = take_inventory(
                self.data_root, spatial_dims=self.spatial_dims, n_way=self.n_way, k_shot=self.k_shot,
                q_query=self.q_query, split_ratios=self.split_ratios, splits=self.explicit_splits, seed=self.seed,
                preflight=self.preflight, require_deidentified=self.require_deidentified,
                skip_undecodable=self.skip_undecodable, window=self.window, preset=self.preset,
            )  # fmt: skip
            log = logger.warning if self.inventory.problems else logger.info
            log("%s", self.inventory.summary_line())
            self._write_class_splits()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if self.inventory.feasibility[split] is not None:
                raise DataError(self.inventory.feasibility[split])
            if split not in self._datasets:
                self._datasets[split] = self._build(split)

    def _write_class_splits(self) -> None:
        """Record the resolved meta-splits next to the run outputs."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir or self.class_splits is None:
            return
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        splits = {s: list(self.class_splits.of(s)) for s in SPLITS}
        (out / "class_splits.json").write_text(json.dumps(splits, indent=2) + "\n")

    def _build(self, split: str) -> EpisodeDataset:
        assert self.inventory is not None
        classes = self.inventory.class_splits.of(split)
        records = [r for r in self.inventory.records if r.label in classes]
        if split == "test" and self.episodes_file is not None:
            sampler = self._replayed_test_episodes(records, classes)
            length = len(sampler)
        else:
            sampler = EpisodeSampler(
                [r.label for r in records], [r.patient for r in records], classes, split=split,
                n_way=self.n_way, k_shot=self.k_shot, q_query=self.q_query, seed=self.seed,
            )  # fmt: skip
            length = self.train_batches_per_epoch * self.meta_batch_size if split == "train" else self.episodes[split]
        if split == "test":
            self._test_records = records
        images = self._cache(records)
        return EpisodeDataset(images, sampler, length, augment=self.augment and split == "train")

    def _data_hash(self) -> str:
        assert self.inventory is not None
        records = self.inventory.records
        return data_hash(records, sample_ids(records, self.data_root))

    def _replayed_test_episodes(self, records: Sequence[ImageRecord], classes: Sequence[str]) -> ManifestEpisodeSampler:
        """The sampler replaying ``episodes_file``, after checking its shape and the data set's hash."""
        manifest = EpisodeManifest.read(self.episodes_file)
        shape, wanted = (manifest.n_way, manifest.k_shot, manifest.q_query), (self.n_way, self.k_shot, self.q_query)
        if shape != wanted:
            raise DataError(
                f"episode manifest {self.episodes_file} holds {shape[0]}-way {shape[1]}-shot {shape[2]}-query episodes "
                f"but the data config asks for {wanted[0]}-way {wanted[1]}-shot {wanted[2]}-query"
            )
        current = self._data_hash()
        if manifest.data_hash != current:
            raise DataError(
                f"episode manifest {self.episodes_file} was frozen on a different data set (hash {manifest.data_hash}, "
                f"this data set {current}): files were added, removed, relabelled or changed; replay refused"
            )
        return ManifestEpisodeSampler(manifest, sample_ids(records, self.data_root), classes,
                                      source=self.episodes_file, patients=[r.patient for r in records])  # fmt: skip

    def freeze_test_episodes(self, path: Path) -> Path | None:
        """Write the test episodes used (drawn or replayed) as a manifest to ``path``; ``None`` before setup."""
        dataset = self._datasets.get("test")
        if dataset is None:
            return None
        if isinstance(dataset.sampler, ManifestEpisodeSampler):
            return dataset.sampler.manifest.write(path)
        ids = sample_ids(self._test_records, self.data_root)
        episodes = [dataset.sampler.episode(i) for i in range(len(dataset))]
        manifest = EpisodeManifest.freeze(episodes, ids, split="test", seed=self.seed, k_shot=self.k_shot,
                                          q_query=self.q_query, data_hash=self._data_hash())  # fmt: skip
        return manifest.write(path)

    def _world(self) -> tuple[int, bool]:
        """(number of processes, whether this one is rank 0) of the attached trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, True
        return int(trainer.world_size), bool(trainer.is_global_zero)

    def _cache(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """The transformed images of ``records``, ``[len(records), C, *spatial]``.

        One process: transformed in memory. Several (DDP): rank 0 transforms them once into a
        tensor file in the medmeta cache (named by a hash of the file list and the transform
        settings; no path or patient key is stored), and every rank memory-maps that file, so the
        operating system keeps one copy for all ranks (engineering notes, trap 9).
        """
        world, is_zero = self._world()
        if world == 1:
            return self._transform_all(records)
        path = default_cache_dir() / "tensors" / f"{self._cache_key(records)}.pt"
        if is_zero and not path.exists():
            images = self._transform_all(records)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            torch.save(images, partial)
            os.replace(partial, path)
        self.trainer.strategy.barrier("medmeta-image-cache")
        return torch.load(path, mmap=True, weights_only=True)

    def _cache_key(self, records: Sequence[ImageRecord]) -> str:
        """Hash of what determines the cached tensor: the files (path, size, mtime) and the transforms."""
        digest = hashlib.sha256()
        settings = (IMAGE_CACHE_VERSION, self.image_size, self.window, self.preset, self.spatial_dims, self.in_channels,
                    self.spacing, self.roi_size)  # fmt: skip
        digest.update(repr(settings).encode())
        for record in records:
            stat = record.path.stat()
            digest.update(f"{record.path}|{record.item}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:32]

    def _transform_all(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """Run the deterministic transforms once per image (MONAI ``CacheDataset``) and stack the results."""
        return transform_images(
            records, image_size=self.image_size, window=self.window, preset=self.preset,
            spatial_dims=self.spatial_dims, in_channels=self.in_channels, spacing=self.spacing, roi_size=self.roi_size,
            arrays=self.inventory.arrays if self.inventory is not None else None, source=self.data_root,
        )  # fmt: skip

    def _loader(self, split: str, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        if split not in self._datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return DataLoader(
            self._datasets[split], batch_size=batch_size, sampler=sampler, shuffle=False,
            num_workers=self.num_workers, persistent_workers=False, generator=torch.Generator(),  # see train_dataloader
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Meta-batches of ``meta_batch_size`` new episodes, split evenly across DDP ranks.

        Under DDP the sampler shards the episode indices across ranks (distinct tasks per rank) and
        each rank adapts ``meta_batch_size / world_size`` of them; averaging the ranks' gradients
        then gives the meta-gradient of the whole meta-batch. The loader's position is saved in
        checkpoints, so a run resumed mid-epoch continues with the next meta-batch.
        """
        world, _ = self._world()
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        if self.meta_batch_size % world:
            raise ValueError(
                f"meta_batch_size={self.meta_batch_size} does not split evenly across {world} processes; "
                f"use a multiple of {world}"
            )
        length = self.train_batches_per_epoch * self.meta_batch_size
        if "train" not in self._datasets:
            self.setup("fit")
        progress = self.trainer.fit_loop.epoch_loop.batch_progress if getattr(self, "trainer", None) else None
        return ResumableLoader(
            self._datasets["train"], batch_size=self.meta_batch_size // world, sampler=EpochEpisodeSampler(length, world, rank),
            shuffle=False, num_workers=self.num_workers, persistent_workers=False,
            # a private generator: each new iterator draws its worker seed from it, not from the global RNG, whose
            # restored state would otherwise shift on a mid-epoch resume (tests/test_reliability.py)
            generator=torch.Generator(),
            position=(lambda: progress.current.processed) if progress else (lambda: 0),
            episodes_per_batch=self.meta_batch_size,
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        """The frozen validation episodes."""
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The frozen test episodes."""
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The frozen test episodes (prediction returns query logits)."""
        return self._loader("test", self.eval_batch_size)

    def describe(self) -> Mapping[str, object]:
        """A JSON-ready summary of the episodes (no file paths, no patient keys)."""
        splits = {s: list(self.class_splits.of(s)) for s in SPLITS} if self.class_splits else None
        return {
            "n_way": self.n_way, "k_shot": self.k_shot, "q_query": self.q_query, "seed": self.seed,
            "test_episodes": len(self._datasets["test"]) if "test" in self._datasets else self.episodes["test"],
            "episodes_file": "replayed" if self.episodes_file else "drawn (seed, split, index)", "class_splits": splits,
        }  # fmt: skip


def transform_images(
    records: Sequence[ImageRecord], *, image_size: int, window: tuple[float, float] | None, preset: str | None,
    spatial_dims: int, in_channels: int, spacing: tuple[float, float, float] | None = None,
    roi_size: tuple[int, int, int] | None = None, arrays: np.ndarray | None = None, source: Path | str = "the data",
) -> torch.Tensor:  # fmt: skip
    """The images of ``records`` through the deterministic load transforms, ``[n, C, *spatial]`` in [0, 1].

    A file that cannot be transformed, a wrong shape or non-finite pixels raise ``DataError``
    naming the file.
    """
    transform = load_transforms(
        image_size=image_size, window=window, preset=preset, spatial_dims=spatial_dims, in_channels=in_channels,
        from_array=arrays is not None, spacing=spacing, roi_size=roi_size,
        array_channel_dim=-1 if arrays is not None and arrays.ndim == spatial_dims + 2 else "no_channel",
    )  # fmt: skip
    items = [{KEY: arrays[r.item] if arrays is not None else str(r.path)} for r in records]
    try:
        cached = CacheDataset(items, transform, cache_rate=1.0, num_workers=0, progress=False)
        images = torch.stack([cached[i][KEY] for i in range(len(cached))])
    except Exception as error:  # find the file that broke the cache and name it
        for record, item in zip(records, items):
            try:
                transform(dict(item))
            except Exception as inner:
                raise DataError(f"cannot read {record.path}: {_reason(inner)}") from inner
        raise DataError(f"cannot cache images under {source}: {_reason(error)}") from error
    expected = (in_channels, *(image_size,) * spatial_dims)
    if tuple(images.shape[1:]) != expected:
        raise DataError(
            f"images under {source} load as {tuple(images.shape[1:])}, expected {expected} "
            f"(in_channels={in_channels}, spatial_dims={spatial_dims})"
        )
    bad = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if bad.any():
        raise DataError(f"non-finite pixel values in {records[int(bad.nonzero()[0])].path}")
    return images


def _reason(error: BaseException) -> str:
    """The innermost cause of a MONAI transform error, in one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
