"""The data module on real DICOM files: batches, determinism across workers, privacy, read-only input."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pydicom
import pytest
import torch
from monai.data import MetaTensor

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.records import discover_records
from medmeta.errors import DataError


def _module(root: Path, **overrides: object) -> EpisodicDataModule:
    settings: dict = dict(
        n_way=3, k_shot=2, q_query=3, meta_batch_size=2, eval_batch_size=4, image_size=16,
        train_batches_per_epoch=3, val_episodes=4, test_episodes=8, split_ratios=(0.5, 0.25, 0.25),
    )  # fmt: skip
    settings.update(overrides)
    return EpisodicDataModule(str(root), **settings)


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in sorted(root.rglob("*"))}


def test_batches_have_the_episode_shape_and_carry_no_metadata(tiny_dicom_root: Path) -> None:
    module = _module(tiny_dicom_root)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["support_x"].shape == (2, 6, 1, 16, 16)
    assert batch["query_x"].shape == (2, 9, 1, 16, 16)
    assert batch["support_y"].tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    assert not isinstance(batch["support_x"], MetaTensor)
    assert 0.0 <= float(batch["support_x"].min()) and float(batch["support_x"].max()) <= 1.0
    assert len(module._datasets["train"].images.shape) == 4


def test_meta_splits_are_class_disjoint(tiny_dicom_root: Path) -> None:
    module = _module(tiny_dicom_root)
    module.setup()
    splits = module.class_splits
    assert splits is not None
    assert not set(splits.train) & set(splits.val)
    assert not set(splits.train) & set(splits.test)
    assert not set(splits.val) & set(splits.test)


@pytest.mark.parametrize("split", ["train", "test"])
def test_same_episodes_with_zero_and_two_workers(tiny_dicom_root: Path, split: str) -> None:
    batches = {}
    for workers in (0, 2):
        module = _module(tiny_dicom_root, num_workers=workers)
        module.setup()
        loader = module.train_dataloader() if split == "train" else module.test_dataloader()
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) > 1
    for a, b in zip(batches[0], batches[2]):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_training_episodes_change_every_epoch(tiny_dicom_root: Path) -> None:
    module = _module(tiny_dicom_root)
    module.setup("fit")
    loader = module.train_dataloader()
    first = [b["episode"] for b in loader]
    loader.sampler.set_epoch(1)
    second = [b["episode"] for b in loader]
    assert not set(torch.cat(first).tolist()) & set(torch.cat(second).tolist())


def test_patient_ids_only_as_hashes(tiny_dicom_root: Path) -> None:
    records, _ = discover_records(tiny_dicom_root)
    real_ids = {pydicom.dcmread(r.path, stop_before_pixels=True).PatientID for r in records}
    assert len(real_ids) == 12 * 4
    assert len({r.patient for r in records}) == len(real_ids)
    assert not {r.patient for r in records} & real_ids
    assert not any(pid in r.patient for r in records for pid in real_ids)


def test_data_folder_is_never_written(tiny_dicom_root: Path, tmp_path: Path) -> None:
    before = _snapshot(tiny_dicom_root)
    modes = {p: p.stat().st_mode for p in [tiny_dicom_root, *tiny_dicom_root.rglob("*")]}
    try:
        for path in modes:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        module = _module(tiny_dicom_root)
        module.setup()
        next(iter(module.train_dataloader()))
        next(iter(module.test_dataloader()))
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)
    assert _snapshot(tiny_dicom_root) == before


def test_too_small_class_fails_at_setup_with_names_and_counts(tiny_dicom_root: Path) -> None:
    module = _module(tiny_dicom_root, k_shot=5, q_query=10)
    with pytest.raises(DataError, match=r"class '.+' in meta-split '.+' has 12 image\(s\) from 4 patient\(s\)"):
        module.setup("fit")


def test_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _module(tmp_path / "nope").setup("fit")
    (tmp_path / "empty" / "classA").mkdir(parents=True)
    (tmp_path / "empty" / "classA" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found"):
        _module(tmp_path / "empty").setup("fit")


def test_unreadable_dicom_is_skipped_and_zero_byte_files_counted(tiny_dicom_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_dicom_root, root)
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "garbage.dcm").write_bytes(os.urandom(300))
    (first_class / "zero.dcm").write_bytes(b"")
    records, skipped = discover_records(root)
    reasons = {s.path.name: s.reason for s in skipped}
    assert reasons == {"garbage.dcm": "unreadable", "zero.dcm": "empty"}
    assert all(r.path.name not in reasons for r in records)


@pytest.mark.parametrize(
    ("settings", "named"),
    [({"roi_size": (4, 4, 4)}, "data.roi_size"), ({"spacing": (1.0, 1.0, 1.0)}, "data.spacing"),
     ({"spacing": (1.0, 1.0, 1.0), "roi_size": (4, 4, 4)}, "data.spacing and data.roi_size to null")],
)  # fmt: skip
def test_3d_settings_are_refused_with_2d_images(settings: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"{named}.*spatial_dims 2"):
        EpisodicDataModule("unused", spatial_dims=2, **settings)
    EpisodicDataModule("unused", spatial_dims=3, **settings)  # where they belong


def _two_test_classes(root: Path, **overrides: object) -> EpisodicDataModule:
    """3-way episodes over explicit splits whose test split has only 2 classes."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return _module(root, splits={"train": classes[:5], "val": classes[5:10], "test": classes[10:]}, **overrides)


def test_fit_setup_refuses_an_untestable_test_split_under_test_after_fit_and_warns_without_it(
    tiny_dicom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = _two_test_classes(tiny_dicom_root)
    module.test_after_fit = True  # as `medmeta fit --test_after_fit true` sets it
    with pytest.raises(DataError, match=r"meta-split 'test' has 2 class\(es\).*n_way=3.*test_after_fit.*before training"):
        module.setup("fit")
    assert not module._datasets  # refused before any image was cached
    plain = _two_test_classes(tiny_dicom_root)
    with caplog.at_level(logging.WARNING, logger="medmeta.data.datamodule"):
        plain.setup("fit")
    assert "meta-split 'test' cannot supply test episodes" in caplog.text and set(plain._datasets) == {"train", "val"}
    replayed = _two_test_classes(tiny_dicom_root, episodes_file=str(tmp_path / "test_episodes.json"))
    replayed.test_after_fit = True
    replayed.setup("fit")  # replayed test episodes are checked when they are replayed, not drawn


def test_fit_setup_under_test_after_fit_names_a_too_small_test_class(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    sizes = {name: [2, 2, 2] for name in "abcde"} | {"rare": [1, 1]}
    rng = np.random.default_rng(0)
    for name, patients in sizes.items():
        for p, n in enumerate(patients):
            (tmp_path / name / f"p{p}").mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / name / f"p{p}" / f"{k}.png")
    module = EpisodicDataModule(str(tmp_path), n_way=2, k_shot=1, q_query=2, image_size=8, window=None,
                                splits={"train": ["a", "b"], "val": ["c", "d"], "test": ["e", "rare"]})  # fmt: skip
    module.test_after_fit = True
    with pytest.raises(DataError, match=r"class 'rare' in meta-split 'test' has 2 image\(s\) from 2 patient\(s\)"):
        module.setup("fit")


@pytest.mark.parametrize("name", ["meta_batch_size", "eval_batch_size", "train_batches_per_epoch", "val_episodes",
                                  "test_episodes"])  # fmt: skip
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_episode_counts_and_batch_sizes_must_be_positive_integers(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^data\.{name} must be a positive integer, got {value!r}$"):
        EpisodicDataModule("unused", **{name: value})
