"""medmeta: few-shot diagnosis on medical images.

``EpisodicDataModule`` and ``FewShotModule`` (the Lightning pieces) are imported on first use, so
the pure layers (``medmeta.data.loading``, ``medmeta.data.formats``, ...) load without Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medmeta.data.datamodule import EpisodicDataModule
    from medmeta.module import FewShotModule

__version__ = "0.1.0"
__all__ = ["EpisodicDataModule", "FewShotModule", "__version__"]


def __getattr__(name: str) -> object:
    """The Lightning data module and module on first use."""
    if name == "EpisodicDataModule":
        from medmeta.data.datamodule import EpisodicDataModule

        return EpisodicDataModule
    if name == "FewShotModule":
        from medmeta.module import FewShotModule

        return FewShotModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
