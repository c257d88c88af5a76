"""Named intensity presets: CT windows, MR normalisation, X-ray/photo min-max (all MONAI transforms)."""

from __future__ import annotations

from collections.abc import Sequence

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


def window_bounds(preset: str) -> tuple[float, float]:
    """``(low, high)`` HU of a CT window preset."""
    level, width = CT_WINDOWS[preset]
    return level - width / 2, level + width / 2


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
