"""The Lightning module: meta-trains a backbone with a meta-learner, adapts at evaluation, logs the scalars.

The learner (``algorithm``) and the backbone are plug-ins chosen by class path or short name
(``medmeta.algorithms``, ``medmeta.networks``). The module computes per-episode query
probabilities and logs scalars; the evaluation callback (``medmeta.evaluation.callback``) writes
every test output (metrics.json, per_episode.csv, figures, the frozen episodes).

Why this module is longer than 300 lines: Lightning wants training, validation, test and checkpoint
hooks on one class; each hook is short and holds no learner- or backbone-specific code.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

import lightning as L
import torch
from torch import nn

from medmeta.algorithms import DEFAULT_ALGORITHM, EpisodeBatch, MetaLearner, pixel_nearest_neighbour, resolve_algorithm
from medmeta.algorithms.base import curve_steps
from medmeta.algorithms.cuda_graph import GraphedOuterLoss
from medmeta.evaluation.metrics import mean_and_ci95, per_episode_metrics, pooled_ece
from medmeta.networks import DEFAULT_BACKBONE, backbone_spec, build_backbone
from medmeta.networks.initialise import initialise_backbone
from medmeta.networks.norm import describe_normalisation, norm_kinds, set_running_stat_slots, uses_running_statistics
from medmeta.plugins import spec_of

logger = logging.getLogger(__name__)

CURVE_EPISODES = 100  # test episodes whose query accuracy is also recorded along the inner steps (the adaptation curve)
AlgorithmArg = Union[Callable[[nn.Module, int], MetaLearner], str]  # the CLI gives a class path as a partial
BackboneArg = Union[Callable[[], nn.Module], str]


def check_learning_rate(name: str, value: object) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is a positive, finite learning rate.

    Zero is refused too: a zero inner rate adapts nothing while still taking the inner steps (set
    ``eval_inner_steps: 0`` to evaluate without adaptation, except with ``zero_head``, whose zero head
    needs a step), and a zero outer rate trains nothing.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        hint = (" (to evaluate without adaptation, set its eval_inner_steps to 0; not with zero_head, whose zero head "
                "needs a step)" if name.endswith("inner_lr") else "")  # fmt: skip
        raise ValueError(f"{name} must be a positive learning rate, got {value!r}{hint}")


def check_learner_rates(
    settings: Mapping[str, Any], prefix: str = "model.algorithm.init_args.", optional: Collection[str] | None = None
) -> None:
    """Every learner setting named ``*_lr`` is a learning rate: positive and finite.

    ``None`` passes for the names in ``optional`` (settings whose default is ``None``); ``optional=None``
    lets every ``None`` pass (the CLI, whose parser has already checked each setting's type).
    """
    for name, value in settings.items():
        if name.endswith("_lr") and not (value is None and (optional is None or name in optional)):
            check_learning_rate(prefix + name, value)


@dataclass
class TestResults:
    """What the module computed on the test episodes (all DDP processes together), for the evaluation callback."""

    probs: torch.Tensor  # [E, N*Q, N] query-class probabilities
    labels: torch.Tensor  # [E, N*Q]
    class_ids: torch.Tensor  # [E, N] test-split class index behind each episode label
    episode_ids: torch.Tensor  # [E]
    curve: torch.Tensor | None  # [E', P] query accuracy after the inner steps curve_steps (first CURVE_EPISODES)
    curve_steps: list[int] | None  # the P inner steps the curve's columns are after: 0 ... S
    pixel_acc: torch.Tensor | None  # [E] accuracy of nearest neighbour on pixels
    example: dict[str, torch.Tensor] | None  # the first episode, with its predictions


class FewShotModule(L.LightningModule):
    """Meta-trains a backbone on episode batches with a meta-learner (the registry's default learner unless chosen).

    Args:
        algorithm: the meta-learner: a ``MetaLearner`` subclass by class path with its settings
            (``{"class_path": ..., "init_args": {...}}``; on the command line ``--model.algorithm.class_path``
            and ``--model.algorithm.init_args.<setting>``), a shipped learner's short or class name
            (``medmeta.algorithms.SHORT_NAMES``), or the class.
        backbone: the network: any ``nn.Module`` by class path with its settings
            (``--model.backbone.class_path``, ``--model.backbone.init_args.<setting>``) or a shipped
            backbone's short name (``medmeta.networks.SHORT_NAMES``); see ``medmeta.networks`` for the interface.
        n_way: classes per episode (linked to the data module's ``n_way`` by the CLI).
        in_channels: image channels (linked to the data module).
        image_size: image side length (linked to the data module).
        spatial_dims: 2 or 3 (linked to the data module).
        norm_mode: batch norm of query images at evaluation: ``"transductive"`` (statistics of
            the query batch, as in Finn et al., 2017) or ``"running"`` (per-step running statistics
            gathered in meta-training, so each query is predicted from the support set alone).
            Reports and ``metrics.json`` state which was used.
        cuda_graph: on CUDA, record each meta-training step once as CUDA graphs and replay it
            (learners whose ``cuda_graph_safe()`` is true; same numbers, no launch overhead;
            episode shapes must stay fixed). Elsewhere it warns once and runs eagerly.
        cosine_annealing: cosine-anneal the outer learning rate to 0 over ``trainer.max_steps``.
        meta_lr: Adam learning rate of the outer loop (``--optimizer`` on the CLI overrides it).
        pixel_baseline: also score a nearest-neighbour-on-pixels baseline on the test episodes.
        nonfinite: a non-finite meta-loss or meta-gradient ``"stop"``s the run naming the episodes,
            or ``"skip"``s that update (counted in ``train/skipped_steps``); no update is applied either way.
        init_from: a file of pretrained backbone weights (a medmeta checkpoint, e.g. of a fine-tune
            pre-training run, or a plain state dict: ``medmeta.networks.initialise``), loaded when a
            fit starts from scratch (not when it resumes); the head is re-initialised for ``n_way``.
    """

    def __init__(
        self,
        *,
        algorithm: AlgorithmArg = DEFAULT_ALGORITHM,
        backbone: BackboneArg = DEFAULT_BACKBONE,
        n_way: int = 5,
        in_channels: int = 1,
        image_size: int = 32,
        spatial_dims: int = 2,
        norm_mode: Literal["transductive", "running"] = "transductive",
        cuda_graph: bool = False,
        cosine_annealing: bool = False,
        meta_lr: float = 1e-3,
        pixel_baseline: bool = True,
        nonfinite: Literal["stop", "skip"] = "stop",
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        check_learning_rate("model.meta_lr", meta_lr)
        if norm_mode not in ("transductive", "running"):
            raise ValueError(f"norm_mode must be 'transductive' or 'running', got {norm_mode!r}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        learner, settings = resolve_algorithm(algorithm)
        check_learner_rates(settings, optional={n for n, p in learner.settings().items() if p.default is None})
        # hyperparameters hold the plain specs (complete settings): checkpoints load with weights_only, loggers show them
        algorithm, backbone = spec_of(learner, settings), backbone_spec(backbone)
        self.save_hyperparameters()
        for hparams in (self.hparams, self._hparams_initial):  # under the CLI these are its config, not the locals
            hparams.update(algorithm=algorithm, backbone=backbone)
        model = build_backbone(
            backbone, in_channels=in_channels, n_way=n_way, spatial_dims=spatial_dims, image_size=image_size,
            running_stat_steps=1 if norm_mode == "running" else 0,
        )  # fmt: skip
        if norm_mode == "running" and not uses_running_statistics(model):
            raise ValueError(
                f"norm_mode='running' applies to batch norm; the backbone's {norm_kinds(model)} already uses "
                "per-sample or per-group statistics"
            )
        self.algorithm = learner(model, n_way, **settings)
        if norm_mode == "running":
            set_running_stat_slots(model, self.algorithm.running_stat_slots())
        if cuda_graph and not self.algorithm.cuda_graph_safe():
            raise ValueError(f"cuda_graph is for learners that can record a fixed meta-step; {self.algorithm.label()} cannot")
        self._graphed = GraphedOuterLoss(self.algorithm) if cuda_graph else None
        self.skipped_steps, self._last_episodes = 0, []
        self._buffers_before: dict[str, torch.Tensor] = {}  # this optimizer step's buffers as they were before it
        self._step_open = False  # a micro-batch of the coming optimizer step has run
        self.on_validation_epoch_start()  # the per-episode validation outputs, empty
        self.seen_classes: dict[str, list[str]] | None = None  # of the checkpoint this module was loaded from
        self.test_summary: dict[str, object] = {}  # written by the evaluation callback after a test
        self.tested_weights_note: str | None = None  # set by the CLI when a test after fit uses unselected weights
        self.test_results: TestResults | None = None
        self._reset_test_outputs()

    @property
    def model(self) -> nn.Module:
        """The backbone being meta-trained."""
        return self.algorithm.model

    # --- training ---------------------------------------------------------------------------------

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        """The meta-loss over the meta-batch; refuses non-finite losses before any update."""
        self._check_n_way(batch)
        if not self._step_open:  # an optimizer step's first micro-batch (of accumulate_grad_batches)
            self._buffers_before = {name: b.clone() for name, b in self.named_buffers()}  # running statistics, say
            self._last_episodes = []  # the episodes of every micro-batch of this optimizer step
            self._step_open = True
        if self._graphed is not None:
            loss, logits = self._graphed(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])
        else:
            loss, logits = self.algorithm.meta_loss(batch)
        episodes = batch["episode"].tolist() if "episode" in batch else []
        self._last_episodes += episodes
        if not torch.isfinite(loss) and self.hparams.nonfinite == "stop":
            self._restore_buffers()
            raise FloatingPointError(
                f"non-finite meta-loss {loss.item()} at training episodes {episodes}; no update was applied"
            )
        tasks = batch["support_x"].shape[0]
        accuracy = (logits.detach().argmax(dim=-1) == batch["query_y"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=tasks)
        self.log("train/acc", accuracy, prog_bar=True, batch_size=tasks)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite meta-gradient stops the run (``nonfinite="stop"``) or skips this update (``"skip"``).

        Skipping drops every gradient, so the optimiser changes no parameter and no moment, and puts
        back the buffers the step's forwards moved (running batch-norm statistics, over every micro-batch of
        ``accumulate_grad_batches``); the count is logged as ``train/skipped_steps``. Under DDP the gradients
        are already averaged, so every rank sees the same fault and skips together. Under an enabled
        ``GradScaler`` (``16-mixed`` on a GPU) an inf gradient is a loss-scale overflow, left to the scaler,
        which skips the step and lowers its scale (the non-finite loss check stays).
        """
        self._step_open = False  # the next training step starts the next optimizer step
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        if scaler is not None and scaler.is_enabled():
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return
        self._restore_buffers()  # the forward already moved running statistics: back to before this step
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite meta-gradient at training episodes {self._last_episodes}; no update was applied "
                "(set model.nonfinite: skip to skip such steps instead)"
            )
        for p in self.parameters():
            p.grad = None
        self.skipped_steps += 1
        logger.warning("skipped the update of training episodes %s: non-finite meta-gradient", self._last_episodes)
        self.log("train/skipped_steps", float(self.skipped_steps))

    def _restore_buffers(self) -> None:
        """Put every buffer back as it was before this optimizer step (an update skipped or refused changes nothing)."""
        with torch.no_grad():
            for name, buffer in self.named_buffers():
                if name in self._buffers_before:
                    buffer.copy_(self._buffers_before[name])

    def on_fit_start(self) -> None:
        """A fit from scratch starts from ``init_from``'s backbone weights (a resumed fit from its checkpoint's)."""
        if self.hparams.init_from and self.trainer.ckpt_path is None:
            initialise_backbone(self.model, Path(self.hparams.init_from))

    def on_train_epoch_start(self) -> None:
        """Tell the learner the epoch (for settings scheduled by epoch)."""
        self.algorithm.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, object]:
        """Adam at ``meta_lr`` on all meta-parameters (groups of the learner's own), optionally cosine-annealed per step.

        LightningCLI's ``--optimizer``/``--lr_scheduler`` replace this.
        """
        groups = self.algorithm.parameter_groups(self.hparams.meta_lr)
        grouped = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in self.parameters() if id(p) not in grouped]  # the module's own, if any
        optimiser = torch.optim.Adam(groups + ([{"params": rest}] if rest else []), lr=self.hparams.meta_lr)
        if not self.hparams.cosine_annealing:
            return optimiser
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("cosine_annealing needs trainer.max_steps to know the schedule length")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self) -> list[L.Callback]:
        """The callbacks every run of this module needs (test outputs, seen-class records), unless the trainer has its own."""
        from medmeta.callbacks import SeenClasses
        from medmeta.evaluation.callback import EvaluationReport

        present = [type(callback) for callback in self.trainer.callbacks]
        return [kind() for kind in (EvaluationReport, SeenClasses) if not any(issubclass(p, kind) for p in present)]

    # --- evaluation -------------------------------------------------------------------------------

    def _adapted_logits(self, batch: EpisodeBatch) -> torch.Tensor:
        self._check_n_way(batch)
        with torch.enable_grad():
            return self.algorithm.adapt_and_predict(batch["support_x"], batch["support_y"], batch["query_x"])

    def on_validation_epoch_start(self) -> None:
        self._val_outputs: dict[str, list[torch.Tensor]] = {"accuracy": [], "episode_ids": []}

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        """Adapt to each frozen validation episode and keep its query accuracy (logged for the epoch below)."""
        logits = _finite(self._adapted_logits(batch), batch, "validation")
        self._val_outputs["accuracy"].append((logits.argmax(dim=-1) == batch["query_y"]).float().mean(dim=1).detach())
        self._val_outputs["episode_ids"].append(_episode_ids(batch))

    def on_validation_epoch_end(self) -> None:
        """``val/acc``: the mean query accuracy over the validation episodes of every process, each episode once."""
        if not self._val_outputs["accuracy"]:
            return
        _, accuracy = self._unique_episodes(self._gather(self._val_outputs["episode_ids"]),
                                            self._gather(self._val_outputs["accuracy"]))  # fmt: skip
        self.log("val/acc", accuracy.mean(), prog_bar=True, sync_dist=True)  # the same value on every rank

    def predict_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        """Query-class probabilities ``[T, N*Q, N]`` after adapting to each episode."""
        return self._adapted_logits(batch).softmax(dim=-1)

    def test_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        """Adapt to each frozen test episode; keep the query probabilities for the metrics and the callback.

        The first ``CURVE_EPISODES`` episodes also record query accuracy along the inner steps: after
        every one, or after ``CURVE_POINTS`` evenly spaced ones for long adaptations (``curve_steps``).
        """
        self._check_n_way(batch)
        sx, sy, qx, qy = batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"]
        curve = None
        with torch.enable_grad():
            if self._outputs["curve_episodes"] < CURVE_EPISODES:
                curve = self._adaptation_curve(sx, sy, qx)
            logits = curve[0][-1] if curve is not None else self.algorithm.adapt_and_predict(sx, sy, qx)
        if curve is not None:
            _finite(curve[0], batch, "test", "along the adaptation curve ")
        logits = _finite(logits, batch, "test")
        if curve is not None:
            per_step, self._outputs["curve_steps"] = curve
            self._outputs["curve"].append((per_step.argmax(dim=-1) == qy).float().mean(dim=-1).T.cpu())
            self._outputs["curve_episodes"] += sx.shape[0]
            self._outputs["curve_ids"].append(_episode_ids(batch).cpu())
        probs = logits.float().softmax(dim=-1)
        self._outputs["probs"].append(probs.cpu())
        self._outputs["labels"].append(qy.cpu())
        self._outputs["class_ids"].append(_episode_class_ids(batch))
        self._outputs["episode_ids"].append(_episode_ids(batch).cpu())
        if batch_idx == 0:
            example = {k: v[0].cpu() for k, v in batch.items() if k in ("support_x", "support_y", "query_x", "query_y")}
            self._outputs["example"] = {**example, "predicted": probs[0].argmax(dim=-1).cpu()}
        if self.hparams.pixel_baseline:
            predicted = pixel_nearest_neighbour(sx, sy, qx)
            self._outputs["pixel_acc"].append((predicted == qy).float().mean(dim=1).cpu())

    def _adaptation_curve(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]] | None:
        """Query logits ``[P, T, N*Q, N]`` along the inner steps and the ``P`` steps they are after, or ``None``: no curve."""
        total = self.algorithm.adaptation_steps()
        if total is None:  # a learner that does not adapt in counted steps: its curve hook's every step, if any
            per_step = self.algorithm.adapt_and_predict_every_step(support_x, support_y, query_x)
            return None if per_step is None else (per_step, list(range(per_step.shape[0])))
        steps = curve_steps(total)
        per_step = self.algorithm.adapt_and_predict_every_step(support_x, support_y, query_x, at_steps=steps)
        if per_step is not None and per_step.shape[0] != len(steps):
            raise RuntimeError(f"{self.algorithm.label()}: adapt_and_predict_every_step gave {per_step.shape[0]} rows for at_steps={steps}")
        return None if per_step is None else (per_step, steps)

    def on_test_epoch_start(self) -> None:
        self._reset_test_outputs()

    def on_test_epoch_end(self) -> None:
        """Gather the test episodes of all processes into ``test_results`` and log the headline scalars.

        The evaluation callback (``medmeta.evaluation.callback``) turns ``test_results`` into
        ``test_summary``, metrics.json and the figures.
        """
        out = self._outputs
        per_episode = [self._gather(out[key]) for key in ("probs", "labels", "class_ids")]
        pixel_acc = [self._gather(out["pixel_acc"])] if out["pixel_acc"] else []
        episode_ids, probs, labels, class_ids, *pixel_acc = self._unique_episodes(
            self._gather(out["episode_ids"]), *per_episode, *pixel_acc
        )
        self.test_results = TestResults(
            probs=probs, labels=labels, class_ids=class_ids, episode_ids=episode_ids,
            curve=self._gathered_curve(), curve_steps=out["curve_steps"],
            pixel_acc=pixel_acc[0] if pixel_acc else None, example=out["example"],
        )  # fmt: skip
        per_episode = per_episode_metrics(self.test_results.probs, self.test_results.labels)
        accuracy, accuracy_ci = mean_and_ci95(per_episode["accuracy"])
        self.log("test/acc", accuracy)
        self.log("test/acc_ci95", accuracy_ci)
        for key in ("balanced_accuracy", "macro_auroc"):
            values = per_episode[key].double()
            self.log(f"test/{key.replace('accuracy', 'acc')}", float(values[~values.isnan()].mean()))  # as in metrics.json
        self.log("test/ece", pooled_ece(self.test_results.probs, self.test_results.labels, resamples=0)[0])
        if self.test_results.pixel_acc is not None:
            self.log("test/pixel_nn_acc", mean_and_ci95(self.test_results.pixel_acc)[0])

    def _reset_test_outputs(self) -> None:
        self._outputs: dict[str, Any] = {
            "probs": [], "labels": [], "class_ids": [], "episode_ids": [], "curve": [], "curve_ids": [], "pixel_acc": [],
            "curve_episodes": 0, "curve_steps": None, "example": None,
        }  # fmt: skip

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-episode values of this process, or of all DDP processes together."""
        values = torch.cat(parts)
        if self.trainer.world_size > 1:  # on the module's device: NCCL gathers CUDA tensors only
            values = self.all_gather(values.to(self.device)).flatten(0, 1).cpu()  # [world, E, ...] -> [world * E, ...]
        return values

    def _gathered_curve(self) -> torch.Tensor | None:
        """The adaptation curve ``[E', P]`` of the first ``CURVE_EPISODES`` test episodes, of all DDP processes together.

        Each process records the curve on its own first episodes; under DDP's strided sampler their
        union holds the first ``CURVE_EPISODES`` by id, which are kept, so the curve is the one
        process's curve.
        """
        out = self._outputs
        if not out["curve"]:  # a learner without a curve: the same on every process
            return None
        curve, ids = torch.cat(out["curve"]), torch.cat(out["curve_ids"])
        if self.trainer.world_size > 1:
            rows = int(self._gather([torch.tensor([len(ids)])]).max())  # pad to one length for the gather
            ids = torch.cat([ids, ids.new_full((rows - len(ids),), -1)])
            curve = torch.cat([curve, curve.new_full((rows - len(curve), curve.shape[1]), float("nan"))])
            ids, curve = self._gather([ids]), self._gather([curve])
            ids, curve = self._unique_episodes(ids[ids >= 0], curve[ids >= 0])
        return curve[:CURVE_EPISODES]

    def _unique_episodes(self, episode_ids: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each episode once, in id order, under DDP (whose sampler repeats episodes to fill the last ranks).

        ``values`` are per-episode tensors aligned with ``episode_ids``; one process returns them as they are.
        """
        if self.trainer.world_size == 1:
            return (episode_ids, *values)
        if bool((episode_ids < 0).any()):
            raise ValueError("under DDP every evaluation episode needs its id (batch['episode']) to count it once")
        order = torch.argsort(episode_ids, stable=True)
        ordered = episode_ids[order]
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        keep = order[first]
        return (episode_ids[keep], *(v[keep] for v in values))

    def normalisation_label(self) -> str:
        """How query images were normalised, for reports: transductive or running batch norm, or per-sample norms."""
        return describe_normalisation(self.model, self.hparams.norm_mode, self.algorithm.transductive_batches)

    # --- checkpoints ------------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        """Keep the class names the loaded checkpoint's model had seen (written by ``medmeta.callbacks.SeenClasses``)."""
        from medmeta.checkpoints import SEEN_CLASSES_KEY

        stored = checkpoint.get(SEEN_CLASSES_KEY)
        self.seen_classes = {k: list(v) for k, v in stored.items()} if isinstance(stored, dict) else None

    def _check_n_way(self, batch: EpisodeBatch) -> None:
        n_way = int(batch["support_y"].max()) + 1
        if n_way > self.hparams.n_way:
            raise ValueError(
                f"episodes have {n_way} classes but the model head has n_way={self.hparams.n_way} outputs"
            )


def _finite(logits: torch.Tensor, batch: EpisodeBatch, split: str, where: str = "") -> torch.Tensor:
    """``logits``, or ``FloatingPointError`` naming the episodes: a NaN query would be scored as a prediction of class 0."""
    finite = torch.isfinite(logits.detach()).flatten(-2).all(dim=-1)  # [T], or [P, T] along a curve
    if bool(finite.all()):
        return logits
    per_episode = finite.reshape(-1, finite.shape[-1]).all(dim=0).tolist()
    episodes = batch["episode"].tolist() if "episode" in batch else list(range(len(per_episode)))
    broken = [e for e, ok in zip(episodes, per_episode) if not ok]
    raise FloatingPointError(
        f"non-finite query predictions {where}after adapting to {split} episodes {broken}: the adaptation diverged "
        "(an inner learning rate or number of steps too large for these weights?); no accuracy was computed from them"
    )


def _episode_ids(batch: EpisodeBatch) -> torch.Tensor:
    """The batch's episode ids, or ``-1`` for each episode of a batch that carries none."""
    if "episode" in batch:
        return batch["episode"]
    return torch.full((batch["support_x"].shape[0],), -1, device=batch["support_x"].device)


def _episode_class_ids(batch: EpisodeBatch) -> torch.Tensor:
    """``[T, N]``: for each episode, the test-split index of the class behind local label 0..N-1."""
    labels = batch["query_y"]
    n_way = int(labels.max()) + 1
    if "query_class" not in batch:
        return torch.arange(n_way).expand(labels.shape[0], -1).clone()
    first = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).float().argmax(dim=1)  # [T, N]
    return batch["query_class"].gather(1, first).cpu()
