"""MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019), every improvement a switch.

Functional like :class:`MAML`. Conventions (``θ_k`` = weights after ``k`` inner updates):

* Per-step norm weights (BNWB): every forward with ``θ_k`` (support forward before update
  ``k + 1``, query forward after update ``k``) uses norm index ``k``. Index 0 is the model's own
  norm weight/bias; index ``k ≥ 1`` is row ``k - 1`` of ``self.norm_weights[key]`` (shape
  ``[inner_steps, C]``). The paper's code instead indexes by loop step, pairing the support
  forward at ``θ_s`` with the query forward at ``θ_{s+1}``; ours gives each network state its
  own norm weights and leaves no parameter unused. With the switch on, norm weights are NOT
  adapted in the inner loop (as in the paper's code); with it off they are adapted as in MAML.
* Batch norm is transductive, or with ``running_stat_steps`` keeps running statistics per step
  for the query forward after ``k`` updates (``medmeta.networks.norm``).
* Learned per-layer per-step inner learning rates (LSLR): ``self.inner_lrs[key]`` has shape
  ``[inner_steps]``; update ``s`` (``θ_s → θ_{s+1}``) uses entry ``s``.
* Steps beyond ``inner_steps`` (evaluation) reuse the last step's norm weights and rates.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from medmeta.algorithms.maml import MAML, Params
from medmeta.algorithms.meta_sgd import check_rates_meta_lr, lr_key, rate_groups
from medmeta.networks.norm import EpisodeBatchNorm, EpisodeInstanceNorm

logger = logging.getLogger(__name__)

NORM_TYPES = (EpisodeBatchNorm, EpisodeInstanceNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class MAMLPlusPlus(MAML):
    """MAML with multi-step loss, per-step norm weights, per-step learned rates and FO→SO annealing.

    Args:
        model, n_way: as in :class:`MAML`.
        maml_options: ``inner_lr``, ``inner_steps``, ``eval_inner_steps``, ``first_order`` (always first order when ``True``),
            ``task_reduction``, ``task_parallel``, ``checkpoint_inner_steps``, ``zero_head``, as in :class:`MAML`.
        multi_step_loss: outer loss is a weighted sum of the query losses after every inner step.
        multi_step_loss_epochs: epochs over which the weights anneal onto the last step.
        per_step_norm_weights: a copy of every norm layer's weight and bias per inner step.
        learn_inner_lrs: one learned inner rate per parameter tensor per step (else ``inner_lr``).
        rates_meta_lr: the outer (Adam) learning rate of the learned inner rates; ``None``: the
            module's ``meta_lr``, as for the weights. Refused without ``learn_inner_lrs`` (nothing to apply it to).
        first_order_epochs: first order while ``epoch < first_order_epochs``, then second order.
    """

    name = "maml_pp"

    def __init__(
        self,
        model: nn.Module,
        n_way: int | None = None,
        *,
        multi_step_loss: bool = True,
        multi_step_loss_epochs: int = 10,
        per_step_norm_weights: bool = True,
        learn_inner_lrs: bool = True,
        first_order_epochs: int = 0,
        rates_meta_lr: float | None = None,
        **maml_options: Any,
    ) -> None:
        super().__init__(model, n_way, **maml_options)
        if multi_step_loss_epochs < 0 or first_order_epochs < 0:
            raise ValueError("multi_step_loss_epochs and first_order_epochs must be >= 0")
        self.rates_meta_lr = check_rates_meta_lr(rates_meta_lr)
        if rates_meta_lr is not None and not learn_inner_lrs:
            raise ValueError("rates_meta_lr is the outer step of learned inner rates: set learn_inner_lrs: true, or drop it")
        self.multi_step_loss = multi_step_loss
        self.multi_step_loss_epochs = multi_step_loss_epochs
        self.per_step_norm_weights = per_step_norm_weights
        self.learn_inner_lrs = learn_inner_lrs
        self.first_order_epochs = first_order_epochs
        self.epoch = 0
        self.norm_names: list[str] = []
        if per_step_norm_weights:
            self.norm_names = [
                f"{prefix}.{name}" if prefix else name
                for prefix, module in model.named_modules()
                if isinstance(module, NORM_TYPES)
                for name, _ in module.named_parameters(recurse=False)
            ]
        self.norm_weights = nn.ParameterDict(
            {
                lr_key(name): nn.Parameter(p.detach().unsqueeze(0).repeat(self.inner_steps, *[1] * p.dim()))
                for name, p in model.named_parameters()
                if name in self.norm_names
            }
        )
        slots = max(self.inner_steps, 1)
        self.inner_lrs = nn.ParameterDict(
            {
                lr_key(name): nn.Parameter(torch.full((slots,), float(self.inner_lr), dtype=p.dtype, device=p.device))
                for name, p in self.adaptable_parameters().items()
            }
            if learn_inner_lrs
            else {}
        )
        if len(self.norm_weights) != len(self.norm_names) or (
            learn_inner_lrs and len(self.inner_lrs) != len(self.adaptable_parameters())
        ):
            raise ValueError("parameter names collide after replacing '.' with '__'")
        logger.debug(
            "MAML++: msl=%s (%d epochs), per-step norms=%d tensors, lslr=%s, first-order epochs=%d",
            multi_step_loss, multi_step_loss_epochs, len(self.norm_names), learn_inner_lrs, first_order_epochs,
        )  # fmt: skip

    def parameter_groups(self, meta_lr: float) -> list[dict[str, Any]]:
        """Every meta-parameter at ``meta_lr``; the learned per-step rates at ``rates_meta_lr`` when it is set."""
        return rate_groups(self, self.inner_lrs, meta_lr, self.rates_meta_lr)

    def set_epoch(self, epoch: int) -> None:
        """Set the current epoch (drives the multi-step loss weights and first-order annealing)."""
        if self.epoch < self.first_order_epochs <= epoch and not self.first_order:
            logger.info("MAML++: switching to second-order meta-gradients at epoch %d", epoch)
        self.epoch = int(epoch)

    def uses_first_order(self) -> bool:
        """Whether the current epoch's training drops second-order terms."""
        return self.first_order or self.epoch < self.first_order_epochs

    def multi_step_loss_weights(self) -> Tensor:
        """Weights of the query losses after steps 1..S at the current epoch (float64, sum 1).

        Uniform at epoch 0; non-final weights decay by 1/(S·E) per epoch down to 0.03/S, the last
        takes the rest; one-hot on the last step once ``epoch >= E`` or with the switch off.
        """
        steps, epochs = self.inner_steps, self.multi_step_loss_epochs
        weights = torch.zeros(steps, dtype=torch.float64)
        if steps == 0:
            return weights
        if not self.multi_step_loss or self.epoch >= epochs:
            weights[-1] = 1.0
            return weights
        floor = 0.03 / steps
        weights[:-1] = max(1.0 / steps - self.epoch / (steps * epochs), floor)
        weights[-1] = min(1.0 / steps + self.epoch * (steps - 1) / (steps * epochs), 1.0 - (steps - 1) * floor)
        return weights

    def adaptable_parameters(self) -> Params:
        """The backbone's weights, less the norm weights when these are per step."""
        return {name: p for name, p in self.model.named_parameters() if name not in self.norm_names}

    def step_loss_weights(self) -> list[float]:
        """The multi-step loss weights of the current epoch (``[1.0]`` without inner steps)."""
        return self.multi_step_loss_weights().tolist() or [1.0]

    def cuda_graph_safe(self) -> bool:
        """No: the annealed loss weights and first-order epochs change between steps; a graph would freeze them."""
        return False

    def step_parameters(self, k: int, *, detach: bool = False) -> Params:
        """Norm weights for the forward with ``θ_k`` (empty: the model's own are used)."""
        if k == 0 or self.inner_steps == 0:
            return {}
        row = min(k, self.inner_steps) - 1
        weights = {name: self.norm_weights[lr_key(name)][row] for name in self.norm_names}
        return {name: w.detach() for name, w in weights.items()} if detach else weights

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """One inner SGD step with the learned rate of each tensor for ``step`` (if learned)."""
        if not self.learn_inner_lrs:
            return super().inner_update(params, grads, step)
        idx = min(step, max(self.inner_steps, 1) - 1)
        return {name: p - self.inner_lrs[lr_key(name)][idx] * grads[name] for name, p in params.items()}
