"""Meta-SGD (Li et al., 2017): MAML with a learned inner learning rate for every weight element."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from medmeta.algorithms.maml import MAML, Params


def lr_key(name: str) -> str:
    """The ``ParameterDict`` key of a parameter's learning rates (``'.'`` is not allowed in keys)."""
    return name.replace(".", "__")


def check_rates_meta_lr(rates_meta_lr: float | None) -> float | None:
    """``rates_meta_lr`` itself if it is ``None`` or a positive finite number; else ``ValueError`` naming it."""
    if rates_meta_lr is not None and not (math.isfinite(rates_meta_lr) and rates_meta_lr > 0):
        raise ValueError(f"rates_meta_lr must be a positive number or None, got {rates_meta_lr!r}")
    return rates_meta_lr


def rate_groups(learner: nn.Module, rates: nn.ParameterDict, meta_lr: float, rates_meta_lr: float | None) -> list[dict[str, Any]]:
    """Outer-optimiser groups: the learned inner ``rates`` at ``rates_meta_lr``, every other meta-parameter at ``meta_lr``."""
    if rates_meta_lr is None or not len(rates):
        return [{"params": list(learner.parameters()), "lr": meta_lr}]
    ids = {id(p) for p in rates.parameters()}
    return [{"params": [p for p in learner.parameters() if id(p) not in ids], "lr": meta_lr},
            {"params": list(rates.parameters()), "lr": rates_meta_lr}]  # fmt: skip


class MetaSGD(MAML):
    """MAML whose inner step is θ ← θ − α ⊙ ∇θ L_support with α a meta-learned tensor per weight.

    The learning rates live in ``self.inner_lrs`` (an ``nn.ParameterDict`` keyed by the weight's
    name with ``'.'`` replaced by ``'__'``, each the weight's shape, initialised to ``inner_lr``),
    so an optimiser over ``self.parameters()`` meta-learns them with the initialisation. They are
    unconstrained: an element may become negative, as in the paper (the sign is learned too).
    The same α is used at every inner step (the paper uses a single step).

    Args:
        model: the network; its parameters are the meta-learned initialisation θ.
        n_way: classes per episode (unused).
        inner_lr: initial value of every learning-rate element.
        rates_meta_lr: the outer (Adam) learning rate of the learned rates; ``None``: the module's
            ``meta_lr``, as for θ. Adam moves each element by about this much per meta-step, so a
            ``meta_lr`` small enough for pre-trained weights (1e-3) barely moves rates started at 0.5.
        maml_options: ``inner_steps``, ``eval_inner_steps``, ``first_order``, ``task_reduction``,
            ``task_parallel``, ``checkpoint_inner_steps``, ``zero_head``, as in :class:`MAML`.
    """

    name = "meta_sgd"

    def __init__(
        self, model: nn.Module, n_way: int | None = None, *, inner_lr: float = 0.4, rates_meta_lr: float | None = None,
        **maml_options: Any,
    ) -> None:
        super().__init__(model, n_way, inner_lr=inner_lr, **maml_options)
        self.rates_meta_lr = check_rates_meta_lr(rates_meta_lr)
        lrs = {
            lr_key(name): nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
            for name, p in self.adaptable_parameters().items()
        }
        if len(lrs) != len(self.adaptable_parameters()):
            raise ValueError("parameter names collide after replacing '.' with '__'")
        self.inner_lrs = nn.ParameterDict(lrs)

    def parameter_groups(self, meta_lr: float) -> list[dict[str, Any]]:
        """θ at ``meta_lr``; the learned rates at ``rates_meta_lr`` when it is set."""
        return rate_groups(self, self.inner_lrs, meta_lr, self.rates_meta_lr)

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """One inner step with per-element learning rates: θ ← θ − α ⊙ ∇θ L_support."""
        return {name: p - self.inner_lrs[lr_key(name)] * grads[name] for name, p in params.items()}

    def resize_head(self, n_classes: int) -> None:
        """A new zero head (see ``MetaLearner.resize_head``) whose learned rates are the mean of the old head's."""
        means = {name: float(self.inner_lrs[lr_key(name)].detach().mean()) for name in self.adaptable_parameters()
                 if name.startswith("head.")}  # fmt: skip
        super().resize_head(n_classes)
        for name, p in self.model.head.named_parameters():
            key = lr_key(f"head.{name}")
            self.inner_lrs[key] = nn.Parameter(torch.full_like(p.detach(), means[f"head.{name}"]))
