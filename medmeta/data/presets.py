"""Named intensity presets: CT windows, MR normalisation, X-ray/photo min-max (all MONAI transforms)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monai.transforms import (
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

# CT windows as (level, width) in Hounsfield units, the values radiology workstations ship with.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-lung": (-600.0, 1500.0),
    "ct-mediastinum": (50.0, 350.0),
    "ct-soft-tissue": (40.0, 400.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
    "ct-abdomen": (60.0, 400.0),
}
OTHER_PRESETS = ("mr-zscore", "mr-percentile", "xray", "photo")
PRESETS = (*CT_WINDOWS, *OTHER_PRESETS)
DEFAULT_WINDOW: tuple[float, float] = (-1100.0, 400.0)  # HU, lung to soft tissue: what `fit` uses by default


def window_bounds(preset: str) -> tuple[float, float]:
    """``(low, high)`` HU of a CT window preset."""
    level, width = CT_WINDOWS[preset]
    return level - width / 2, level + width / 2


def parse_window(words: Sequence[str]) -> tuple[float, float] | None:
    """A command line's ``LOW HIGH`` as a window, ``none``/``null`` as None (per-image min/max).

    Raises:
        ValueError: anything else, or low >= high.
    """
    if len(words) == 1 and str(words[0]).lower() in ("none", "null"):
        return None
    try:
        low, high = (float(w) for w in words)
    except ValueError:
        raise ValueError(f"a window is LOW HIGH (two numbers) or 'none', got {' '.join(map(str, words))}") from None
    if not low < high:
        raise ValueError(f"a window needs low < high, got {low:g} {high:g}")
    return low, high


def intensity_transform(key: str, *, preset: str | None, window: Sequence[float] | None) -> MapTransform:
    """The intensity step: a named preset, else an explicit ``[low, high]`` window, else per-image min/max.

    CT windows map ``[low, high]`` to ``[0, 1]`` with clipping; ``mr-zscore`` is zero mean, unit
    variance per image; ``mr-percentile`` maps the 1st-99th percentiles to ``[0, 1]``; ``xray`` and
    ``photo`` rescale each image's min/max to ``[0, 1]``.
    """
    if preset is not None:
        if preset in CT_WINDOWS:
            window = window_bounds(preset)
        elif preset == "mr-zscore":
            return NormalizeIntensityd(key)
        elif preset == "mr-percentile":
            return ScaleIntensityRangePercentilesd(key, lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True)
        elif preset in ("xray", "photo"):
            return ScaleIntensityd(key, minv=0.0, maxv=1.0)
        else:
            raise ValueError(f"unknown intensity preset {preset!r}; choose one of {list(PRESETS)}")
    if window is None:
        return ScaleIntensityd(key, minv=0.0, maxv=1.0)
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"window must be (low, high) with low < high, got {list(window)}")
    return ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


@dataclass(frozen=True)
class Intensity:
    """One intensity setting, as ``fit`` takes it: ``preset`` overrides ``window``; no window is per-image min/max.

    Building one checks it (``ValueError`` for an unknown preset or a window with low >= high).
    """

    preset: str | None = None
    window: tuple[float, float] | None = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.window is not None:
            object.__setattr__(self, "window", tuple(float(v) for v in self.window))
            if len(self.window) != 2:
                raise ValueError(f"window must be (low, high), got {list(self.window)}")
        self.transform("image")

    def transform(self, key: str) -> MapTransform:
        """The MONAI transform training applies (:func:`intensity_transform`)."""
        return intensity_transform(key, preset=self.preset, window=self.window)

    def describe(self) -> str:
        """A short phrase such as ``window [-1100, 400]`` or ``preset ct-brain [0, 80]``."""
        if self.preset in CT_WINDOWS:
            low, high = window_bounds(self.preset)
            return f"preset {self.preset} [{low:g}, {high:g}]"
        if self.preset is not None:
            return f"preset {self.preset}"
        if self.window is None:
            return "per-image min/max"
        return f"window [{self.window[0]:g}, {self.window[1]:g}]"
