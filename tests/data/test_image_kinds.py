"""The kind of an image (format family, grey or colour) from its header, and the record of a training set's kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medmeta.data.image_kinds import image_kind, training_kinds
from medmeta.data.records import ImageRecord
from tests.data.test_dicom_photometric import _palette
from tests.data.test_preflight import ct, nifti, png, png16
from tests.data.test_readers import write_series


def test_the_kind_of_an_image_comes_from_its_header(tmp_path: Path) -> None:
    """Real files: grey and colour PNG/JPEG (a palette by the colours it shows), DICOM files and series, NIfTI."""
    rng = np.random.default_rng(0)
    grey_palette = Image.fromarray(rng.integers(0, 200, (8, 8)).astype(np.uint8)).convert("P")
    grey_palette.putpalette([v for g in range(256) for v in (g, g, g)])
    grey_palette.save(tmp_path / "palette-grey.png")
    colour_palette = Image.fromarray(rng.integers(0, 200, (8, 8, 3)).astype(np.uint8)).convert("P")
    colour_palette.save(tmp_path / "palette-colour.png")
    Image.fromarray(rng.integers(0, 200, (8, 8, 3)).astype(np.uint8)).save(tmp_path / "photo.jpg")
    write_series(tmp_path / "series")
    files = {
        "grey.png": ("picture", 1), "rgb.png": ("picture", 3), "sixteen.png": ("picture", 1), "palette-grey.png": ("picture", 1),
        "palette-colour.png": ("picture", 3), "photo.jpg": ("picture", 3), "ct.dcm": ("dicom", 1), "series": ("dicom", 1),
        "volume.nii.gz": ("nifti", 1),
    }  # fmt: skip
    png(tmp_path / "grey.png", rng.integers(0, 200, (8, 8)).astype(np.uint8))
    png(tmp_path / "rgb.png", rng.integers(0, 200, (8, 8, 3)).astype(np.uint8))
    png16(tmp_path / "sixteen.png")
    ct(tmp_path / "ct.dcm")
    nifti(tmp_path / "volume.nii.gz", rng.normal(0, 1, (8, 8, 4)).astype(np.float32))
    assert {name: image_kind(tmp_path / name) for name in files} == files
    assert image_kind(_palette(tmp_path)[0]) == ("dicom", 3)  # PALETTE COLOR: shown in colour
    assert image_kind(tmp_path / "notes.txt") is None
    records = [ImageRecord(tmp_path / name, "a", "p") for name in ("grey.png", "rgb.png", "ct.dcm", "series")]
    assert training_kinds(records) == {"dicom": [1], "picture": [1, 3]}
    arrays = np.zeros((3, 8, 8, 3), np.uint8)
    assert training_kinds([ImageRecord(tmp_path / "x.npz", "a", "p", item=0)], arrays) == {"npz": [3]}
