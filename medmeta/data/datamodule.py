"""Lightning data module: wires the data layers to loaders (folders of images in, batches of few-shot episodes out).

The work is done elsewhere, each without Lightning: ``inventory`` (discover, preflight, split),
``loading`` and ``image_cache`` (images to tensors, in memory or memory-mapped), ``loaders``
(episodes, samplers, the resumable loader), ``replay`` (frozen test episodes) and ``cache_folder``
(the built-in synthetic data set).

Why this module is longer than 300 lines: Lightning's data-module interface (setup, the four loaders, the
frozen test episodes) and its typed, documented settings are one class, which LightningCLI reads as a whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from medmeta.data.cache_folder import default_cache_dir, ensure_synthetic, synthetic_root
from medmeta.data.episode_manifest import EpisodeManifest, ManifestEpisodeSampler, image_settings
from medmeta.data.episodes import SPLITS, ClassSplits
from medmeta.data.image_cache import cached_images
from medmeta.data.inventory import Inventory, take_inventory
from medmeta.data.loaders import EpisodeDataset, EpochEpisodeSampler, ResumableLoader, per_rank_batch, training_loader
from medmeta.data.loading import transform_images
from medmeta.data.presets import DEFAULT_WINDOW
from medmeta.data.records import ImageRecord
from medmeta.data.replay import frozen_episodes, replayed_episodes
from medmeta.errors import DataError

# also importable from here, where they lived before the data layers were split
__all__ = ["EpisodeDataset", "EpisodicDataModule", "EpochEpisodeSampler", "ResumableLoader", "default_cache_dir",
           "synthetic_root", "transform_images"]  # fmt: skip

logger = logging.getLogger(__name__)


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
            of drawing them: identical tasks on any machine; refused if the data set or the image
            settings changed. The manifest's seed, not ``seed``, then decides the test episodes.
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
        counts = (("meta_batch_size", meta_batch_size), ("eval_batch_size", eval_batch_size),
                  ("train_batches_per_epoch", train_batches_per_epoch), ("val_episodes", val_episodes),
                  ("test_episodes", test_episodes))  # fmt: skip
        for name, value in counts:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        three_d_only = [name for name, value in (("spacing", spacing), ("roi_size", roi_size)) if value is not None]
        if spatial_dims == 2 and three_d_only:
            raise ValueError(f"data.{three_d_only[0]} is a 3D setting, ignored by 2D images: set "
                             f"{' and '.join(f'data.{n}' for n in three_d_only)} to null with spatial_dims 2")
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
        self.test_after_fit = False  # set by `medmeta fit --test_after_fit true`: setup("fit") then refuses a bad test split
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
        if self.root is None:
            ensure_synthetic(self.synthetic_seed, self.spatial_dims)

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
        splits = wanted.get(stage, SPLITS) if stage else SPLITS
        for split in splits:  # every refusal before any image is cached
            if self.inventory.feasibility[split] is not None:
                raise DataError(self.inventory.feasibility[split])
        if stage == "fit":
            self._check_test_split()
        for split in splits:
            if split not in self._datasets:
                self._datasets[split] = self._build(split)

    def _check_test_split(self) -> None:
        """Before training: refuse (``test_after_fit``) or warn about a test split that cannot supply episodes.

        Not when the test episodes are replayed from a manifest (``episodes_file``), which is checked when replayed.
        """
        message = self.inventory.feasibility["test"] if self.inventory is not None else None
        if message is None or self.episodes_file is not None:
            return
        if self.test_after_fit:
            raise DataError(f"{message} (test_after_fit would test on meta-split 'test' after training: "
                            "refused before training)")  # fmt: skip
        logger.warning("meta-split 'test' cannot supply test episodes, so testing this model will be refused: %s",
                       message)  # fmt: skip

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
        (out / "class_splits.json").write_text(json.dumps(self.class_splits.to_json(), indent=2) + "\n")

    def _build(self, split: str) -> EpisodeDataset:
        assert self.inventory is not None
        records = self.inventory.split_records(split)
        shape = {"n_way": self.n_way, "k_shot": self.k_shot, "q_query": self.q_query}
        if split == "test" and self.episodes_file is not None:
            sampler = replayed_episodes(self.episodes_file, records, self.inventory.class_splits.of(split),
                                        all_records=self.inventory.records, root=self.data_root,
                                        images=self.image_settings(), **shape)  # fmt: skip
            length = len(sampler)
        else:
            sampler = self.inventory.episode_sampler(split, seed=self.seed, **shape)
            length = self.train_batches_per_epoch * self.meta_batch_size if split == "train" else self.episodes[split]
        if split == "test":
            self._test_records = records
        return EpisodeDataset(self._images(records), sampler, length, augment=self.augment and split == "train")

    def freeze_test_episodes(self, path: Path) -> Path | None:
        """Write the test episodes used (drawn or replayed) as a manifest to ``path``; ``None`` before setup."""
        dataset = self._datasets.get("test")
        if dataset is None or self.inventory is None:
            return None
        manifest = frozen_episodes(
            dataset.sampler, len(dataset), self._test_records, all_records=self.inventory.records,
            root=self.data_root, seed=self.seed, k_shot=self.k_shot, q_query=self.q_query, images=self.image_settings(),
        )  # fmt: skip
        return manifest.write(path)

    def image_settings(self) -> dict[str, object]:
        """The settings that decide each image's tensor, as stored in (and checked against) a frozen manifest."""
        return image_settings(
            image_size=self.image_size, in_channels=self.in_channels, spatial_dims=self.spatial_dims,
            window=self.window, preset=self.preset, spacing=self.spacing, roi_size=self.roi_size,
        )  # fmt: skip

    @property
    def test_seed(self) -> int:
        """The seed of the test episodes: the replayed manifest's (``episodes_file``), else ``seed``."""
        dataset = self._datasets.get("test")
        if dataset is not None and isinstance(dataset.sampler, ManifestEpisodeSampler):
            return dataset.sampler.seed
        return EpisodeManifest.read(self.episodes_file).seed if self.episodes_file is not None else self.seed

    def _world(self) -> tuple[int, int]:
        """(number of processes, this one's global rank) of the attached trainer."""
        trainer = getattr(self, "trainer", None)
        return (1, 0) if trainer is None else (int(trainer.world_size), int(trainer.global_rank))

    def _images(self, records: Sequence[ImageRecord]) -> torch.Tensor:
        """The transformed images of ``records``: in memory, or under DDP memory-mapped from one shared file."""
        # in the order of the cache key (image_cache.cache_key)
        settings = {
            "image_size": self.image_size, "window": self.window, "preset": self.preset,
            "spatial_dims": self.spatial_dims, "in_channels": self.in_channels, "spacing": self.spacing,
            "roi_size": self.roi_size,
        }  # fmt: skip
        arrays = self.inventory.arrays if self.inventory is not None else None
        transform = partial(transform_images, **settings, arrays=arrays, source=self.data_root)
        world, rank = self._world()
        barrier = (lambda: self.trainer.strategy.barrier("medmeta-image-cache")) if world > 1 else None
        return cached_images(records, transform, settings=settings, world_size=world, is_zero=rank == 0,
                             barrier=barrier)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        if split not in self._datasets:
            self.setup({"val": "validate", "test": "test"}[split])
        return DataLoader(
            self._datasets[split], batch_size=batch_size, shuffle=False,
            num_workers=self.num_workers, persistent_workers=False, generator=torch.Generator(),  # see train_dataloader
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Meta-batches of ``meta_batch_size`` new episodes, split evenly across DDP ranks.

        Under DDP the sampler shards the episode indices across ranks (distinct tasks per rank) and
        each rank adapts ``meta_batch_size / world_size`` of them; averaging the ranks' gradients
        then gives the meta-gradient of the whole meta-batch. The loader's position is saved in
        checkpoints, so a run resumed mid-epoch continues with the next meta-batch.
        """
        world, rank = self._world()
        per_rank_batch(self.meta_batch_size, world)  # a wrong meta-batch size is named before any image is read
        if "train" not in self._datasets:
            self.setup("fit")
        progress = self.trainer.fit_loop.epoch_loop.batch_progress if getattr(self, "trainer", None) else None
        return training_loader(
            self._datasets["train"], meta_batch_size=self.meta_batch_size, world_size=world, rank=rank,
            num_workers=self.num_workers, position=(lambda: progress.current.processed) if progress else (lambda: 0),
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
        """A JSON-ready summary of the episodes (no file paths, no patient keys); ``seed`` is the test episodes'."""
        splits = self.class_splits.to_json() if self.class_splits else None
        return {
            "n_way": self.n_way, "k_shot": self.k_shot, "q_query": self.q_query, "seed": self.test_seed,
            "test_episodes": len(self._datasets["test"]) if "test" in self._datasets else self.episodes["test"],
            "episodes_file": "replayed" if self.episodes_file else "drawn (seed, split, index)", "class_splits": splits,
        }  # fmt: skip
