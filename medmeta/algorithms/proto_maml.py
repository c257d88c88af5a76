"""Proto-MAML (Triantafillou et al., "Meta-Dataset", ICLR 2020): MAML whose head starts each task from the support prototypes.

Before the first inner step, the linear head is set from the support set: with ``c_k`` the mean
feature of class ``k``, weight row ``k`` is ``2 c_k`` and bias ``k`` is ``-‖c_k‖²``, so the
un-adapted model is the nearest-prototype classifier of prototypical networks with squared
Euclidean distance (``2 c·x - ‖c‖² = ‖x‖² - ‖x - c‖²``). The inner steps then fine-tune the whole
network (body and that head) as in :class:`MAML`, and the meta-gradient is exact second order
through the prototypes too: they are functions of θ. The meta-learned head ``model.head`` is never
used (its parameters get no gradient); only its shape (``N`` outputs on the features) is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from medmeta.algorithms.maml import MAML, Params

BODY, HEAD = "features.", "head."


class ProtoMAML(MAML):
    """Second-order MAML with the head initialised from the support prototypes on every task.

    The backbone must compute ``model(x) == model.head(model.features(x))`` with ``head`` an
    ``nn.Linear`` (as medmeta's backbones do). Every episode's support set must hold every one of
    the head's ``N`` classes: a class without an example would have no prototype, and is refused.

    Args:
        model: the network with ``features`` and a linear ``head``; its body's parameters are θ.
        n_way: classes per episode (unused: the head has them).
        maml_options: ``inner_lr``, ``inner_steps``, ``eval_inner_steps``, ``first_order``,
            ``task_reduction``, ``task_parallel``, ``checkpoint_inner_steps``, ``support_augment``,
            ``query_augment``, as in :class:`MAML` (not ``zero_head``: the head starts from the prototypes).
    """

    name = "proto_maml"

    def __init__(self, model: nn.Module, n_way: int | None = None, **maml_options: Any) -> None:
        if not (isinstance(getattr(model, "features", None), nn.Module) and isinstance(getattr(model, "head", None), nn.Linear)):
            raise ValueError(
                f"Proto-MAML needs a backbone with a `features` submodule and a linear `head`; got {type(model).__name__}"
            )
        if maml_options.get("zero_head"):
            raise ValueError("Proto-MAML sets the head from the support prototypes: zero_head does not apply to it")
        super().__init__(model, n_way, **maml_options)

    def cuda_graph_safe(self) -> bool:
        """No: its recorded meta-step has not been checked on a GPU; it runs eagerly there."""
        return False

    def adaptation_text(self, steps: int | None = None) -> str:
        return "head from the support prototypes, then " + super().adaptation_text(steps)

    def initial_weights(self, params: Params, support_x: Tensor, support_y: Tensor) -> Params:
        """θ with the head set from this support set's class prototypes (``2 c_k``, ``-‖c_k‖²``); vmap-safe."""
        body = {name.removeprefix(BODY): p for name, p in params.items() if name.startswith(BODY)}
        features = functional_call(self.model.features, body, (support_x,), strict=False)
        classes = torch.arange(self.model.head.out_features, device=support_y.device)
        one_hot = (support_y.unsqueeze(1) == classes).to(features.dtype)  # [N*K, N], no data-dependent shapes
        prototypes = (one_hot.T @ features) / one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)
        return {**params, HEAD + "weight": 2 * prototypes, HEAD + "bias": -(prototypes**2).sum(dim=1)}

    # every entry point checks the support labels first: initial_weights runs under vmap, where it cannot

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        self._check_support_classes(support_y)
        return super().outer_loss_and_logits(support_x, support_y, query_x, query_y)

    def adapt_and_predict_every_step(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None,
        at_steps: Sequence[int] | None = None,
    ) -> Tensor:
        self._check_support_classes(support_y)
        return super().adapt_and_predict_every_step(support_x, support_y, query_x, steps=steps, at_steps=at_steps)

    def _adapted_weights(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        self._check_support_classes(support_y)
        return super()._adapted_weights(support_x, support_y, steps)

    def _check_support_classes(self, support_y: Tensor) -> None:
        """Refuse support sets (``[N*K]`` or ``[T, N*K]``) without an example of every head class or with labels beyond them."""
        n = self.model.head.out_features
        labels = support_y.reshape(-1, support_y.shape[-1])
        counts = (labels.unsqueeze(-1) == torch.arange(n, device=labels.device)).sum(dim=1)  # [T, N]
        if bool((counts.sum(dim=1) == labels.shape[1]).all() & (counts > 0).all()):  # one check on the usual path
            return
        if bool(((labels < 0) | (labels >= n)).any()):
            got = labels.unique().tolist()
            raise ValueError(f"Proto-MAML: support labels must be in 0..{n - 1} (the head's classes); got {got}")
        task = int((counts == 0).any(dim=1).nonzero()[0])
        missing = (counts[task] == 0).nonzero().flatten().tolist()
        which = f"the support set of task {task}" if support_y.dim() > 1 else "the support set"
        raise ValueError(f"Proto-MAML: {which} has no example of classes {missing}: every class needs one for its prototype")
