"""Evaluation figures written as PNG files (Agg canvas, no pyplot state, so safe in headless and worker processes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from medmeta.display import display_plane
from medmeta.evaluation.metrics import mean_and_ci95

CORRECT_COLOUR = "tab:green"
WRONG_COLOUR = "tab:red"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, dpi: int = 120) -> Path:
    """Write ``figure`` to ``path`` as PNG (creating parent folders) and release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, format="png")
    figure.clear()
    return path


def plot_confusion_matrix(
    class_names: list[str], counts: Tensor, path: Path, title: str = "Confusion matrix (rows: true class)"
) -> Path:
    """Confusion matrix with row-normalised colours and raw counts in the cells; returns ``path``."""
    counts = torch.as_tensor(counts).detach().cpu().double()
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"counts must be [{n}, {n}] for {n} class names, got {tuple(counts.shape)}")
    rows = counts.sum(dim=1, keepdim=True)
    fraction = torch.where(rows > 0, counts / rows.clamp(min=1), torch.zeros_like(counts)).numpy()
    side = max(4.0, 1.2 + 0.45 * n)
    figure = _new_figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.02, label="fraction of true class")
    fontsize = 9 if n <= 10 else 7 if n <= 16 else 6
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            colour = "white" if fraction[i, j] > 0.5 else "black"
            axes.text(j, i, str(value), ha="center", va="center", fontsize=fontsize, color=colour)
    axes.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize + 1)
    axes.set_yticks(range(n), class_names, fontsize=fontsize + 1)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    return _save(figure, path)


def plot_reliability_diagram(bins: dict, path: Path, ece: float | None = None) -> Path:
    """Reliability diagram from :func:`~medmeta.evaluation.metrics.reliability_bins`: accuracy per confidence bin
    against the diagonal, with the per-bin prediction counts below; returns ``path``."""
    edges = np.asarray(bins["edges"], dtype=float)
    accuracy = np.asarray(bins["accuracy"], dtype=float)
    confidence = np.asarray(bins["confidence"], dtype=float)
    count = np.asarray(bins["count"], dtype=float)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = count > 0
    figure = _new_figure(5.0, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centres[filled], accuracy[filled], width=widths[filled], color="tab:blue", edgecolor="black", alpha=0.8,
            label="accuracy")
    top.bar(centres[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=widths[filled],
            color="tab:red", alpha=0.25, edgecolor="tab:red", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("Reliability diagram" if ece is None else f"Reliability diagram (ECE = {ece:.3f})")
    bottom.bar(centres, count, width=widths, color="grey", edgecolor="black")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("count")
    return _save(figure, path)


def plot_adaptation_curve(step_accuracy: Tensor, path: Path, steps: Sequence[int] | None = None) -> Path:
    """Mean query accuracy after the inner steps ``steps`` (default 0..S; ``step_accuracy`` is ``[E, len(steps)]``)
    with a 95% CI band (normal approximation over episodes); returns ``path``."""
    step_accuracy = torch.as_tensor(step_accuracy).detach().cpu().double()
    if step_accuracy.ndim != 2:
        raise ValueError(f"step_accuracy must be [E, S+1], got {tuple(step_accuracy.shape)}")
    steps = np.arange(step_accuracy.shape[1]) if steps is None else np.asarray(steps)
    if steps.shape != (step_accuracy.shape[1],):
        raise ValueError(f"{step_accuracy.shape[1]} curve columns but {steps.size} steps: {steps.tolist()}")
    stats = np.array([mean_and_ci95(column) for column in step_accuracy.T])
    mean, ci = stats[:, 0], stats[:, 1]
    figure = _new_figure(5.0, 3.5)
    axes = figure.add_subplot()
    axes.fill_between(steps, mean - ci, mean + ci, color="tab:blue", alpha=0.25, label="95% CI")
    axes.plot(steps, mean, marker="o", color="tab:blue", label=f"mean over {step_accuracy.shape[0]} episodes")
    axes.set_xlabel("inner steps")
    axes.set_ylabel("query accuracy")
    axes.set_xticks(steps if steps.size <= 20 else np.linspace(0, steps[-1], 11).round())
    axes.set_title("Adaptation curve")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _display_slices(images: Tensor, from_array: bool = False) -> np.ndarray:
    """Channel 0 of the plane a viewer shows (:func:`~medmeta.display.display_plane`) of each of ``[n, C, H, W]`` or
    ``[n, C, D, H, W]`` images, as ``[n, rows, columns]``."""
    images = torch.as_tensor(images).detach().cpu().float()
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [n, C, H, W] or [n, C, D, H, W], got {tuple(images.shape)}")
    planes = [display_plane(image, from_array=from_array)[0] for image in images]
    return torch.stack(planes).numpy() if planes else np.zeros((0, 1, 1), np.float32)


def _query_title(true: str, predicted: str, width: int = 26) -> str:
    """``true: X / pred: Y``, broken after the slash when too long for one image column."""
    title = f"true: {true} / pred: {predicted}"
    return title if len(title) <= width else f"true: {true} /\npred: {predicted}"


def plot_episode_grid(
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    predicted: Tensor,
    class_names: tuple[str, ...],
    path: Path,
    max_query: int = 10,
    *,
    from_array: bool = False,
) -> Path:
    """One episode: support images (grouped by class, titled with it) above up to ``max_query`` query images titled
    ``true: X / pred: Y`` in green when correct and red when wrong. Images are already windowed to [0, 1] and are
    drawn as a viewer shows them (:func:`~medmeta.display.display_plane`: 3D volumes their middle axial slice,
    anterior up, the patient's left on the right); ``from_array``: they came from an array source (MedMNIST),
    not from files. Returns ``path``."""
    support = _display_slices(support_x, from_array)
    support_y = torch.as_tensor(support_y).detach().cpu().long()
    order = torch.argsort(support_y, stable=True)
    support, support_y = support[order.numpy()], support_y[order]
    shown = min(max_query, int(query_x.shape[0]))
    query = _display_slices(query_x[:shown], from_array)
    query_y = torch.as_tensor(query_y).detach().cpu().long()[:shown]
    predicted = torch.as_tensor(predicted).detach().cpu().long()[:shown]

    columns = max(1, min(10, max(len(support), len(query))))
    support_rows = math.ceil(len(support) / columns)
    query_rows = math.ceil(len(query) / columns)
    figure = _new_figure(1.6 * columns, 1.9 * (support_rows + query_rows) + 0.6)
    support_part, query_part = figure.subfigures(2, 1, height_ratios=[max(support_rows, 1), max(query_rows, 1)])
    support_part.supylabel("support", fontsize=10, fontweight="bold")
    query_part.supylabel(f"query\n({shown} of {int(query_x.shape[0])})", fontsize=10, fontweight="bold")

    def draw(part: Figure, images: np.ndarray, rows: int, titles: list[str], colours: list[str]) -> None:
        grid = part.subplots(max(rows, 1), columns, squeeze=False)
        for index, axes in enumerate(grid.flat):
            axes.set_axis_off()
            if index < len(images):
                axes.imshow(images[index], cmap="gray", vmin=0.0, vmax=1.0)
                axes.set_title(titles[index], fontsize=7, color=colours[index])

    draw(support_part, support, support_rows, [class_names[int(y)] for y in support_y], ["black"] * len(support))
    query_titles = [_query_title(class_names[int(t)], class_names[int(p)]) for t, p in zip(query_y, predicted)]
    query_colours = [CORRECT_COLOUR if int(t) == int(p) else WRONG_COLOUR for t, p in zip(query_y, predicted)]
    draw(query_part, query, query_rows, query_titles, query_colours)
    return _save(figure, path)


def _comparison_layout(rows: list[dict]) -> tuple[list[str], list[int], dict[tuple[str, int], dict]]:
    """Algorithms (in order of first appearance), sorted shot counts, and the row of each (algorithm, shots)."""
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    for row in rows:
        missing = {"algorithm", "shots", "accuracy", "ci95"} - set(row)
        if missing:
            raise ValueError(f"every row needs algorithm, shots, accuracy and ci95; a row lacks {sorted(missing)}")
    by_key: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (str(row["algorithm"]), int(row["shots"]))
        if key in by_key:  # one bar per (algorithm, shots): a second row (another seed, say) would hide the first
            raise ValueError(f"two rows for {key[0]} at {key[1]} shots: give each (algorithm, shots) one row, e.g. "
                             "averaged over seeds, or name the seeds apart in 'algorithm'")  # fmt: skip
        by_key[key] = row
    algorithms = list(dict.fromkeys(key[0] for key in by_key))
    return algorithms, sorted({key[1] for key in by_key}), by_key


def _chance(rows: list[dict]) -> float | None:
    """``1 / n_way`` when every row states the same ``n_way``, else ``None``."""
    ways = {row.get("n_way") for row in rows}
    if len(ways) != 1 or None in ways:
        return None
    return 1.0 / float(ways.pop())


def plot_comparison(
    rows: list[dict], path: Path, title: str = "Test accuracy on the same frozen episodes (± 95% CI)"
) -> Path:
    """Bar plot of test accuracy with 95% CI error bars: one group per shot count, one bar (colour) per algorithm.

    Each row is one run: ``algorithm``, ``shots``, ``accuracy`` and ``ci95`` (fractions in [0, 1]),
    optionally ``n_way`` (the same in every row draws the chance level). Algorithms keep their colour
    and place in every group (in order of first appearance, as in :func:`plot_accuracy_vs_shots`); a
    missing (algorithm, shots) pair leaves a gap. Returns ``path``.
    """
    algorithms, shots, by_key = _comparison_layout(rows)
    width = 0.8 / len(algorithms)
    figure = _new_figure(max(6.0, 2.2 + 0.3 * len(algorithms) * len(shots)), 4.0)
    axes = figure.add_subplot()
    for j, name in enumerate(algorithms):
        present = [(i, by_key[(name, k)]) for i, k in enumerate(shots) if (name, k) in by_key]
        xs = [i - 0.4 + width * (j + 0.5) for i, _ in present]
        axes.bar(xs, [100 * float(r["accuracy"]) for _, r in present], width,
                 yerr=[100 * float(r["ci95"]) for _, r in present], capsize=3, label=name)  # fmt: skip
    chance = _chance(rows)
    if chance is not None:
        axes.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({100 * chance:.0f}%)")
    axes.set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
    axes.set_ylim(0, 100)
    axes.set_ylabel("test accuracy (%) ± 95% CI")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_title(title)
    return _save(figure, path)


def plot_accuracy_vs_shots(
    rows: list[dict], path: Path, title: str = "Test accuracy against support images per class (± 95% CI)"
) -> Path:
    """Test accuracy against shots (K), one line per algorithm with 95% CI error bars and band; same rows as
    :func:`plot_comparison` (an algorithm run at one shot count shows as a single point). Returns ``path``."""
    algorithms, shots, by_key = _comparison_layout(rows)
    figure = _new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    gap = float(np.diff(shots).min()) if len(shots) > 1 else 1.0
    for i, name in enumerate(algorithms):
        points = [(k, by_key[(name, k)]) for k in shots if (name, k) in by_key]
        dodge = 0.04 * gap * (i - (len(algorithms) - 1) / 2)  # side by side, so the error bars stay readable
        ks = np.array([k for k, _ in points], dtype=float) + dodge
        mean = np.array([100 * float(r["accuracy"]) for _, r in points])
        ci = np.array([100 * float(r["ci95"]) for _, r in points])
        bars = axes.errorbar(ks, mean, yerr=ci, marker="o", capsize=3, label=name)
        axes.fill_between(ks, mean - ci, mean + ci, color=bars.lines[0].get_color(), alpha=0.1)
    chance = _chance(rows)
    if chance is not None:
        axes.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xticks(shots)
    axes.set_xlabel("shots (support images per class)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_title(title, fontsize=10)
    return _save(figure, path)
