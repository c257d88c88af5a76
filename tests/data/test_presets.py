"""Intensity presets map known values where radiology expects them."""

from __future__ import annotations

import pytest
import torch

from medmeta.data.presets import DEFAULT_WINDOW, PRESETS, Intensity, intensity_transform, parse_window, window_bounds


def test_ct_windows_by_level_and_width() -> None:
    assert window_bounds("ct-lung") == (-1350.0, 150.0)
    assert window_bounds("ct-brain") == (0.0, 80.0)
    hu = torch.tensor([[[-2000.0, -1350.0, -600.0, 150.0, 3000.0]]])
    out = intensity_transform("image", preset="ct-lung", window=None)({"image": hu})["image"]
    assert torch.allclose(torch.as_tensor(out), torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0]]]))


def test_mr_and_photo_presets() -> None:
    image = torch.arange(1.0, 101.0).reshape(1, 10, 10)
    z = torch.as_tensor(intensity_transform("image", preset="mr-zscore", window=None)({"image": image})["image"])
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-3
    p = torch.as_tensor(intensity_transform("image", preset="mr-percentile", window=None)({"image": image})["image"])
    assert float(p.min()) == 0.0 and float(p.max()) == 1.0 and 0.4 < float(p.median()) < 0.6
    m = torch.as_tensor(intensity_transform("image", preset="xray", window=None)({"image": image})["image"])
    assert float(m.min()) == 0.0 and float(m.max()) == 1.0


def test_unknown_preset_lists_the_choices() -> None:
    assert len(PRESETS) == 10
    with pytest.raises(ValueError, match="unknown intensity preset 'ct-liver'.*ct-lung"):
        intensity_transform("image", preset="ct-liver", window=None)


def test_intensity_setting_is_checked_and_described() -> None:
    assert Intensity() == Intensity(window=[-1100, 400]) and Intensity().window == DEFAULT_WINDOW
    assert Intensity().describe() == "window [-1100, 400]"
    assert Intensity(preset="ct-brain").describe() == "preset ct-brain [0, 80]"
    assert Intensity(window=None).describe() == "per-image min/max"
    for bad in ({"preset": "ct-nose"}, {"window": (400, -1100)}, {"window": (1, 2, 3)}):
        with pytest.raises(ValueError):
            Intensity(**bad)
    assert parse_window(["-1100", "400"]) == (-1100.0, 400.0) and parse_window(["none"]) is None
    for bad in (["400", "-1100"], ["a", "b"], ["1"]):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
