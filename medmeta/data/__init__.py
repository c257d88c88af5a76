"""Data: formats and readers, discovery and preflight, transforms, the image cache, episodes, the data module.

``EpisodicDataModule`` (the only Lightning piece) is imported on first use, so the pure layers
(``medmeta.data.loading``, ``image_cache``, ``formats``, ...) load without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medmeta.data.episodes import ClassSplits, Episode, EpisodeSampler, split_classes
from medmeta.data.records import ImageRecord, discover_records

if TYPE_CHECKING:
    from medmeta.data.datamodule import EpisodicDataModule

__all__ = [
    "ClassSplits",
    "Episode",
    "EpisodeSampler",
    "EpisodicDataModule",
    "ImageRecord",
    "discover_records",
    "split_classes",
]


def __getattr__(name: str) -> object:
    """``EpisodicDataModule`` on first use (it imports Lightning)."""
    if name == "EpisodicDataModule":
        from medmeta.data.datamodule import EpisodicDataModule

        return EpisodicDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
