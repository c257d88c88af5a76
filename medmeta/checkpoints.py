"""Loading checkpoints safely: ``weights_only`` always, a clear error for anything that is not ours.

A checkpoint is a file a user may have received from anywhere. It is never unpickled beyond
tensors and plain values (a crafted pickle is refused unread), and a truncated file, a file that
is not a medmeta checkpoint, or one trained for another model shape is a one-line ``DataError``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from medmeta.algorithms import LEGACY_MODULE_SETTINGS, legacy_algorithm_spec, saved_algorithm_spec
from medmeta.errors import DataError
from medmeta.networks import LEGACY_MODULE_SETTINGS as LEGACY_BACKBONE_SETTINGS
from medmeta.networks import legacy_backbone_spec

SHAPE_KEYS = ("algorithm", "backbone", "n_way", "in_channels", "spatial_dims", "image_size")


NOT_OURS = "not a medmeta/Lightning checkpoint"
SEEN_CLASSES_KEY = "medmeta_seen_classes"  # {"train": [...], "val": [...]}: class names, written at fit time


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, read with ``weights_only=True``; ``DataError`` if it cannot be.

    Every refusal is one complete line: ``cannot load checkpoint PATH: <why>``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise DataError(f"cannot load checkpoint {path}: it is a folder, not a checkpoint file")
    problem = _format_problem(path)
    if problem is not None:
        raise DataError(f"cannot load checkpoint {path}: {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - crafted pickle, damaged zip, not a checkpoint at all
        if "Weights only load failed" in str(error):
            reason = "it holds objects other than tensors and plain values (refused unread: medmeta never unpickles code)"
        else:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no further detail"
            reason = f"it is damaged or incomplete, {NOT_OURS} that can be read ({type(error).__name__}: {first_line})"
        raise DataError(f"cannot load checkpoint {path}: {reason}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict) or (
        "state_dict" not in checkpoint
    ):  # fmt: skip
        raise DataError(
            f"cannot load checkpoint {path}: it is a PyTorch file but {NOT_OURS} (no state_dict or hyper_parameters)"
        )
    broken = non_finite(checkpoint["state_dict"])
    if broken:
        raise DataError(f"cannot load checkpoint {path}: {weights_problem(broken)}")
    return checkpoint


def non_finite(state: Mapping[str, object]) -> list[str]:
    """The names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]  # fmt: skip


def weights_problem(names: list[str]) -> str:
    """The reason given for refusing weights with non-finite values (a diverged training, or a damaged file)."""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} weight tensor(s) hold NaN or infinite values ({shown}); every prediction from them would "
            "be meaningless (a diverged training or a damaged file)")  # fmt: skip


def _format_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, judged from its size and first bytes (``None``: it may be one).

    ``torch.save`` writes a zip archive (``PK``), or a pickle in its legacy format; anything else
    (an empty file, a text file, random bytes) is refused before ``torch.load`` sees it, and a zip
    archive without its closing directory is a truncated file.
    """
    size = path.stat().st_size
    if size == 0:
        return f"the file is empty (0 bytes), {NOT_OURS}"
    with path.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"the file is truncated ({size} bytes; the end of the archive is missing), not a complete checkpoint"
        return None
    if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy format
        return None
    if b"\x00" not in head and _is_text(head):
        return f"it is a text file, {NOT_OURS}"
    return f"its content is neither a zip archive nor a pickle ({size} bytes of other data), {NOT_OURS}"


def _is_text(data: bytes) -> bool:
    """Whether ``data`` (the start of a file) is UTF-8 text; a character cut by the read still counts."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(data) - 3
    return True


def seen_classes(path: Path, checkpoint: Mapping[str, object]) -> dict[str, list[str]] | None:
    """The class names a checkpoint's model was meta-trained and validated on, or ``None`` if unknown.

    Looked up in the checkpoint itself (written at fit time since this was added), then in explicit
    ``data.splits`` saved with it, then in ``class_splits.json`` of the run folder the checkpoint
    sits in (``<run>/checkpoints/<name>.ckpt``).
    """
    stored = checkpoint.get(SEEN_CLASSES_KEY)
    if isinstance(stored, Mapping):
        return {split: sorted(map(str, stored.get(split, ()))) for split in ("train", "val")}
    data = checkpoint.get("datamodule_hyper_parameters")
    explicit = data.get("splits") if isinstance(data, Mapping) else None
    if isinstance(explicit, Mapping):
        return {split: sorted(map(str, explicit.get(split, ()))) for split in ("train", "val")}
    path = Path(path)
    run_file = path.parent.parent / "class_splits.json"
    if path.parent.name == "checkpoints" and run_file.is_file():
        try:
            splits = json.loads(run_file.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(splits, dict):
            return {split: sorted(map(str, splits.get(split) or ())) for split in ("train", "val")}
    return None


def model_hparams(checkpoint: Mapping[str, object]) -> dict[str, object]:
    """The model settings of a checkpoint in today's spelling (learner and backbone as class-path specs).

    Checkpoints written before learners and backbones were plug-ins hold flat settings
    (``algorithm: <short name>``, ``inner_lr``, ``hidden_channels`` ...); they are translated here, so
    they load like new ones. A learner setting added after the checkpoint was written takes the value
    that reproduces it (``MetaLearner.settings_added``). Lightning's own bookkeeping keys are dropped.
    """
    saved = {k: v for k, v in dict(checkpoint["hyper_parameters"]).items() if k not in ("_instantiator", "_class_path")}
    moved = set(LEGACY_MODULE_SETTINGS) | set(LEGACY_BACKBONE_SETTINGS)
    if not isinstance(saved.get("backbone"), str) or not moved & set(saved):
        if isinstance(saved.get("algorithm"), Mapping) and "class_path" in saved["algorithm"]:
            try:
                saved["algorithm"] = saved_algorithm_spec(saved["algorithm"])  # settings added since: their old value
            except ValueError:
                pass  # a learner that cannot be built: rebuilding the module refuses it, naming the file
        return saved
    try:
        algorithm, backbone = legacy_algorithm_spec(saved), legacy_backbone_spec(saved)
    except ValueError as error:
        raise DataError(f"checkpoint settings from an older medmeta cannot be translated: {error}") from None
    upgraded = {k: v for k, v in saved.items() if k not in moved}
    upgraded.update(algorithm=algorithm, backbone=backbone)
    return upgraded


def check_checkpoint(path: Path, hparams: Mapping[str, object] | None = None) -> dict:
    """Read ``path`` safely and, given this run's model ``hparams``, check it was trained for the same model shape.

    The learner must be the same class and the backbone the same class with the same settings.
    """
    checkpoint = read_checkpoint(path)
    if hparams is not None:
        saved = model_hparams(checkpoint)
        differs = [f"{k}={_shown(saved[k])} (this run: {_shown(hparams[k])})" for k in SHAPE_KEYS
                   if k in saved and k in hparams and _shape_of(k, saved[k]) != _shape_of(k, hparams[k])]  # fmt: skip
        if differs:
            raise DataError(f"checkpoint {path} was trained for a different model: {', '.join(differs)}")
    return checkpoint


def _shape_of(key: str, value: object) -> object:
    """What of a setting decides the model's weights: the learner's class (its settings may differ), all else as is."""
    if key == "algorithm" and isinstance(value, Mapping):
        return value.get("class_path")
    return value


def _shown(value: object) -> str:
    if isinstance(value, Mapping) and "class_path" in value:
        settings = ", ".join(f"{k}={v!r}" for k, v in (value.get("init_args") or {}).items())
        return f"{value['class_path']}({settings})"
    return repr(value)


def load_trained(path: Path) -> tuple[object, dict[str, object]]:
    """The ``FewShotModule`` of a checkpoint (CPU, eval mode) and the data module settings saved with it.

    The module's ``training_images`` is the record of the kinds of images it was trained on
    (:func:`medmeta.data.image_kinds.trained_kinds`), ``None`` for a checkpoint written before it was kept:
    nothing is known then.
    """
    from medmeta.data.image_kinds import TRAINING_IMAGES_KEY, trained_kinds
    from medmeta.module import FewShotModule

    checkpoint = read_checkpoint(path)
    hparams = model_hparams(checkpoint)
    try:
        module = FewShotModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
    except Exception as error:  # noqa: BLE001 - a state dict that does not fit its own hyperparameters
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no further detail"
        raise DataError(
            f"cannot load checkpoint {path}: its model cannot be rebuilt from it ({type(error).__name__}: {first_line})"
        ) from error
    module.training_images = trained_kinds(checkpoint.get(TRAINING_IMAGES_KEY))
    settings = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    return module.eval(), settings
