"""The pure image layers load without Lightning, and ``transform_images`` names the file it cannot read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta.data.loading import transform_images
from medmeta.data.records import ImageRecord
from medmeta.errors import DataError

PURE = ("loading", "image_cache", "cache_folder", "replay", "formats", "loaders", "inventory", "preflight")

# ``medmeta`` and ``medmeta.data`` load their Lightning pieces lazily: what is measured is what the data
# layers themselves import.
_PROBE = """
import importlib, sys
for name in sys.argv[1:]:  # "--" marks a measurement
    if name == "--":
        print(sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")}))
    else:
        importlib.import_module("medmeta.data." + name)
"""


def test_reading_transforming_and_caching_import_no_lightning() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, *PURE, "--", "datamodule", "--"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    pure, with_data_module = done.stdout.split("\n")[:2]
    assert pure == "[]"
    assert "lightning" in with_data_module  # the counter-check: the probe does see Lightning


def _picture(path: Path, value: int) -> Path:
    pixels = np.full((12, 12), value, dtype=np.uint8)
    pixels[:6] = 255 - value
    Image.fromarray(pixels, "L").save(path)
    return path


def test_transform_images_gives_the_configured_shape_in_unit_range(tmp_path: Path) -> None:
    records = [ImageRecord(_picture(tmp_path / f"{i}.png", 40 * i), "a", "p") for i in range(3)]
    images = transform_images(records, image_size=8, window=(0.0, 255.0), preset=None, spatial_dims=2, in_channels=3)
    assert images.shape == (3, 3, 8, 8)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_transform_images_names_the_file_it_cannot_read(tmp_path: Path) -> None:
    good = ImageRecord(_picture(tmp_path / "good.png", 10), "a", "p")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture at all")
    with pytest.raises(DataError, match="cannot read .*bad.png"):
        transform_images([good, ImageRecord(bad, "a", "p")], image_size=8, window=None, preset=None, spatial_dims=2,
                         in_channels=1)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "spatial_dims", "expected"),
    [((6, 7), 2, (1, 8, 8)), ((6, 7, 1), 2, (1, 8, 8)), ((6, 7, 3), 2, (1, 8, 8)), ((5, 6, 7), 3, (1, 8, 8, 8))],
)
def test_array_channels_follow_the_shape_not_the_number_of_axes(
    shape: tuple[int, ...], spatial_dims: int, expected: tuple[int, ...]
) -> None:
    arrays = np.random.default_rng(0).integers(0, 255, (2, *shape)).astype(np.uint8)
    records = [ImageRecord(Path("m.npz"), "a", "p", item=i) for i in range(2)]
    images = transform_images(records, image_size=8, window=None, preset="photo", spatial_dims=spatial_dims,
                              in_channels=1, arrays=arrays)  # fmt: skip
    assert tuple(images.shape[1:]) == expected


@pytest.mark.parametrize(("shape", "spatial_dims"), [((5, 6, 7), 2), ((6, 7, 3), 3), ((6, 7), 3), ((2, 5, 6, 7), 2)])
def test_array_shapes_that_do_not_fit_the_dimensionality_are_refused(shape: tuple[int, ...], spatial_dims: int) -> None:
    arrays = np.zeros((1, *shape), dtype=np.uint8)
    with pytest.raises(DataError, match=rf"m\.npz: array images of shape .* do not fit spatial_dims={spatial_dims}"):
        transform_images([ImageRecord(Path("m.npz"), "a", "p", item=0)], image_size=8, window=None, preset="photo",
                         spatial_dims=spatial_dims, in_channels=1, arrays=arrays, source="m.npz")  # fmt: skip
