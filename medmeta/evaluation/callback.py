"""The evaluation callback: turns a test run's per-episode results into every file a researcher reads.

``FewShotModule`` computes per-episode query probabilities (``test_results``) and logs scalars;
this callback, which the module attaches to every trainer, writes ``metrics.json`` (means, 95% CIs,
per-class rates, the normalisation, the episodes), ``per_episode.csv``, ``test_episodes.json``
(the frozen episodes, to replay with ``--episodes``), the PNG figures (also sent to TensorBoard) and
``report.html`` (everything in one self-contained page, ``medmeta.evaluation.html_report``), logs
these files as artifacts of an MLflow run when a logger is an ``MLFlowLogger``, and fills
``module.test_summary``. Data flows one way: data module -> module -> this callback.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.episodes import ClassSplits
from medmeta.evaluation import figures
from medmeta.evaluation.html_report import backbone_label, checkpoint_label, image_label, worst_episodes, write_test_report
from medmeta.evaluation.metrics import (
    PER_EPISODE_COLUMNS,
    bootstrap_ci95,
    confusion_over_classes,
    mean_and_ci95,
    per_episode_metrics,
    reliability_bins,
    summarise,
)  # fmt: skip
from medmeta.plugins import import_object

logger = logging.getLogger(__name__)


MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EvaluationReport(L.Callback):
    """Writes the outputs of every test run into the run's log folder (on the main process only).

    Args:
        metrics: extra per-episode metrics, ``{column: "package.module.function"}``. Each function
            maps query probabilities ``[E, N*Q, N]`` and labels ``[E, N*Q]`` to one value per
            episode ``[E]`` (NaN where undefined); it becomes a column of ``per_episode.csv`` and a
            mean with a 95% bootstrap CI in ``metrics.json``. On the command line:
            ``--trainer.callbacks+=medmeta.evaluation.callback.EvaluationReport
            --trainer.callbacks.metrics '{"brier": "my_metrics.brier"}'``.
    """

    def __init__(self, metrics: dict[str, str] | None = None) -> None:
        self.metrics: dict[str, MetricFn] = {name: _import_function(path) for name, path in (metrics or {}).items()}
        clash = set(self.metrics) & set(PER_EPISODE_COLUMNS)
        if clash:
            raise ValueError(f"extra metric names {sorted(clash)} are built-in metrics; choose other names")
        self.seen_test_classes: list[str] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn when a test class was a meta-training or validation class of the loaded checkpoint's model."""
        seen = pl_module.seen_classes or {}
        splits = _class_splits(trainer)
        self.seen_test_classes = sorted(set(splits.of("test")) & {n for names in seen.values() for n in names}) if (
            splits is not None and seen
        ) else []  # fmt: skip
        if self.seen_test_classes:
            logger.warning("%s (recorded in metrics.json as seen_test_classes)", _seen_classes_text(self.seen_test_classes))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = pl_module.test_results
        if results is None:
            return
        names = _test_class_names(trainer, int(results.class_ids.max()) + 1 if results.class_ids.numel() else 0)
        episode_classes = [tuple(names[c] for c in row.tolist()) for row in results.class_ids]
        summary: dict[str, Any] = {
            "algorithm": pl_module.algorithm.label(),
            "test_episodes": int(results.probs.shape[0]),
            **summarise(results.probs, results.labels, episode_classes),
            "normalisation": pl_module.normalisation_label(),
            **pl_module.algorithm.report_settings(),
        }
        extra = {name: _per_episode(name, fn, results.probs, results.labels) for name, fn in self.metrics.items()}
        per_episode = {**per_episode_metrics(results.probs, results.labels), **extra}
        for name, values in extra.items():
            summary[name], summary[f"{name}_ci95"] = bootstrap_ci95(values)
        if self.seen_test_classes:
            summary["seen_test_classes"] = self.seen_test_classes
        note = getattr(pl_module, "tested_weights_note", None)  # a test after a fit whose validation never ran
        if note:
            summary["tested_weights"] = note
        if results.pixel_acc is not None:
            pixel_mean, pixel_ci = mean_and_ci95(results.pixel_acc)
            summary.update(pixel_nn_accuracy=pixel_mean, pixel_nn_accuracy_ci95=pixel_ci)
        if results.curve is not None:
            curve = results.curve
            summary["adaptation_curve"] = {"episodes": int(curve.shape[0]), "after_steps": results.curve_steps,
                                           "accuracy_after_step": curve.mean(0).tolist()}  # fmt: skip
        datamodule = _episodic(trainer)
        if datamodule is not None:
            summary["episodes"] = dict(datamodule.describe())
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        metrics_path = out_dir / "metrics.json"
        if trainer.is_global_zero:
            settings = run_settings(trainer, pl_module, out_dir)
            if note:
                settings["checkpoint"] = note
            out_dir.mkdir(parents=True, exist_ok=True)
            if datamodule is not None:
                datamodule.freeze_test_episodes(out_dir / "test_episodes.json")
            write_per_episode_csv(out_dir / "per_episode.csv", results.episode_ids, per_episode, episode_classes)
            from_array = datamodule is not None and datamodule.inventory is not None and datamodule.inventory.arrays is not None
            paths = write_figures(out_dir, results, episode_classes, float(summary["ece"]), from_array=from_array)
            log_images(trainer.loggers, paths, trainer.global_step)
            summary["figures"] = [path.name for path in paths]
            metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
            report = write_test_report(
                out_dir / "report.html", summary=summary, settings=settings,
                figures=paths, worst=worst_episodes(results.episode_ids, episode_classes, per_episode),
                extra_metrics=list(extra),
                warnings=([_seen_classes_text(self.seen_test_classes)] if self.seen_test_classes else [])
                + ([f"tested the {note}"] if note else []),
            )  # fmt: skip
            log_artifacts(trainer.loggers, [metrics_path, report, out_dir / "per_episode.csv", *paths])
        summary["metrics_file"] = str(metrics_path)
        pl_module.test_summary = summary


def _seen_classes_text(names: list[str]) -> str:
    """The warning (log and report) about test classes the checkpoint's model was trained or validated on."""
    return (f"{len(names)} test class(es) were meta-training or validation classes of the checkpoint's model "
            f"({', '.join(names)}): their accuracy is not few-shot accuracy on new classes")  # fmt: skip


def run_settings(trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> dict[str, str]:
    """The run's settings for the report: learner, backbone, normalisation, episodes, images and checkpoint."""
    algorithm = pl_module.algorithm
    settings = {"learner": algorithm.label()}
    settings.update({f"learner: {k}": str(v) for k, v in algorithm.report_settings().items()})
    settings["backbone"] = backbone_label(pl_module.hparams.get("backbone") or {})
    settings["normalisation"] = pl_module.normalisation_label()
    datamodule = _episodic(trainer)
    if datamodule is not None:
        described = datamodule.describe()
        settings["episodes"] = f"{datamodule.n_way}-way {datamodule.k_shot}-shot, {datamodule.q_query} queries per class"
        settings["test episodes"] = f"{described['test_episodes']}, {described['episodes_file']}, seed {described['seed']}"
        settings["images"] = image_label(
            datamodule.image_size, datamodule.spatial_dims, datamodule.in_channels, datamodule.window,
            datamodule.preset, datamodule.spacing, datamodule.roi_size,
        )  # fmt: skip
    settings["checkpoint"] = checkpoint_label(trainer.ckpt_path, out_dir)
    return settings


def write_figures(
    out_dir: Path, results: Any, episode_classes: list[tuple[str, ...]], ece: float, *, from_array: bool = False
) -> list[Path]:
    """The evaluation PNGs in ``out_dir``: confusion matrix, reliability diagram, adaptation curve, episode grid.

    ``from_array``: the images came from arrays (MedMNIST ``.npz``), stored row-major, not from files.
    """
    names, counts = confusion_over_classes(results.probs, results.labels, episode_classes)
    paths = [
        figures.plot_confusion_matrix(names, counts, out_dir / "confusion_matrix.png"),
        figures.plot_reliability_diagram(reliability_bins(results.probs, results.labels), out_dir / "reliability_diagram.png", ece=ece),
    ]  # fmt: skip
    if results.curve is not None:
        paths.append(figures.plot_adaptation_curve(results.curve, out_dir / "adaptation_curve.png", steps=results.curve_steps))
    if results.example is not None:
        example = results.example
        paths.append(figures.plot_episode_grid(
            example["support_x"], example["support_y"], example["query_x"], example["query_y"], example["predicted"],
            episode_classes[0], out_dir / "episode_grid.png", from_array=from_array,
        ))  # fmt: skip
    return paths


def write_per_episode_csv(
    path: Path, episode_ids: torch.Tensor, per_episode: dict[str, torch.Tensor], episode_classes: list[tuple[str, ...]]
) -> None:
    """One row per test episode: its index, classes and metrics (the columns of ``per_episode``, in order)."""
    columns = tuple(per_episode)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("episode", "classes", *columns))
        for e in range(len(episode_ids)):
            values = [f"{float(per_episode[c][e]):.6f}" for c in columns]
            writer.writerow((int(episode_ids[e]), ";".join(episode_classes[e]), *values))


def log_images(loggers: list, paths: list[Path], step: int) -> None:
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


def log_artifacts(loggers: list, paths: list[Path], folder: str = "test") -> None:
    """Copy ``paths`` into the artifacts (under ``folder``) of every MLflow logger's run; no-op without one.

    MLflow is optional (``pip install medmeta[mlflow]``): without it no logger can be an ``MLFlowLogger``.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    for mlflow_logger in (lg for lg in loggers if isinstance(lg, MLFlowLogger)):
        for path in paths:
            mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, str(path), artifact_path=folder)


def _import_function(path: str) -> MetricFn:
    """The function at dotted ``path`` (a metric); ``ValueError`` naming it when it cannot be imported."""
    function = import_object(path, what="metric")
    if not callable(function):
        raise ValueError(f"metric {path!r} is not a function")
    return function


def _per_episode(name: str, fn: MetricFn, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``fn``'s value per episode, checked to be one finite-or-NaN number per episode."""
    values = torch.as_tensor(fn(probs, labels), dtype=torch.float64).detach().cpu()
    if values.shape != (probs.shape[0],) or bool(torch.isinf(values).any()):
        raise ValueError(f"metric {name!r} must give one finite (or NaN) value per episode [{probs.shape[0]}], got {tuple(values.shape)}")
    return values


def _episodic(trainer: L.Trainer) -> EpisodicDataModule | None:
    """The trainer's data module if it is medmeta's (episodes, class names, frozen manifest), else ``None``."""
    return trainer.datamodule if isinstance(trainer.datamodule, EpisodicDataModule) else None


def _class_splits(trainer: L.Trainer) -> ClassSplits | None:
    datamodule = _episodic(trainer)
    return datamodule.class_splits if datamodule is not None else None


def _test_class_names(trainer: L.Trainer, count: int) -> list[str]:
    """Names of the test classes (by the data module's sorted test split), else ``class 0..``."""
    splits = _class_splits(trainer)
    if splits is not None and len(splits.test) >= count:
        return sorted(splits.test)
    return [f"class {i}" for i in range(count)]
