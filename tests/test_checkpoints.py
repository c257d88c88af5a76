"""``medmeta.checkpoints``: loading trained models (the refusals are in ``test_reliability.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from medmeta import FewShotModule
from medmeta.checkpoints import load_trained


def _checkpoint(path: Path, module: FewShotModule, drop: tuple[str, ...] = ()) -> Path:
    hparams = {k: v for k, v in module.hparams.items() if k not in drop}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, path)  # fmt: skip
    return path


@pytest.mark.parametrize(("drop", "expected"), [((), "current"), (("mann_label_timing",), "previous")])
def test_a_mann_checkpoint_keeps_the_label_timing_it_was_trained_with(
    tmp_path: Path, drop: tuple[str, ...], expected: str
) -> None:
    """Checkpoints from before ``mann_label_timing`` existed were trained with one-step-late labels."""
    module = FewShotModule(algorithm="mann", n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    loaded, _ = load_trained(_checkpoint(tmp_path / "mann.ckpt", module, drop))
    assert loaded.algorithm.label_timing == expected
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
