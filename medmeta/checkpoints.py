"""Loading checkpoints safely: ``weights_only`` always, a clear error for anything that is not ours.

A checkpoint is a file a user may have received from anywhere. It is never unpickled beyond
tensors and plain values (a crafted pickle is refused unread), and a truncated file, a file that
is not a medmeta checkpoint, or one trained for another model shape is a one-line ``DataError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from medmeta.errors import DataError

SHAPE_KEYS = ("algorithm", "backbone", "n_way", "in_channels", "spatial_dims", "hidden_channels", "norm", "image_size")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, read with ``weights_only=True``; ``DataError`` if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - crafted pickle, truncated zip, not a checkpoint at all
        if "Weights only load failed" in str(error):
            reason = "it holds objects other than tensors and plain values (refused unread)"
        else:
            first_line = str(error).splitlines()[0][:160] if str(error) else "unreadable"
            reason = f"{type(error).__name__}: {first_line}"
        raise DataError(f"cannot load checkpoint {path}: {reason}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict) or (
        "state_dict" not in checkpoint
    ):  # fmt: skip
        raise DataError(f"checkpoint {path} is not a medmeta checkpoint (no state_dict or hyper_parameters)")
    return checkpoint


def check_checkpoint(path: Path, hparams: Mapping[str, object] | None = None) -> dict:
    """Read ``path`` safely and, given this run's model ``hparams``, check it was trained for the same model shape."""
    checkpoint = read_checkpoint(path)
    if hparams is not None:
        saved = checkpoint["hyper_parameters"]
        differs = [f"{k}={saved[k]!r} (this run: {hparams[k]!r})" for k in SHAPE_KEYS if k in saved and saved[k] != hparams[k]]
        if differs:
            raise DataError(f"checkpoint {path} was trained for a different model: {', '.join(differs)}")
    return checkpoint


def load_trained(path: Path) -> tuple[object, dict[str, object]]:
    """The ``FewShotModule`` of a checkpoint (CPU, eval mode) and the data module settings saved with it."""
    from medmeta.module import FewShotModule

    checkpoint = read_checkpoint(path)
    saved = checkpoint["hyper_parameters"]
    # MANN checkpoints written before `mann_label_timing` existed fed the labels one step late
    legacy = {"mann_label_timing": "previous"} if saved.get("algorithm") == "mann" and "mann_label_timing" not in saved else {}
    try:
        module = FewShotModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **legacy)
    except Exception as error:  # noqa: BLE001 - a state dict that does not fit its own hyperparameters
        raise DataError(f"cannot load checkpoint {path}: {type(error).__name__}: {str(error).splitlines()[0][:160]}") from error
    settings = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return module.eval(), settings
