"""MONAI dictionary transforms: a deterministic, cached prefix and a random suffix per draw."""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import PydicomReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandFlipd,
    RandRotate90d,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
)

KEY = "image"


def load_transforms(
    *, image_size: int, window: Sequence[float] | None = (-1100.0, 400.0), spatial_dims: int = 2
) -> Compose:
    """Read, window and resize one image; the result has no metadata left.

    DICOM is read with MONAI's pydicom reader with pruned metadata (geometry only, no patient
    tags), and ``EnsureTyped(track_meta=False)`` drops what remains, so cached tensors carry no
    header value at all.

    Args:
        image_size: side length after resizing.
        window: ``(low, high)`` intensity window (Hounsfield units for CT) mapped to ``[0, 1]``
            with clipping; ``None`` rescales each image's own min/max to ``[0, 1]``.
        spatial_dims: 2 or 3.
    """
    if window is not None:
        low, high = (float(v) for v in window)
        if not low < high:
            raise ValueError(f"window must be (low, high) with low < high, got {list(window)}")
        intensity = ScaleIntensityRanged(KEY, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    else:
        intensity = ScaleIntensityd(KEY, minv=0.0, maxv=1.0)
    return Compose(
        [
            LoadImaged(KEY, reader=PydicomReader(prune_metadata=True), image_only=True),
            EnsureChannelFirstd(KEY),
            intensity,
            Resized(KEY, spatial_size=(image_size,) * spatial_dims, mode="area"),
            EnsureTyped(KEY, dtype="float32", track_meta=False),
        ]
    )


def augment_transforms(spatial_dims: int = 2) -> Compose:
    """Label-preserving random flips and 90° rotations, drawn anew for every episode."""
    return Compose(
        [
            RandFlipd(KEY, prob=0.5, spatial_axis=0),
            RandFlipd(KEY, prob=0.5, spatial_axis=1),
            RandRotate90d(KEY, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            EnsureTyped(KEY, dtype="float32", track_meta=False),
        ]
    )
