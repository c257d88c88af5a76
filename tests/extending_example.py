"""my_learners.py: a meta-learner of one's own, nearest class centroid by cosine similarity."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.algorithms import MetaLearner, Predictor


class CosineCentroids(MetaLearner):
    """Scores each query by the cosine similarity of its embedding to each class's mean support embedding."""

    def __init__(self, model: nn.Module, n_way: int | None = None, *, temperature: float = 0.1) -> None:
        super().__init__(model, n_way)
        self.temperature = temperature  # a setting: --model.algorithm.init_args.temperature 0.05

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits [N*Q, N] of one task: the support images through the backbone first, then the queries."""
        support = F.normalize(self.model.features(support_x).flatten(1), dim=-1)
        query = F.normalize(self.model.features(query_x).flatten(1), dim=-1)
        classes = range(int(support_y.max()) + 1)
        centroids = F.normalize(torch.stack([support[support_y == k].mean(0) for k in classes]), dim=-1)
        return query @ centroids.T / self.temperature

    def all_tasks(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits [T, N*Q, N], one task after another."""
        return torch.stack([self.task_logits(*task) for task in zip(support_x, support_y, query_x)])

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = self.all_tasks(support_x, support_y, query_x)
        return F.cross_entropy(logits.flatten(0, 1), query_y.flatten()), logits

    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        return self.all_tasks(support_x, support_y, query_x).detach()

    def predictor(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> Predictor:
        return Predictor(lambda x: self.task_logits(support_x, support_y, x), backbone_calls=2)

    def resize_head(self, n_classes: int) -> None:
        self.n_way = n_classes  # centroids come from the support set: there is no head to resize

    def adaptation_text(self, steps: int | None = None) -> str:
        return f"cosine class centroids (temperature {self.temperature:g})"
