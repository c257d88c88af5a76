"""The meta-learner contract: what the Lightning module, the evaluation callback and ``diagnose`` rely on.

A meta-learner is one subclass of :class:`MetaLearner` in one file. It receives the backbone (and
the episodes' ``n_way``) from medmeta and owns every setting of its own as a keyword argument of
``__init__``, so the CLI can build it from a class path::

    --model.algorithm.class_path my_package.MyLearner --model.algorithm.init_args.steps 3

Episode batches carry a leading task dimension ``T`` (see :class:`EpisodeBatch`). Two methods are
required: a training loss on a meta-batch (:meth:`MetaLearner.outer_loss_and_logits`, or
:meth:`MetaLearner.meta_loss` when the whole batch is needed) and the evaluation
:meth:`MetaLearner.adapt_and_predict`. Everything else is an optional hook with a no-op default;
``docs/extending.md`` walks through a complete example.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypedDict

from torch import Tensor, nn

from medmeta.plugins import init_parameters

CURVE_POINTS = 11  # the adaptation curve's points at most: every step up to 10, then evenly spaced


class EpisodeBatch(TypedDict, total=False):
    """A meta-batch of ``T`` episodes, as the data module yields it (N classes, K shots, Q queries)."""

    support_x: Tensor  # [T, N*K, C, *spatial]
    support_y: Tensor  # [T, N*K], episode labels 0..N-1
    query_x: Tensor  # [T, N*Q, C, *spatial]
    query_y: Tensor  # [T, N*Q]
    support_class: Tensor  # [T, N*K], class ids within the split (meta-train ids in training)
    query_class: Tensor  # [T, N*Q]
    episode: Tensor  # [T], episode index


class Predictor(NamedTuple):
    """The adapted model's query logits as a function of query images, for ``diagnose`` and Grad-CAM.

    ``forward(x)`` maps query images ``[B, C, *spatial]`` to logits ``[B, N]``. It runs the backbone
    ``backbone_calls`` times; the query images pass through the last of those calls, as its last
    ``B`` rows (Grad-CAM reads the activations of exactly those rows).
    """

    forward: Callable[[Tensor], Tensor]
    backbone_calls: int = 1


class MetaLearner(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every meta-learner: the backbone as ``self.model``, ``n_way``, and the hooks below.

    Subclass it, call ``super().__init__(model, n_way)`` first, and implement
    :meth:`outer_loss_and_logits` (or :meth:`meta_loss`) and :meth:`adapt_and_predict`. Parameters
    registered on the subclass (learned rates, a memory controller, a pre-training head) are
    meta-learned with the backbone: the optimiser sees ``self.parameters()``.

    Class attributes a subclass may set:
        name: its short name on the command line (``--model.algorithm <name>``); the class name works too.
        transductive_batches: what batch norm's batch statistics are computed over in transductive
            mode, for reports (``"each task's support and query images together"`` for a learner that
            embeds them in one pass).
        settings_added: settings added after checkpoints of the learner were first written, each
            with the value that reproduces such a checkpoint (its behaviour before the setting
            existed); a checkpoint that lacks one gets this value on loading, not today's default.
        adapts_in_steps: whether the ``steps`` of the adaptation methods mean anything to it (False:
            prototypes, a probe fitted to convergence, a memory), so ``diagnose --steps`` is refused.
    """

    name: ClassVar[str] = ""
    transductive_batches: ClassVar[str] = "each adaptation/query batch"
    settings_added: ClassVar[Mapping[str, Any]] = {}
    adapts_in_steps: ClassVar[bool] = True

    def __init__(self, model: nn.Module, n_way: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.n_way = n_way

    # --- the contract -----------------------------------------------------------------------------

    def meta_loss(self, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Training: the loss of a meta-batch (differentiable in the meta-parameters) and its query logits ``[T, N*Q, N]``.

        The default calls :meth:`outer_loss_and_logits` on the four episode tensors; override this
        instead when the loss needs more of the batch (the fine-tune baseline reads the class ids).
        """
        return self.outer_loss_and_logits(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])

    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The meta-loss over the ``T`` episodes and the query logits ``[T, N*Q, N]`` (see :meth:`meta_loss`)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither outer_loss_and_logits nor meta_loss")

    def outer_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """The meta-loss of :meth:`outer_loss_and_logits` alone; differentiable in the meta-parameters."""
        return self.outer_loss_and_logits(support_x, support_y, query_x, query_y)[0]

    @abc.abstractmethod
    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Evaluation: detached query logits ``[T, N*Q, N]`` after adapting to each episode's support set.

        ``steps`` overrides the learner's number of adaptation steps where it has one. Runs with
        gradients enabled (adaptation may need them) but must not change the meta-parameters.
        """

    # --- optional hooks ---------------------------------------------------------------------------

    def adapt_and_predict_every_step(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None,
        at_steps: Sequence[int] | None = None,
    ) -> Tensor | None:
        """Query logits after 0, 1, ... adaptation steps ``[S + 1, T, N*Q, N]`` (the adaptation curve), or ``None``.

        ``at_steps`` (ascending, ending at ``S``): only after those steps, ``[len(at_steps), T, N*Q, N]``.
        """
        return None

    def adaptation_steps(self) -> int | None:
        """The number of adaptation steps at evaluation, for learners that adapt in steps (``None``: not one).

        With it the test records the adaptation curve after at most ``CURVE_POINTS`` steps
        (:func:`curve_steps`) instead of after every one.
        """
        return None

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every training epoch (for settings scheduled by epoch)."""

    def predictor(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> Predictor | None:
        """The model adapted to one task's support set (no task dimension) as a :class:`Predictor`.

        ``None`` (the default): ``diagnose`` predicts and explains with :meth:`adapted_network` instead; a
        learner offering neither is refused. Its logits must equal
        :meth:`adapt_and_predict` on the same support set and query batch.
        """
        return None

    def adapted_network(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> nn.Module:
        """The model adapted to one task's support set (no task dimension) as a standalone classifier.

        Maps images ``[B, C, *spatial]`` to logits ``[B, N]``, each row from its own image alone
        (non-transductive), and its ``state_dict`` holds everything adaptation produced, so that
        ``diagnose --save-adapted`` can save it as a bundle. The shipped learners return a
        :class:`medmeta.adapted.AdaptedClassifier` (built with :func:`medmeta.adapted.export_classifier`).
        The default refuses: the learner cannot export an adapted model.
        """
        raise NotImplementedError(f"{self.label()} cannot export an adapted model")

    def parameter_groups(self, meta_lr: float) -> list[dict[str, Any]]:
        """The outer optimiser's parameter groups: every meta-parameter at ``meta_lr``.

        Learners whose meta-parameters want another outer step (learned inner rates) split them off.
        """
        return [{"params": list(self.parameters()), "lr": meta_lr}]

    def resize_head(self, n_classes: int) -> None:
        """Give the backbone ``n_classes`` outputs (``diagnose`` with a different number of diagnoses).

        The default replaces ``model.head`` (an ``nn.Linear``) with a zero-initialised one, which
        scores every class alike until adaptation fits it; learners that keep per-weight state
        for the head extend this.
        """
        head = getattr(self.model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{type(self).__name__}: the backbone has no linear `head` to resize to {n_classes} classes")
        new = nn.Linear(head.in_features, n_classes).to(head.weight.device, head.weight.dtype)
        nn.init.zeros_(new.weight)
        nn.init.zeros_(new.bias)
        self.model.head = new
        self.n_way = n_classes

    def running_stat_slots(self) -> int:
        """Per-step running batch-norm statistic slots the learner's query forwards use (``norm_mode: running``)."""
        return 1

    def cuda_graph_safe(self) -> bool:
        """Whether a meta-step can be recorded once as CUDA graphs and replayed (``cuda_graph``; no setting may change between steps)."""
        return False

    def label(self) -> str:
        """How reports and ``metrics.json`` name this learner."""
        return self.name or type(self).__name__

    def report_settings(self) -> dict[str, object]:
        """Settings that ``metrics.json`` records next to the test figures (e.g. the adaptation steps)."""
        return {}

    def adaptation_text(self, steps: int | None = None) -> str:
        """One phrase for reports saying how the learner adapts to a support set."""
        return "adaptation to the support set"

    # --- settings -----------------------------------------------------------------------------------

    @classmethod
    def settings(cls) -> dict[str, inspect.Parameter]:
        """The learner's own settings: the keyword arguments of ``__init__`` after ``model`` and ``n_way``.

        ``**kwargs`` passed on to a parent class contribute the parent's settings.
        """
        return {name: p for name, p in init_parameters(cls).items() if name not in ("model", "n_way")}

    @classmethod
    def settings_from_legacy(cls, saved: Mapping[str, Any]) -> dict[str, Any]:
        """This learner's settings from the flat hyperparameters of a checkpoint written before plug-ins.

        The default takes the keys named like a setting; learners whose settings were renamed
        override this.
        """
        return {name: saved[name] for name in cls.settings() if name in saved}


def curve_steps(total: int, max_points: int = CURVE_POINTS) -> list[int]:
    """The inner steps an adaptation curve of ``total`` steps is recorded after: every one when they are at
    most ``max_points`` (with step 0), otherwise ``max_points`` of them evenly spaced from 0 to ``total``.

    >>> curve_steps(4), curve_steps(40)
    ([0, 1, 2, 3, 4], [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40])
    """
    if total < 0 or max_points < 2:
        raise ValueError(f"curve_steps needs total >= 0 and max_points >= 2, got {total} and {max_points}")
    if total + 1 <= max_points:
        return list(range(total + 1))
    return sorted({round(i * total / (max_points - 1)) for i in range(max_points)})


def check_task_batch(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> None:
    """Raise ``ValueError`` unless the four tensors form a meta-batch of the :class:`EpisodeBatch` shapes."""
    if support_x.dim() < 3 or support_y.dim() < 2 or query_y.dim() < 2:
        raise ValueError(
            "expected a leading task dimension: support_x [T, N*K, C, ...], support_y [T, N*K], "
            f"query_x [T, N*Q, C, ...], query_y [T, N*Q]; got {tuple(support_x.shape)}, "
            f"{tuple(support_y.shape)}, {tuple(query_x.shape)}, {tuple(query_y.shape)}"
        )
    if not (support_x.shape[0] == support_y.shape[0] == query_x.shape[0] == query_y.shape[0]):
        raise ValueError("support and query tensors must share the task dimension T")
