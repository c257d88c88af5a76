"""Backbones for few-shot classification, chosen by name."""

from __future__ import annotations

from torch import nn

from medmeta.networks.conv4 import Conv4
from medmeta.networks.resnet import RESNET_BACKBONES, ResNet12, ResNet18

BACKBONES: dict[str, type[nn.Module]] = {"conv4": Conv4, **RESNET_BACKBONES}


def get_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build a backbone by name: ``"conv4"``, ``"resnet12"`` or ``"resnet18"`` (same keyword arguments)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


__all__ = ["BACKBONES", "Conv4", "ResNet12", "ResNet18", "get_backbone"]
