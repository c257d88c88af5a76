"""ANIL, Almost No Inner Loop (Raghu et al., 2020): MAML that adapts only the head."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from medmeta.algorithms.maml import MAML, Params

HEAD_PREFIX = "head."


class ANIL(MAML):
    """MAML whose inner loop adapts only ``model.head``; the body ``model.features`` is shared.

    The body is meta-learned in the outer loop only: it gets gradient from the query loss
    directly and, in second order, through the adapted head's dependence on the support features.
    The backbone must compute ``model(x) == model.head(model.features(x))`` (as medmeta's backbones do):
    the support features are computed once per task and the inner steps re-run only the head,
    while query logits use the full model with the adapted head. Batch norm in the body thus sees
    the support batch and the query batch separately, exactly as in :class:`MAML`.

    Args:
        model: the network with ``features`` and ``head`` submodules; its parameters are θ.
        n_way: classes per episode (unused).
        maml_options: ``inner_lr``, ``inner_steps``, ``eval_inner_steps``, ``first_order``,
            ``task_reduction``, ``task_parallel``, ``checkpoint_inner_steps``, ``zero_head``, as in :class:`MAML`.
    """

    name = "anil"

    def __init__(self, model: nn.Module, n_way: int | None = None, **maml_options: Any) -> None:
        for part in ("features", "head"):
            if not isinstance(getattr(model, part, None), nn.Module):
                raise ValueError(f"ANIL needs a backbone with a `{part}` submodule; got {type(model).__name__}")
        super().__init__(model, n_way, **maml_options)

    def _inner_loop_module(self) -> tuple[str, nn.Module]:
        """Only the head runs inside the inner gradient (the body runs once per task, outside it)."""
        return HEAD_PREFIX, self.model.head

    def adaptable_parameters(self) -> Params:
        """The head's weights, keyed by their names in ``self.model`` (``head.weight``, ...)."""
        return {HEAD_PREFIX + name: p for name, p in self.model.head.named_parameters()}

    def support_input(self, support_x: Tensor) -> Tensor:
        """The body runs once per task on the support set; the inner steps re-run only the head."""
        return self.model.features(support_x)

    def _support_loss(self, params: Params, features: Tensor, y: Tensor) -> Tensor:
        """Support loss of the head alone on precomputed support ``features``."""
        head = {name.removeprefix(HEAD_PREFIX): p for name, p in params.items()}
        return self.loss_fn(functional_call(self.model.head, head, (features,)), y)
