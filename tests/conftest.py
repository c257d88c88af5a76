"""Shared fixtures (small synthetic DICOM data sets in temporary folders) and :func:`module_for`."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch

from medmeta.algorithms import SHORT_NAMES as LEARNERS
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.synthetic import generate_synthetic_dataset
from medmeta.module import FewShotModule

torch.set_num_threads(2)

MODULE_ARGUMENTS = frozenset(inspect.signature(FewShotModule).parameters)
BACKBONE_SETTINGS = ("hidden_channels", "norm", "feature_levels")  # Conv4's and the ResNets' own settings


def spec(class_path: str, **init_args: object) -> dict[str, object]:
    """A plug-in spec: ``{"class_path": class_path, "init_args": init_args}``."""
    return {"class_path": class_path, "init_args": init_args}


def module_for(algorithm: str = "maml", backbone: str = "conv4", **settings: object) -> FewShotModule:
    """A ``FewShotModule`` for tests, with the settings sorted into their places.

    ``FewShotModule``'s own arguments (``n_way``, ``image_size``, ``norm_mode``, ...) are passed as
    they are, ``hidden_channels``, ``norm`` and ``feature_levels`` (unless the learner has its own)
    go into the backbone's ``init_args`` and every other keyword into the learner's ``init_args``:
    ``module_for("anil", n_way=3, hidden_channels=4, inner_steps=1)``.
    """
    own = {k: v for k, v in settings.items() if k in MODULE_ARGUMENTS}
    learner_settings = LEARNERS[algorithm].settings() if algorithm in LEARNERS else {}
    network = {k: v for k, v in settings.items() if k in BACKBONE_SETTINGS and k not in learner_settings}
    learner = {k: v for k, v in settings.items() if k not in own and k not in network}
    return FewShotModule(algorithm=spec(algorithm, **learner), backbone=spec(backbone, **network), **own)


@pytest.fixture(scope="session")
def tiny_dicom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 lesion classes x 4 patients x 3 images of 32x32 DICOM (read-only use)."""
    root = tmp_path_factory.mktemp("data") / "lesions"
    return generate_synthetic_dataset(root, n_classes=12, patients_per_class=4, images_per_patient=3, image_size=32, seed=3)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_dicom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-way model meta-trained for 2 steps on the tiny DICOM set (its image settings saved with it)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("fit")
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=3, pixel_baseline=False)
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=1, q_query=2, meta_batch_size=2, image_size=16,
                              val_episodes=2, test_episodes=2, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, inference_mode=False, default_root_dir=out)  # fmt: skip
    trainer.fit(module, datamodule=data)
    path = out / "model.ckpt"
    trainer.save_checkpoint(path)
    return path
