"""The image cache: every image of a split transformed once, in memory or (several processes) memory-mapped.

One process transforms the images in memory. Several (DDP): rank 0 transforms them once into a
tensor file in the medmeta cache, named by a hash of the file list and the transform settings (no
path or patient key is stored), and every rank memory-maps that file, so the operating system
keeps one copy for all ranks (engineering notes, trap 9). The caller says how many processes there
are and how to wait for the others; nothing here knows about Lightning or the data module.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from medmeta.data.cache_folder import default_cache_dir
from medmeta.data.records import ImageRecord

# Bumped whenever reading or transforming changes pixel values (2: pictures converted through their PIL mode, grey
# as ITU-R 601 luma; 3: 2D NIfTI slices oriented as DICOM shows them), so a memory-mapped image cache written by
# an older medmeta is never reused.
IMAGE_CACHE_VERSION = 3


def cache_key(records: Sequence[ImageRecord], settings: Mapping[str, object]) -> str:
    """Hash of what determines the cached tensor: the files (path, item, size, mtime) and the transform settings.

    ``settings`` are the keyword arguments of the transform (their values, in order, enter the hash). For a
    series folder, the name, size and mtime of every file in it enter the hash too: a slice rewritten in place
    changes neither the folder's size nor its mtime.
    """
    digest = hashlib.sha256()
    digest.update(repr((IMAGE_CACHE_VERSION, *settings.values())).encode())
    for record in records:
        stat = record.path.stat()
        digest.update(f"{record.path}|{record.item}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        if record.path.is_dir():
            for path in sorted(p for p in record.path.iterdir() if p.is_file()):
                stat = path.stat()
                digest.update(f"  {path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cached_images(
    records: Sequence[ImageRecord], transform: Callable[[Sequence[ImageRecord]], torch.Tensor], *,
    settings: Mapping[str, object], world_size: int = 1, is_zero: bool = True,
    barrier: Callable[[], None] | None = None, cache_dir: Path | None = None,
) -> torch.Tensor:  # fmt: skip
    """The transformed images of ``records``, ``[len(records), C, *spatial]``.

    Args:
        records: the images.
        transform: turns records into the image tensor (e.g. :func:`~medmeta.data.loading.transform_images`
            with ``settings`` bound).
        settings: the transform settings, hashed into the cache file's name.
        world_size: the number of processes; 1 transforms in memory, with no file written.
        is_zero: whether this process writes the file (rank 0).
        barrier: waits until every process reaches it; required when ``world_size > 1``.
        cache_dir: the medmeta cache folder (default :func:`~medmeta.data.cache_folder.default_cache_dir`);
            files go to its ``tensors/`` folder.
    """
    if world_size == 1:
        return transform(records)
    if barrier is None:
        raise ValueError(f"a barrier is needed to share the image cache across {world_size} processes")
    path = (cache_dir or default_cache_dir()) / "tensors" / f"{cache_key(records, settings)}.pt"
    if is_zero and not path.exists():
        images = transform(records)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save(images, partial)
        os.replace(partial, path)
    barrier()
    return torch.load(path, mmap=True, weights_only=True)
