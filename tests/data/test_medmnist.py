"""MedMNIST .npz files (2D, RGB and 3D) from a path, pooled and split by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.errors import DataError


def _npz(path: Path, shape: tuple[int, ...], n_classes: int = 6, per_split: int = 30) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(per_split, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(per_split) % n_classes).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("shape", "spatial_dims", "in_channels", "expected"),
    [((28, 28), 2, 1, (1, 16, 16)), ((28, 28, 3), 2, 1, (1, 16, 16)), ((28, 28, 28), 3, 1, (1, 8, 8, 8))],
)
def test_medmnist_episodes(tmp_path: Path, shape: tuple[int, ...], spatial_dims: int, in_channels: int, expected: tuple) -> None:
    path = _npz(tmp_path / "organmnist.npz", shape)
    data = EpisodicDataModule(
        str(path), n_way=2, k_shot=1, q_query=3, image_size=expected[-1], spatial_dims=spatial_dims,
        in_channels=in_channels, preset="photo", split_ratios=(0.34, 0.33, 0.33), test_episodes=4, eval_batch_size=2,
    )  # fmt: skip
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert tuple(batch["support_x"].shape[2:]) == expected
    assert data.class_splits is not None and len(data.class_splits.test) == 2
    assert set(data.class_splits.test) <= {f"label_{k}" for k in range(6)}


def test_multilabel_and_foreign_npz_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="not a MedMNIST file"):
        EpisodicDataModule(str(tmp_path / "x.npz")).setup("test")
    np.savez(tmp_path / "chest.npz", train_images=np.zeros((2, 4, 4)), train_labels=np.zeros((2, 14)))
    with pytest.raises(DataError, match="multi-label"):
        EpisodicDataModule(str(tmp_path / "chest.npz")).setup("test")


def test_nan_and_constant_array_images_are_skipped_with_reasons(tmp_path: Path) -> None:
    from medmeta.data.inventory import take_inventory

    path = _npz(tmp_path / "m.npz", (8, 8))
    with np.load(path) as arrays:
        data = {k: arrays[k].astype(np.float32) for k in arrays.files}
    data["train_images"][3] = np.nan
    data["train_images"][5] = 7.0
    np.savez(path, **data)
    problems = take_inventory(path, n_way=2, k_shot=1, q_query=1, split_ratios=(0.34, 0.33, 0.33)).problems
    assert [(p.reason, p.detail.split(":")[0]) for p in problems] == [("non-finite", "image 3"), ("constant", "image 5")]


@pytest.mark.parametrize(
    ("shape", "spatial_dims", "words"),
    [((8, 8, 8), 2, r"shape \(8, 8, 8\) do not fit spatial_dims=2.*look 3D.*--data\.spatial_dims 3"),
     ((8, 8, 3), 3, r"shape \(8, 8, 3\) do not fit spatial_dims=3.*look 2D.*--data\.spatial_dims 2"),
     ((8, 8, 8, 1), 3, r"shape \(8, 8, 8, 1\) do not fit spatial_dims=3")],
    ids=["volume-as-2d", "rgb-as-3d", "volume-with-channel"],
)
def test_npz_of_the_other_dimensionality_is_refused(
    tmp_path: Path, shape: tuple[int, ...], spatial_dims: int, words: str
) -> None:
    from medmeta.data.inventory import take_inventory
    from medmeta.data.loading import transform_images
    from medmeta.data.medmnist import load_medmnist, medmnist_records

    path = _npz(tmp_path / "organmnist3d.npz", shape)
    with pytest.raises(DataError, match=rf"organmnist3d\.npz: array images of {words}"):
        take_inventory(path, spatial_dims=spatial_dims, n_way=2, k_shot=1, q_query=1, preset="photo",
                       split_ratios=(0.34, 0.33, 0.33))  # fmt: skip
    arrays, labels = load_medmnist(path)
    with pytest.raises(DataError, match=words):
        transform_images(medmnist_records(path, labels)[:2], image_size=8, window=None, preset="photo",
                         spatial_dims=spatial_dims, in_channels=1, arrays=arrays, source=path)  # fmt: skip
