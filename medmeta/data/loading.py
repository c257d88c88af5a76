"""Images in, tensors out: the deterministic load transforms over a list of records, Lightning-free.

Training (the data module, through the image cache) and ``medmeta diagnose`` read images with the
same function, so a case is seen at diagnosis exactly as it was during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset

from medmeta.data.records import ImageRecord
from medmeta.data.transforms import KEY, load_transforms
from medmeta.errors import DataError


def transform_images(
    records: Sequence[ImageRecord], *, image_size: int, window: tuple[float, float] | None, preset: str | None,
    spatial_dims: int, in_channels: int, spacing: tuple[float, float, float] | None = None,
    roi_size: tuple[int, int, int] | None = None, arrays: np.ndarray | None = None, source: Path | str = "the data",
) -> torch.Tensor:  # fmt: skip
    """The images of ``records`` through the deterministic load transforms, ``[n, C, *spatial]`` in [0, 1].

    ``arrays`` holds the images of an array source (MedMNIST ``.npz``), indexed by ``record.item``;
    ``source`` names the data in messages. A file that cannot be transformed, a wrong shape (for arrays:
    :func:`array_channel_dim`) or non-finite pixels raise ``DataError`` naming the file.
    """
    channel_dim = "no_channel" if arrays is None else array_channel_dim(arrays.shape[1:], spatial_dims, source)
    transform = load_transforms(
        image_size=image_size, window=window, preset=preset, spatial_dims=spatial_dims, in_channels=in_channels,
        from_array=arrays is not None, spacing=spacing, roi_size=roi_size, array_channel_dim=channel_dim,
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


def array_channel_dim(shape: Sequence[int], spatial_dims: int, source: Path | str) -> int | str:
    """Where the channels of one array image of ``shape`` are (``-1`` or ``"no_channel"``), decided from its shape.

    The MedMNIST layouts: a 2D image is ``(H, W)``, or ``(H, W, C)`` with a trailing colour axis of 1 or 3;
    a 3D volume is ``(D, H, W)``, with no channel axis. Any other shape raises ``DataError`` naming ``source``
    and, when the images look like the other dimensionality, suggesting it: a 3D volume is never averaged
    into a 2D image, nor an RGB image stacked into a volume 3 slices deep.
    """
    shape = tuple(int(n) for n in shape)
    looks_2d = len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3))
    if spatial_dims == 2 and looks_2d:
        return "no_channel" if len(shape) == 2 else -1
    if spatial_dims == 3 and len(shape) == 3 and not looks_2d and shape[0] > 1:
        return "no_channel"
    message = (
        f"{source}: array images of shape {shape} do not fit spatial_dims={spatial_dims} (MedMNIST 2D images are "
        f"(H, W) or (H, W, 3), 3D volumes (D, H, W))"
    )
    other = 3 if len(shape) == 3 and not looks_2d else 2 if looks_2d else None
    if other is not None and other != spatial_dims:
        message += (
            f"; they look {other}D: try --spatial-dims {other} (data check) or --data.spatial_dims {other} (fit)"
        )
    raise DataError(message)


def _reason(error: BaseException) -> str:
    """The innermost cause of a MONAI transform error, in one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
