"""``medmeta.checkpoints``: loading trained models, files that are not checkpoints, the classes a model has seen.

Crafted pickles and model-shape mismatches through the CLI are in ``test_reliability.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from medmeta import FewShotModule
from medmeta.checkpoints import load_trained, read_checkpoint
from medmeta.errors import DataError


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


def _not_checkpoints(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not (complete) checkpoints, each with the words its refusal must hold."""
    data = good.read_bytes()
    files = {
        "random-bytes": (np.random.default_rng(0).bytes(5000), "neither a zip archive nor a pickle"),
        "text": (b"epoch: 3\nval/acc: 0.61\nthis is a text file\n", "it is a text file"),
        "truncated": (data[: len(data) // 2], "the file is truncated"),
        "truncated-at-the-end": (data[:-30], "the file is truncated"),
        "empty": (b"", "the file is empty (0 bytes)"),
    }
    written = {}
    for name, (content, words) in files.items():
        path = folder / f"{name}.ckpt"
        path.write_bytes(content)
        written[name] = (path, words)
    return written


@pytest.mark.parametrize("name", ["random-bytes", "text", "truncated", "truncated-at-the-end", "empty"])
def test_a_file_that_is_not_a_complete_checkpoint_is_one_clear_line(tmp_path: Path, name: str) -> None:
    module = FewShotModule(n_way=3, image_size=8, hidden_channels=4, pixel_baseline=False)
    path, words = _not_checkpoints(tmp_path, _checkpoint(tmp_path / "good.ckpt", module))[name]
    with pytest.raises(DataError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"cannot load checkpoint {path}: ") and words in message, message
    assert "checkpoint" in message.removeprefix(f"cannot load checkpoint {path}: "), message  # says what it is not
    assert "\n" not in message and not message.endswith(("(", ":", ",")), message
    for riddle in ("objects other than tensors", "IndexError", "KeyError", "OSError", "EOFError"):
        assert riddle not in message, message


def test_fit_records_the_classes_the_model_has_seen(trained_checkpoint: Path, tmp_path: Path) -> None:
    """Meta-train and meta-val class names go into the checkpoint; old checkpoints fall back to the run folder."""
    from medmeta.checkpoints import SEEN_CLASSES_KEY, seen_classes

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    seen = seen_classes(trained_checkpoint, checkpoint)
    assert seen is not None and len(seen["train"]) == 6 and len(seen["val"]) == 3
    assert checkpoint[SEEN_CLASSES_KEY] == seen and not set(seen["train"]) & set(seen["val"])
    old = {k: v for k, v in checkpoint.items() if k != SEEN_CLASSES_KEY}
    assert seen_classes(tmp_path / "model.ckpt", old) is None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    splits = {"train": ["b", "a"], "val": ["c"], "test": ["d"]}
    (tmp_path / "run" / "class_splits.json").write_text(json.dumps(splits))
    assert seen_classes(tmp_path / "run" / "checkpoints" / "last.ckpt", old) == {"train": ["a", "b"], "val": ["c"]}


@pytest.mark.parametrize(("drop", "expected"), [((), 0.1), (("protonet_temperature",), 1.0)])
def test_a_protonet_checkpoint_keeps_its_temperature(tmp_path: Path, drop: tuple[str, ...], expected: float) -> None:
    """Checkpoints from before ``protonet_temperature`` existed were trained with temperature 1."""
    module = FewShotModule(algorithm="protonet", distance="cosine", protonet_temperature=0.1, n_way=3, image_size=8,
                           hidden_channels=4, pixel_baseline=False)  # fmt: skip
    loaded, _ = load_trained(_checkpoint(tmp_path / "protonet.ckpt", module, drop))
    assert loaded.algorithm.temperature == expected and loaded.algorithm.distance == "cosine"
