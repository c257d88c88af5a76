"""PNG (RGB), JPEG (grayscale) and 2D NIfTI images in one folder, to the configured channel count."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medmeta.data.datamodule import EpisodicDataModule


def _mixed_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, kind in enumerate(["png-rgb", "png-rgb", "jpeg", "nifti"]):
        for p in range(3):
            folder = root / f"class_{kind}_{c}" / f"patient{p}"
            folder.mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 255, size=(20, 20, 3) if kind == "png-rgb" else (20, 20), dtype=np.uint8)
                if kind == "png-rgb":
                    Image.fromarray(pixels, "RGB").save(folder / f"{k}.png")
                elif kind == "jpeg":
                    Image.fromarray(pixels, "L").save(folder / f"{k}.jpg")
                else:
                    nib.save(nib.Nifti1Image(pixels[..., None].astype(np.int16), np.eye(4)), folder / f"{k}.nii.gz")
    return root


@pytest.mark.parametrize("in_channels", [1, 3])
def test_mixed_formats_become_episodes_with_the_configured_channels(tmp_path: Path, in_channels: int) -> None:
    root = _mixed_folder(tmp_path / "mixed")
    data = EpisodicDataModule(
        str(root), n_way=4, k_shot=1, q_query=2, in_channels=in_channels, image_size=16, preset="photo",
        splits={"test": sorted(p.name for p in root.iterdir())}, test_episodes=2, eval_batch_size=2,
    )  # fmt: skip
    data.setup("test")
    assert data.inventory is not None and not data.inventory.problems
    assert len({r.patient for r in data.inventory.records}) == 12  # patients from the sub-folders
    batch = next(iter(data.test_dataloader()))
    assert batch["support_x"].shape == (2, 4, in_channels, 16, 16)
    assert float(batch["query_x"].min()) >= 0.0 and float(batch["query_x"].max()) <= 1.0
