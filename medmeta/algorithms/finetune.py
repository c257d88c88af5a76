"""Fine-tune baseline (transfer learning): supervised pre-training, then a new head per task.

Training ignores the episode structure: every support and query image of a meta-batch is a
labelled example of its meta-train class, and the backbone plus a ``pretrain_classes``-way head
learn ordinary classification. At evaluation the backbone is frozen and a fresh N-way linear head
is fitted on the support set only (Chen et al., 2019, "A closer look at few-shot classification";
the strongest simple baseline in cross-domain medical few-shot studies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.algorithms.maml import _check_task_batch


class FineTune(nn.Module):
    """Pre-train on all meta-train classes; adapt with a new linear head on frozen features.

    Args:
        model: backbone with ``features`` and ``feature_dim``.
        pretrain_classes: size of the pre-training head; at least the number of meta-train classes.
        finetune_steps: optimisation steps of the new head on each support set.
        finetune_lr: learning rate of those steps (Adam).
    """

    uses_class_ids = True

    def __init__(self, model: nn.Module, *, pretrain_classes: int = 64, finetune_steps: int = 100,
                 finetune_lr: float = 0.01) -> None:  # fmt: skip
        super().__init__()
        if not hasattr(model, "features") or not hasattr(model, "feature_dim"):
            raise ValueError("the fine-tune baseline needs a backbone with `features` and `feature_dim`")
        self.model = model
        self.pretrain_head = nn.Linear(model.feature_dim, pretrain_classes)
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, *,
        support_class: Tensor, query_class: Tensor,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Cross-entropy over the meta-train classes of every image, and the query logits restricted to each episode's N classes."""
        _check_task_batch(support_x, support_y, query_x, query_y)
        if int(max(support_class.max(), query_class.max())) >= self.pretrain_head.out_features:
            raise ValueError(
                f"a meta-train class id exceeds pretrain_classes={self.pretrain_head.out_features}; "
                "raise --model.pretrain_classes to at least the number of meta-train classes"
            )
        images = torch.cat([support_x, query_x], dim=1).flatten(0, 1)
        classes = torch.cat([support_class, query_class], dim=1).flatten()
        logits = self.pretrain_head(self.model.features(images))
        loss = F.cross_entropy(logits, classes)
        tasks, n_query = query_x.shape[:2]
        query_logits = logits.view(tasks, -1, logits.shape[-1])[:, support_x.shape[1] :]
        n_way = int(support_y.max()) + 1
        episode_classes = support_class.new_zeros(tasks, n_way).scatter_(1, support_y, support_class)  # label -> class id
        index = episode_classes.unsqueeze(1).expand(tasks, n_query, n_way)
        return loss, torch.gather(query_logits, 2, index)

    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Query logits ``[T, N*Q, N]`` from a new linear head fitted on each support set (backbone frozen)."""
        steps = self.finetune_steps if steps is None else steps
        outputs = []
        for sx, sy, qx in zip(support_x, support_y, query_x):
            with torch.no_grad():
                support_features, query_features = self.model.features(sx), self.model.features(qx)
            n_way = int(sy.max()) + 1
            head = nn.Linear(support_features.shape[-1], n_way).to(support_features)
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
            optimiser = torch.optim.Adam(head.parameters(), lr=self.finetune_lr)
            with torch.enable_grad():
                for _ in range(steps):
                    optimiser.zero_grad()
                    F.cross_entropy(head(support_features), sy).backward()
                    optimiser.step()
            with torch.no_grad():
                outputs.append(head(query_features))
        return torch.stack(outputs)
