"""The adapted model as one standalone, non-transductive classifier (what ``diagnose --save-adapted`` saves).

:class:`AdaptedClassifier` maps images ``[B, C, *spatial]`` to logits ``[B, N]``; its ``state_dict``
holds everything adaptation produced (adapted weights, a fitted linear head or class prototypes,
frozen batch-norm statistics), and it is rebuilt from plain arguments (a backbone spec, the image
shape, the head), so a MONAI bundle config can name it as its ``network_def``.

Normalisation rule (non-transductive): every batch-norm layer is replaced by a
:class:`FixedBatchNorm` with fixed statistics, so a query's logits never depend on the other
images of its batch. The statistics are the ones medmeta's own query forward would use where it
keeps running statistics (``norm_mode: running``: the slot of the final inner step; a torch batch
norm in eval mode: its running statistics); otherwise (transductive batch norm) they are the
support set's batch statistics at the adapted weights, from one forward of the support images
(:meth:`AdaptedClassifier.calibrate`). Group and instance norm (per-sample statistics) are kept.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.flips import flip_averaged, flip_view_count
from medmeta.networks import build_backbone
from medmeta.networks.levels import check_levels, embedding
from medmeta.networks.norm import EpisodeBatchNorm, norm_kinds

HEAD_KINDS = ("backbone", "linear", "prototypes")
DISTANCES = ("squared_euclidean", "cosine")


def prototype_logits(query: Tensor, prototypes: Tensor, distance: str, temperature: float | Tensor) -> Tensor:
    """``-distance(query, prototype) / temperature``, ``[Q, N]``: squared Euclidean or ``1 - cos``."""
    if distance == "cosine":
        dist = 1.0 - F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).T
    else:
        dist = (query.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)
    return -dist / temperature


class FixedBatchNorm(nn.Module):
    """Batch norm with fixed per-channel statistics (``running_mean``, ``running_var``) and an affine weight.

    ``calibrating = True`` makes the next forwards record their batch's statistics (biased variance,
    as batch norm normalises with) and normalise with them; otherwise the stored ones are used.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.calibrating = False
        self.fixed = False  # statistics set from a checkpoint's running statistics (never recalibrated)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``[B, C, *spatial]`` with the stored statistics (or the batch's, while calibrating)."""
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.calibrating:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            with torch.no_grad():
                self.running_mean.copy_(mean.detach())
                self.running_var.copy_(var.detach())
        shape = (1, self.channels) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(self.running_var + self.eps) * self.weight
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


def _frozen(layer: nn.Module, running_step: int | None) -> FixedBatchNorm:
    """A :class:`FixedBatchNorm` with ``layer``'s affine weights; its running statistics if medmeta's query forward uses them."""
    channels = layer.channels if isinstance(layer, EpisodeBatchNorm) else layer.num_features
    fixed = FixedBatchNorm(channels, eps=layer.eps).to(next(layer.parameters(), torch.empty(0)).device)
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            fixed.weight.copy_(layer.weight)
        if getattr(layer, "bias", None) is not None:
            fixed.bias.copy_(layer.bias)
        if isinstance(layer, EpisodeBatchNorm) and layer.steps > 0 and running_step is not None:
            slot = layer._eval_slot(running_step)
            mean, var, fixed.fixed = layer.running_mean[slot], layer.running_var[slot], True
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None and not layer.training:
            mean, var, fixed.fixed = layer.running_mean, layer.running_var, True
        if fixed.fixed:
            fixed.running_mean.copy_(mean)
            fixed.running_var.copy_(var)
    return fixed


def freeze_batch_norms(model: nn.Module, running_step: int | None = None) -> int:
    """Replace every batch-norm layer of ``model`` in place by a :class:`FixedBatchNorm`; returns how many.

    ``running_step``: the inner step whose running-statistic slot medmeta's query forward uses
    (``None``: the model keeps no per-step statistics, or its queries use batch statistics).
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (EpisodeBatchNorm, nn.modules.batchnorm._BatchNorm))]  # fmt: skip
    for name, layer in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _frozen(layer, running_step))
    return len(targets)


class AdaptedClassifier(nn.Module):
    """A backbone with adapted weights, fixed batch-norm statistics and a head, as one classifier.

    Args:
        backbone: a backbone spec (short name, or ``{"class_path", "init_args"}``), built for the
            shape below with ``n_way = n_classes``; or an ``nn.Module`` used as it is (a learner's
            export hook passes a copy of its model).
        n_classes: N, the output width.
        head: ``{"kind": "backbone"}`` (logits are the backbone's output), ``{"kind": "linear",
            "feature_dim": D, "normalize": bool}`` (a linear layer on ``backbone.features``, the
            features optionally L2-normalised; ``"feature_levels": "all"`` puts it on every stage's
            features, :func:`medmeta.networks.levels.multi_level_features`) or ``{"kind":
            "prototypes", "feature_dim": D, "distance": ...}`` (``-distance / temperature`` to N
            class prototypes).
        in_channels, spatial_dims, image_size: the image shape (for building from a spec).

    ``head["query_flips"]`` (any kind): each image's prediction is the average of the class
    probabilities of its flips (the logits are their ``log``), as the learner predicted its queries.
    """

    def __init__(
        self, backbone: Mapping[str, Any] | str | nn.Module, *, n_classes: int, head: Mapping[str, Any] | None = None,
        in_channels: int = 1, spatial_dims: int = 2, image_size: int = 32,
    ) -> None:  # fmt: skip
        super().__init__()
        head = dict(head or {"kind": "backbone"})
        if head.get("kind") not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {head.get('kind')!r}")
        if head.get("feature_levels", "last") != "last" and head["kind"] == "backbone":
            raise ValueError("feature_levels applies to a linear or prototype head on the backbone's features")
        if head["kind"] == "prototypes" and head.get("distance") not in DISTANCES:
            raise ValueError(f"prototype distance must be one of {DISTANCES}, got {head.get('distance')!r}")
        if not isinstance(backbone, nn.Module):
            backbone = build_backbone(backbone, in_channels=in_channels, n_way=n_classes, spatial_dims=spatial_dims,
                                      image_size=image_size)  # fmt: skip
        check_levels(backbone, head.get("feature_levels", "last"))
        self.kind, self.n_classes, self.head_spec, self.spatial_dims = head["kind"], n_classes, head, spatial_dims
        if self.kind != "backbone":
            backbone.head = nn.Identity()  # the backbone's own head is unused: keep it out of the state dict
        freeze_batch_norms(backbone)
        self.backbone = backbone
        if self.kind == "linear":
            self.linear = nn.Linear(int(head["feature_dim"]), n_classes)
        elif self.kind == "prototypes":
            self.register_buffer("prototypes", torch.zeros(n_classes, int(head["feature_dim"])))
            self.register_buffer("temperature", torch.ones(()))

    def embed(self, x: Tensor) -> Tensor:
        """Features ``[B, D]``: ``backbone.features`` flattened, or every stage's (``feature_levels: all``)."""
        return embedding(self.backbone, self.backbone.features, x, self.head_spec.get("feature_levels", "last"))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, N]`` of images ``[B, C, *spatial]``; each row depends on its own image only."""
        if self.head_spec.get("query_flips"):
            return flip_averaged(self._logits, x)
        return self._logits(x)

    @property
    def backbone_calls(self) -> int:
        """Backbone forwards per :meth:`forward`: one, or one per flip view with ``query_flips`` (the image itself last)."""
        return flip_view_count(self.spatial_dims) if self.head_spec.get("query_flips") else 1

    def _logits(self, x: Tensor) -> Tensor:
        if self.kind == "backbone":
            return self.backbone(x)
        features = self.embed(x)
        if self.kind == "linear":
            return self.linear(F.normalize(features, dim=1) if self.head_spec.get("normalize") else features)
        return prototype_logits(features, self.prototypes, self.head_spec["distance"], self.temperature)

    @torch.no_grad()
    def calibrate(self, support_x: Tensor) -> Tensor:
        """Fix the statistics of every batch-norm layer not set from running statistics: the support set's, in one forward.

        Returns that forward's output (the backbone's logits, or the features).
        """
        layers = [m for m in self.modules() if isinstance(m, FixedBatchNorm) and not m.fixed]
        for layer in layers:
            layer.calibrating = True
        try:
            return self.backbone(support_x) if self.kind == "backbone" else self.embed(support_x)
        finally:
            for layer in layers:
                layer.calibrating = False

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments besides the backbone and image shape (for a bundle's ``network_def``)."""
        return {"n_classes": self.n_classes, "head": dict(self.head_spec)}


def exported_normalisation(network: nn.Module) -> str:
    """How ``network`` (an export) normalises: which fixed batch-norm statistics it holds, or its per-image norms."""
    layers = [m for m in network.modules() if isinstance(m, FixedBatchNorm)]
    if not layers:
        return f"{norm_kinds(network)} (per-image statistics; non-transductive)"
    source = ("the checkpoint's running statistics, as medmeta's own query forward uses them (norm_mode running)"
              if all(m.fixed for m in layers) else "the support set's batch statistics at the adapted weights")  # fmt: skip
    return f"batch norm with fixed statistics: {source} (non-transductive: each case is predicted from itself alone)"


def export_classifier(
    model: nn.Module, support_x: Tensor, *, n_classes: int, head: Mapping[str, Any] | None = None,
    params: Mapping[str, Tensor] | None = None, running_step: int | None = None,
) -> AdaptedClassifier:  # fmt: skip
    """A copy of ``model`` with ``params`` (adapted weights, by the model's parameter names) in place, as a classifier.

    Batch norm is frozen (see the module docstring): ``running_step`` is the inner step whose
    running-statistic slot the learner's query forward uses; the remaining layers are calibrated
    on ``support_x`` at the adapted weights. The head's own tensors are the caller's to fill
    (``linear``, ``prototypes``, ``temperature``). The result is in eval mode.
    """
    copied = copy.deepcopy(model)
    freeze_batch_norms(copied, running_step)
    network = AdaptedClassifier(copied, n_classes=n_classes, head=head, spatial_dims=support_x.dim() - 2)
    own = dict(network.backbone.named_parameters())
    unknown = sorted(set(params or {}) - set(own))
    if unknown:
        raise ValueError(f"adapted weights {unknown[:3]} are not parameters of {type(model).__name__}")
    with torch.no_grad():
        for name, value in (params or {}).items():
            own[name].copy_(value.detach())
    out = network.calibrate(support_x)
    if network.kind == "backbone" and out.shape[-1] != n_classes:
        raise ValueError(f"the adapted {type(model).__name__} gives {out.shape[-1]} logits per image, expected {n_classes}")
    return network.eval()
