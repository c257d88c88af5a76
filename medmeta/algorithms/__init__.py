"""Meta-learning algorithms: functional, parameters in, loss or logits out.

Every algorithm is an ``nn.Module`` holding the backbone as ``self.model`` and offering
``outer_loss_and_logits`` (training) and ``adapt_and_predict`` (evaluation) on batches of tasks.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from medmeta.algorithms.anil import ANIL
from medmeta.algorithms.finetune import FineTune, FinetuneScope
from medmeta.algorithms.maml import MAML, TaskParallel
from medmeta.algorithms.maml_pp import MAMLPlusPlus
from medmeta.algorithms.mann import MANN
from medmeta.algorithms.meta_sgd import MetaSGD
from medmeta.algorithms.pixel_nn import pixel_nearest_neighbour
from medmeta.algorithms.protonet import ProtoNet

AlgorithmName = Literal["maml", "maml_pp", "meta_sgd", "anil", "protonet", "mann", "finetune"]
GRADIENT_BASED = {"maml": MAML, "meta_sgd": MetaSGD, "anil": ANIL}


def build_algorithm(
    name: AlgorithmName,
    model: nn.Module,
    *,
    n_way: int,
    inner_lr: float = 0.4,
    inner_steps: int = 5,
    eval_inner_steps: int | None = None,
    first_order: bool = False,
    task_reduction: Literal["mean", "sum"] = "mean",
    task_parallel: TaskParallel = "auto",
    checkpoint_inner_steps: bool = False,
    distance: Literal["squared_euclidean", "cosine"] = "squared_euclidean",
    temperature: float = 1.0,
    pretrain_classes: int = 64,
    finetune_steps: int = 100,
    finetune_lr: float = 0.01,
    finetune_scope: FinetuneScope = "head",
    maml_pp: dict[str, object] | None = None,
    mann: dict[str, object] | None = None,
) -> nn.Module:
    """The algorithm ``name`` around ``model``, with the settings that algorithm uses.

    ``maml_pp`` holds MAML++'s switches (see ``MAMLPlusPlus``) when ``name`` is ``"maml_pp"``;
    ``mann`` the MANN's settings (see ``MANN``) when ``name`` is ``"mann"``.
    """
    if name in GRADIENT_BASED:
        return GRADIENT_BASED[name](
            model, inner_lr=inner_lr, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps,
            first_order=first_order, task_reduction=task_reduction, task_parallel=task_parallel,
            checkpoint_inner_steps=checkpoint_inner_steps,
        )  # fmt: skip
    if name == "maml_pp":
        return MAMLPlusPlus(
            model, inner_lr=inner_lr, inner_steps=inner_steps, eval_inner_steps=eval_inner_steps,
            first_order=first_order, task_reduction=task_reduction, task_parallel=task_parallel,
            checkpoint_inner_steps=checkpoint_inner_steps, **(maml_pp or {}),
        )  # fmt: skip
    if name == "protonet":
        return ProtoNet(model, distance=distance, temperature=temperature)
    if name == "mann":
        return MANN(model, n_way=n_way, **(mann or {}))
    if name == "finetune":
        return FineTune(
            model, pretrain_classes=pretrain_classes, finetune_steps=finetune_steps, finetune_lr=finetune_lr,
            finetune_scope=finetune_scope,
        )  # fmt: skip
    raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted([*GRADIENT_BASED, 'maml_pp', 'protonet', 'mann', 'finetune'])}")


__all__ = ["ANIL", "FineTune", "MAML", "MAMLPlusPlus", "MANN", "MetaSGD", "ProtoNet", "build_algorithm", "pixel_nearest_neighbour"]
