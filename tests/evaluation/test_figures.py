"""Each figure writes a non-blank PNG of plausible size and plots the given numbers (read back from its Axes)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from medmeta.data.loading import transform_images
from medmeta.data.records import ImageRecord
from medmeta.evaluation import figures
from medmeta.evaluation.figures import (
    plot_accuracy_vs_shots,
    plot_adaptation_curve,
    plot_comparison,
    plot_confusion_matrix,
    plot_episode_grid,
    plot_reliability_diagram,
)
from medmeta.evaluation.metrics import reliability_bins
from tests.test_explain import (
    axial_anatomy,
    load_files,
    top_row_picture,
    write_axial_series,
    write_picture_as,
    write_ras_nifti,
)


def assert_png(path: Path, written: Path, min_side: int = 300) -> None:
    assert written == path and path.is_file()
    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) < 6_000
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 0


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions save, kept instead of cleared after writing the PNG."""
    kept: list[Figure] = []
    save = figures._save

    def save_and_keep(figure: Figure, path: Path, dpi: int = 120) -> Path:
        kept.append(figure)
        monkeypatch.setattr(figure, "clear", lambda *args, **kwargs: None)
        return save(figure, path, dpi)

    monkeypatch.setattr(figures, "_save", save_and_keep)
    return kept


def test_confusion_matrix_rows_are_true_classes(tmp_path: Path, drawn: list[Figure]) -> None:
    counts = torch.tensor([[5, 1, 0], [2, 2, 4], [0, 0, 0]])  # asymmetric; class "c" never the true class
    path = tmp_path / "confusion.png"
    assert_png(path, plot_confusion_matrix(["a", "b", "c"], counts, path), min_side=200)
    axes = drawn[0].axes[0]
    expected = np.array([[5 / 6, 1 / 6, 0], [2 / 8, 2 / 8, 4 / 8], [0, 0, 0]])  # each row normalised by its true class
    np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), expected)
    cells = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in axes.texts}
    assert cells == {(j, i): str(int(counts[i, j])) for i in range(3) for j in range(3)}  # x: predicted, y: true
    assert [t.get_text() for t in axes.get_yticklabels()] == ["a", "b", "c"] == [t.get_text() for t in axes.get_xticklabels()]
    assert (axes.get_ylabel(), axes.get_xlabel()) == ("true class", "predicted class")


def test_reliability_diagram_plots_the_bins(tmp_path: Path, drawn: list[Figure]) -> None:
    """Seven predictions in 4 bins worked out by hand: [0.25, 0.5): 0.4 right, 0.45 wrong; [0.5, 0.75): 0.6, 0.7 right,
    0.7 wrong; [0.75, 1]: 0.9 wrong, 1.0 right; [0, 0.25) empty."""
    confidence = [0.4, 0.45, 0.6, 0.7, 0.7, 0.9, 1.0]
    probs = torch.tensor([[c, (1 - c) / 2, (1 - c) / 2] for c in confidence], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 0])
    path = tmp_path / "reliability.png"
    assert_png(path, plot_reliability_diagram(reliability_bins(probs[None], labels[None], n_bins=4), path, ece=0.123))
    top, bottom = drawn[0].axes[:2]
    accuracy, mean_confidence = [1 / 2, 2 / 3, 1 / 2], [0.425, 2 / 3, 0.95]
    bars, gaps = top.containers[0], top.containers[1]
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], [0.375, 0.625, 0.875])
    np.testing.assert_allclose([b.get_width() for b in bars], [0.25] * 3)
    np.testing.assert_allclose([b.get_height() for b in bars], accuracy)
    np.testing.assert_allclose([b.get_y() for b in gaps], accuracy)  # the gap starts at the accuracy ...
    np.testing.assert_allclose([b.get_y() + b.get_height() for b in gaps], mean_confidence)  # ... and ends at the confidence
    np.testing.assert_allclose([b.get_height() for b in bottom.containers[0]], [0, 2, 3, 2])
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bottom.containers[0]], [0.125, 0.375, 0.625, 0.875])
    assert top.get_title() == "Reliability diagram (ECE = 0.123)"


def test_adaptation_curve_plots_the_mean_and_ci_per_step(tmp_path: Path, drawn: list[Figure]) -> None:
    columns = [[0.2, 0.4, 0.0, 0.2], [0.4, 0.6, 0.5, 0.5], [0.6, 1.0, 0.8, 0.6]]  # accuracy after 0, 1, 2 steps
    path = tmp_path / "adaptation.png"
    assert_png(path, plot_adaptation_curve(torch.tensor(columns).T, path))
    axes = drawn[0].axes[0]
    mean = [0.2, 0.5, 0.75]
    half_width = [1.96 * statistics.stdev(column) / 2 for column in columns]  # n = 4 episodes
    np.testing.assert_allclose(axes.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(axes.lines[0].get_ydata(), mean)
    band = axes.collections[0].get_paths()[0].vertices
    for step in range(3):
        ys = band[np.isclose(band[:, 0], step), 1]
        np.testing.assert_allclose([ys.min(), ys.max()], [mean[step] - half_width[step], mean[step] + half_width[step]])
    assert "4 episodes" in axes.lines[0].get_label()


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


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_episode_grid_shows_files_as_a_viewer_does(tmp_path: Path, drawn: list[Figure], spatial_dims: int) -> None:
    if spatial_dims == 2:  # a PNG and a DICOM of one picture with a bright top row
        viewer = top_row_picture() / 255
        files = [write_picture_as(kind, top_row_picture(), tmp_path / f"bar.{kind}") for kind in ("png", "dcm")]
    else:  # an axial DICOM series and a RAS NIfTI of one anatomy: their middle axial slice
        slices = axial_anatomy()
        viewer = slices[8] / 1000
        files = [write_axial_series(slices, tmp_path / "series"), write_ras_nifti(slices, tmp_path / "v.nii")]
    images = load_files(files, viewer.shape[0], spatial_dims)
    plot_episode_grid(images, torch.tensor([0, 1]), images[:1], torch.tensor([0]), torch.tensor([0]), ("a", "b"),
                      tmp_path / "grid.png")  # fmt: skip
    support, query = (part.axes for part in drawn[0].subfigs)
    for axes in (support[0], support[1], query[0]):
        np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), viewer, atol=0.003)


def test_episode_grid_draws_array_images_as_stored(tmp_path: Path, drawn: list[Figure]) -> None:
    pictures = np.stack([top_row_picture(), top_row_picture().T])  # MedMNIST 2D: (H, W)
    records = [ImageRecord(Path("x.npz"), "a", str(i), item=i) for i in range(2)]
    images = transform_images(records, image_size=12, window=None, preset=None, spatial_dims=2, in_channels=1,
                              arrays=pictures)  # fmt: skip
    plot_episode_grid(images, torch.tensor([0, 1]), images[:1], torch.tensor([0]), torch.tensor([0]), ("a", "b"),
                      tmp_path / "grid.png", from_array=True)  # fmt: skip
    support = drawn[0].subfigs[0].axes
    for axes, picture in zip(support, pictures):
        np.testing.assert_allclose(np.asarray(axes.images[0].get_array()) * 255, picture, atol=1)


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
    two_seeds = [{"algorithm": "maml", "shots": 5, "accuracy": a, "ci95": 0.02} for a in (0.4, 0.6)]
    for plot in (plot_comparison, plot_accuracy_vs_shots):  # one bar would show one seed as if it were the method
        with pytest.raises(ValueError, match="two rows for maml at 5 shots"):
            plot(two_seeds, tmp_path / "seeds.png")


def test_adaptation_curve_at_some_steps_puts_each_point_at_its_step(tmp_path: Path, drawn: list[Figure]) -> None:
    columns = torch.tensor([[0.2, 0.4], [0.5, 0.7], [0.6, 0.8]]).T  # 2 episodes, after steps 0, 20, 40
    path = tmp_path / "adaptation.png"
    assert_png(path, plot_adaptation_curve(columns, path, steps=[0, 20, 40]))
    np.testing.assert_allclose(drawn[0].axes[0].lines[0].get_xdata(), [0, 20, 40])
    with pytest.raises(ValueError, match="3 curve columns but 2 steps"):
        plot_adaptation_curve(columns, path, steps=[0, 40])
