"""The ``medmeta`` command: LightningCLI (fit/validate/test) plus ``synth``, ``data check``,
``evaluate``, ``diagnose`` and ``predict``.

The CLI holds no logic of its own: it parses, links the data and model shapes, checks checkpoints
(``medmeta.checkpoints``) before anything loads them, and reports.

Why this module is longer than 300 lines: it is the entry point of eight subcommands; each one's
parser and printed report is short, and all of them share the error handling in ``main``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.markup import escape

from medmeta.algorithms import DEFAULT_ALGORITHM
from medmeta.callbacks import LastCheckpoint, PreemptionCheckpoint, RandomStateCheckpoint
from medmeta.checkpoints import check_checkpoint, load_trained, model_hparams, read_checkpoint, seen_classes
from medmeta.config_check import check_config_files, expand_short_names
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.episodes import SPLITS
from medmeta.errors import DataError
from medmeta.module import FewShotModule, check_learner_rates, check_learning_rate
from medmeta.networks import DEFAULT_BACKBONE, resolve_backbone
from medmeta.plugins import class_path, import_object

console = Console(stderr=False)


HALF_WEIGHTS = ("16-true", "bf16-true")  # precisions that cast the weights themselves to 16 bits


def _refuse_ignored_settings(config: Mapping[str, Any]) -> None:
    """``DataError`` for settings that would be ignored or could not run, before any data is read.

    ``--lr_scheduler`` without ``--optimizer`` (never built), ``model.cosine_annealing`` beside ``--optimizer``
    (whose optimiser replaces the module's and its schedule), ``ReduceLROnPlateau`` (schedulers step per
    optimizer step, validation every ``val_check_interval`` steps) and half-precision weights (``*-true``).
    """
    scheduler, optimizer = config.get("lr_scheduler"), config.get("optimizer")
    if scheduler is not None and optimizer is None:
        raise DataError("--lr_scheduler needs --optimizer: without it the module's own Adam (model.meta_lr) is used "
                        "and the scheduler would be ignored (or use model.cosine_annealing: true)")  # fmt: skip
    if scheduler is not None and str(scheduler.get("class_path", "")).endswith("ReduceLROnPlateau"):
        raise DataError("--lr_scheduler ReduceLROnPlateau is not supported: medmeta steps a scheduler once per "
                        "optimizer step, not at each validation; choose a step-based one "
                        "(StepLR, CosineAnnealingLR)")  # fmt: skip
    if optimizer is not None and (config.get("model") or {}).get("cosine_annealing"):
        raise DataError("model.cosine_annealing has no effect with --optimizer, which replaces the module's optimiser "
                        "and its schedule: drop one of them (or add --lr_scheduler CosineAnnealingLR)")  # fmt: skip
    precision = str((config.get("trainer") or {}).get("precision"))
    if precision in HALF_WEIGHTS:
        raise DataError(f"trainer.precision {precision} is not supported: the norm statistics and the inner updates "
                        "need float32 weights; use bf16-mixed (or 16-mixed on a GPU)")  # fmt: skip


def _drop_disabled_progress_bar(trainer: dict[str, Any]) -> None:
    """Remove progress bar callbacks (the configs' ``RichProgressBar``) when ``enable_progress_bar`` is false.

    Lightning refuses the two together; ``--trainer.enable_progress_bar false`` (CI logs, nohup) should just work.
    """
    if trainer.get("enable_progress_bar") is not False or not trainer.get("callbacks"):
        return
    from lightning.pytorch.callbacks import ProgressBar

    def is_bar(callback: Any) -> bool:
        path = callback.get("class_path") if hasattr(callback, "get") else None
        try:
            kind = import_object(str(path), what="callback") if path else type(callback)
        except ValueError:
            return False  # Lightning names the callback that cannot be imported
        return isinstance(kind, type) and issubclass(kind, ProgressBar)

    trainer["callbacks"] = [callback for callback in trainer["callbacks"] if not is_bar(callback)]


class MedMetaCLI(LightningCLI):
    """LightningCLI with the episode shape linked from data to model and an optional test after fit.

    A ``--lr_scheduler`` steps once per optimizer step (Lightning's interval ``"step"``), as
    ``model.cosine_annealing`` does: medmeta's epochs (``train_batches_per_epoch``) are longer than most fits.
    """

    @staticmethod
    def configure_optimizers(
        lightning_module: L.LightningModule, optimizer: torch.optim.Optimizer, lr_scheduler: Any = None
    ) -> Any:
        """``--optimizer`` with its ``--lr_scheduler`` stepped after every optimizer step."""
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name in ("n_way", "in_channels", "image_size", "spatial_dims"):
            parser.link_arguments(f"data.{name}", f"model.{name}")
        # the default learner and backbone as class paths, so `--model.algorithm.init_args.<setting>` alone works
        parser.set_defaults({
            "model.algorithm": {"class_path": class_path(DEFAULT_ALGORITHM)},
            "model.backbone": {"class_path": class_path(resolve_backbone(DEFAULT_BACKBONE)[0])},
        })  # fmt: skip
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="Test the best checkpoint on the frozen test episodes after fit."
        )
        parser.add_argument(
            "--episodes", type=str | None, default=None,
            help="Replay the test episodes of this manifest (a run's test_episodes.json) instead of drawing them.",
        )  # fmt: skip
        parser.link_arguments("episodes", "data.episodes_file")

    def _parse_ckpt_path(self) -> None:
        """A checkpoint's model settings replace the config's, as in LightningCLI; read safely and in today's spelling.

        The file is checked first, loaded with ``weights_only``, and the hyperparameters of a
        checkpoint written before learners and backbones were plug-ins are translated.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in ("last", "best", "hpc") or not Path(path).is_file():  # the named ones are this run's own
            return
        hparams = model_hparams(check_checkpoint(Path(path), None))
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Refuse a zero, negative or non-finite learning rate by its setting's name, before any data is read.

        Also refused: a learner's own outer rate (``*_meta_lr``) beside ``--optimizer``, which would ignore it,
        ``trainer.inference_mode: true``, under which no episode can be adapted, and the settings of
        ``_refuse_ignored_settings``. A progress bar callback is dropped under ``trainer.enable_progress_bar: false``.
        """
        config = self.config[self.config["subcommand"]]
        model, optimizer = config.get("model") or {}, config.get("optimizer")
        if (config.get("trainer") or {}).get("inference_mode"):
            raise DataError("trainer.inference_mode must be false: validation and test adapt the model to each "
                            "episode's support set, which needs gradients (torch.inference_mode turns them off)")  # fmt: skip
        _refuse_ignored_settings(config)
        _drop_disabled_progress_bar(config.get("trainer") or {})
        try:
            if model.get("meta_lr") is not None:
                check_learning_rate("model.meta_lr", model.get("meta_lr"))
            if optimizer is not None and (optimizer.get("init_args") or {}).get("lr") is not None:
                check_learning_rate("optimizer.lr", optimizer["init_args"]["lr"])
            algorithm = model.get("algorithm")
            if algorithm is not None and not isinstance(algorithm, str):
                check_learner_rates(dict(algorithm.get("init_args") or {}))
                own = [k for k, v in (algorithm.get("init_args") or {}).items() if k.endswith("_meta_lr") and v is not None]
                if optimizer is not None and own:  # --optimizer replaces the module's optimiser and its groups
                    raise ValueError(f"model.algorithm.init_args.{own[0]} has no effect with --optimizer, which puts "
                                     "every meta-parameter at optimizer.lr: drop one of them")  # fmt: skip
        except ValueError as error:
            raise DataError(str(error)) from None

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a ``ValueError`` of their settings is a one-line message."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            if isinstance(error, DataError):
                raise
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DataError(f"invalid setting: {first_line}") from error

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()
        self._load_checkpoints_safely()
        if isinstance(self.datamodule, EpisodicDataModule):  # a test split that cannot be tested: refused before training
            self.datamodule.test_after_fit = bool(self.config[self.subcommand].get("test_after_fit"))
        self._refuse_test_without_validation()

    def _no_validation_cause(self, *, planned: bool) -> str | None:
        """Why no validation runs in this fit (``planned``: known before it starts), or ``None``."""
        trainer, data = self.trainer, self.datamodule
        if trainer.limit_val_batches == 0:
            return "trainer.limit_val_batches 0"
        if (getattr(data, "hparams", None) or {}).get("val_episodes") == 0:  # a data module that accepts none
            return "data.val_episodes 0"
        interval, steps = trainer.val_check_interval, trainer.max_steps
        batches = steps * trainer.accumulate_grad_batches  # the interval counts batches across epochs
        if isinstance(interval, int) and trainer.check_val_every_n_epoch is None and 0 < batches < interval:
            return f"trainer.val_check_interval {interval} batches > trainer.max_steps {steps}"
        if planned:
            return None
        return (f"val_check_interval {interval}, max_steps {steps}, max_epochs {trainer.max_epochs}, "
                f"{sum(trainer.num_val_batches)} validation batches")  # fmt: skip

    def _refuse_test_without_validation(self) -> None:
        """``test_after_fit`` with a checkpoint selected on a metric that no validation of this fit would log."""
        callback = self.trainer.checkpoint_callback
        if not self.config["fit"].get("test_after_fit") or callback is None or not getattr(callback, "monitor", None):
            return
        cause = None if self.config_init["fit"].get("ckpt_path") else self._no_validation_cause(planned=True)
        if cause:  # a resumed fit may hold a checkpoint selected before: warned after fit instead
            raise DataError(f"test_after_fit: no validation would run ({cause}), so no checkpoint would be selected on "
                            f"{callback.monitor} and the test would use the last weights; validate at least once or "
                            "set test_after_fit false")  # fmt: skip

    def before_validate(self) -> None:
        self._load_checkpoints_safely()

    def before_test(self) -> None:
        self._load_checkpoints_safely()

    def before_predict(self) -> None:
        self._load_checkpoints_safely()

    def _load_checkpoints_safely(self) -> None:
        """Checkpoints are loaded with ``weights_only=True`` (a crafted pickle can never run code) and checked first."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is False:
            raise DataError("--weights_only false is refused: medmeta never unpickles code from a checkpoint")
        config["weights_only"] = True
        path = config.get("ckpt_path")
        if path and path not in ("last", "best", "hpc"):  # the named ones are this run's own checkpoints
            check_checkpoint(Path(path), self.model.hparams)

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of this run's logger folder (any version), or a clear error.

        A resumed fit (``last`` or a checkpoint's path) goes on in the run folder the checkpoint is in.
        """
        config = self.config_init["fit"]
        if config.get("ckpt_path") != "last":
            if config.get("ckpt_path") and Path(config["ckpt_path"]).is_file():
                self._continue_run_folder(Path(config["ckpt_path"]))
            return
        callback = self.trainer.checkpoint_callback
        candidates = [Path(callback.dirpath) / "last.ckpt"] if callback is not None and callback.dirpath else []
        logger = self.trainer.logger
        if logger is not None and logger.save_dir:
            candidates += Path(logger.save_dir, logger.name or "").glob("version_*/checkpoints/last.ckpt")
        candidates += Path(self.trainer.default_root_dir).glob("**/checkpoints/last.ckpt")
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise DataError(f"--ckpt_path last: no last.ckpt found under {logger.save_dir if logger else self.trainer.default_root_dir}")
        config["ckpt_path"] = str(max(found, key=lambda path: path.stat().st_mtime))
        console.print(f"resuming from {config['ckpt_path']}", highlight=False, soft_wrap=True)
        self._continue_run_folder(Path(config["ckpt_path"]))

    def _continue_run_folder(self, checkpoint: Path) -> None:
        """Log and checkpoint a resumed run in the folder of the run it continues (``<logger dir>/version_N``).

        ``ModelCheckpoint`` then finds its folder unchanged and restores its best-model bookkeeping, so the
        best checkpoint (``test_after_fit``) is chosen over the whole run. The CSV log goes on in the same
        ``metrics.csv`` (its rows after the checkpoint's step, from training that is redone, are dropped) and
        the first run's ``config.yaml`` is kept: the resumed run's settings go to ``config_resume_<k>.yaml``.
        """
        logger, run = self.trainer.logger, checkpoint.parent.parent.resolve()
        root = getattr(logger, "root_dir", None)  # CSVLogger and TensorBoardLogger: <save_dir>/<name>
        if root is None or not hasattr(logger, "_version") or checkpoint.parent.name != "checkpoints" or (
            Path(root).resolve() != run.parent
        ):
            return
        number = run.name.removeprefix("version_")
        logger._version = int(number) if number.isdigit() else run.name  # as CSVLogger and TensorBoardLogger name it
        logger._experiment = None
        metrics = run / "metrics.csv"
        if isinstance(logger, CSVLogger) and metrics.is_file() and self.trainer.is_global_zero:
            with metrics.open(newline="") as file:
                reader = csv.DictReader(file)
                keys, step = list(reader.fieldnames or []), read_checkpoint(checkpoint)["global_step"]
                rows = [row for row in reader if not row.get("step", "").isdigit() or int(row["step"]) < step]
            with warnings.catch_warnings():  # CSVLogger deletes the metrics.csv of a folder it reuses: written back
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                logger.experiment.metrics_keys = sorted(keys)
            with metrics.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=sorted(keys))
                writer.writeheader()
                writer.writerows(rows)
        for callback in self.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback) and (run / callback.config_filename).exists():
                stem, k = Path(callback.config_filename).stem, 1
                while (run / f"{stem}_resume_{k}.yaml").exists():
                    k += 1
                callback.config_filename = f"{stem}_resume_{k}.yaml"

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        has_best = callback is not None and getattr(callback, "best_model_path", "")
        monitor = getattr(callback, "monitor", None)
        if not has_best and monitor:
            self.model.tested_weights_note = f"last weights, not selected on {monitor}: no validation ran " + (
                f"({self._no_validation_cause(planned=False)})")  # fmt: skip
            console.print(f"[yellow]warning:[/] testing the {escape(self.model.tested_weights_note)}",
                          highlight=False, soft_wrap=True)  # fmt: skip
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)
        self._report()

    def after_test(self) -> None:
        self._report()

    def _report(self) -> None:
        summary = getattr(self.model, "test_summary", {})
        if not summary or not self.trainer.is_global_zero:
            return
        console.rule("[bold]medmeta test result")
        console.print(
            f"test accuracy: [bold]{100 * summary['accuracy']:.1f}% ± {100 * summary['accuracy_ci95']:.1f}%[/] "
            f"(95% CI, {summary['test_episodes']} frozen test episodes)"
        )
        if "pixel_nn_accuracy" in summary:
            console.print(
                f"pixel nearest-neighbour baseline: {100 * summary['pixel_nn_accuracy']:.1f}% "
                f"± {100 * summary['pixel_nn_accuracy_ci95']:.1f}%"
            )
        console.print(
            f"macro AUROC {summary['macro_auroc']:.3f} ± {summary['macro_auroc_ci95']:.3f}, balanced accuracy "
            f"{100 * summary['balanced_accuracy']:.1f}% ± {100 * summary['balanced_accuracy_ci95']:.1f}%, "
            f"ECE {summary['ece']:.3f} (bootstrap CIs)"
        )
        console.print(f"normalisation: {summary['normalisation']}")
        callback = self.trainer.checkpoint_callback
        checkpoint = self.trainer.ckpt_path or (
            (callback.best_model_path or callback.last_model_path) if callback else ""
        )
        if checkpoint:
            console.print(f"checkpoint: {checkpoint}")
        console.print(f"metrics: {summary['metrics_file']}")
        console.print(f"report: {Path(summary['metrics_file']).with_name('report.html')}")
        console.print(
            "also there: per_episode.csv, figures (confusion matrix, reliability, adaptation curve, episode grid) "
            "and test_episodes.json (replay with --episodes)"
        )


def synth_main(argv: list[str]) -> int:
    """``medmeta synth --out DIR``: write the synthetic lesion data set (2D DICOM or 3D NIfTI)."""
    from medmeta.data.synthetic import generate_synthetic_dataset
    from medmeta.data.synthetic3d import generate_synthetic_volumes

    parser = argparse.ArgumentParser(prog="medmeta synth", description=synth_main.__doc__)
    parser.add_argument("--out", required=True, type=Path, help="new folder to write (must not exist)")
    parser.add_argument("--classes", type=int, default=30, help="number of lesion classes (at most 80)")
    parser.add_argument("--patients", type=int, default=8, help="patients per class")
    parser.add_argument("--images", type=int, default=3, help="images (volumes in 3D) per patient")
    parser.add_argument("--size", type=int, default=None, help="side length in pixels (default 64; 32 in 3D)")
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3), help="2: DICOM slices, 3: NIfTI volumes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.spatial_dims == 3:
        root = generate_synthetic_volumes(
            args.out, n_classes=args.classes, patients_per_class=args.patients,
            volumes_per_patient=args.images, size=args.size or 32, seed=args.seed,
        )  # fmt: skip
        kind, n_files = "NIfTI volumes", sum(1 for _ in root.rglob("*.nii.gz"))
    else:
        root = generate_synthetic_dataset(
            args.out, n_classes=args.classes, patients_per_class=args.patients,
            images_per_patient=args.images, image_size=args.size or 64, seed=args.seed,
        )  # fmt: skip
        kind, n_files = "DICOM files", sum(1 for _ in root.rglob("*.dcm"))
    console.print(f"wrote {n_files} {kind} in {args.classes} lesion classes to {root}")
    return 0


def data_check_main(argv: list[str]) -> int:
    """``medmeta data check SOURCE``: read every file, report usable images and skipped files, check episodes."""
    from rich.table import Table

    from medmeta.data.inventory import shown_path, take_inventory
    from medmeta.data.records import data_folder
    from medmeta.data.presets import DEFAULT_WINDOW, PRESETS, parse_window

    parser = argparse.ArgumentParser(prog="medmeta data check", description=data_check_main.__doc__)
    parser.add_argument("source", type=Path, help="data folder, CSV manifest or MedMNIST .npz")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--q-query", type=int, default=15)
    parser.add_argument("--spatial-dims", type=int, default=2, choices=(2, 3))
    parser.add_argument("--split-ratios", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--require-deidentified", action="store_true")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="intensity preset, as fit's --data.preset (overrides --window)")
    parser.add_argument("--window", nargs="+", default=list(DEFAULT_WINDOW), metavar="LOW HIGH",
                        help="intensity window, as fit's --data.window (default: %(default)s HU); "
                             "'none' for per-image min/max")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of tables")
    args = parser.parse_args(argv)
    try:
        window = parse_window(args.window)
    except ValueError as error:
        parser.error(str(error))
    inventory = take_inventory(
        args.source, spatial_dims=args.spatial_dims, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
        split_ratios=args.split_ratios, seed=args.seed, require_deidentified=args.require_deidentified,
        skip_undecodable=True, window=window, preset=args.preset,
    )  # fmt: skip
    if args.json:
        print(json.dumps(inventory.to_json(), indent=2))
        return 0 if inventory.ok else 1
    split_of = {name: split for split in SPLITS for name in inventory.class_splits.of(split)}
    console.print(f"data set: {inventory.source}", highlight=False, markup=False, soft_wrap=True)
    classes = Table(title="usable images per class")
    classes.add_column("class", overflow="fold")
    for column in ("images", "patients", "meta-split"):
        classes.add_column(column, no_wrap=True)
    for name, (images, patients) in inventory.classes().items():
        classes.add_row(name, str(images), str(patients), split_of.get(name, "-"))
    console.print(classes)
    if inventory.problems:  # plain lines, never cut: a file name is only useful whole
        base = data_folder(inventory.source)
        console.print(f"skipped files ({len(inventory.problems)}; paths relative to {base}):", highlight=False,
                      markup=False, soft_wrap=True)  # fmt: skip
        for problem in inventory.problems:
            line = f"  {shown_path(problem.path, inventory.source)}  {problem.reason}: {problem.detail}"
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    episode = f"{args.n_way}-way {args.k_shot}-shot {args.q_query}-query"
    for split, message in inventory.feasibility.items():
        verdict = "[green]ok[/]" if message is None else f"[red]cannot[/] ({escape(message)})"
        console.print(f"{split}: {episode} episodes {verdict}", highlight=False, soft_wrap=True)
    console.print(inventory.summary_line(), highlight=False, markup=False, soft_wrap=True)
    return 0 if inventory.ok else 1


def diagnose_main(argv: list[str]) -> int:
    """``medmeta diagnose``: adapt a trained model to a new task from a few labelled cases, predict and explain."""
    import time

    from medmeta.diagnose import diagnose

    parser = argparse.ArgumentParser(prog="medmeta diagnose", description=diagnose_main.__doc__)
    parser.add_argument("--ckpt", required=True, type=Path, help="a checkpoint written by medmeta fit")
    parser.add_argument("--support", required=True, type=Path,
                        help="folder with one sub-folder per diagnosis, 2 to 20 labelled cases each")  # fmt: skip
    parser.add_argument("--query", required=True, type=Path, nargs="+", help="query image files or folders")
    parser.add_argument("--out", type=Path, default=None, help="new output folder (default: diagnosis-<date-time>)")
    parser.add_argument("--steps", type=int, default=None,
                        help="adaptation steps (default: the model's eval_inner_steps, or finetune_steps for the fine-tune "
                             "baseline); refused for learners without steps (protonet, logreg)")  # fmt: skip
    parser.add_argument("--save-adapted", type=Path, default=None, metavar="DIR",
                        help="also save the adapted model as a MONAI bundle in this new folder (for medmeta predict)")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or Path(time.strftime("diagnosis-%Y%m%d-%H%M%S"))
    result = diagnose(args.ckpt, args.support, args.query, out, steps=args.steps, save_adapted=args.save_adapted)
    from rich.table import Table

    table = Table(title=f"{len(result.predictions)} query case(s)")
    for column in ("case", "predicted", "probability"):
        table.add_column(column)
    for p in result.predictions:
        table.add_row(str(p["case"]), str(p["predicted"]), f"{max(p['probabilities'].values()):.2f}")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"report: {result.report}", highlight=False)
    if result.bundle is not None:
        console.print(f"adapted model (MONAI bundle): {result.bundle}", highlight=False)
    return 0


def evaluate_main(argv: list[str]) -> int:
    """``medmeta evaluate``: test a checkpoint on frozen test episodes (drawn, or replayed from --episodes)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    parser = argparse.ArgumentParser(prog="medmeta evaluate", description=evaluate_main.__doc__)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=None, help="a checkpoint written by medmeta fit")
    parser.add_argument("--ckpt", type=Path, default=None, help="the checkpoint (same as the positional argument)")
    parser.add_argument("--episodes", type=Path, default=None, help="replay this test_episodes.json")
    parser.add_argument("--data-root", default=None, help="the data set (default: the one the model was trained on)")
    parser.add_argument("--test-episodes", type=int, default=None, help="episodes to draw when not replaying")
    parser.add_argument("--out", type=Path, default=Path("runs/evaluate"), help="run folder root")
    parser.add_argument(
        "--allow-seen-classes", action="store_true",
        help="evaluate even if a test class was a meta-train or meta-val class of the model (a warning, not a refusal)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.ckpt is None):
        parser.error("give the checkpoint once: medmeta evaluate CKPT (or --ckpt CKPT)")
    path = args.checkpoint or args.ckpt
    model, settings = load_trained(path)
    settings.update(_model_shape(path, model.hparams, settings, data_root=args.data_root))
    if args.data_root is not None:
        settings["root"] = args.data_root
    if args.test_episodes is not None:
        settings["test_episodes"] = args.test_episodes
    settings["episodes_file"] = str(args.episodes) if args.episodes else None
    data = EpisodicDataModule(**settings)
    csv_logger = CSVLogger(args.out, name="evaluate")
    loggers = [csv_logger, TensorBoardLogger(args.out, name="evaluate", version=csv_logger.version)]  # one folder
    trainer = L.Trainer(logger=loggers, inference_mode=False, enable_progress_bar=False, default_root_dir=args.out)
    data.trainer = trainer  # set up before testing (class_splits.json still goes to the run folder), to check classes
    csv_logger.experiment  # makes the new run folder now: made after class_splits.json, it warns of deleting old logs
    data.setup("test")
    _check_unseen_test_classes(path, read_checkpoint(path), data.class_splits.test, allow=args.allow_seen_classes)
    trainer.test(model, datamodule=data, verbose=False)
    summary = model.test_summary
    console.print(
        f"test accuracy: [bold]{100 * summary['accuracy']:.1f}% ± {100 * summary['accuracy_ci95']:.1f}%[/], "
        f"macro AUROC {summary['macro_auroc']:.3f} ± {summary['macro_auroc_ci95']:.3f}, "
        f"balanced accuracy {100 * summary['balanced_accuracy']:.1f}%, ECE {summary['ece']:.3f} "
        f"({summary['test_episodes']} episodes)"
    )
    console.print(f"outputs: {Path(summary['metrics_file']).parent}", highlight=False)
    return 0


def _model_shape(path: Path, hparams: dict, settings: dict, *, data_root: str | None) -> dict[str, object]:
    """The episode and image shape of the checkpoint's model, which the test data must have (``evaluate``).

    A saved data setting that disagrees is refused; a checkpoint without data settings (fit with plain
    loaders) needs ``--data-root``, and its intensity and episode settings are then the defaults (a warning).
    """
    shape = {key: hparams[key] for key in ("n_way", "in_channels", "image_size", "spatial_dims")}
    differs = [f"{key}={settings[key]!r} (the model: {value!r})" for key, value in shape.items()
               if key in settings and settings[key] != value]  # fmt: skip
    if differs:
        raise DataError(f"checkpoint {path}: its saved data settings do not fit its model: {', '.join(differs)}; "
                        "it cannot be evaluated on them")  # fmt: skip
    if not settings:
        if data_root is None:
            raise DataError(f"checkpoint {path} holds no data settings (fit without medmeta's data module): give the "
                            "test data with --data-root DIR")  # fmt: skip
        console.print(
            f"[yellow]warning:[/] checkpoint {escape(str(path))} holds no data settings: the test images are read with "
            "the default intensity window and episodes (k_shot=1, q_query=15), which may not be how the model was "
            "trained",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
    return shape


def _check_unseen_test_classes(path: Path, checkpoint: dict, test_classes: Sequence[str], *, allow: bool) -> None:
    """Refuse (or, with ``allow``, warn about) test classes the checkpoint's model meta-trained or validated on."""
    seen = seen_classes(path, checkpoint)
    if seen is None:
        console.print(
            f"[yellow]warning:[/] checkpoint {escape(str(path))} does not record the classes its model meta-trained on "
            "(written by an older medmeta, and no class_splits.json in its run folder): whether a test class was "
            "a training class cannot be checked",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        return
    overlap = {split: sorted(set(test_classes) & set(seen[split])) for split in ("train", "val")}
    if not any(overlap.values()):
        return
    listed = "; ".join(f"meta-{split}: {', '.join(names)}" for split, names in overlap.items() if names)
    message = (
        f"{sum(map(len, overlap.values()))} of the {len(test_classes)} test classes were seen by this model in "
        f"meta-training or validation ({listed}): their accuracy is not few-shot accuracy on new classes"
    )
    if not allow:
        raise DataError(
            f"{message}; remove or rename them in the test data, or pass --allow-seen-classes to evaluate anyway"
        )
    console.print(f"[yellow]warning:[/] {escape(message)} (--allow-seen-classes)", highlight=False, soft_wrap=True)


PREDICT_WITHOUT_BUNDLE = (
    "medmeta predict needs --bundle DIR: an adapted model saved by `medmeta diagnose ... --save-adapted DIR`. It "
    "predicts every case of --input PATH... and writes predictions.csv and predictions.json to --out OUT. To test a "
    "checkpoint on its frozen test episodes, use `medmeta test` (or `medmeta evaluate`)"
)


def predict_main(argv: list[str]) -> int:
    """``medmeta predict``: predict a cohort with an adapted model saved as a bundle (``diagnose --save-adapted``)."""
    if not {"-h", "--help"} & set(argv) and not any(w == "--bundle" or w.startswith("--bundle=") for w in argv):
        console.print(f"[bold red]medmeta: error:[/] {escape(PREDICT_WITHOUT_BUNDLE)}", highlight=False, soft_wrap=True)
        return 2
    from medmeta.bundle import load_bundle
    from medmeta.predict import BATCH_SIZE, CSV_NAME, JSON_NAME, predict_cohort

    parser = argparse.ArgumentParser(prog="medmeta predict", description=predict_main.__doc__)
    parser.add_argument("--bundle", required=True, type=Path, metavar="DIR",
                        help="an adapted model: medmeta diagnose --save-adapted DIR")  # fmt: skip
    parser.add_argument("--input", required=True, type=Path, nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively; DICOM series folders in 3D) or CSV "
                             "manifests with a path column")  # fmt: skip
    parser.add_argument("--out", required=True, type=Path, metavar="OUT",
                        help="output folder: new, or an earlier run's (its predicted cases are skipped)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="N", help="cases per batch (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    bundle = load_bundle(args.bundle)
    try:
        result = predict_cohort(bundle, args.input, args.out, batch_size=args.batch_size, bundle_folder=args.bundle)
    except KeyboardInterrupt:
        console.print(f"medmeta predict: interrupted; the rows of finished batches are in {args.out / CSV_NAME}; run "
                      "the same command again to finish", highlight=False, soft_wrap=True)  # fmt: skip
        return 130
    console.print(
        f"{result.cases} case(s): {result.predicted} predicted now, {result.not_predicted} not predicted (reason in "
        f"the warnings column), {result.with_warnings} with warnings; {result.done_before} already predicted (skipped)",
        highlight=False, soft_wrap=True,
    )  # fmt: skip
    if result.stopped:
        console.print(
            f"medmeta predict: stopped by a signal after the batch in flight; the rows so far are in "
            f"{args.out / CSV_NAME}; run the same command again to predict the remaining cases",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        return 143
    console.print(f"predictions: {args.out / CSV_NAME}, {args.out / JSON_NAME}", highlight=False, soft_wrap=True)
    return 0


SUBCOMMANDS = {
    "fit": "meta-train a model (LightningCLI: --config FILE, --model.*, --data.*, --trainer.*)",
    "validate": "adapt to the frozen validation episodes with a checkpoint (--ckpt_path)",
    "test": "test a checkpoint on frozen test episodes: metrics with 95% CIs, figures",
    "predict": "predict a cohort with an adapted model (--bundle from diagnose --save-adapted): CSV and JSON",
    "synth": "write the synthetic lesion data set (2D DICOM or 3D NIfTI)",
    "data check": "read every file of a data set: usable images, skipped files with reasons, feasible episodes",
    "evaluate": "test a checkpoint without a config (data settings read from the checkpoint)",
    "diagnose": "adapt a trained model to a new task from a few labelled cases, predict and explain",
}


def print_overview() -> None:
    """Print every subcommand with one line each (``medmeta --help``)."""
    lines = [
        "usage: medmeta SUBCOMMAND [options]   (medmeta SUBCOMMAND --help lists its options)",
        "",
        "Few-shot medical image diagnosis: meta-learning on DICOM, NIfTI and 2D images.",
        "",
        "subcommands:",
        *(f"  {name:<11} {text}" for name, text in SUBCOMMANDS.items()),
    ]
    print("\n".join(lines))


def _quiet_third_party_noise() -> None:
    """Hide start-up chatter that says nothing about the user's run (optional GPU codecs, deprecations)."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medmeta`` console script."""
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] in ("-h", "--help"):
        print_overview()
        return 0 if words else 2
    if words[0] == "data" and words[1:2] != ["check"]:
        print("usage: medmeta data check SOURCE [options]   (medmeta data check --help lists them)", file=sys.stderr)
        return 0 if words[1:2] in (["-h"], ["--help"]) else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_third_party_noise()
    preemption = PreemptionCheckpoint()
    try:
        if words[:1] == ["synth"]:
            return synth_main(list(words[1:]))
        if words[:2] == ["data", "check"]:
            return data_check_main(list(words[2:]))
        if words[:1] == ["diagnose"]:
            return diagnose_main(list(words[1:]))
        if words[:1] == ["evaluate"]:
            return evaluate_main(list(words[1:]))
        if words[:1] == ["predict"]:
            return predict_main(list(words[1:]))
        check_config_files(words)
        expanded = expand_short_names(words)
        if argv is None:  # LightningCLI reads sys.argv itself (given both, it warns): the short names as class paths
            sys.argv[1:] = expanded
        MedMetaCLI(
            FewShotModule,
            EpisodicDataModule,
            args=None if argv is None else expanded,
            trainer_defaults={"inference_mode": False, "callbacks": [preemption, LastCheckpoint(), RandomStateCheckpoint()]},
            save_config_kwargs={"overwrite": True},
        )
    except (DataError, FileExistsError) as error:
        console.print(f"[bold red]medmeta: error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except FloatingPointError as error:  # a non-finite loss, gradient or adapted prediction: stopped, said where
        console.print(f"[bold red]medmeta: stopped:[/] {error}", highlight=False, soft_wrap=True)
        return 1
    except SIGTERMException:
        console.print(
            f"medmeta: stopped by a termination signal; checkpoint written to "
            f"{preemption.saved or '(none: the signal came before training started)'}; "
            "continue with the same command and --ckpt_path last",
            highlight=False, soft_wrap=True,
        )
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
