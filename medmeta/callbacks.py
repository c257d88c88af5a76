"""Callbacks every ``medmeta fit`` carries: checkpoint on pre-emption, a fresh ``last.ckpt``, RNG state, seen classes and
training image kinds in checkpoints."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medmeta.data.datamodule import EpisodicDataModule


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where this run's ``last.ckpt`` goes: the checkpoint callback's folder, else ``<log dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath) / "last.ckpt"
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def save_resumable_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Save a checkpoint that resumes with the batch after the last trained one, also after the epoch loop ended.

    Once the training epoch loop has ended (fit stopping at ``max_steps``, or a signal at the end of an
    epoch), Lightning counts the epoch as done but keeps its batch count, and a checkpoint of that state
    resumes in a new epoch even when ``max_steps`` cut the epoch short, or after an empty epoch. Saved
    here instead: a cut epoch as still in progress, a finished one with the next epoch not yet begun.
    """
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    epochs, batches = trainer.fit_loop.epoch_progress.current, trainer.fit_loop.epoch_loop.batch_progress
    if trainer.state.fn == "fit" and epochs.processed == epochs.ready > 0:  # the epoch loop has ended
        loop = checkpoint["loops"]["fit_loop"]
        if batches.current.ready < trainer.num_training_batches and not batches.is_last_batch:  # cut short
            for counts in loop["epoch_progress"].values():
                counts["processed"], counts["completed"] = counts["processed"] - 1, counts["completed"] - 1
            checkpoint["epoch"] = loop["epoch_progress"]["current"]["completed"]
        else:  # finished: no batch of the next epoch yet
            progress = loop["epoch_loop.batch_progress"]
            progress["current"], progress["is_last_batch"] = dict.fromkeys(progress["current"], 0), False
    trainer.strategy.save_checkpoint(checkpoint, path)
    trainer.strategy.barrier("Trainer.save_checkpoint")


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM during fit (and SIGUSR1, SLURM's usual pre-emption warning, outside Lightning's own SLURM
    requeueing), finish the step in progress, write ``last.ckpt`` and stop; ``fit --ckpt_path last``
    continues from it. Lightning turns the signal into ``SIGTERMException`` at the end of the step;
    ``medmeta`` then exits with status 143 and a one-line message.
    """

    def __init__(self) -> None:
        self.saved: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        slurm_requeues = isinstance(environment, SLURMEnvironment) and environment.auto_requeue
        if stage == "fit" and hasattr(signal, "SIGUSR1") and not slurm_requeues:
            # Lightning restores the handlers it found when fit ends
            signal.signal(signal.SIGUSR1, trainer._signal_connector._sigterm_notifier_fn)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.saved = last_checkpoint_path(trainer)
            save_resumable_checkpoint(trainer, self.saved)


class LastCheckpoint(L.Callback):
    """Refresh ``last.ckpt`` after every validation during fit and when training ends.

    Lightning's ``ModelCheckpoint(save_last=True)`` with a monitored metric rewrites ``last.ckpt``
    only when that metric improves, so a run killed without warning (out of memory, a lost node)
    would resume from its last improvement; with this callback it loses at most one validation
    interval. Off when checkpointing is off (``--trainer.enable_checkpointing false``).
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    @staticmethod
    def _save(trainer: L.Trainer) -> None:
        if trainer.checkpoint_callback is None:
            return
        path = last_checkpoint_path(trainer)
        for callback in trainer.checkpoint_callbacks:
            # a ModelCheckpoint that finds a last.ckpt it did not write itself would start last-v1.ckpt, and one that
            # never wrote it would overwrite it when training ends (without this state's resume fixes)
            if getattr(callback, "save_last", False) and Path(getattr(callback, "dirpath", "") or "") == path.parent:
                callback.last_model_path = str(path)
                if callback.save_last is True and hasattr(callback, "_last_checkpoint_saved"):
                    callback._last_checkpoint_saved = str(path)
        save_resumable_checkpoint(trainer, path)


class RandomStateCheckpoint(L.Callback):
    """Saves the Python, NumPy and torch random states in checkpoints and restores them on resume."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        numpy_state = np.random.get_state()
        checkpoint["medmeta_rng"] = {
            "python": random.getstate(),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],  # plain types: loads with weights_only
            "torch": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("medmeta_rng")
        if state is None:
            return
        version, keys, *rest = state["numpy"]
        random.setstate(_as_tuple(state["python"]))
        np.random.set_state((version, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])


def _as_tuple(value: Any) -> Any:
    """Python's random state with its nested tuples back (a checkpoint may hold lists)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class SeenClasses(L.Callback):
    """Record in every checkpoint the class names (diagnosis labels only) its model was meta-trained and validated on,
    and the kinds of its training images (format families and native channel counts, :mod:`medmeta.data.image_kinds`).

    ``medmeta evaluate`` refuses a test class among them and ``medmeta test`` warns. Names from an
    earlier checkpoint the run resumed or started from (``module.seen_classes``) are kept too, and so
    are the image kinds of a checkpoint the run resumed from. ``diagnose`` and ``predict`` warn on a
    case of a kind the model was not trained on.
    """

    def __init__(self) -> None:
        self._resumed_kinds: dict[str, list[int]] = {}
        self._kinds: dict[str, list[int]] | None = None  # of this run's training images: read once per fit

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        from medmeta.data.image_kinds import TRAINING_IMAGES_KEY, trained_kinds

        self._resumed_kinds = trained_kinds(checkpoint.get(TRAINING_IMAGES_KEY)) or {}

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        from medmeta.checkpoints import SEEN_CLASSES_KEY
        from medmeta.data.image_kinds import TRAINING_IMAGES_KEY

        seen = {split: set(names) for split, names in (pl_module.seen_classes or {}).items()}
        datamodule = trainer.datamodule
        splits = datamodule.class_splits if isinstance(datamodule, EpisodicDataModule) else None
        if splits is not None:
            for split in ("train", "val"):
                seen.setdefault(split, set()).update(splits.of(split))
        if seen:
            checkpoint[SEEN_CLASSES_KEY] = {split: sorted(names) for split, names in seen.items()}
        kinds = {family: set(channels) for family, channels in self._resumed_kinds.items()}
        for family, channels in self._training_kinds(datamodule).items():
            kinds.setdefault(family, set()).update(channels)
        if kinds:
            checkpoint[TRAINING_IMAGES_KEY] = {family: sorted(channels) for family, channels in sorted(kinds.items())}

    def _training_kinds(self, datamodule: object) -> dict[str, list[int]]:
        """The kinds of the data module's meta-training images (after its setup), read once."""
        from medmeta.data.image_kinds import training_kinds

        inventory = datamodule.inventory if isinstance(datamodule, EpisodicDataModule) else None
        if self._kinds is None and inventory is not None:
            self._kinds = training_kinds(inventory.split_records("train"), inventory.arrays)
        return self._kinds or {}
