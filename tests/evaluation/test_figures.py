"""Each figure writes a non-blank PNG of plausible size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medmeta.evaluation.figures import (
    plot_accuracy_vs_shots,
    plot_adaptation_curve,
    plot_comparison,
    plot_confusion_matrix,
    plot_episode_grid,
    plot_reliability_diagram,
)
from medmeta.evaluation.metrics import reliability_bins


def assert_png(path: Path, written: Path, min_side: int = 300) -> None:
    assert written == path and path.is_file()
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) < 6_000
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0


def test_confusion_matrix_12_classes(tmp_path: Path) -> None:
    names = [f"lesion_type_{i:02d}" for i in range(12)]
    counts = torch.randint(0, 20, (12, 12), generator=torch.Generator().manual_seed(0)) + 30 * torch.eye(12).long()
    counts[3] = 0  # a class never seen as true class must not break the row normalisation
    path = tmp_path / "figs" / "confusion.png"
    assert_png(path, plot_confusion_matrix(names, counts, path))


def test_reliability_diagram(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 10, 3, generator=generator), dim=-1)
    labels = torch.randint(0, 3, (4, 10), generator=generator)
    path = tmp_path / "reliability.png"
    assert_png(path, plot_reliability_diagram(reliability_bins(probs, labels), path, ece=0.123))


def test_adaptation_curve(tmp_path: Path) -> None:
    steps = torch.linspace(0.2, 0.8, 6)
    step_accuracy = (steps + 0.1 * torch.randn(8, 6, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    path = tmp_path / "adaptation.png"
    assert_png(path, plot_adaptation_curve(step_accuracy, path))


@pytest.mark.parametrize("shape", [(1, 32, 32), (1, 8, 32, 32)], ids=["2d", "3d"])
def test_episode_grid(tmp_path: Path, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    query_y = torch.arange(3).repeat(4)
    predicted = query_y.clone()
    predicted[::3] = (predicted[::3] + 1) % 3  # some wrong predictions
    path = tmp_path / "episode.png"
    written = plot_episode_grid(
        torch.rand(6, *shape, generator=generator),
        support_y,
        torch.rand(12, *shape, generator=generator),
        query_y,
        predicted,
        ("nodule", "cyst", "normal"),
        path,
        max_query=10,
    )
    assert_png(path, written, min_side=200)


def _comparison_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shots in (1, 5, 10):
        for name in ("maml", "protonet", "finetune"):
            if name == "finetune" and shots == 10:
                continue  # a missing (algorithm, shots) pair leaves a gap
            accuracy = 0.3 + 0.04 * shots + 0.05 * float(torch.rand(1, generator=generator))
            rows.append({"algorithm": name, "shots": shots, "accuracy": accuracy, "ci95": 0.02, "n_way": 5})
    return rows


def test_comparison_bar_plot(tmp_path: Path) -> None:
    path = tmp_path / "figs" / "comparison.png"
    assert_png(path, plot_comparison(_comparison_rows(), path, title="5-way comparison"))


def test_accuracy_vs_shots(tmp_path: Path) -> None:
    path = tmp_path / "shots.png"
    assert_png(path, plot_accuracy_vs_shots(_comparison_rows(), path))


def test_comparison_needs_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_comparison([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="ci95"):
        plot_accuracy_vs_shots([{"algorithm": "maml", "shots": 1, "accuracy": 0.5}], tmp_path / "bad.png")
