"""medmeta: few-shot diagnosis on medical images."""

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.module import FewShotModule

__version__ = "0.1.0"
__all__ = ["EpisodicDataModule", "FewShotModule", "__version__"]
