"""MedMNIST ``.npz`` files (2D and 3D), read from a path the user gives; nothing is downloaded.

The official ``train``/``val``/``test`` image splits share their classes, so few-shot use pools
them and splits by class instead; each image is its own patient (MedMNIST has no patient ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmeta.data.records import ImageRecord, hash_patient
from medmeta.errors import DataError

OFFICIAL_SPLITS = ("train", "val", "test")


def load_medmnist(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All images ``[N, H, W(, D)][, 3]`` and integer labels ``[N]`` of a MedMNIST ``.npz``.

    Raises:
        DataError: if the file lacks the official keys or holds multi-label targets.
    """
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as arrays:
            keys = set(arrays.files)
            present = [s for s in OFFICIAL_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
            if not present:
                raise DataError(
                    f"{path} is not a MedMNIST file: expected keys like 'train_images'/'train_labels', "
                    f"found {sorted(keys)}"
                )
            images = np.concatenate([arrays[f"{s}_images"] for s in present])
            labels = np.concatenate([arrays[f"{s}_labels"] for s in present])
    except (OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{path} has multi-label targets of shape {labels.shape[1:]}; few-shot episodes need one class per image")
    return images, labels.astype(np.int64)


def medmnist_records(path: str | Path, labels: np.ndarray) -> list[ImageRecord]:
    """One record per image, class names ``label_<k>``, item = index into the pooled arrays."""
    path = Path(path).expanduser()
    return [
        ImageRecord(path=path, label=f"label_{int(label)}", patient=hash_patient(f"medmnist:{i}"), item=i)
        for i, label in enumerate(labels)
    ]
