"""Meta-learners: one :class:`MetaLearner` subclass per file, and this registry of the shipped ones.

The registry is the only place besides each learner's own file that names a learner: it gives the
shipped learners their short names on the command line (``--model.algorithm maml``) and reads the
hyperparameters of checkpoints written before learners were plug-ins. Any other subclass of
:class:`MetaLearner` is used by its class path (``--model.algorithm.class_path my_package.MyLearner``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from medmeta.algorithms.anil import ANIL
from medmeta.algorithms.base import EpisodeBatch, MetaLearner, Predictor
from medmeta.algorithms.finetune import FineTune
from medmeta.algorithms.linear_probe import LogisticRegressionProbe
from medmeta.algorithms.maml import MAML
from medmeta.algorithms.maml_pp import MAMLPlusPlus
from medmeta.algorithms.mann import MANN
from medmeta.algorithms.meta_sgd import MetaSGD
from medmeta.algorithms.pixel_nn import pixel_nearest_neighbour
from medmeta.algorithms.proto_maml import ProtoMAML
from medmeta.algorithms.protonet import ProtoNet
from medmeta.plugins import class_path, resolve, spec_of

SHIPPED: tuple[type[MetaLearner], ...] = (
    MAML, MAMLPlusPlus, MetaSGD, ANIL, ProtoMAML, ProtoNet, MANN, FineTune, LogisticRegressionProbe,
)  # fmt: skip
SHORT_NAMES: dict[str, type[MetaLearner]] = {cls.name: cls for cls in SHIPPED}
DEFAULT_ALGORITHM: type[MetaLearner] = MAML  # second-order MAML, the learner medmeta is built around

# Settings of the Lightning module before learners were plug-ins; each now belongs to a learner.
LEGACY_MODULE_SETTINGS = (
    "inner_lr", "inner_steps", "eval_inner_steps", "first_order", "task_reduction", "task_parallel",
    "checkpoint_inner_steps", "distance", "protonet_temperature", "pretrain_classes", "finetune_steps", "finetune_lr",
    "finetune_scope", "multi_step_loss", "multi_step_loss_epochs", "per_step_norm_weights", "learn_inner_lrs",
    "first_order_epochs", "mann_controller", "mann_memory_slots", "mann_key_strength", "mann_label_timing",
)  # fmt: skip


def resolve_algorithm(spec: object) -> tuple[type[MetaLearner], dict[str, Any]]:
    """The learner class of ``spec`` (short name, class path, class, mapping or partial) and its complete settings."""
    return resolve(spec, kind="algorithm", short_names=SHORT_NAMES, base=MetaLearner, parameters=lambda cls: cls.settings())


def algorithm_spec(spec: object) -> dict[str, Any]:
    """``spec`` as the plain ``{"class_path", "init_args"}`` mapping (complete settings) that checkpoints store."""
    return spec_of(*resolve_algorithm(spec))


def build_algorithm(spec: object, model: nn.Module, n_way: int) -> MetaLearner:
    """The learner of ``spec`` around the backbone ``model`` for ``n_way``-class episodes."""
    cls, settings = resolve_algorithm(spec)
    return cls(model, n_way, **settings)


def legacy_algorithm_spec(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The algorithm spec of a checkpoint's flat hyperparameters from before plug-ins (``algorithm: maml`` ...)."""
    cls, _ = resolve_algorithm(saved["algorithm"])
    return saved_algorithm_spec({"class_path": class_path(cls), "init_args": cls.settings_from_legacy(saved)})


def saved_algorithm_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The complete spec of a learner stored in a checkpoint (``{"class_path", "init_args"}``).

    A setting the checkpoint lacks because it was added later takes the value that reproduces the
    checkpoint (the learner's ``settings_added``); the rest of the missing ones take today's defaults.
    """
    cls, _ = resolve_algorithm(spec)
    stored = dict(spec.get("init_args") or {})
    before = {name: value for name, value in cls.settings_added.items() if name not in stored}
    return algorithm_spec({"class_path": class_path(cls), "init_args": {**before, **stored}})


def legacy_setting_name(key: str) -> str | None:
    """Today's name (within the learner's ``init_args``) of an old module setting, or ``None`` if it is not one."""
    if key not in LEGACY_MODULE_SETTINGS:
        return None
    marker = object()
    for cls in SHIPPED:
        for name, value in cls.settings_from_legacy({key: marker}).items():
            if value is marker:
                return name
    return key


__all__ = [
    "ANIL", "EpisodeBatch", "FineTune", "LogisticRegressionProbe", "MAML", "MAMLPlusPlus", "MANN", "MetaLearner", "MetaSGD", "Predictor", "ProtoMAML", "ProtoNet",
    "DEFAULT_ALGORITHM", "SHORT_NAMES", "algorithm_spec", "build_algorithm", "legacy_algorithm_spec", "legacy_setting_name",
    "pixel_nearest_neighbour", "resolve_algorithm", "saved_algorithm_spec",
]  # fmt: skip
