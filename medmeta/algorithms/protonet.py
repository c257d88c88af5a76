"""Prototypical networks (Snell et al., 2017): nearest class mean in a learned embedding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmeta.adapted import export_classifier, prototype_logits
from medmeta.algorithms.base import MetaLearner, Predictor, check_task_batch
from medmeta.flips import flipped
from medmeta.networks.norm import query_statistics, uses_running_statistics

Distance = Literal["squared_euclidean", "cosine"]


class ProtoNet(MetaLearner):
    """Prototypical network over a meta-batch of tasks with a leading task dimension ``T``.

    Embeddings are ``model.features(x)`` flattened (``model.head`` is unused: it gets no gradient,
    so leave it out of weight decay / DDP's used-parameter check). A class prototype is the mean
    support embedding of the class; logits are ``-distance(query, prototype) / temperature``.

    Batch norm: **transductive**. Support and query images of a task go through the backbone in
    ONE forward pass (concatenated, as in the authors' code), so with batch norm that uses batch
    statistics (medmeta's backbones keep none unless ``norm_mode: running``) every embedding, prototypes included,
    depends on the task's query images, and prototypes and queries share one normalisation.
    The same holds in training (:meth:`outer_loss_and_logits`) and evaluation
    (:meth:`adapt_and_predict`). Query labels are never used for the logits. Tasks are never
    mixed in one forward pass.

    Args:
        model: backbone with a ``features`` submodule; its parameters are meta-learned.
        n_way: classes per episode (unused: prototypes are built for the classes of the support set).
        distance: ``"squared_euclidean"`` (the paper's) or ``"cosine"`` (``1 - cos``; use a
            temperature well below 1, e.g. 0.1, since its logits only span ``[-2/t, 0]``).
        temperature: divides the negative distances; positive and finite. With
            ``learn_temperature`` it is the starting value.
        learn_temperature: meta-learn the temperature (as its logarithm) with the backbone: with
            ``distance="cosine"`` and ``temperature=0.1`` this is Meta-Baseline's classifier
            (Chen et al., 2021, cosine similarity times a learned scale, starting at 10), usually
            meta-trained from a fine-tune pre-training (``--model.init_from``).
        support_augment: at evaluation (``adapt_and_predict``, ``predictor``), build each prototype from
            the support images and their flips along every spatial axis and pair of axes; training is unchanged.
    """

    adapts_in_steps = False  # its adaptation takes no step count: diagnose refuses --steps

    name = "protonet"
    transductive_batches = "each task's support and query images together"

    def __init__(
        self, model: nn.Module, n_way: int | None = None, *, distance: Distance = "squared_euclidean",
        temperature: float = 1.0, learn_temperature: bool = False, support_augment: bool = False,
    ) -> None:  # fmt: skip
        if not isinstance(getattr(model, "features", None), nn.Module):
            raise ValueError(f"ProtoNet needs a backbone with a `features` submodule; got {type(model).__name__}")
        if distance not in ("squared_euclidean", "cosine"):
            raise ValueError(f"distance must be 'squared_euclidean' or 'cosine', got {distance!r}")
        if isinstance(temperature, bool) or not (0 < temperature < float("inf")):
            raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
        super().__init__(model, n_way)
        self.distance = distance
        self.learn_temperature, self.support_augment = learn_temperature, support_augment
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.fixed_temperature = temperature

    @property
    def temperature(self) -> float | Tensor:
        """The divisor of the negative distances: the fixed setting, or the learned scalar (a tensor)."""
        return self.log_temperature.exp() if self.learn_temperature else self.fixed_temperature

    def embed(self, x: Tensor) -> Tensor:
        """Flattened embeddings ``[B, D]`` of images ``[B, C, *spatial]``."""
        return self.model.features(x).flatten(start_dim=1)

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits ``[N*Q, N]`` of one task.

        Transductive batch norm embeds support and query in one pass; with per-step running
        statistics the queries are embedded on their own as query forwards at step 0.
        """
        if uses_running_statistics(self.model):
            support = self.embed(support_x)
            with query_statistics(self.model, 0):
                query = self.embed(query_x)
        else:
            embeddings = self.embed(torch.cat([support_x, query_x]))
            support, query = embeddings[: support_x.shape[0]], embeddings[support_x.shape[0] :]
        return prototype_logits(query, class_prototypes(support, support_y), self.distance, self.temperature)

    def predictor(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> Predictor:
        """:meth:`task_logits` of this support set; with running statistics support and query pass separately, the query last."""
        calls = 2 if uses_running_statistics(self.model) else 1
        if self.support_augment:
            support_x, support_y = flipped(support_x, support_y)
        return Predictor(lambda x: self.task_logits(support_x, support_y, x), backbone_calls=calls)

    def adapted_network(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> nn.Module:
        """The embedding with batch norm fixed and a prototype head (this learner's distance and temperature).

        Prototypes are the mean support embeddings as :meth:`task_logits` computes them with
        running statistics (support embedded on its own); batch norm uses the support set's
        statistics, or with ``norm_mode: running`` the slot of step 0 (as the query forward).
        """
        del steps
        if self.support_augment:  # flips keep each channel's statistics, so batch norm is fixed as without them
            support_x, support_y = flipped(support_x, support_y)
        with torch.no_grad():
            prototypes = class_prototypes(self.embed(support_x), support_y)
        head = {"kind": "prototypes", "feature_dim": prototypes.shape[1], "distance": self.distance}
        running = 0 if uses_running_statistics(self.model) else None
        network = export_classifier(self.model, support_x, n_classes=prototypes.shape[0], head=head, running_step=running)
        network.prototypes.copy_(prototypes)
        network.temperature.fill_(float(self.temperature))
        return network

    def resize_head(self, n_classes: int) -> None:
        """Nothing to resize: prototypes come from the support set, the backbone's head is unused."""
        self.n_way = n_classes

    def adaptation_text(self, steps: int | None = None) -> str:
        kind = "learned temperature" if self.learn_temperature else "temperature"
        value = self.log_temperature.detach().exp().item() if self.learn_temperature else self.fixed_temperature
        flips = " of the support set and its flips" if self.support_augment else ""
        return f"class prototypes{flips} ({self.distance.replace('_', ' ')} distance, {kind} {value:.3g})"

    @classmethod
    def settings_from_legacy(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Before plug-ins the temperature was ``protonet_temperature`` (absent: 1.0)."""
        return {"distance": saved.get("distance", "squared_euclidean"), "temperature": saved.get("protonet_temperature", 1.0)}

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy on the queries, averaged over tasks, and the query logits ``[T, N*Q, N]``."""
        check_task_batch(support_x, support_y, query_x, query_y)
        logits = self._all_task_logits(support_x, support_y, query_x)
        losses = torch.stack([F.cross_entropy(logits[t], query_y[t]) for t in range(logits.shape[0])])
        return losses.mean(), logits


    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Detached query logits ``[T, N*Q, N]``; ``steps`` is ignored (nothing to adapt)."""
        del steps
        if self.support_augment:
            views = [flipped(sx, sy) for sx, sy in zip(support_x, support_y)]
            support_x, support_y = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
        return self._all_task_logits(support_x, support_y, query_x).detach()

    def _all_task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Query logits ``[T, N*Q, N]``, one backbone pass per task (batch norm never mixes tasks)."""
        logits = [self.task_logits(support_x[t], support_y[t], query_x[t]) for t in range(support_x.shape[0])]
        widths = {t.shape[-1] for t in logits}
        if len(widths) != 1:
            raise ValueError(f"every task must have the same number of classes N; got {sorted(widths)}")
        return torch.stack(logits)


def class_prototypes(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Mean embedding ``[N, D]`` per class for labels ``0..N-1`` with ``N = labels.max() + 1``.

    Raises:
        ValueError: a class in ``0..N-1`` has no support example.
    """
    one_hot = F.one_hot(labels, int(labels.max()) + 1).to(embeddings.dtype)
    counts = one_hot.sum(dim=0)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"support labels must cover 0..N-1; classes {missing} have no support example")
    return (one_hot.T @ embeddings) / counts.unsqueeze(1)

