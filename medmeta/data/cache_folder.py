"""The medmeta cache folder: where generated data lives, and which generator makes the built-in data set."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Where medmeta keeps generated data: ``$MEDMETA_CACHE``, else ``$XDG_CACHE_HOME/medmeta``, else ``~/.cache/medmeta``."""
    if os.environ.get("MEDMETA_CACHE"):
        return Path(os.environ["MEDMETA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medmeta"


def synthetic_root(seed: int, spatial_dims: int = 2) -> Path:
    """Folder of the built-in synthetic lesion data set (2D DICOM or 3D NIfTI) for ``seed``."""
    kind = "synthetic-lesions-v1" if spatial_dims == 2 else "synthetic-lesions-3d-v2"  # v2: patient folders unique
    return default_cache_dir() / f"{kind}-seed{seed}"


def ensure_synthetic(seed: int, spatial_dims: int = 2) -> Path:
    """The built-in synthetic data set's folder, generated there first if it is missing (2D DICOM or 3D NIfTI)."""
    target = synthetic_root(seed, spatial_dims)
    if target.exists():
        return target
    logger.info("generating the synthetic lesion data set at %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if spatial_dims == 3:
        from medmeta.data.synthetic3d import generate_synthetic_volumes

        generate_synthetic_volumes(target, seed=seed)
    else:
        from medmeta.data.synthetic import generate_synthetic_dataset

        generate_synthetic_dataset(target, seed=seed)
    return target
