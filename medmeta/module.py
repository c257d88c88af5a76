"""The Lightning module: meta-training, adaptation at evaluation, and honest test figures."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from medmeta.algorithms import GRADIENT_BASED, AlgorithmName, build_algorithm, pixel_nearest_neighbour
from medmeta.algorithms.cuda_graph import GraphedOuterLoss
from medmeta.evaluation import figures
from medmeta.evaluation.metrics import (
    confusion_over_classes,
    mean_and_ci95,
    per_episode_metrics,
    reliability_bins,
    summarise,
)  # fmt: skip
from medmeta.networks import get_backbone
from medmeta.networks.conv4 import NormName

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


CURVE_EPISODES = 100  # test episodes whose query accuracy is also recorded after every inner step


def check_learning_rate(name: str, value: object) -> None:
    """Raise ``ValueError`` naming the setting unless ``value`` is a positive, finite learning rate.

    Zero is refused too: a zero inner rate adapts nothing while still taking the inner steps (set
    ``eval_inner_steps: 0`` to evaluate without adaptation), and a zero outer rate trains nothing.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        hint = " (to evaluate without adaptation, set model.eval_inner_steps 0)" if name.endswith("inner_lr") else ""
        raise ValueError(f"{name} must be a positive learning rate, got {value!r}{hint}")


class FewShotModule(L.LightningModule):
    """Meta-trains a backbone on episode batches with the chosen algorithm (second-order MAML by default).

    Args:
        algorithm: ``"maml"``, ``"maml_pp"``, ``"meta_sgd"``, ``"anil"``, ``"protonet"``, ``"mann"`` or ``"finetune"``.
        n_way: classes per episode (linked to the data module's ``n_way`` by the CLI).
        in_channels: image channels (linked to the data module).
        image_size: image side length (linked to the data module).
        spatial_dims: 2 or 3 (linked to the data module).
        backbone: backbone name (``"conv4"``, ``"resnet12"``, ``"resnet18"``).
        hidden_channels: channels of each conv block.
        norm: ``"batch"``, ``"group"`` or ``"instance"``.
        norm_mode: batch norm of query images at evaluation: ``"transductive"`` (statistics of
            the query batch, as in the MAML paper) or ``"running"`` (per-inner-step running
            statistics gathered in meta-training, so each query is predicted from the support set
            alone). Reports and ``metrics.json`` state which was used.
        inner_lr: inner-loop step size α.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps when adapting at validation and test.
        first_order: drop second-order terms (MAML, Meta-SGD, ANIL).
        task_reduction: ``"mean"`` or ``"sum"`` of query losses over the tasks of a meta-batch.
        task_parallel: gradient-based algorithms: adapt the tasks of a meta-batch with
            ``"vmap"``, in a ``"loop"``, or ``"auto"`` (vmap on GPUs, the loop on CPUs).
        checkpoint_inner_steps: MAML, MAML++, Meta-SGD, ANIL: recompute inner steps in the meta-backward
            (memory no longer grows with the activations of every inner step; loop only).
        cuda_graph: MAML, Meta-SGD, ANIL on CUDA: record each meta-training step (inner loops and
            meta-backward) once as CUDA graphs and replay it (same numbers, no launch overhead;
            episode shapes must stay fixed). Elsewhere it warns once and runs eagerly.
        distance: ProtoNet distance, ``"squared_euclidean"`` or ``"cosine"``.
        protonet_temperature: ProtoNet: the negative distances are divided by it (positive; use
            about 0.1 with ``"cosine"``, whose distances only span [0, 2]).
        pretrain_classes: fine-tune baseline: size of the pre-training head (>= meta-train classes).
        finetune_steps: fine-tune baseline: Adam steps of the new head on each support set.
        finetune_lr: fine-tune baseline: learning rate of those steps.
        finetune_scope: fine-tune baseline: ``"head"`` or ``"last_block"`` (head and last block).
        multi_step_loss: MAML++: query loss after every inner step, annealed towards the last.
        multi_step_loss_epochs: MAML++: epochs over which that weighting anneals.
        per_step_norm_weights: MAML++: separate norm weights and biases per inner step.
        learn_inner_lrs: MAML++: learned inner learning rate per layer and step.
        first_order_epochs: MAML++: first order for this many epochs, then second order.
        mann_controller: MANN: ``"feedforward"`` or ``"lstm"`` controller.
        mann_memory_slots: MANN: memory rows per episode.
        mann_key_strength: MANN: sharpness of the cosine read addressing.
        mann_label_timing: MANN: support labels fed with their own image (``"current"``) or one step
            late as in Santoro et al. (``"previous"``).
        cosine_annealing: cosine-anneal the outer learning rate to 0 over ``trainer.max_steps``.
        meta_lr: Adam learning rate of the outer loop (``--optimizer`` on the CLI overrides it).
        pixel_baseline: also score a nearest-neighbour-on-pixels baseline on the test episodes.
        nonfinite: a non-finite meta-loss or meta-gradient ``"stop"``s the run naming the episodes,
            or ``"skip"``s that update (counted in ``train/skipped_steps``); no update is applied either way.
    """

    def __init__(
        self,
        *,
        algorithm: AlgorithmName = "maml",
        n_way: int = 5,
        in_channels: int = 1,
        image_size: int = 32,
        spatial_dims: int = 2,
        backbone: str = "conv4",
        hidden_channels: int = 64,
        norm: NormName = "batch",
        norm_mode: Literal["transductive", "running"] = "transductive",
        inner_lr: float = 0.4,
        inner_steps: int = 5,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        task_reduction: Literal["mean", "sum"] = "mean",
        task_parallel: Literal["auto", "loop", "vmap"] = "auto",
        checkpoint_inner_steps: bool = False,
        cuda_graph: bool = False,
        distance: Literal["squared_euclidean", "cosine"] = "squared_euclidean",
        protonet_temperature: float = 1.0,
        pretrain_classes: int = 64,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_scope: Literal["head", "last_block"] = "head",
        multi_step_loss: bool = True,
        multi_step_loss_epochs: int = 10,
        per_step_norm_weights: bool = True,
        learn_inner_lrs: bool = True,
        first_order_epochs: int = 0,
        mann_controller: Literal["lstm", "feedforward"] = "feedforward",
        mann_memory_slots: int = 32,
        mann_key_strength: float = 10.0,
        mann_label_timing: Literal["current", "previous"] = "current",
        cosine_annealing: bool = False,
        meta_lr: float = 1e-3,
        pixel_baseline: bool = True,
        nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        for name, rate in (("meta_lr", meta_lr), ("inner_lr", inner_lr), ("finetune_lr", finetune_lr)):
            check_learning_rate(f"model.{name}", rate)
        self.save_hyperparameters()
        model = get_backbone(
            backbone, in_channels=in_channels, n_way=n_way, hidden_channels=hidden_channels,
            spatial_dims=spatial_dims, norm=norm, image_size=image_size,
            running_stat_steps=_running_stat_slots(algorithm, norm, norm_mode, inner_steps),
        )  # fmt: skip
        self.algorithm = build_algorithm(
            algorithm, model, n_way=n_way, inner_lr=inner_lr, inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps, first_order=first_order, task_reduction=task_reduction,
            task_parallel=task_parallel, checkpoint_inner_steps=checkpoint_inner_steps, distance=distance,
            temperature=protonet_temperature,
            pretrain_classes=pretrain_classes, finetune_steps=finetune_steps,
            finetune_lr=finetune_lr, finetune_scope=finetune_scope,
            maml_pp={
                "multi_step_loss": multi_step_loss, "multi_step_loss_epochs": multi_step_loss_epochs,
                "per_step_norm_weights": per_step_norm_weights, "learn_inner_lrs": learn_inner_lrs,
                "first_order_epochs": first_order_epochs,
            },
            mann={
                "controller": mann_controller, "memory_slots": mann_memory_slots, "key_strength": mann_key_strength,
                "label_timing": mann_label_timing,
            },
        )  # fmt: skip
        if cuda_graph and algorithm not in GRADIENT_BASED:
            raise ValueError(f"cuda_graph is for {', '.join(GRADIENT_BASED)}; got algorithm {algorithm!r}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self._graphed = GraphedOuterLoss(self.algorithm) if cuda_graph else None
        self.skipped_steps, self._last_episodes = 0, []
        self.on_test_epoch_start()
        self.test_summary: dict[str, object] = {}

    @property
    def model(self) -> torch.nn.Module:
        """The backbone being meta-trained."""
        return self.algorithm.model

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """The meta-loss over the meta-batch; refuses non-finite losses before any update."""
        self._check_n_way(batch)
        extra = {}
        if getattr(self.algorithm, "uses_class_ids", False):  # the fine-tune baseline pre-trains on class ids
            extra = {"support_class": batch["support_class"], "query_class": batch["query_class"]}
        outer_loss_and_logits = self._graphed or self.algorithm.outer_loss_and_logits
        loss, logits = outer_loss_and_logits(
            batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"], **extra
        )
        self._last_episodes = batch["episode"].tolist() if "episode" in batch else []
        if not torch.isfinite(loss) and self.hparams.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite meta-loss {loss.item()} at training episodes {self._last_episodes}; "
                "no update was applied"
            )
        tasks = batch["support_x"].shape[0]
        accuracy = (logits.detach().argmax(dim=-1) == batch["query_y"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=tasks)
        self.log("train/acc", accuracy, prog_bar=True, batch_size=tasks)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite meta-gradient stops the run (``nonfinite="stop"``) or skips this update (``"skip"``).

        Skipping drops every gradient, so the optimiser changes no parameter and no moment; the
        count is logged as ``train/skipped_steps``. Under DDP the gradients are already averaged,
        so every rank sees the same fault and skips together.
        """
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if all(bool(torch.isfinite(g).all()) for g in grads):
            return
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

    def _episode_accuracy(self, batch: Batch) -> torch.Tensor:
        self._check_n_way(batch)
        with torch.enable_grad():
            logits = self.algorithm.adapt_and_predict(batch["support_x"], batch["support_y"], batch["query_x"])
        return (logits.argmax(dim=-1) == batch["query_y"]).float().mean(dim=1)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Adapt to each frozen validation episode and log query accuracy."""
        accuracy = self._episode_accuracy(batch)
        self.log("val/acc", accuracy.mean(), prog_bar=True, batch_size=accuracy.numel())

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Adapt to each frozen test episode; keep the query probabilities for the metrics and figures.

        The first ``CURVE_EPISODES`` episodes also record query accuracy after every inner step.
        """
        self._check_n_way(batch)
        sx, sy, qx, qy = batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"]
        every_step = getattr(self.algorithm, "adapt_and_predict_every_step", None)
        with torch.enable_grad():
            if every_step is not None and self._curve_episodes < CURVE_EPISODES:
                per_step = every_step(sx, sy, qx)
                logits = per_step[-1]
                self._test_curve.append((per_step.argmax(dim=-1) == qy).float().mean(dim=-1).T.cpu())
                self._curve_episodes += sx.shape[0]
            else:
                logits = self.algorithm.adapt_and_predict(sx, sy, qx)
        probs = logits.float().softmax(dim=-1)
        self._test_probs.append(probs.cpu())
        self._test_labels.append(qy.cpu())
        self._test_class_ids.append(_episode_class_ids(batch))
        self._test_episode_ids.append(batch["episode"].cpu() if "episode" in batch else torch.full((sx.shape[0],), -1))
        if batch_idx == 0:
            self._grid_example = {k: v[0].cpu() for k, v in batch.items() if k in ("support_x", "support_y", "query_x", "query_y")}
            self._grid_example["predicted"] = probs[0].argmax(dim=-1).cpu()
        if self.hparams.pixel_baseline:
            predicted = pixel_nearest_neighbour(sx, sy, qx)
            self._test_pixel_acc.append((predicted == qy).float().mean(dim=1).cpu())

    def on_test_epoch_start(self) -> None:
        self._seen_test = self._seen_test_classes()
        if self._seen_test:
            logger.warning(
                "%d test class(es) were meta-training or validation classes of the checkpoint's model (%s): their "
                "accuracy is not few-shot accuracy on new classes (recorded in metrics.json as seen_test_classes)",
                len(self._seen_test), ", ".join(self._seen_test),
            )  # fmt: skip
        self._test_probs, self._test_labels, self._test_class_ids, self._test_episode_ids = [], [], [], []
        self._test_curve, self._test_pixel_acc, self._curve_episodes, self._grid_example = [], [], 0, None

    def on_test_epoch_end(self) -> None:
        """Metrics with 95% CIs over the test episodes, logged and written with figures to the run folder.

        Writes ``metrics.json``, ``per_episode.csv``, ``test_episodes.json`` (the frozen episodes, to
        replay with ``--episodes``) and PNGs: confusion matrix, reliability diagram, adaptation
        curve and an episode grid.
        """
        probs, labels = self._gather(self._test_probs), self._gather(self._test_labels)
        class_ids, episode_ids = self._gather(self._test_class_ids), self._gather(self._test_episode_ids)
        names = self._test_class_names(int(class_ids.max()) + 1 if class_ids.numel() else 0)
        episode_classes = [tuple(names[c] for c in row.tolist()) for row in class_ids]
        metrics = summarise(probs, labels, episode_classes)
        summary: dict[str, object] = {
            "algorithm": self._algorithm_label(),
            "test_episodes": int(probs.shape[0]),
            **metrics,
            "normalisation": self._normalisation_label(),
            "eval_inner_steps": self.hparams.eval_inner_steps,
        }
        if self._seen_test:
            summary["seen_test_classes"] = self._seen_test
        for key in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_auroc", "ece"):
            self.log(f"test/{key.replace('accuracy', 'acc')}", float(metrics[key]))
        if self._test_pixel_acc:
            pixel_mean, pixel_ci = mean_and_ci95(self._gather(self._test_pixel_acc))
            summary.update(pixel_nn_accuracy=pixel_mean, pixel_nn_accuracy_ci95=pixel_ci)
            self.log("test/pixel_nn_acc", pixel_mean)
        curve = torch.cat(self._test_curve) if self._test_curve else None
        if curve is not None:
            summary["adaptation_curve"] = {"episodes": int(curve.shape[0]), "accuracy_after_step": curve.mean(0).tolist()}
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "describe"):
            summary["episodes"] = dict(datamodule.describe())
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        metrics_path = out_dir / "metrics.json"
        if self.trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            if datamodule is not None and hasattr(datamodule, "freeze_test_episodes"):
                datamodule.freeze_test_episodes(out_dir / "test_episodes.json")
            _write_per_episode_csv(out_dir / "per_episode.csv", episode_ids, probs, labels, episode_classes)
            summary["figures"] = self._write_figures(out_dir, probs, labels, episode_classes, curve, float(metrics["ece"]))
            metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
        summary["metrics_file"] = str(metrics_path)
        self.test_summary = summary

    def _write_figures(
        self, out_dir: Path, probs: torch.Tensor, labels: torch.Tensor, episode_classes: list[tuple[str, ...]],
        curve: torch.Tensor | None, ece: float,
    ) -> list[str]:  # fmt: skip
        """The evaluation PNGs in ``out_dir`` (also sent to a TensorBoard logger); their file names."""
        names, counts = confusion_over_classes(probs, labels, episode_classes)
        paths = [
            figures.plot_confusion_matrix(names, counts, out_dir / "confusion_matrix.png"),
            figures.plot_reliability_diagram(reliability_bins(probs, labels), out_dir / "reliability_diagram.png", ece=ece),
        ]
        if curve is not None:
            paths.append(figures.plot_adaptation_curve(curve, out_dir / "adaptation_curve.png"))
        if self._grid_example is not None:
            example = self._grid_example
            paths.append(figures.plot_episode_grid(
                example["support_x"], example["support_y"], example["query_x"], example["query_y"], example["predicted"],
                episode_classes[0], out_dir / "episode_grid.png",
            ))  # fmt: skip
        _log_images(self.loggers, paths, self.global_step)
        return [path.name for path in paths]

    def _test_class_names(self, count: int) -> list[str]:
        """Names of the test classes (by the datamodule's sorted test split), else ``class 0..``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        splits = getattr(datamodule, "class_splits", None)
        if splits is not None and len(splits.test) >= count:
            return sorted(splits.test)
        return [f"class {i}" for i in range(count)]

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-episode values of this process, or of all DDP processes together."""
        values = torch.cat(parts)
        if self.trainer.world_size > 1:
            values = self.all_gather(values).flatten(0, 1)  # [world, E, ...] -> [world * E, ...]
        return values

    def _algorithm_label(self) -> str:
        name = self.hparams.algorithm
        if name in ("maml", "maml_pp", "meta_sgd", "anil"):
            return f"{name}-{'first' if self.hparams.first_order else 'second'}-order"
        return name

    def _normalisation_label(self) -> str:
        if self.hparams.norm != "batch":
            return f"{self.hparams.norm} norm (per-sample or per-group statistics, non-transductive)"
        if self.hparams.norm_mode == "running":
            return (
                "running (per-inner-step running batch-norm statistics from meta-training for query "
                "images; support images use their own batch statistics; non-transductive)"
            )
        if self.hparams.algorithm in ("protonet", "mann"):
            return "transductive (batch statistics of each task's support and query images together)"
        return "transductive (batch statistics of each adaptation/query batch)"

    def predict_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Query-class probabilities ``[T, N*Q, N]`` after adapting to each episode."""
        self._check_n_way(batch)
        with torch.enable_grad():
            logits = self.algorithm.adapt_and_predict(batch["support_x"], batch["support_y"], batch["query_x"])
        return logits.softmax(dim=-1)

    def on_train_epoch_start(self) -> None:
        """Tell epoch-scheduled algorithms (MAML++'s loss weights and order annealing) the epoch."""
        if hasattr(self.algorithm, "set_epoch"):
            self.algorithm.set_epoch(self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, object]:
        """Adam at ``meta_lr`` on all meta-parameters, optionally cosine-annealed per step.

        LightningCLI's ``--optimizer``/``--lr_scheduler`` replace this.
        """
        optimiser = torch.optim.Adam(self.parameters(), lr=self.hparams.meta_lr)
        if not self.hparams.cosine_annealing:
            return optimiser
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("cosine_annealing needs trainer.max_steps to know the schedule length")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, object]) -> None:
        """Record the meta-train and meta-val class names (diagnosis labels only) the model has seen.

        ``medmeta evaluate`` refuses a test class among them. Names from an earlier checkpoint this
        run resumed or started from are kept too.
        """
        from medmeta.checkpoints import SEEN_CLASSES_KEY

        seen = {split: set(names) for split, names in (getattr(self, "_seen_classes", None) or {}).items()}
        splits = getattr(getattr(self._trainer, "datamodule", None), "class_splits", None) if self._trainer else None
        if splits is not None:
            for split in ("train", "val"):
                seen.setdefault(split, set()).update(splits.of(split))
        if seen:
            checkpoint[SEEN_CLASSES_KEY] = {split: sorted(names) for split, names in seen.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        """Keep the class names the loaded checkpoint had seen (see ``on_save_checkpoint``)."""
        from medmeta.checkpoints import SEEN_CLASSES_KEY

        stored = checkpoint.get(SEEN_CLASSES_KEY)
        self._seen_classes = {k: list(v) for k, v in stored.items()} if isinstance(stored, dict) else None

    def _seen_test_classes(self) -> list[str]:
        """Test classes of the attached data that the loaded checkpoint's model meta-trained or validated on."""
        seen = getattr(self, "_seen_classes", None) or {}
        splits = getattr(getattr(self._trainer, "datamodule", None), "class_splits", None) if self._trainer else None
        if not seen or splits is None:
            return []
        return sorted(set(splits.of("test")) & {name for names in seen.values() for name in names})

    def _check_n_way(self, batch: Batch) -> None:
        n_way = int(batch["support_y"].max()) + 1
        if n_way > self.hparams.n_way:
            raise ValueError(
                f"episodes have {n_way} classes but the model head has n_way={self.hparams.n_way} outputs"
            )


def _episode_class_ids(batch: Batch) -> torch.Tensor:
    """``[T, N]``: for each episode, the test-split index of the class behind local label 0..N-1."""
    labels = batch["query_y"]
    n_way = int(labels.max()) + 1
    if "query_class" not in batch:
        return torch.arange(n_way).expand(labels.shape[0], -1).clone()
    first = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).float().argmax(dim=1)  # [T, N]
    return batch["query_class"].gather(1, first).cpu()


def _write_per_episode_csv(
    path: Path, episode_ids: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, episode_classes: list[tuple[str, ...]]
) -> None:  # fmt: skip
    """One row per test episode: its index, classes and metrics."""
    per_episode = per_episode_metrics(probs, labels)
    columns = ("accuracy", "balanced_accuracy", "macro_auroc", "ece")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("episode", "classes", *columns))
        for e in range(probs.shape[0]):
            values = [f"{float(per_episode[c][e]):.6f}" for c in columns]
            writer.writerow((int(episode_ids[e]), ";".join(episode_classes[e]), *values))


def _log_images(loggers: list, paths: list[Path], step: int) -> None:
    """Send the figures to every TensorBoard logger (the CSV logger keeps the scalars)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    boards = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
    if not boards:
        return
    import numpy as np
    from PIL import Image

    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        for board in boards:
            board.experiment.add_image(f"test/{path.stem}", image, step, dataformats="HWC")


def _running_stat_slots(algorithm: str, norm: str, norm_mode: str, inner_steps: int) -> int:
    """Per-step running-statistic slots of batch norm: one per query step (0 when transductive)."""
    if norm_mode not in ("transductive", "running"):
        raise ValueError(f"norm_mode must be 'transductive' or 'running', got {norm_mode!r}")
    if norm_mode == "transductive":
        return 0
    if norm != "batch":
        raise ValueError(
            f"norm_mode='running' applies to batch norm; {norm} norm already uses per-sample statistics"
        )
    return 1 if algorithm in ("protonet", "mann", "finetune") else inner_steps + 1
