"""Model-agnostic meta-learning (Finn et al., 2017), second order by default: the MAML family's one inner loop.

Functional: the inner loop never clones or mutates the model. Adapted weights are a dict of
tensors fed to ``torch.func.functional_call``; inner gradients come from ``torch.func.grad``, and
the outer loss keeps the graph through every inner step, so ``outer_loss(...).backward()`` puts
the exact second-order meta-gradient into ``model.parameters()``.

:meth:`MAML.trajectory` is the only inner loop: training, evaluation and the adaptation curve
all walk it. Its variants (each in its own file) override hooks: the step's update and rate
(:meth:`MAML.inner_update`: learned rates), the weights the inner loop adapts
(:meth:`MAML.adaptable_parameters`: the head only), where they start on a task
(:meth:`MAML.initial_weights`: a zero head, or one from the support prototypes), the support input
(:meth:`MAML.support_input`: features computed once), extra per-step parameters
(:meth:`MAML.step_parameters`: per-step norm weights), the query loss weight of each step
(:meth:`MAML.step_loss_weights`) and the order (:meth:`MAML.uses_first_order`).

Why this module is longer than 300 lines: it is the MAML family's one inner loop (the trajectory
and its hooks, training in a loop or under vmap, evaluation), kept in one place so that every variant
reads as a few overrides in its own short file.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from medmeta.adapted import export_classifier
from medmeta.algorithms.base import MetaLearner, Predictor, check_task_batch
from medmeta.flips import flip_averaged, flip_view_count, flipped
from medmeta.networks.norm import (
    NotVectorisable,
    composite_norms,
    query_statistics,
    running_statistic_updates,
    uses_running_statistics,
)

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
TaskParallel = Literal["auto", "loop", "vmap"]
HEAD = "head."  # the linear head's parameter names within the backbone (``zero_head``)


class MAML(MetaLearner):
    """Second-order MAML over a meta-batch of tasks with a leading task dimension ``T``.

    Args:
        model: the network; its parameters are the meta-learned initialisation θ.
        n_way: classes per episode (unused: the backbone's head has them).
        inner_lr: inner-loop SGD step size α.
        inner_steps: inner SGD steps on the support set during meta-training.
        eval_inner_steps: inner steps when adapting for evaluation (default: ``inner_steps``).
        first_order: drop second-order terms (FOMAML) when ``True``.
        task_reduction: ``"mean"`` or ``"sum"`` of the query losses over the tasks; ``"sum"`` with
            plain SGD at rate β is the update θ ← θ − β∇θ Σᵢ L_Tᵢ(f_θᵢ') of the paper.
        task_parallel: how the ``T`` tasks of a meta-batch are adapted in training: ``"loop"``
            (one after the other), ``"vmap"`` (all at once with ``torch.func.vmap``) or
            ``"auto"`` (``vmap`` on GPUs, the loop on CPUs, where it measured faster; always the
            loop with per-step running batch-norm statistics, whose updates cannot run under vmap).
            Any model is exact under vmap: torch's batch, instance and layer norms (and any module type
            medmeta does not know) are computed there with batching-correct ops
            (``medmeta.networks.norm.composite_norms``); where that cannot be done exactly (a
            norm layer that updates running statistics) the loop runs instead, with one warning.
        checkpoint_inner_steps: second order in the loop: recompute each inner step's forward and
            backward during the meta-backward (``torch.utils.checkpoint``) instead of keeping its
            activations. Same meta-gradient; memory grows about 3x more slowly with
            ``inner_steps`` for about 1.5x the compute (BENCHMARKS.md).
        support_augment: at evaluation only, adapt on each support image and its flips (every
            non-empty set of spatial axes, with the image's label; ``medmeta.flips``).
        query_augment: at evaluation only, predict each query as the average of the class
            probabilities of its flips (each prediction still depends on its own image only).
        zero_head: start every task's inner loop from a zero linear head (the "zeroing trick" of
            Kao et al., ICLR 2022), in meta-training and at evaluation: the first inner step then
            fits the head alone, along the support set's class means, and the body adapts from
            the second step on. The meta-learned ``model.head`` is never used (only its shape);
            the backbone needs a linear ``head``, and ``inner_steps`` and ``eval_inner_steps`` must
            be at least 1 (without a step the zero head scores every class alike).

    The loss is ``self.loss_fn`` (cross-entropy; assign another function of (logits, targets) to change it).
    """

    name = "maml"

    def __init__(
        self,
        model: nn.Module,
        n_way: int | None = None,
        *,
        inner_lr: float = 0.4,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        task_reduction: Literal["mean", "sum"] = "mean",
        task_parallel: TaskParallel = "auto",
        checkpoint_inner_steps: bool = False,
        support_augment: bool = False,
        query_augment: bool = False,
        zero_head: bool = False,
    ) -> None:
        if task_parallel not in ("auto", "loop", "vmap"):
            raise ValueError(f"task_parallel must be 'auto', 'loop' or 'vmap', got {task_parallel!r}")
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ValueError("inner_steps and eval_inner_steps must be >= 0")
        if task_reduction not in ("mean", "sum"):
            raise ValueError(f"task_reduction must be 'mean' or 'sum', got {task_reduction!r}")
        if zero_head and not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError(f"zero_head needs a backbone with a linear `head`; {type(model).__name__} has none")
        if zero_head and (inner_steps < 1 or (eval_inner_steps is not None and eval_inner_steps < 1)):
            raise ValueError(
                f"zero_head starts every task from a zero head: inner_steps and eval_inner_steps must be at least 1 "
                f"(without a step every class scores alike), got {inner_steps} and "
                f"{inner_steps if eval_inner_steps is None else eval_inner_steps}"
            )
        super().__init__(model, n_way)
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.first_order = first_order
        self.task_reduction = task_reduction
        self.loss_fn: LossFn = F.cross_entropy
        self.task_parallel = task_parallel
        self.checkpoint_inner_steps = checkpoint_inner_steps
        self.support_augment, self.query_augment = support_augment, query_augment
        self.zero_head = zero_head
        self._vmap_blocker: str | None = None  # why a vmap attempt had to fall back to the loop
        self._warned_fallback = False

    # --- what reports say -----------------------------------------------------------------------

    def label(self) -> str:
        """``<name>-first-order`` or ``<name>-second-order``."""
        return f"{super().label()}-{'first' if self.first_order else 'second'}-order"

    def report_settings(self) -> dict[str, object]:
        return {"eval_inner_steps": self.eval_inner_steps, "support_augment": self.support_augment,
                "query_augment": self.query_augment, "zero_head": self.zero_head}  # fmt: skip

    def adaptation_text(self, steps: int | None = None) -> str:
        text = f"{self.eval_inner_steps if steps is None else steps} inner steps"
        if self.zero_head:
            text = "zero head, then " + text
        if self.support_augment:
            text += " on the support set and its flips"
        return text + (", each query predicted from its flips" if self.query_augment else "")

    def running_stat_slots(self) -> int:
        """One slot per query step: the query forward after ``k`` updates uses slot ``k``."""
        return self.inner_steps + 1

    def cuda_graph_safe(self) -> bool:
        """Second order only (the recorded meta-step is the second-order one); not with ``zero_head`` (unchecked on a GPU)."""
        return not self.first_order and not self.zero_head

    # --- hooks of the inner loop ------------------------------------------------------------------

    def adaptable_parameters(self) -> Params:
        """The weights the inner loop adapts (all of the backbone's)."""
        return dict(self.model.named_parameters())

    def initial_weights(self, params: Params, support_x: Tensor, support_y: Tensor) -> Params:
        """The weights the inner loop starts from on one task: θ, its head zeroed under ``zero_head`` (Proto-MAML: from the prototypes)."""
        if not self.zero_head:
            return params
        return {name: torch.zeros_like(p) if name.startswith(HEAD) else p for name, p in params.items()}

    def support_input(self, support_x: Tensor) -> Tensor:
        """What the inner loss sees of the support images (a head-only variant: their features, computed once)."""
        return support_x

    def step_parameters(self, step: int, *, detach: bool = False) -> Params:
        """Extra parameters of the forward with the weights after ``step`` updates (none; MAML++: norm weights)."""
        return {}

    def inner_update(self, params: Params, grads: Params, step: int) -> Params:
        """Inner step ``step``: θ ← θ − α ∇θ L_support (subclasses learn α)."""
        return {name: p - self.inner_lr * grads[name] for name, p in params.items()}

    def step_loss_weights(self) -> list[float]:
        """Weights of the query losses after steps 1..S (or the one of step 0 when S = 0): the last only."""
        return [0.0] * (self.inner_steps - 1) + [1.0]

    def uses_first_order(self) -> bool:
        """Whether training drops the second-order terms now."""
        return self.first_order

    # --- the inner loop -----------------------------------------------------------------------------

    def trajectory(
        self,
        support_x: Tensor,
        support_y: Tensor,
        *,
        steps: int,
        first_order: bool,
        params: Params,
        detach: bool = False,
    ) -> Iterator[tuple[int, Params]]:
        """``(k, θ_k)`` for k = 0..``steps``: the weights after ``k`` inner updates on one task's support set.

        Each ``θ_k`` includes that step's :meth:`step_parameters`, so ``self._forward(θ_k, x)`` is
        the model after ``k`` updates. With ``first_order=False`` the weights stay differentiable
        functions of θ (second order); with ``True`` the inner gradients are constants. ``detach``
        (evaluation) cuts every step from the graph.
        """
        _require_grad_mode()
        if steps > 0:
            self._check_inner_loop_norms()
        params = self.initial_weights(params, support_x, support_y)
        if detach:
            params = {name: p.detach() for name, p in params.items()}
        support_x = self.support_input(support_x)
        checkpointed = self.checkpoint_inner_steps and not first_order and torch.is_grad_enabled()
        support_grad = grad(self._step_support_loss)
        yield 0, {**params, **self.step_parameters(0, detach=detach)}
        for step in range(steps):
            if checkpointed:
                params = self._checkpointed_step(params, step, support_x, support_y)
            else:
                grads = support_grad(params, self.step_parameters(step, detach=detach), support_x, support_y)
                if first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                params = self.inner_update(params, grads, step)
            if detach:
                params = {name: p.detach() for name, p in params.items()}
            yield step + 1, {**params, **self.step_parameters(step + 1, detach=detach)}

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        *,
        steps: int | None = None,
        first_order: bool | None = None,
        params: Params | None = None,
    ) -> Params:
        """Adapted weights θ' for one task after ``steps`` inner steps (the last of :meth:`trajectory`)."""
        steps = self.inner_steps if steps is None else steps
        first_order = self.uses_first_order() if first_order is None else first_order
        params = self.adaptable_parameters() if params is None else params
        for _, state in self.trajectory(support_x, support_y, steps=steps, first_order=first_order, params=params):
            pass
        return state

    def _checkpointed_step(self, params: Params, step: int, support_x: Tensor, support_y: Tensor) -> Params:
        """One second-order inner step whose graph is recomputed in the meta-backward instead of stored.

        ``torch.utils.checkpoint`` around an ``autograd.grad(create_graph=True)`` step: ``torch.func.grad``
        cannot run under checkpointing's saved-tensor hooks. Learned rates read inside get their gradients.
        """
        names = list(params)

        def one_step(x: Tensor, y: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
            # views: each weight a variable of its own, as under torch.func.grad, even where one was computed
            # from others (Proto-MAML's head from the body's weights); their gradients then stay partial ones.
            # A weight that starts as a constant (a zero head) becomes a variable of the step the same way.
            tensors = tuple(t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in tensors)
            current = dict(zip(names, tensors))
            loss = self._step_support_loss(current, self.step_parameters(step), x, y)
            grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
            grads_by_name = {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, tensors, grads)}
            return tuple(self.inner_update(current, grads_by_name, step).values())

        return dict(zip(names, checkpoint(one_step, support_x, support_y, *params.values(), use_reentrant=False)))

    def _step_support_loss(self, params: Params, extra: Params, x: Tensor, y: Tensor) -> Tensor:
        """The support loss descended by an inner step: ``params`` differentiated, ``extra`` (step parameters) not."""
        return self._support_loss({**params, **extra}, x, y)

    def _support_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self._forward(params, x), y)

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        """The backbone's output with ``params`` in place of (some of) its weights."""
        return functional_call(self.model, params, (x,), strict=False)

    def _query_forward(self, params: Params, x: Tensor, step: int) -> Tensor:
        """The output on query images with the weights after ``step`` inner updates.

        Batch norm with per-step running statistics uses (at evaluation) or updates (in training)
        slot ``step``; transductive batch norm uses the query batch's statistics.
        """
        with query_statistics(self.model, step):
            return self._forward(params, x)

    # --- training -------------------------------------------------------------------------------------


    def outer_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The outer loss and the adapted models' query logits ``[T, N*Q, N]`` (kept in the graph)."""
        check_task_batch(support_x, support_y, query_x, query_y)
        losses = logits = None
        if self.vectorises(support_x.device):
            try:
                with composite_norms(self.model):
                    losses, logits = vmap(self.task_loss_and_logits)(support_x, support_y, query_x, query_y)
            except NotVectorisable as error:  # raised where a buffer would change; the loop is exact
                self._vmap_blocker = _describe(self.model, error)
                self._warn_fallback(self._vmap_blocker)
        if losses is None or logits is None:
            pairs = [self.task_loss_and_logits(*task) for task in zip(support_x, support_y, query_x, query_y)]
            losses, logits = torch.stack([pair[0] for pair in pairs]), torch.stack([pair[1] for pair in pairs])
        loss = losses.sum() if self.task_reduction == "sum" else losses.mean()
        return loss, logits

    def task_loss_and_logits(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One task's query loss (weighted over steps by :meth:`step_loss_weights`) and its last step's query logits."""
        weights = self.step_loss_weights()
        first = self.inner_steps + 1 - len(weights)  # the step the first weight belongs to
        task_loss = logits = None
        # the whole inner loop first, then the query forwards (as before the one-loop refactor): the
        # meta-backward then accumulates gradients in the same order, so MAML++ stays bitwise identical
        states = list(self.trajectory(
            support_x, support_y, steps=self.inner_steps, first_order=self.uses_first_order(),
            params=self.adaptable_parameters(),
        ))  # fmt: skip
        for k, state in states:
            weight = weights[k - first] if k >= first else 0.0
            if weight == 0.0 and k != self.inner_steps:
                continue
            logits = self._query_forward(state, query_x, k)
            loss = self.loss_fn(logits, query_y)
            term = loss if weight == 1.0 else weight * loss
            task_loss = term if task_loss is None else task_loss + term
        return task_loss, logits

    # --- evaluation -----------------------------------------------------------------------------------

    def adapt_and_predict(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None
    ) -> Tensor:
        """Query logits ``[T, N*Q, N]`` after ``eval_inner_steps`` steps on each task (works under ``no_grad``; detached)."""
        steps = self.eval_inner_steps if steps is None else steps
        return self.adapt_and_predict_every_step(support_x, support_y, query_x, steps=steps, at_steps=[steps])[-1]

    def adapt_and_predict_every_step(
        self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None,
        at_steps: Sequence[int] | None = None,
    ) -> Tensor:
        """Detached query logits after 0, 1, ..., ``steps`` inner steps: ``[steps + 1, T, N*Q, N]``.

        The last entry equals :meth:`adapt_and_predict`; the others give the adaptation curve.
        ``at_steps`` (ascending, ending at ``steps``) predicts the queries after those steps only:
        ``[len(at_steps), T, N*Q, N]``; the inner loop is the same.
        """
        steps = self._evaluation_steps(steps)
        wanted = list(range(steps + 1)) if at_steps is None else [int(k) for k in at_steps]
        if not wanted or wanted[-1] != steps or any(b <= a for a, b in itertools.pairwise(wanted)) or wanted[0] < 0:
            raise ValueError(f"at_steps must ascend from >= 0 and end at the {steps} adaptation steps, got {wanted}")
        theta = {name: p.detach() for name, p in self.adaptable_parameters().items()}
        curves = []
        for task in range(support_x.shape[0]):
            task_x, task_y = self._evaluation_support(support_x[task], support_y[task])
            states = self.trajectory(task_x, task_y, steps=steps, first_order=True, params=theta, detach=True)
            curves.append(torch.stack([
                self._predict_queries(state, query_x[task], k).detach() for k, state in states if k in wanted
            ]))  # fmt: skip
        return torch.stack(curves, dim=1)

    def adaptation_steps(self) -> int:
        return self.eval_inner_steps

    def _evaluation_steps(self, steps: int | None) -> int:
        """``steps``, or ``eval_inner_steps`` for ``None``; below 1 refused with ``zero_head`` (every class scores alike)."""
        steps = self.eval_inner_steps if steps is None else steps
        if self.zero_head and steps < 1:
            raise ValueError(f"zero_head starts every task from a zero head: adapt with at least 1 step, got {steps}")
        return steps

    def _evaluation_support(self, support_x: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
        """The support set adapted on at evaluation: with its flips under ``support_augment``."""
        return flipped(support_x, support_y) if self.support_augment else (support_x, support_y)

    def _predict_queries(self, params: Params, query_x: Tensor, step: int) -> Tensor:
        """Query logits at evaluation: :meth:`_query_forward`, averaged over the query's flips under ``query_augment``."""
        if self.query_augment:
            return flip_averaged(lambda x: self._query_forward(params, x, step), query_x)
        return self._query_forward(params, query_x, step)

    def predictor(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> Predictor:
        """The query forward with the weights adapted to this support set (``eval_inner_steps`` by default)."""
        steps = self._evaluation_steps(steps)
        adapted = self._adapted_weights(support_x, support_y, steps)
        calls = flip_view_count(support_x.dim() - 2) if self.query_augment else 1
        return Predictor(lambda x: self._predict_queries(adapted, x, steps), backbone_calls=calls)

    def adapted_network(self, support_x: Tensor, support_y: Tensor, *, steps: int | None = None) -> nn.Module:
        """The backbone with the weights after ``steps`` inner steps (and that step's norm weights), batch norm fixed.

        Batch-norm statistics: the running-statistic slot of step ``steps`` with ``norm_mode:
        running`` (as :meth:`_query_forward`), otherwise the support set's at the adapted weights.
        """
        steps = self._evaluation_steps(steps)
        adapted = self._adapted_weights(support_x, support_y, steps)
        running = steps if uses_running_statistics(self.model) else None
        fitted_on = self._evaluation_support(support_x, support_y)[0]
        return export_classifier(self.model, fitted_on, n_classes=int(support_y.max()) + 1, params=adapted,
                                 running_step=running, head={"kind": "backbone", "query_flips": self.query_augment})  # fmt: skip

    def _adapted_weights(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """Detached weights (with step ``steps``'s step parameters) after ``steps`` inner steps on one support set."""
        theta = {name: p.detach() for name, p in self.adaptable_parameters().items()}
        support_x, support_y = self._evaluation_support(support_x, support_y)
        with torch.enable_grad():
            adapted = self.adapt(support_x, support_y, steps=steps, first_order=True, params=theta)
        return {name: p.detach() for name, p in adapted.items()}

    # --- how tasks run --------------------------------------------------------------------------------

    def vectorises(self, device: torch.device) -> bool:
        """Whether training adapts the tasks of a meta-batch with ``vmap`` on ``device``."""
        if self.task_parallel == "loop":
            return False
        if self.checkpoint_inner_steps:
            if self.task_parallel == "vmap":
                raise ValueError("checkpoint_inner_steps needs task_parallel='loop' (torch.func transforms cannot checkpoint)")
            return False
        if uses_running_statistics(self.model):
            if self.task_parallel == "vmap":
                raise ValueError(
                    "task_parallel='vmap' cannot update per-step running batch-norm statistics; "
                    "use task_parallel='loop' or 'auto', or norm_mode='transductive'"
                )
            return False
        if not (self.task_parallel == "vmap" or device.type == "cuda"):
            return False
        blocker = self._vmap_blocker or _running_statistics_blocker(self.model)
        if blocker is not None:
            self._warn_fallback(blocker)
            return False
        return True

    def _warn_fallback(self, reason: str) -> None:
        """Warn once per algorithm that its tasks run in the loop instead of under ``vmap``."""
        if not self._warned_fallback:
            self._warned_fallback = True
            message = f"task_parallel={self.task_parallel!r}: adapting tasks in a loop, not with vmap: {reason}"
            warnings.warn(message, stacklevel=3)

    def _inner_loop_module(self) -> tuple[str, nn.Module]:
        """The module whose forward runs inside the inner gradient (``torch.func.grad``), with its name prefix."""
        return "", self.model

    def _check_inner_loop_norms(self) -> None:
        """Refuse norm layers that would update running statistics inside ``torch.func.grad``."""
        if torch.compiler.is_compiling():
            return
        prefix, module = self._inner_loop_module()
        layers = running_statistic_updates(module)
        if layers:
            name, layer = layers[0]
            raise ValueError(
                f"layer {prefix + name!r} ({type(layer).__name__}) updates running statistics in training mode "
                "(track_running_stats=True), which the functional inner loop cannot do; build it with "
                "track_running_stats=False (batch statistics, as in the MAML paper) or use medmeta's networks "
                "(norm_mode='running' keeps per-step running statistics)"
            )


def _running_statistics_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot run under vmap now (a norm layer updating running statistics), or ``None``."""
    layers = running_statistic_updates(model)
    if not layers:
        return None
    (name, layer), more = layers[0], f" (and {len(layers) - 1} more)" if len(layers) > 1 else ""
    return (
        f"layer {name!r} ({type(layer).__name__}){more} updates running statistics in training mode "
        "(track_running_stats=True), which cannot run under vmap"
    )


def _describe(model: nn.Module, error: NotVectorisable) -> str:
    """The reason of ``error``, naming the layer whose buffer it concerns when ``model`` holds it."""
    for name, module in model.named_modules():
        if error.buffer is not None and any(b is error.buffer for b in module.buffers(recurse=False)):
            return f"layer {name!r} ({type(module).__name__}): {error}"
    return f"a module of {type(model).__name__}: {error}"


def _require_grad_mode() -> None:
    if torch.compiler.is_compiling():  # traced code cannot query the mode; the eager call checked it
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "MAML adaptation needs gradients but is running under torch.inference_mode; "
            "set `trainer.inference_mode: false` in the config (Trainer(inference_mode=False))."
        )
