"""Shared fixtures: small synthetic DICOM data sets written to temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta.data.synthetic import generate_synthetic_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dicom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 lesion classes x 4 patients x 3 images of 32x32 DICOM (read-only use)."""
    root = tmp_path_factory.mktemp("data") / "lesions"
    return generate_synthetic_dataset(root, n_classes=12, patients_per_class=4, images_per_patient=3, image_size=32, seed=3)
