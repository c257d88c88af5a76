"""Backbones: medmeta's own (Conv4, ResNet-12, ResNet-18) by short name, any other ``nn.Module`` by class path.

The feature interface a backbone offers decides which meta-learners can use it:

* every learner: ``model(x)`` maps images ``[B, C, *spatial]`` to ``n_way`` logits ``[B, n_way]``;
* ANIL, ProtoNet, MANN and the fine-tune baseline also need ``model.features(x)`` (the embedding,
  ``[B, model.feature_dim]``) and ``model.head`` (an ``nn.Linear``) with ``model(x) == model.head(model.features(x))``;
* the fine-tune baseline's ``finetune_scope: last_block`` needs ``model.last_block_prefixes()``.

medmeta passes the episode shape to the arguments of the backbone's ``__init__`` named in
:data:`SHAPE_ARGUMENTS` (from the data; never set them in ``init_args``); any other setting, such
as a MONAI network's ``out_channels``, goes in ``init_args``, and :func:`build_backbone` checks the
output width on a dummy batch. This registry is the only place besides each backbone's own file
that names a backbone.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medmeta.networks.backbone import Backbone
from medmeta.networks.conv4 import Conv4
from medmeta.networks.resnet import ResNet12, ResNet18
from medmeta.plugins import init_parameters, resolve, spec_of

SHORT_NAMES: dict[str, type[nn.Module]] = {"conv4": Conv4, "resnet12": ResNet12, "resnet18": ResNet18}
BACKBONES = SHORT_NAMES
DEFAULT_BACKBONE = "conv4"
SHAPE_ARGUMENTS = ("in_channels", "n_way", "spatial_dims", "image_size", "running_stat_steps")
LEGACY_MODULE_SETTINGS = ("hidden_channels", "norm")  # module settings before plug-ins, now the backbone's


def backbone_settings(cls: type) -> dict[str, inspect.Parameter]:
    """A backbone class's own settings: the arguments it accepts less the :data:`SHAPE_ARGUMENTS`."""
    return {name: p for name, p in init_parameters(cls).items() if name not in SHAPE_ARGUMENTS}


def resolve_backbone(spec: object) -> tuple[type[nn.Module], dict[str, Any]]:
    """The backbone class of ``spec`` (short name, class path, class, mapping or partial) and its complete settings.

    Shape arguments in ``spec`` are left out of the settings (the command line lists them with their
    defaults): medmeta sets them from the data (:func:`build_backbone`).
    """
    return resolve(_split_shape(spec)[0], kind="backbone", short_names=SHORT_NAMES, base=nn.Module,
                   parameters=backbone_settings)  # fmt: skip


def _split_shape(spec: object) -> tuple[object, dict[str, Any]]:
    """``spec`` without shape arguments, and the shape arguments it gave."""
    if isinstance(spec, functools.partial):
        given = {k: v for k, v in spec.keywords.items() if k in SHAPE_ARGUMENTS}
        rest = {k: v for k, v in spec.keywords.items() if k not in SHAPE_ARGUMENTS}
        return functools.partial(spec.func, *spec.args, **rest), given
    if isinstance(spec, Mapping):
        init_args = {**(spec.get("init_args") or {}), **{k: v for k, v in spec.items() if k not in ("class_path", "init_args")}}
        given = {k: v for k, v in init_args.items() if k in SHAPE_ARGUMENTS}
        rest = {k: v for k, v in init_args.items() if k not in SHAPE_ARGUMENTS}
        return {"class_path": spec.get("class_path"), "init_args": rest}, given
    return spec, {}


def backbone_spec(spec: object) -> dict[str, Any]:
    """``spec`` as the plain ``{"class_path", "init_args"}`` mapping that checkpoints store."""
    return spec_of(*resolve_backbone(spec))


def build_backbone(
    spec: object, *, in_channels: int, n_way: int, spatial_dims: int, image_size: int, running_stat_steps: int = 0
) -> nn.Module:  # fmt: skip
    """The backbone of ``spec`` for this episode shape, checked to give ``n_way`` logits per image."""
    cls, settings = resolve_backbone(spec)
    shape = {"in_channels": in_channels, "n_way": n_way, "spatial_dims": spatial_dims, "image_size": image_size,
             "running_stat_steps": running_stat_steps}  # fmt: skip
    accepted = init_parameters(cls)
    for name, value in _split_shape(spec)[1].items():
        default = accepted[name].default if name in accepted else inspect.Parameter.empty
        if value != default and value != shape[name]:
            warnings.warn(
                f"backbone {cls.__name__}: {name}={value!r} is replaced by {shape[name]!r} from the data "
                f"(medmeta sets {', '.join(SHAPE_ARGUMENTS)} itself)", stacklevel=2,
            )  # fmt: skip
    if running_stat_steps and "running_stat_steps" not in accepted:
        raise ValueError(
            f"norm_mode='running' needs a backbone with medmeta's per-step batch norm (running_stat_steps); "
            f"{cls.__name__} has none: use norm_mode='transductive'"
        )
    model = cls(**settings, **{k: v for k, v in shape.items() if k in accepted})
    check_output(model, in_channels=in_channels, n_way=n_way, spatial_dims=spatial_dims, image_size=image_size)
    return model


def check_output(model: nn.Module, *, in_channels: int, n_way: int, spatial_dims: int, image_size: int) -> None:
    """Raise ``ValueError`` unless ``model`` maps two images of the episode shape to ``[2, n_way]`` logits.

    Runs in eval mode without gradients, so no running statistic changes.
    """
    parameter = next(model.parameters(), None)
    x = torch.zeros(2, in_channels, *[image_size] * spatial_dims, dtype=parameter.dtype if parameter is not None else None)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as error:  # noqa: BLE001 - any failure of a user's network on the episode shape
        raise ValueError(
            f"backbone {type(model).__name__} cannot process images of shape {tuple(x.shape[1:])}: "
            f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        ) from error
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_way):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"backbone {type(model).__name__} gives {got} for 2 images of shape {tuple(x.shape[1:])}; "
            f"{n_way}-way episodes need logits [2, {n_way}] (set its number of output classes in init_args)"
        )


def legacy_backbone_spec(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone spec of a checkpoint's flat hyperparameters from before plug-ins (``backbone: conv4`` ...)."""
    settings = {name: saved[name] for name in LEGACY_MODULE_SETTINGS if name in saved}
    return backbone_spec({"class_path": saved.get("backbone", DEFAULT_BACKBONE), "init_args": settings})


def get_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build one of medmeta's backbones by short name with explicit keyword arguments (no checks)."""
    cls, _ = resolve_backbone(name)
    return cls(**kwargs)


__all__ = [
    "BACKBONES", "DEFAULT_BACKBONE", "Backbone", "Conv4", "ResNet12", "ResNet18", "SHAPE_ARGUMENTS", "SHORT_NAMES", "backbone_settings",
    "backbone_spec", "build_backbone", "check_output", "get_backbone", "legacy_backbone_spec", "resolve_backbone",
]  # fmt: skip
