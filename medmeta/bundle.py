"""Adapted models as MONAI bundles: written by ``diagnose --save-adapted``, read by ``medmeta predict`` and MONAI.

A bundle folder holds::

    configs/inference.json   network_def (a medmeta class and plain arguments) and MONAI's usual keys
    configs/metadata.json    class names (the output channels), input spec, intensity settings,
                             normalisation, medmeta version, learner, support-set counts per class,
                             the kinds of images the model was trained on (``training_images``:
                             format family -> native channel counts; absent when not known), the
                             support cases' content hashes (``support_sha256``), and the SHA-256 of
                             the weights file and of the settings that make a prediction (``saved_sha256``)
    models/model.pt          the network's state dict (tensors only: torch.load(..., weights_only=True))
    docs/README.md           the same in words, and how to load it

MONAI users load it with ``monai.bundle.ConfigParser`` (instantiate ``network_def``, then
``load_state_dict`` from ``models/model.pt``). :func:`load_bundle` does the same without
evaluating any expression from the files: it builds ``network_def`` only when its ``_target_`` is a
medmeta class, from plain arguments. Nothing in a bundle names a file, a folder or a patient:
:func:`save_bundle` refuses a string that looks like a path. :func:`load_bundle` refuses a bundle edited
by hand (its ``saved_sha256`` no longer matches, duplicate class names, a ``channel_def`` that disagrees
with ``class_names``, an invalid window or preset); a bundle written before ``saved_sha256`` loads with a warning.

Why this module is longer than 300 lines: writing, checking and reading a bundle are one file format,
and its refusals (paths, expressions, settings that disagree) are easiest to check read together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import medmeta
from medmeta.adapted import AdaptedClassifier
from medmeta.checkpoints import non_finite, weights_problem
from medmeta.errors import DataError
from medmeta.data.image_kinds import kinds_text
from medmeta.data.presets import Intensity
from medmeta.plugins import import_object

logger = logging.getLogger(__name__)

INFERENCE, METADATA, WEIGHTS = Path("configs/inference.json"), Path("configs/metadata.json"), Path("models/model.pt")
README = Path("docs/README.md")
IMAGE_SETTINGS = ("image_size", "window", "preset", "spatial_dims", "in_channels", "spacing", "roi_size")
BUNDLE_VERSION = "0.1.0"
SAVED_SHA256 = "saved_sha256"  # metadata.json: {what: sha256} of the weights file and each setting (see _fingerprint)
PATH_SUFFIXES = (".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npz", ".ckpt", ".pt", ".csv")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: the network (eval mode, CPU, non-transductive), its class names, image settings and metadata."""

    network: nn.Module  # images [B, C, *spatial] -> logits [B, N]
    class_names: list[str]  # column order of the logits
    image_settings: dict[str, object]  # the keyword arguments of medmeta.data.loading.transform_images besides records/source
    metadata: dict[str, object]  # the parsed configs/metadata.json


def save_bundle(
    out: Path, network: nn.Module, network_def: Mapping[str, Any], class_names: list[str],
    image_settings: Mapping[str, object], metadata_extra: Mapping[str, object],
) -> Path:  # fmt: skip
    """Write ``network`` as a MONAI bundle in the new folder ``out`` and check that it loads back to the same logits.

    ``network_def`` is ``{"_target_": "<medmeta class path>", ...plain arguments}`` building a
    network whose state dict takes ``network``'s; ``image_settings`` are the arguments of
    ``transform_images``; ``metadata_extra`` adds keys to ``metadata.json`` (no paths, no patient data).
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"bundle folder {out} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    settings = {key: _plain(image_settings.get(key)) for key in IMAGE_SETTINGS}
    inference, metadata = inference_config(network_def, settings), _metadata(class_names, settings, metadata_extra)
    _refuse_paths({"network_def": network_def, "metadata": metadata})
    created = not out.exists()
    try:
        for relative in (INFERENCE, METADATA, WEIGHTS, README):
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in network.state_dict().items()}, out / WEIGHTS)
        metadata[SAVED_SHA256] = _fingerprint(out, inference, metadata)
        (out / INFERENCE).write_text(json.dumps(inference, indent=2) + "\n")
        (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        (out / README).write_text(readme(metadata))
        _check_reproduces(network, load_bundle(out).network, settings)
    except BaseException:
        for part in [out] if created else [out / p.parts[0] for p in (INFERENCE, WEIGHTS, README)]:
            shutil.rmtree(part, ignore_errors=True)
        raise
    return out


def network_definition(
    network: AdaptedClassifier, backbone: Mapping[str, Any], image_settings: Mapping[str, object]
) -> dict[str, Any]:  # fmt: skip
    """The ``network_def`` that rebuilds ``network`` (a learner's export) from its backbone spec and the image shape.

    Backbone settings naming a file (``*path``, such as a ``weights_path``) are dropped: every
    weight comes from ``models/model.pt``.
    """
    init_args = {k: (None if k.endswith("path") else v) for k, v in (backbone.get("init_args") or {}).items()}
    return {
        "_target_": f"{AdaptedClassifier.__module__}.{AdaptedClassifier.__name__}",
        "backbone": {"class_path": backbone["class_path"], "init_args": init_args},
        **{k: int(image_settings[k]) for k in ("in_channels", "spatial_dims", "image_size")},
        **network.arguments(),
    }


def load_bundle(folder: Path) -> Bundle:
    """The bundle in ``folder``; a ``DataError`` naming the folder and the reason on any problem."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"bundle {folder}: not a folder")
    missing = [str(p) for p in (INFERENCE, METADATA, WEIGHTS) if not (folder / p).is_file()]
    if missing:
        raise DataError(
            f"bundle {folder}: missing {', '.join(missing)} (not a bundle written by medmeta diagnose --save-adapted?)"
        )
    inference, metadata = _read_json(folder, INFERENCE), _read_json(folder, METADATA)
    for key, where in (("network_def", inference), ("class_names", metadata), ("image_settings", metadata)):
        if key not in where:
            raise DataError(f"bundle {folder}: no {key!r} in {INFERENCE if where is inference else METADATA}")
    names = metadata["class_names"]
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise DataError(f"bundle {folder}: class_names must be a list of at least 2 names, got {names!r}")
    if len(set(names)) < len(names):
        raise DataError(f"bundle {folder}: class_names in {METADATA} name a class twice: {names!r}")
    channel_def = metadata.get("network_data_format")
    for key in ("outputs", "pred", "channel_def"):
        channel_def = channel_def.get(key) if isinstance(channel_def, Mapping) else None
    if channel_def is not None and channel_def != {str(k): name for k, name in enumerate(names)}:
        raise DataError(f"bundle {folder}: {METADATA}'s network_data_format channel_def {channel_def!r} disagrees with "
                        f"its class_names {names!r}")  # fmt: skip
    network = _build(folder, inference["network_def"])
    try:
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign weights file
        raise DataError(f"bundle {folder}: {WEIGHTS} cannot be read as a state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, Mapping) and (broken := non_finite(state)):
        raise DataError(f"bundle {folder}: {WEIGHTS}: {weights_problem(broken)}")
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"bundle {folder}: {WEIGHTS} does not fit network_def ({first})") from None
    width = getattr(network, "n_classes", len(names))
    if width != len(names):
        raise DataError(f"bundle {folder}: the network has {width} outputs but metadata names {len(names)} classes")
    settings = _image_settings(folder, metadata["image_settings"], inference["network_def"])
    _check_fingerprint(folder, inference, metadata)
    for key in ("window", "spacing", "roi_size"):
        if settings.get(key) is not None:
            settings[key] = tuple(settings[key])
    return Bundle(network.eval(), list(names), settings, metadata)


def _fingerprint(folder: Path, inference: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, str]:
    """SHA-256 of the weights file's bytes and of each setting that makes a prediction (its sorted-key JSON)."""
    settings = {key: metadata.get(key) for key in ("class_names", "image_settings")}
    settings |= {key: inference.get(key) for key in ("network_def", "preprocessing")}
    described = {key: json.dumps(value, sort_keys=True).encode() for key, value in settings.items()}
    return {str(WEIGHTS): hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest(),
            **{key: hashlib.sha256(text).hexdigest() for key, text in described.items()}}  # fmt: skip


def _check_fingerprint(folder: Path, inference: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Refuse a bundle whose weights or settings are not those it was saved with; warn when it records no hashes."""
    saved = metadata.get(SAVED_SHA256)
    if saved is None:
        logger.warning("bundle %s was saved before medmeta recorded its hashes: edits to its weights or settings "
                       "cannot be detected", folder)  # fmt: skip
        return
    now = _fingerprint(folder, inference, metadata)
    if not isinstance(saved, Mapping) or set(saved) != set(now):
        raise DataError(f"bundle {folder}: {SAVED_SHA256} in {METADATA} was edited (it must name {', '.join(now)})")
    for key, digest in now.items():
        if saved[key] == digest:
            continue
        if key == str(WEIGHTS):
            raise DataError(f"bundle {folder}: {WEIGHTS} is not the file this bundle was saved with (edited, or "
                            "copied from another bundle); save it again with diagnose --save-adapted")  # fmt: skip
        where = METADATA if key in ("class_names", "image_settings") else INFERENCE
        raise DataError(f"bundle {folder}: {key} in {where} was changed after the bundle was saved (edited by hand?); "
                        "save it again with diagnose --save-adapted")  # fmt: skip


def _image_settings(folder: Path, settings: object, network_def: Mapping[str, Any]) -> dict[str, object]:
    """``metadata.json``'s image settings, checked for the keys the load transforms need and against ``network_def``."""
    if not isinstance(settings, Mapping):
        raise DataError(f"bundle {folder}: image_settings in {METADATA} must be a JSON object, got {settings!r}")
    ranges = {"spatial_dims": (2, 3), "in_channels": (1, 64), "image_size": (1, 4096)}
    for key, (low, high) in ranges.items():
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise DataError(f"bundle {folder}: image_settings.{key} in {METADATA} must be an integer from {low} to "
                            f"{high}, got {value!r}")  # fmt: skip
        if key in network_def and network_def[key] != value:
            raise DataError(f"bundle {folder}: image_settings.{key} = {value} in {METADATA}, but the network in "
                            f"{INFERENCE} was built for {network_def[key]!r}")  # fmt: skip
    try:
        Intensity(preset=settings.get("preset"), window=settings.get("window"))
    except (ValueError, TypeError) as error:
        raise DataError(f"bundle {folder}: image_settings in {METADATA} have an invalid intensity setting (window "
                        f"{settings.get('window')!r}, preset {settings.get('preset')!r}): {error}") from None
    return dict(settings)


def inference_config(network_def: Mapping[str, Any], image_settings: Mapping[str, object]) -> dict[str, Any]:
    """``configs/inference.json``: MONAI's standard keys around ``network_def``; preprocessing is medmeta's load transforms.

    Every key is one the MONAI bundle tools build with ``ConfigParser`` (``network``, ``preprocessing``
    of ``{"image": path}``, ``inferer``, ``postprocessing`` of ``{"pred": logits}``); no dataset or
    evaluator is named, since a cohort is ``medmeta predict``'s (MONAI's evaluator needs pytorch-ignite).
    """
    transforms = {k: v for k, v in image_settings.items() if v is not None or k in ("window", "preset")}
    return {
        "imports": ["$import torch", "$import medmeta"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network_def": dict(network_def),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "medmeta.data.transforms.load_transforms", **transforms},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    }


def readme(metadata: Mapping[str, Any]) -> str:
    """``docs/README.md``: what the bundle predicts, from what input, how it normalises, and how to load it."""
    image = metadata["network_data_format"]["inputs"]["image"]
    lines = [
        f"# {metadata['task']}", "",
        "For research use only; not for diagnostic use.", "",
        f"- classes (logit order): {', '.join(metadata['class_names'])}",
        f"- input: {image['num_channels']} channel(s), {' x '.join(map(str, image['spatial_shape']))}, values in [0, 1] "
        "after the bundle's `preprocessing` (medmeta's load transforms)",
        *(f"- {key.replace('_', ' ')}: {metadata[key]}" for key in ("algorithm", "adaptation", "normalisation", "support_counts")
          if key in metadata),
        *([f"- trained on: {kinds_text(metadata['training_images'])} images (medmeta predict warns on other kinds)"]
          if isinstance(metadata.get("training_images"), Mapping) else []),
        f"- medmeta {metadata['medmeta_version']}", "",
        "Load with medmeta: `medmeta.bundle.load_bundle(folder)`, or run `medmeta predict --bundle FOLDER --input ...`.",
        "Load with MONAI: `ConfigParser().read_config('configs/inference.json')`, set `bundle_root`, build `network_def`, "
        "then `load_state_dict(torch.load('models/model.pt', weights_only=True))`.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _metadata(class_names: list[str], settings: Mapping[str, object], extra: Mapping[str, object]) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's metadata keys and network_data_format, then medmeta's."""
    import monai

    channels, side, dims = int(settings["in_channels"]), int(settings["image_size"]), int(settings["spatial_dims"])
    names = [str(n) for n in class_names]
    return {
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: "adapted to a new diagnostic task with medmeta diagnose --save-adapted"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medmeta": medmeta.__version__},
        "task": f"few-shot classification into {len(names)} diagnoses: {', '.join(names)}",
        "description": "A medmeta model adapted from a few labelled cases per diagnosis; outputs one logit per diagnosis.",
        "authors": "medmeta diagnose",
        "copyright": "the adapting user",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "num_channels": channels, "spatial_shape": [side] * dims,
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"},
            }},
            "outputs": {"pred": {
                "type": "logits", "format": "classes", "num_channels": len(names), "spatial_shape": [1],
                "dtype": "float32", "value_range": [], "is_onehot": False,
                "channel_def": {str(k): name for k, name in enumerate(names)},
            }},
        },  # fmt: skip
        "medmeta_version": medmeta.__version__,
        "class_names": names,
        "image_settings": dict(settings),
        **dict(extra),
    }


def _build(folder: Path, network_def: object) -> nn.Module:
    """``network_def`` instantiated from plain arguments; only medmeta classes, no expressions."""
    if not isinstance(network_def, Mapping) or not isinstance(network_def.get("_target_"), str):
        raise DataError(f"bundle {folder}: network_def must be a mapping with a '_target_' class path")
    target = network_def["_target_"]
    arguments = {k: v for k, v in network_def.items() if k != "_target_"}
    if not target.startswith("medmeta.") or _has_expression(arguments):
        raise DataError(f"bundle {folder}: medmeta builds only medmeta networks from plain arguments, got {target!r}")
    try:
        cls = import_object(target, what="network_def _target_")
        network = cls(**arguments)
    except Exception as error:  # noqa: BLE001 - any failure to rebuild the network is the bundle's problem
        raise DataError(f"bundle {folder}: network_def cannot be built ({type(error).__name__}: {error})") from None
    if not isinstance(network, nn.Module):
        raise DataError(f"bundle {folder}: network_def {target!r} is not a torch module")
    return network


def _check_reproduces(network: nn.Module, loaded: nn.Module, settings: Mapping[str, object]) -> None:
    """Raise unless the reloaded network gives exactly the saved one's logits on a fixed probe batch."""
    shape = (2, int(settings["in_channels"]), *[int(settings["image_size"])] * int(settings["spatial_dims"]))
    probe = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = network.eval()(probe), loaded(probe)
    if not bool(torch.isfinite(expected).all()):
        raise DataError("the adapted model gives NaN or infinite outputs (its adaptation diverged); nothing was saved: "
                        "try fewer --steps, or check the support images")  # fmt: skip
    if not torch.equal(expected, got):
        difference = float((expected - got).abs().max())
        raise RuntimeError(f"the saved bundle does not reproduce the adapted model (max difference {difference:.3g})")


def _read_json(folder: Path, relative: Path) -> dict[str, Any]:
    try:
        value = json.loads((folder / relative).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"bundle {folder}: {relative} is not readable JSON ({error})") from None
    if not isinstance(value, dict):
        raise DataError(f"bundle {folder}: {relative} must hold a JSON object")
    return value


def _has_expression(value: object) -> bool:
    """Whether a MONAI config expression or reference (``$...``, ``@...``, ``%...``) occurs in ``value``."""
    if isinstance(value, str):
        return value.startswith(("$", "@", "%"))
    if isinstance(value, Mapping):
        return any(_has_expression(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_expression(v) for v in value)
    return False


def _refuse_paths(value: object, where: str = "") -> None:
    """Raise ``ValueError`` on any string that looks like a file or folder path (a bundle never names one)."""
    if isinstance(value, str):
        if any(_path_like(token) for token in value.split()):
            raise ValueError(f"bundle metadata {where or 'value'} = {value!r} looks like a path; bundles never name files")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_paths(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_paths(item, f"{where}[{i}]")


def _path_like(token: str) -> bool:
    """A word that names a file or folder: absolute, home- or dot-relative, a drive, or with an image/checkpoint suffix."""
    token = token.strip("'\"()[],;")
    if token.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", token):
        return True
    return token.lower().endswith(PATH_SUFFIXES)


def _plain(value: object) -> object:
    """Tuples as lists, so that the value is JSON."""
    return list(value) if isinstance(value, tuple) else value
