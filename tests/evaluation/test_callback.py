"""The evaluation callback: extra per-episode metrics by dotted path, and a user's own instance is the one used."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.evaluation.callback import EvaluationReport
from tests.conftest import module_for


def brier(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Brier score per episode (a metric for the test below)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean(-1)


def one_number(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A wrong metric: one number for the whole test set instead of one per episode."""
    return probs.mean()


def _test_run(root: Path, tmp_path: Path, callbacks: list[L.Callback]) -> Path:
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1, pixel_baseline=False)
    data = EpisodicDataModule(str(root), n_way=3, k_shot=2, q_query=3, eval_batch_size=4, image_size=16, test_episodes=6,
                              split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(logger=False, enable_progress_bar=False, inference_mode=False, default_root_dir=tmp_path,
                        callbacks=callbacks)  # fmt: skip
    trainer.test(module, datamodule=data, verbose=False)
    assert [type(c) for c in trainer.callbacks].count(EvaluationReport) == 1  # the user's, not a second default one
    return Path(trainer.log_dir or tmp_path)


def test_an_extra_metric_is_a_column_and_a_mean_with_ci(tiny_dicom_root: Path, tmp_path: Path) -> None:
    run = _test_run(tiny_dicom_root, tmp_path, [EvaluationReport(metrics={"brier": f"{__name__}.brier"})])
    with (run / "per_episode.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(rows) == 6 and all(0.0 <= float(r["brier"]) <= 2.0 for r in rows)
    assert metrics["brier"] == pytest.approx(sum(float(r["brier"]) for r in rows) / 6, abs=1e-6)
    assert metrics["brier_ci95"] >= 0.0


def test_a_metric_with_the_wrong_shape_or_name_is_refused(tiny_dicom_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="built-in"):
        EvaluationReport(metrics={"accuracy": f"{__name__}.brier"})
    with pytest.raises(ValueError, match="cannot be imported"):
        EvaluationReport(metrics={"x": "no_such_package.metric"})
    with pytest.raises(ValueError, match="one finite .* value per episode"):
        _test_run(tiny_dicom_root, tmp_path, [EvaluationReport(metrics={"mean_p": f"{__name__}.one_number"})])
