"""Pretrained initialisation: a backbone's weights from a file the user has (never downloaded).

The file is a medmeta checkpoint (e.g. of a fine-tune pre-training run: its backbone, the
``algorithm.model.*`` weights, is taken) or a plain state dict with torchvision, MONAI or
MedicalNet/RadImageNet-style keys (a key is matched as it is, else without wrapper prefixes such as
``module.``, each also under the backbone's ``features.``). The classification head (the backbone's
``head``, else its last linear layer) is never loaded: it is re-initialised for the episodes' ``n_way``. Running batch-norm statistics in the file
are left out when the backbone keeps none. Anything else that does not fit (a backbone weight the
file lacks, a file weight the backbone lacks, a shape that differs) is a ``DataError`` listing them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medmeta.errors import DataError

logger = logging.getLogger(__name__)

CHECKPOINT_BACKBONE = "algorithm.model."  # where a medmeta checkpoint keeps the backbone's weights
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.")  # DataParallel, Lightning, ...
# heads a file may hold that the backbone lacks (another library's, or ImageNet's 1000 classes): left out
HEAD_NAMES = ("head", "fc", "_fc", "last_linear", "classifier", "classification_head", "class_layers", "pretrain_head")
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
SHOWN = 8  # names listed per kind of problem


@dataclass(frozen=True)
class Initialisation:
    """What :func:`initialise_backbone` loaded: counts of weights loaded, head weights re-initialised, statistics left out."""

    loaded: int
    head: int
    statistics: int


def read_weights(path: Path) -> dict[str, Tensor]:
    """The backbone weights in ``path``: a medmeta checkpoint's backbone, or a state dict (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--model.init_from {path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a pickle with code, a damaged file, not a torch file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--model.init_from {path}: not a readable weights file ({first})") from error
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        state = content["state_dict"]
        if any(str(k).startswith(CHECKPOINT_BACKBONE) for k in state):  # a medmeta checkpoint: its backbone only
            state = {k[len(CHECKPOINT_BACKBONE) :]: v for k, v in state.items() if k.startswith(CHECKPOINT_BACKBONE)}
    elif isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        state = content["model"]
    else:
        state = content
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"--model.init_from {path}: expected a state dict of tensors (or a checkpoint holding one)")
    return {str(k): v for k, v in state.items()}


def initialise_backbone(model: nn.Module, path: Path) -> Initialisation:
    """Load the weights of ``path`` into ``model`` (all but its head); ``DataError`` listing what does not fit."""
    own = model.state_dict()
    heads = head_prefixes(model)
    is_head = lambda name: _is_head(name) or name.startswith(heads)  # noqa: E731
    matched, head, statistics, unexpected, mismatched = {}, 0, 0, [], []
    for key, value in read_weights(path).items():
        name = _own_name(key, own)
        if is_head(name or _unwrapped(key)):
            head += 1
        elif name is None:
            if key.rsplit(".", 1)[-1] in STATISTICS:
                statistics += 1  # the backbone keeps no running statistics (medmeta's transductive batch norm)
            else:
                unexpected.append(key)
        elif own[name].shape != value.shape:
            mismatched.append(f"{name} {tuple(value.shape)} in the file, {tuple(own[name].shape)} in the backbone")
        else:
            matched[name] = value
    missing = [n for n in own if n not in matched and not is_head(n) and n.rsplit(".", 1)[-1] not in STATISTICS]
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:SHOWN])}{', ...' if len(names) > SHOWN else ''}"
        for label, names in (("missing from the file", missing), ("unexpected in the file", unexpected),
                             ("shape mismatches", mismatched))
        if names
    ]  # fmt: skip
    if problems:
        raise DataError(f"--model.init_from {path} does not fit the {type(model).__name__} backbone: " + "; ".join(problems))
    with torch.no_grad():
        for name, value in matched.items():
            own[name].copy_(value.to(own[name].dtype))
    logger.info(
        "initialised %d backbone tensors from %s; the head (%s) keeps its new initialisation (%d head tensors in the "
        "file left out)%s", len(matched), path, ", ".join(sorted(p.rstrip(".") for p in heads)) or "none found", head,
        f"; {statistics} running statistics left out" if statistics else "",
    )  # fmt: skip
    return Initialisation(len(matched), head, statistics)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state-dict prefixes of ``model``'s classification head: its ``head``, else its last linear layer.

    Found on the model itself, so a head of any name (MONAI's ``fc``, ``_fc``, ``last_linear``,
    ``class_layers.out``) is re-initialised rather than loaded from a file trained for other classes.
    """
    if isinstance(getattr(model, "head", None), nn.Module):
        return ("head.",)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]
    return (f"{linears[-1]}.",) if linears else ()


def _unwrapped(key: str) -> str:
    """``key`` without the wrapper prefixes of DataParallel, Lightning and similar."""
    return _unwrappings(key)[-1]


def _unwrappings(key: str) -> list[str]:
    """``key``, then ``key`` less each wrapper prefix in turn (``module.model.x`` -> ``model.x`` -> ``x``)."""
    forms = [key]
    while prefix := next((p for p in WRAPPER_PREFIXES if forms[-1].startswith(p)), None):
        forms.append(forms[-1][len(prefix) :])
    return forms


def _own_name(key: str, own: Mapping[str, Tensor]) -> str | None:
    """The backbone's name for a file key: the key itself, else without wrapper prefixes, each also under ``features.``.

    The exact key comes first, so a backbone whose own names start like a wrapper (``net.``,
    ``encoder.``) takes a file of its own kind as it is.
    """
    for form in _unwrappings(key):
        for name in (form, f"features.{form}"):
            if name in own:
                return name
    return None


def _is_head(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in HEAD_NAMES or (parts[0] == "features" and len(parts) > 1 and parts[1] in HEAD_NAMES)