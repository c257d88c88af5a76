"""Backbones for few-shot classification."""

from medmeta.networks.conv4 import Conv4, get_backbone

__all__ = ["Conv4", "get_backbone"]
