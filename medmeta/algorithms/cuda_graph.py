"""The meta-step of a gradient-based algorithm replayed as CUDA graphs.

A second-order meta-step launches thousands of small kernels (every inner step's forward, its
gradient, and the meta-backward through all of them), so on a GPU it is often bound by Python
and launch overhead rather than arithmetic. :class:`GraphedOuterLoss` records the outer loss
(all inner loops) and its meta-backward once per episode shape with
:func:`torch.cuda.make_graphed_callables` and replays them afterwards: same kernels, same
numbers, none of the overhead. The weights are read in place, so optimiser updates between
steps are seen by the next replay.

Where graphs cannot be used (not on CUDA, gradients off, first-order inner loops, evaluation)
it falls back to the eager outer loss: same function, no graph.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from medmeta.algorithms.base import MetaLearner

CAPTURED_SHAPES = 4  # graphs kept per algorithm (one per distinct episode shape); more falls back to eager


class _OuterLoss(nn.Module):
    """``algorithm.outer_loss_and_logits`` as a module whose parameters are the algorithm's."""

    def __init__(self, algorithm: MetaLearner) -> None:
        super().__init__()
        self.algorithm = algorithm

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        return self.algorithm.outer_loss_and_logits(support_x, support_y, query_x, query_y)


class GraphedOuterLoss:
    """``outer_loss_and_logits`` of ``algorithm`` (a learner whose ``cuda_graph_safe()`` is true), captured as CUDA graphs.

    Call it like ``algorithm.outer_loss_and_logits``; ``loss.backward()`` replays the recorded
    meta-backward and leaves the meta-gradient in the parameters' ``.grad`` as usual. Episode
    tensors must keep their shapes between steps (a new shape records a new graph, up to
    ``CAPTURED_SHAPES``). Settings that change between steps (annealed loss weights, a switch of
    order) would be frozen into the graph, so a learner that has them says so (``cuda_graph_safe``)
    and is refused.
    """

    def __init__(self, algorithm: MetaLearner) -> None:
        if not algorithm.cuda_graph_safe():
            raise ValueError(f"cuda_graph is for learners that can record a fixed meta-step; {algorithm.label()} cannot")
        self.algorithm = algorithm
        self._graphs: dict[tuple, nn.Module] = {}
        self._warned = False

    def usable(self, support_x: Tensor) -> bool:
        """Whether this call can run as a graph (CUDA, gradients on, training)."""
        return (
            support_x.is_cuda and torch.is_grad_enabled() and self.algorithm.training
            and self.algorithm.cuda_graph_safe()
        )  # fmt: skip

    def __call__(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        tensors = (support_x, support_y, query_x, query_y)
        if not self.usable(support_x):
            self._warn_once(f"cuda_graph: running eagerly (needs CUDA, gradients and second order; got {support_x.device})")
            return self.algorithm.outer_loss_and_logits(*tensors)
        key = (*(tuple(t.shape) for t in tensors), support_x.dtype, torch.is_autocast_enabled("cuda"))
        graphed = self._graphs.get(key)
        if graphed is None:
            if len(self._graphs) >= CAPTURED_SHAPES:
                self._warn_once(f"cuda_graph: more than {CAPTURED_SHAPES} episode shapes; new shapes run eagerly")
                return self.algorithm.outer_loss_and_logits(*tensors)
            graphed = self._graphs[key] = self._capture(tensors)
        return graphed(*tensors)

    def _capture(self, tensors: tuple[Tensor, ...]) -> nn.Module:
        """Record forward and meta-backward for these shapes (after make_graphed_callables' warm-up)."""
        samples = tuple(t.detach().clone() for t in tensors)
        if torch.is_autocast_enabled("cuda"):  # graphs need autocast without its weight cache
            dtype = torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                return torch.cuda.make_graphed_callables(_OuterLoss(self.algorithm), samples, allow_unused_input=True)
        return torch.cuda.make_graphed_callables(_OuterLoss(self.algorithm), samples, allow_unused_input=True)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned = True
