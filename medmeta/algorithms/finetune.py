"""Fine-tune baseline (transfer learning): supervised pre-training, then a new head per task.

Training ignores the episode structure: every support and query image of a meta-batch is a
labelled example of its meta-train class, and the backbone plus a ``pretrain_classes``-way head
learn ordinary classification. At evaluation a fresh N-way linear head (and, with
``finetune_scope="last_block"``, a per-task copy of the backbone's last block) is fitted on the
support set only; the rest of the backbone is frozen (Chen et al., 2019, "A closer look at
few-shot classification"; the strongest simple baseline in cross-domain medical few-shot studies).
Optional adaptation switches: ``feature_levels="all"`` fits the head on every stage of the
backbone, not only its last (``medmeta.networks.levels``); ``support_augment`` adds the support
images' flips as extra labelled examples; ``query_augment`` averages each query's prediction over
its flips; and ``query_entropy_weight`` makes adaptation transductive (Dhillon et al., 2020: the
entropy of the unlabelled query predictions is minimised with the support loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from medmeta.adapted import export_classifier
from medmeta.algorithms.base import EpisodeBatch, MetaLearner, check_task_batch
from medmeta.flips import flip_averaged, flipped
from medmeta.networks.levels import FeatureLevels, check_levels, embedding
from medmeta.networks.norm import query_statistics, uses_running_statistics

FinetuneScope = Literal["head", "last_block"]
FinetuneOptimizer = Literal["sgd", "adam"]
OPTIMISERS: dict[str, tuple[type[torch.optim.Optimizer], str]] = {  # setting -> (optimiser, its name in reports)
    "sgd": (torch.optim.SGD, "gradient-descent"), "adam": (torch.optim.Adam, "Adam"),
}


class FineTune(MetaLearner):
    """Pre-train on all meta-train classes; adapt with a new linear head on frozen features.

    Args:
        model: backbone with ``features`` and ``feature_dim``.
        n_way: classes per episode (unused: the new head has the support set's classes).
        pretrain_classes: size of the pre-training head; at least the number of meta-train classes.
        finetune_steps: optimisation steps of the new head on each support set.
        finetune_lr: learning rate of those steps.
        finetune_optimizer: ``"sgd"`` (default: full-batch gradient descent, as Chen et al.'s
            baseline, selected on meta-val in ``BENCHMARKS.md``) or ``"adam"`` (per-coordinate step
            sizes: better for ``feature_levels="all"``, whose levels are each L2-normalised).
            Checkpoints written before this setting existed used Adam, and still do.
        finetune_scope: ``"head"`` (linear probe on frozen features) or ``"last_block"`` (the
            new head and the backbone's last block, ``model.last_block_prefixes()``: prefixes of
            parameter names under ``features.``, checked to name some when the learner is built).
        support_augment: also fit on each support image flipped along every spatial axis and every
            pair of axes (4x the support set in 2D), with the image's label.
        query_augment: predict each query image as the average of the class probabilities of its
            flip views (test-time augmentation; each prediction still depends on its own image only).
        feature_levels: ``"last"`` (the backbone's features) or ``"all"``: the head is fitted on
            every stage of the backbone, each summarised and L2-normalised
            (:func:`medmeta.networks.levels.multi_level_features`); the backbone must name its
            stages (``stage_names()``: Conv-4, ResNet-12 and ResNet-18 do).
        query_entropy_weight: above 0, add this weight times the mean entropy of the query
            predictions to the support loss (transductive: a query's prediction then depends on
            the other queries of its episode; the report says so). 0 (default) never looks at them.
    """

    name = "finetune"
    settings_added = {"finetune_optimizer": "adam"}  # what checkpoints written before the setting existed used

    def __init__(self, model: nn.Module, n_way: int | None = None, *, pretrain_classes: int = 64,
                 finetune_steps: int = 100, finetune_lr: float = 0.01, finetune_scope: FinetuneScope = "head",
                 finetune_optimizer: FinetuneOptimizer = "sgd",
                 support_augment: bool = False, query_augment: bool = False, feature_levels: FeatureLevels = "last",
                 query_entropy_weight: float = 0.0) -> None:  # fmt: skip
        if not hasattr(model, "features") or not hasattr(model, "feature_dim"):
            raise ValueError("the fine-tune baseline needs a backbone with `features` and `feature_dim`")
        if finetune_scope not in ("head", "last_block"):
            raise ValueError(f"finetune_scope must be 'head' or 'last_block', got {finetune_scope!r}")
        if finetune_optimizer not in OPTIMISERS:
            raise ValueError(f"finetune_optimizer must be 'sgd' or 'adam', got {finetune_optimizer!r}")
        if finetune_scope == "last_block" and not hasattr(model, "last_block_prefixes"):
            raise ValueError(f"finetune_scope='last_block' needs a backbone with `last_block_prefixes`; got {type(model).__name__}")
        if isinstance(finetune_steps, bool) or finetune_steps < 1:
            raise ValueError(f"finetune_steps must be at least 1 (the new head starts at zero), got {finetune_steps!r}")
        if not (0.0 <= query_entropy_weight < float("inf")):
            raise ValueError(f"query_entropy_weight must be 0 or positive and finite, got {query_entropy_weight!r}")
        check_levels(model, feature_levels)
        super().__init__(model, n_way)
        self.support_augment, self.query_entropy_weight = support_augment, query_entropy_weight
        self.query_augment, self.feature_levels = query_augment, feature_levels
        self.pretrain_head = nn.Linear(model.feature_dim, pretrain_classes)
        self.finetune_steps, self.finetune_lr, self.finetune_scope = finetune_steps, finetune_lr, finetune_scope
        self.finetune_optimizer = finetune_optimizer
        self._tuned_names = last_block_names(model) if finetune_scope == "last_block" else ()

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Pre-training on the batch's images by their meta-train class ids (``support_class``, ``query_class``)."""
        if "support_class" not in batch or "query_class" not in batch:
            raise ValueError("the fine-tune baseline pre-trains on class ids: the batch needs support_class and query_class")
        return self.pretraining_loss_and_logits(
            batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"], batch["support_class"],
            batch["query_class"],
        )  # fmt: skip

    def pretraining_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor, support_class: Tensor,
        query_class: Tensor,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Cross-entropy over the meta-train classes of every image, and the query logits restricted to each episode's N classes."""
        check_task_batch(support_x, support_y, query_x, query_y)
        if int(max(support_class.max(), query_class.max())) >= self.pretrain_head.out_features:
            raise ValueError(
                f"a meta-train class id exceeds pretrain_classes={self.pretrain_head.out_features}; "
                "raise --model.pretrain_classes to at least the number of meta-train classes"
            )
        images = torch.cat([support_x, query_x], dim=1).flatten(0, 1)
        classes = torch.cat([support_class, query_class], dim=1).flatten()
        with query_statistics(self.model, 0):  # running batch-norm statistics, if kept, come from here
            logits = self.pretrain_head(self.model.features(images))
        loss = F.cross_entropy(logits, classes)
        tasks, n_query = query_x.shape[:2]
        query_logits = logits.view(tasks, -1, logits.shape[-1])[:, support_x.shape[1] :]
        n_way = int(support_y.max()) + 1
        episode_classes = support_class.new_zeros(tasks, n_way).scatter_(1, support_y, support_class)  # label -> class id
        index = episode_classes.unsqueeze(1).expand(tasks, n_query, n_way)
        return loss, torch.gather(query_logits, 2, index)

    def report_settings(self) -> dict[str, object]:
        return {"finetune_steps": self.finetune_steps, "finetune_optimizer": self.finetune_optimizer,
                "finetune_scope": self.finetune_scope,
                "feature_levels": self.feature_levels, "support_augment": self.support_augment,
                "query_augment": self.query_augment, "query_entropy_weight": self.query_entropy_weight}  # fmt: skip

    def adaptation_text(self, steps: int | None = None) -> str:
        scope = "a new linear head" if self.finetune_scope == "head" else "a new linear head and the last block"
        text = f"{scope} fitted with {self.finetune_steps if steps is None else steps} {OPTIMISERS[self.finetune_optimizer][1]} steps"
        if self.feature_levels == "all":
            text += " on the features of every stage"
        if self.support_augment:
            text += " on the support set and its flips"
        if self.query_augment:
            text += ", each query predicted from its flips"
        if self.query_entropy_weight > 0:
            text += f", plus {self.query_entropy_weight:g} x the query predictions' entropy (transductive)"
        return text

    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Query logits ``[T, N*Q, N]`` after fitting a new head (and last block) on each support set."""
        steps = self.finetune_steps if steps is None else steps
        return torch.stack([self._adapt_one(sx, sy, qx, steps) for sx, sy, qx in zip(support_x, support_y, query_x)])

    def _adapt_one(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, steps: int) -> Tensor:
        """Detached query logits ``[N*Q, N]`` of one task; the model's own weights never change."""
        head, tuned = self._fit(support_x, support_y, query_x, steps)
        with torch.no_grad(), query_statistics(self.model, 0):
            return self._predict(lambda x: head(self._embed(x, tuned)), query_x)

    def _embed(self, x: Tensor, tuned: dict[str, Tensor]) -> Tensor:
        """The features the head sees (``feature_levels``), with the ``tuned`` weights (names within ``model.features``)."""
        return embedding(self.model, lambda images: functional_call(self.model.features, tuned, (images,), strict=False),
                         x, self.feature_levels)  # fmt: skip

    def _predict(self, logits: Callable[[Tensor], Tensor], query_x: Tensor) -> Tensor:
        """``logits(query_x)``, or with ``query_augment`` its average over the query's flips (:func:`flip_averaged`)."""
        return flip_averaged(logits, query_x) if self.query_augment else logits(query_x)

    def adapted_network(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> nn.Module:
        """The backbone (its last block as tuned, with ``last_block``), batch norm fixed, and the fitted linear head.

        Batch norm uses the support set's statistics at the tuned weights, or with ``norm_mode:
        running`` the checkpoint's running statistics (as the query forward). Refused with
        ``query_entropy_weight > 0``: that adaptation depends on the query cases.
        """
        if self.query_entropy_weight > 0:
            raise NotImplementedError(
                f"{self.label()} with query_entropy_weight > 0 adapts to the query cases (transductive) and cannot "
                "export an adapted model; set query_entropy_weight to 0"
            )
        head, tuned = self._fit(support_x, support_y, None, self.finetune_steps if steps is None else steps)
        fitted_on = flipped(support_x, support_y)[0] if self.support_augment else support_x
        return self._export(fitted_on, {"features." + name: p for name, p in tuned.items()}, head.weight, head.bias)

    def _export(self, fitted_on: Tensor, params: dict[str, Tensor], weight: Tensor, bias: Tensor, *,
                normalize: bool = False) -> nn.Module:  # fmt: skip
        """The exported classifier: ``params`` in the backbone, a linear head ``weight [N, D]``, ``bias [N]`` on its features.

        Batch norm without running statistics is fixed to the statistics of ``fitted_on``, the images the head was fitted on.
        """
        head = {"kind": "linear", "feature_dim": weight.shape[1], "normalize": normalize,
                "feature_levels": self.feature_levels, "query_flips": self.query_augment}
        running = 0 if uses_running_statistics(self.model) else None
        network = export_classifier(self.model, fitted_on, n_classes=weight.shape[0], head=head, params=params,
                                    running_step=running)  # fmt: skip
        with torch.no_grad():
            network.linear.weight.copy_(weight)
            network.linear.bias.copy_(bias)
        return network

    def _fit(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor | None, steps: int
    ) -> tuple[nn.Linear, dict[str, Tensor]]:
        """The new head fitted on one support set and the tuned weights (names within ``model.features``; none for ``head``).

        ``query_x`` is read only with ``query_entropy_weight > 0`` (the transductive loss).
        """
        if isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be at least 1 (the new head starts at zero: every class would score alike), "
                             f"got {steps!r}")  # fmt: skip
        own = dict(self.model.features.named_parameters())
        tuned = {name: own[name].detach().clone().requires_grad_(True) for name in self._tuned_names}

        def features(x: Tensor) -> Tensor:
            return self._embed(x, tuned)

        n_way = int(support_y.max()) + 1
        if self.support_augment:
            support_x, support_y = flipped(support_x, support_y)
        transductive = self.query_entropy_weight > 0 and query_x is not None
        with torch.no_grad():
            frozen_support = None if tuned else features(support_x)
            frozen_query = None if tuned or not transductive else features(query_x)
            feature_dim = (features(support_x) if frozen_support is None else frozen_support).shape[1]
        head = nn.Linear(feature_dim, n_way).to(support_x.device)
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        optimiser = OPTIMISERS[self.finetune_optimizer][0]([*head.parameters(), *tuned.values()], lr=self.finetune_lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimiser.zero_grad()
                support = features(support_x) if tuned else frozen_support
                loss = F.cross_entropy(head(support), support_y)
                if transductive:
                    query_logits = head(features(query_x) if tuned else frozen_query)
                    entropy = -(query_logits.softmax(-1) * query_logits.log_softmax(-1)).sum(-1).mean()
                    loss = loss + self.query_entropy_weight * entropy
                loss.backward(inputs=[*head.parameters(), *tuned.values()])  # no .grad on the frozen weights
                optimiser.step()
        return head, {name: p.detach() for name, p in tuned.items()}


def last_block_names(model: nn.Module) -> tuple[str, ...]:
    """The names within ``model.features`` of the parameters ``model.last_block_prefixes()`` names (``finetune_scope:
    last_block``); ``ValueError`` when a prefix lies outside ``features.`` or none names a parameter."""
    prefixes = tuple(model.last_block_prefixes())
    inner = tuple(prefix.removeprefix("features.") for prefix in prefixes if prefix.startswith("features."))
    names = tuple(name for name, _ in model.features.named_parameters() if name.startswith(inner)) if inner else ()
    if len(inner) != len(prefixes) or not names:
        raise ValueError(
            f"finetune_scope='last_block': {type(model).__name__}.last_block_prefixes() = {prefixes!r} must name "
            "parameters of `features` by their names in the model (e.g. 'features.3.'); "
            + ("it names none" if len(inner) == len(prefixes) else "a prefix lies outside `features.`")
        )
    return names
