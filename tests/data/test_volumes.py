"""3D episodes from NIfTI volumes and from DICOM series folders, end to end through the data module."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.inventory import take_inventory
from medmeta.data.synthetic import generate_synthetic_dataset
from medmeta.data.synthetic3d import generate_synthetic_volumes
from medmeta.errors import DataError
from tests.data.test_readers import write_series


def test_nifti_volumes_make_3d_episodes(tmp_path: Path) -> None:
    root = generate_synthetic_volumes(tmp_path / "vols", n_classes=8, patients_per_class=3, volumes_per_patient=2, size=16)
    data = EpisodicDataModule(
        str(root), spatial_dims=3, image_size=8, roi_size=(12, 12, 12), n_way=2, k_shot=1, q_query=2,
        split_ratios=(0.5, 0.25, 0.25), meta_batch_size=2, train_batches_per_epoch=2, test_episodes=4,
    )  # fmt: skip
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["support_x"].shape == (2, 2, 1, 8, 8, 8)
    assert batch["query_x"].shape == (2, 4, 1, 8, 8, 8)
    records = data.inventory.records
    assert len({r.patient for r in records}) == 8 * 3  # one patient per folder, two volumes each


def test_dicom_series_folders_are_volumes(tmp_path: Path) -> None:
    root = tmp_path / "series"
    for c in range(4):
        for p in range(3):
            folder = root / f"class{c}" / f"patient{p}"
            write_series(folder, n=6, seed=10 * c + p)
            for path in folder.glob("*.dcm"):  # one PatientID per series
                ds = pydicom.dcmread(path)
                ds.PatientID = f"c{c}p{p}"
                ds.save_as(path)
    data = EpisodicDataModule(
        str(root), spatial_dims=3, image_size=8, window=None, n_way=2, k_shot=1, q_query=1,
        splits={"train": ["class0", "class1"], "test": ["class2", "class3"]}, test_episodes=3,
    )  # fmt: skip
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["support_x"].shape == (3, 2, 1, 8, 8, 8)
    assert len(data.inventory.records) == 12 and all(r.path.is_dir() for r in data.inventory.records)


def test_2d_images_in_a_3d_run_are_skipped_with_reasons_and_nothing_is_left(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "flat", n_classes=4, patients_per_class=2, images_per_patient=1,
                                      image_size=16)  # fmt: skip
    with pytest.raises(DataError, match="no usable images under .*flat"):
        take_inventory(root, spatial_dims=3, n_way=2)
    assert take_inventory(root, spatial_dims=2, n_way=2).problems == []
    (root / "extra").mkdir()
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), np.eye(4)),
             root / "extra" / "volume.nii.gz")  # fmt: skip
    problems = take_inventory(root, spatial_dims=2, n_way=2, split_ratios=(1, 0, 0)).problems
    assert [(p.path.name, p.reason) for p in problems] == [("volume.nii.gz", "wrong-dims")]


def test_a_data_set_of_single_slices_stored_1xhxw_is_refused_in_3d(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "slices"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for p, shape in enumerate([(1, 12, 12), (12, 1, 12)]):  # one slice, its singleton axis not last
            image = nib.Nifti1Image(rng.normal(0, 300, shape).astype(np.float32), np.eye(4))
            nib.save(image, root / f"class{c}" / f"p{p}.nii.gz")
    with pytest.raises(DataError, match=r"no usable images .*wrong-dims: 4"):
        take_inventory(root, spatial_dims=3, n_way=2)
    assert take_inventory(root, spatial_dims=2, n_way=2, k_shot=1, q_query=1).problems == []
