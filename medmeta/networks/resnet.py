"""Residual backbones: the few-shot ResNet-12 (2D/3D) and torchvision's ResNet-18 (2D).

Both share the constructor arguments of the Conv-4 backbone, expose ``features`` (flattened ``[B, feature_dim]``),
``feature_dim`` and ``head``, and use normalisation without running statistics, so they run
under functional inner loops (``torch.func.functional_call``) with the statistics of each batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import nn
from torchvision.models import resnet18

from medmeta.networks.backbone import Backbone, NormName, norm_layer

logger = logging.getLogger(__name__)


class _ResNet12Block(nn.Module):
    """3x [conv 3x3, norm, LeakyReLU(0.1)] with a 1x1 conv + norm shortcut, then max-pool 2.

    As in MetaOptNet, the third activation comes after the residual addition.
    """

    def __init__(self, in_channels: int, out_channels: int, *, spatial_dims: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(3):
            layers += [
                conv(channels, out_channels, kernel_size=3, padding=1, bias=False),
                norm(out_channels),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            conv(in_channels, out_channels, kernel_size=1, bias=False),
            norm(out_channels),
        )
        self.act = nn.LeakyReLU(0.1)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, spatially halved (rounded up)."""
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class ResNet12(Backbone):
    """ResNet-12 of the few-shot literature (Oreshkin et al., 2018; Lee et al., 2019).

    Four residual blocks with max-pooling, global average pooling and a linear head. The
    literature uses widths 64-160-320-640; by default the widths are ``hidden_channels`` times
    (1, 2, 4, 8), so ``hidden_channels=64`` gives 64-128-256-512. DropBlock is not included.

    Args:
        hidden_channels: width of the first block; later blocks double it.
        norm: ``"batch"``, ``"group"`` or ``"instance"`` (batch norm with running statistics only with
            ``running_stat_steps``); instance norm needs ``image_size > 8`` (the last block normalises
            at side ``ceil(size / 8)``).
        widths: explicit block widths, e.g. ``(64, 160, 320, 640)``; overrides ``hidden_channels``.
        shape: ``in_channels``, ``n_way``, ``spatial_dims``, ``image_size`` (only checked against
            instance norm: the global pool makes the network independent of it),
            ``running_stat_steps`` and ``feature_levels``, as in :class:`~medmeta.networks.backbone.Backbone`.
    """

    def __init__(
        self, *, hidden_channels: int = 64, norm: NormName = "batch", widths: tuple[int, int, int, int] | None = None,
        **shape: Any,
    ) -> None:  # fmt: skip
        super().__init__(**shape)
        if widths is None:
            widths = (hidden_channels, 2 * hidden_channels, 4 * hidden_channels, 8 * hidden_channels)
        widths = tuple(int(w) for w in widths)  # type: ignore[assignment]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive integers, got {widths}")
        _check_instance_norm_size(norm, self.image_size, last_norm_side=-(-self.image_size // 8), name="ResNet12")
        blocks: list[nn.Module] = []
        channels = self.in_channels
        for width in widths:
            blocks.append(_ResNet12Block(channels, width, spatial_dims=self.spatial_dims, norm=lambda c: self.norm_layer(norm, c)))
            channels = width
        pool = Pool[Pool.ADAPTIVEAVG, self.spatial_dims](1)
        self.set_features(nn.Sequential(*blocks, pool, nn.Flatten()), widths[-1], stage_channels=widths[:3])
        for module in self.features.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")

    def last_block_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the last residual block."""
        return ("features.3.",)

    def stage_names(self) -> tuple[str, ...]:
        """The residual blocks before the last, whose outputs multi-level features read."""
        return ("features.0", "features.1", "features.2")

class ResNet18(Backbone):
    """torchvision's ResNet-18 (never downloaded), adapted to few-shot diagnosis, 2D only.

    ``features`` is the torchvision trunk's children in sequence (their names kept) with ``fc``
    replaced by an identity (so it ends with the global average pool and flatten, ``[B, 512]``);
    ``head`` is ``Linear(512, n_way)``. The first conv takes ``in_channels`` and every BatchNorm2d
    becomes the medmeta norm choice.

    Args:
        hidden_channels: accepted like the other backbones'; torchvision's widths (64-128-256-512)
            are fixed, so other values are ignored with a warning.
        norm: ``"batch"``, ``"group"`` or ``"instance"`` (batch norm with running statistics only with
            ``running_stat_steps``); instance norm needs ``image_size > 32`` (``layer4`` runs at side
            ``ceil(size / 32)``).
        weights_path: optional local state-dict file (torchvision keys, or this model's
            ``features.`` keys) loaded into the trunk; keys absent from the trunk or with other
            shapes (``fc``, a first conv with other channels, running statistics) are skipped
            with a logged warning.
        shape: ``in_channels``, ``n_way``, ``spatial_dims`` (must be 2), ``image_size`` (only checked
            against instance norm), ``running_stat_steps`` and ``feature_levels``, as in
            :class:`~medmeta.networks.backbone.Backbone`.
    """

    def __init__(
        self, *, hidden_channels: int = 64, norm: NormName = "batch", weights_path: str | None = None, **shape: Any
    ) -> None:  # fmt: skip
        super().__init__(**shape)
        if self.spatial_dims != 2:
            raise ValueError(
                f"ResNet18 is 2D only (torchvision), got spatial_dims={self.spatial_dims}; use ResNet12 for volumes"
            )
        norm_layer(norm, 64, 2)  # fail early with a clear message on an unknown norm
        _check_instance_norm_size(norm, self.image_size, last_norm_side=-(-self.image_size // 32), name="ResNet18")
        if hidden_channels != 64:
            logger.warning("ResNet18 ignores hidden_channels=%d: torchvision widths are fixed", hidden_channels)
        trunk = resnet18(weights=None, norm_layer=lambda channels: self.norm_layer(norm, channels))
        trunk.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        trunk.fc = nn.Identity()
        # torchvision's forward as a sequence of the same named children (the weights keep their names)
        children = [*trunk.named_children()]
        sequential = nn.Sequential(OrderedDict([*children[:-1], ("flatten", nn.Flatten()), children[-1]]))
        self.set_features(sequential, 512, stage_channels=(64, 128, 256))
        if weights_path is not None:
            self.load_trunk_weights(weights_path)

    def load_trunk_weights(self, weights_path: str | Path) -> list[str]:
        """Load a local state dict into ``features``; returns (and logs) the skipped keys."""
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"ResNet18 weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
        own = self.features.state_dict()
        loadable: dict[str, torch.Tensor] = {}
        skipped: list[str] = []
        for key, value in state.items():
            name = key.removeprefix("features.")
            if name in own and isinstance(value, torch.Tensor) and value.shape == own[name].shape:
                loadable[name] = value
            else:
                skipped.append(key)
        missing = sorted(set(own) - set(loadable))
        self.features.load_state_dict(loadable, strict=False)
        if skipped or missing:
            logger.warning(
                "ResNet18 weights from %s: skipped %d keys %s; %d trunk keys left at initialisation %s",
                path, len(skipped), skipped, len(missing), missing,
            )
        return skipped

    def last_block_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the last residual stage (``layer4``)."""
        return ("features.layer4.",)

    def stage_names(self) -> tuple[str, ...]:
        """The residual stages before the last, whose outputs multi-level features read."""
        return ("features.layer1", "features.layer2", "features.layer3")


def _check_instance_norm_size(norm: NormName, image_size: int, *, last_norm_side: int, name: str) -> None:
    """Instance norm over a single spatial element is undefined: refuse it at construction."""
    if norm == "instance" and last_norm_side < 2:
        raise ValueError(
            f"{name} with instance norm needs a larger image_size than {image_size}: its last norm "
            "layer would see a single spatial element; use norm='group' or 'batch', or larger images"
        )

