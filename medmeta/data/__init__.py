"""Data: file discovery, MONAI transforms, episodes and the synthetic lesion data set."""

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.episodes import ClassSplits, Episode, EpisodeSampler, split_classes
from medmeta.data.records import ImageRecord, discover_records

__all__ = [
    "ClassSplits",
    "Episode",
    "EpisodeSampler",
    "EpisodicDataModule",
    "ImageRecord",
    "discover_records",
    "split_classes",
]
