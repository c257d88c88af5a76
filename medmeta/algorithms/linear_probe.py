"""Supervised pre-training, then logistic regression on L2-normalised features (Tian et al., 2020, "Rethinking few-shot").

Training is the fine-tune baseline's: ordinary classification of the meta-train classes. At
evaluation each support set's frozen features are L2-normalised and a multinomial logistic
regression with an L2 penalty is fitted to convergence (L-BFGS in float64, the objective of
scikit-learn's ``LogisticRegression(C=C)``), so no learning rate or step count is tuned.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.algorithms.finetune import FineTune
from medmeta.flips import flipped
from medmeta.networks.norm import query_statistics


GRADIENT_SETTINGS = ("finetune_steps", "finetune_lr", "finetune_optimizer")  # FineTune's, refused here


class LogisticRegressionProbe(FineTune):
    """:class:`FineTune`'s pre-training; adaptation by L2-penalised logistic regression on unit-length features.

    Args:
        model: backbone with ``features`` and ``feature_dim``.
        n_way: classes per episode (unused).
        penalty_c: inverse strength of the L2 penalty on the weights (scikit-learn's ``C``; default 1).
        max_iterations: L-BFGS iterations per support set.
        finetune_options: ``pretrain_classes``, ``support_augment`` (the support set's flips as
            extra examples), ``query_augment`` (flip-averaged query predictions) and
            ``feature_levels``, as in :class:`FineTune`; its other adaptation settings are refused.
    """

    adapts_in_steps = False  # its adaptation takes no step count: diagnose refuses --steps

    name = "logreg"

    def __init__(self, model: nn.Module, n_way: int | None = None, *, penalty_c: float = 1.0, max_iterations: int = 200,
                 **finetune_options: object) -> None:  # fmt: skip
        if isinstance(penalty_c, bool) or not (0 < penalty_c < float("inf")):
            raise ValueError(f"penalty_c must be positive and finite, got {penalty_c!r}")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {max_iterations!r}")
        ignored = sorted(set(finetune_options) & set(GRADIENT_SETTINGS))
        if ignored:
            raise ValueError(f"logistic regression is fitted to convergence, so {', '.join(ignored)} would have no "
                             "effect: leave it out (penalty_c and max_iterations set the fit)")  # fmt: skip
        super().__init__(model, n_way, **finetune_options)
        if self.finetune_scope != "head" or self.query_entropy_weight:
            raise ValueError("logistic regression fits a probe on frozen features: finetune_scope must be 'head' and "
                             "query_entropy_weight 0")  # fmt: skip
        self.penalty_c, self.max_iterations = penalty_c, max_iterations

    @classmethod
    def settings(cls) -> dict[str, inspect.Parameter]:
        """:class:`FineTune`'s settings less those of its gradient-descent adaptation, which this learner has not."""
        return {name: p for name, p in super().settings().items() if name not in GRADIENT_SETTINGS}

    def report_settings(self) -> dict[str, object]:
        return {"penalty_c": self.penalty_c, "max_iterations": self.max_iterations, "feature_levels": self.feature_levels,
                "support_augment": self.support_augment, "query_augment": self.query_augment}  # fmt: skip

    def adaptation_text(self, steps: int | None = None) -> str:
        levels = " of every stage" if self.feature_levels == "all" else ""
        flips = " of the support set and its flips" if self.support_augment else ""
        queries = ", each query predicted from its flips" if self.query_augment else ""
        return f"logistic regression (C={self.penalty_c:g}) on L2-normalised frozen features{levels}{flips}{queries}"

    def _adapt_one(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int) -> Tensor:
        """Detached query logits ``[N*Q, N]`` of one task; ``steps`` is unused (fitted to convergence)."""
        del steps
        weight, bias = self._fit_probe(support_x, support_y)

        def logits(x: Tensor) -> Tensor:
            return (F.normalize(self._embed(x, {}), dim=1).double() @ weight + bias).to(x.dtype)

        with torch.no_grad(), query_statistics(self.model, 0):
            return self._predict(logits, query_x)

    def adapted_network(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> nn.Module:
        """The frozen backbone (batch norm fixed as in :class:`FineTune`) and the fitted probe on normalised features.

        Batch norm without running statistics is fixed to the statistics of the images the probe was
        fitted on: the support set, with its flips under ``support_augment``.
        """
        del steps
        weight, bias = self._fit_probe(support_x, support_y)
        fitted_on = flipped(support_x, support_y)[0] if self.support_augment else support_x
        return self._export(fitted_on, {}, weight.T.float(), bias.float(), normalize=True)

    def _fit_probe(self, support_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
        """The probe's weights ``[D, N]`` and bias ``[N]`` (float64) on one support set's normalised features."""
        if self.support_augment:
            support_x, support_y = flipped(support_x, support_y)
        with torch.no_grad():
            support = F.normalize(self._embed(support_x, {}), dim=1).double()
        return fit_logistic_regression(support, support_y, int(support_y.max()) + 1, self.penalty_c, self.max_iterations)


def fit_logistic_regression(features: Tensor, labels: Tensor, n_classes: int, penalty_c: float,
                            max_iterations: int = 200) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Weights ``[D, N]`` and bias ``[N]`` minimising ``sum(cross-entropy) + |W|^2 / (2 C)`` (the bias is not penalised)."""
    weight = features.new_zeros(features.shape[1], n_classes, requires_grad=True)
    bias = features.new_zeros(n_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-8, tolerance_change=1e-12)  # fmt: skip

    def objective() -> Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels, reduction="sum") + weight.pow(2).sum() / (2 * penalty_c)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(objective)
    return weight.detach(), bias.detach()
