"""A real test run writes every evaluation output: metrics with CIs, per-episode CSV, figures, loggers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.evaluation.metrics import reliability_bins
from tests.conftest import module_for

FIGURES = ("confusion_matrix.png", "reliability_diagram.png", "adaptation_curve.png", "episode_grid.png")


def test_test_run_writes_metrics_csv_figures_and_logs(tiny_dicom_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=12)
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=2, q_query=3, eval_batch_size=4, image_size=16,
                              test_episodes=8, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = L.Trainer(logger=loggers, enable_progress_bar=False, inference_mode=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=data, verbose=False)
    run = Path(trainer.log_dir)

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_auroc", "ece"):
        assert 0.0 <= metrics[key] <= 1.0 and metrics[f"{key}_ci95"] >= 0.0, key
    assert metrics["test_episodes"] == 8 and "bootstrap" in metrics["ci_method"]
    bins = reliability_bins(module.test_results.probs, module.test_results.labels)  # the ECE is that of the diagram
    gaps = [n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n]
    assert metrics["ece"] == pytest.approx(sum(gaps) / sum(bins["count"]))
    assert set(metrics["per_class"]) == set(data.class_splits.test)
    curve = metrics["adaptation_curve"]  # all 8 episodes (fewer than CURVE_EPISODES), 11 of the 13 points 0..12
    assert curve["episodes"] == 8 and curve["after_steps"] == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12]
    assert len(curve["accuracy_after_step"]) == 11 and abs(curve["accuracy_after_step"][-1] - metrics["accuracy"]) < 1e-6
    assert metrics["figures"] == list(FIGURES)

    with (run / "per_episode.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and sorted(int(r["episode"]) for r in rows) == list(range(8))
    assert abs(sum(float(r["accuracy"]) for r in rows) / 8 - metrics["accuracy"]) < 1e-6
    assert all(set(r["classes"].split(";")) <= set(data.class_splits.test) for r in rows)

    for name in FIGURES:
        with Image.open(run / name) as image:
            assert image.width > 200 and image.height > 150, name
    assert (run / "test_episodes.json").is_file()

    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "test/acc" in logged and "test/macro_auroc" in logged and "test/ece" in logged
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").rglob("events.out.tfevents*"))
    assert all(f"test/{Path(name).stem}".encode() in events for name in FIGURES)
