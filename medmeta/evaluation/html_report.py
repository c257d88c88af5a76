"""The self-contained ``report.html`` of a test run, written by the evaluation callback beside ``metrics.json``.

One file a clinician or reviewer can open: the run's settings, the accuracy with its 95% CI and the
other metrics, the figures (PNGs embedded as data URIs), the per-class table and the episodes of
lowest accuracy with their classes. Everything shown is escaped; no file path of an image, patient
folder or data root is written (class names are the data set's diagnosis names, as in metrics.json),
and the page parts and content security policy are those of ``medmeta diagnose``'s report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from medmeta.data.presets import Intensity
from medmeta.networks import SHAPE_ARGUMENTS
from medmeta.report import BASE_CSS, data_uri, html_page, key_value_table, warnings_html, write_page

TITLE = "medmeta test report"
WORST_EPISODES = 10  # how many of the lowest-accuracy episodes the report lists
FIGURE_TITLES = {
    "confusion_matrix": "Confusion matrix over the test classes (all episodes)",
    "reliability_diagram": "Reliability diagram (confidence vs accuracy of the query predictions)",
    "adaptation_curve": "Query accuracy along the adaptation steps",
    "episode_grid": "The first test episode: support and query images with the predictions",
}
METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "macro_auroc": "macro AUROC (one-vs-rest)",
    "ece": "expected calibration error (ECE)",
    "pixel_nn_accuracy": "pixel nearest-neighbour baseline accuracy",
}
SHORT_LABELS = {"balanced_accuracy": "balanced accuracy", "macro_auroc": "macro AUROC", "ece": "ECE"}  # table columns
PERCENTAGES = frozenset({"accuracy", "balanced_accuracy", "pixel_nn_accuracy"})

_CSS = """.headline { font-size: 20px; margin: 16px 0 8px; }
.headline strong { font-size: 28px; }
.note { color: #57606a; font-size: 13px; max-width: 900px; }
h2 { font-size: 18px; margin: 24px 0 8px; }
table.data { border-collapse: collapse; margin-top: 8px; }
table.data th, table.data td { border: 1px solid #d0d7de; padding: 5px 10px; font-size: 14px; text-align: left; }
table.data thead th { background: #f6f8fa; }
table.data td.num { font-variant-numeric: tabular-nums; text-align: right; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; border: 1px solid #d0d7de; padding: 8px; border-radius: 6px; }
figure img { display: block; max-width: 560px; width: 100%; height: auto; }
figcaption { font-size: 13px; color: #57606a; margin-top: 4px; max-width: 560px; }
"""


@dataclass(frozen=True)
class EpisodeRow:
    """One test episode: its index (as in per_episode.csv), its classes and its metric values."""

    episode: int
    classes: tuple[str, ...]
    metrics: dict[str, float]


def worst_episodes(
    episode_ids: Tensor, episode_classes: Sequence[Sequence[str]], per_episode: Mapping[str, Tensor],
    count: int = WORST_EPISODES,
) -> list[EpisodeRow]:  # fmt: skip
    """The ``count`` episodes of lowest accuracy, lowest first (ties: the lower episode index first)."""
    accuracy = per_episode["accuracy"]
    order = sorted(range(len(accuracy)), key=lambda e: (float(accuracy[e]), int(episode_ids[e])))
    return [
        EpisodeRow(int(episode_ids[e]), tuple(episode_classes[e]), {k: float(v[e]) for k, v in per_episode.items()})
        for e in order[:count]
    ]


def backbone_label(spec: Mapping[str, Any]) -> str:
    """``<class name> (hidden_channels=8, norm=batch)`` from a backbone spec, without the shape settings medmeta sets."""
    name = str(spec.get("class_path", "?")).rsplit(".", 1)[-1]
    own = {k: v for k, v in dict(spec.get("init_args") or {}).items() if k not in SHAPE_ARGUMENTS}
    return f"{name} ({', '.join(f'{k}={v}' for k, v in own.items())})" if own else name


def image_label(image_size: int, spatial_dims: int, in_channels: int, window: Any, preset: str | None,
                spacing: Any = None, roi_size: Any = None) -> str:  # fmt: skip
    """``2D 32×32 px, 1 channel, window [-1100, 400]``: the image settings of the episodes."""
    shape = f"{image_size}×{image_size}" + (f"×{image_size} voxels" if spatial_dims == 3 else " px")
    parts = [f"{spatial_dims}D {shape}", f"{in_channels} channel{'s' if in_channels != 1 else ''}",
             Intensity(preset=preset, window=tuple(window) if window is not None else None).describe()]  # fmt: skip
    if spacing is not None:
        parts.append(f"spacing {tuple(spacing)} mm")
    if roi_size is not None:
        parts.append(f"region of interest {tuple(roi_size)}")
    return ", ".join(parts)


def checkpoint_label(ckpt_path: str | None, out_dir: Path) -> str:
    """The checkpoint relative to the run folder when inside it, else its file name (never a full path)."""
    if not ckpt_path:
        return "none given: the model's weights in memory"
    path = Path(ckpt_path)
    try:
        return str(path.resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return path.name


def _number(name: str, value: Any) -> str:
    """A metric value as shown: a percentage for accuracies, three decimals otherwise; ``n/a`` when undefined."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return f"{100 * float(value):.1f}%" if name in PERCENTAGES else f"{float(value):.3f}"


def _with_ci(name: str, summary: Mapping[str, Any], key: str | None = None) -> str:
    """``mean ± half-width`` of ``summary[key]`` (``key`` defaults to ``name``)."""
    key = key or name
    return f"{_number(name, summary.get(key))} ± {_number(name, summary.get(f'{key}_ci95'))}"


def _metrics_table(summary: Mapping[str, Any], extra_metrics: Sequence[str]) -> str:
    """The metrics other than accuracy, each with its 95% CI, and the adaptation curve's first and last point."""
    rows = [
        f'<tr class="metric-row" data-metric="{html.escape(name)}"><th>{html.escape(METRIC_LABELS.get(name, name))}</th>'
        f'<td class="num">{html.escape(_with_ci(name, summary))}</td></tr>'
        for name in (*METRIC_LABELS, *extra_metrics)
        if name in summary
    ]
    curve = summary.get("adaptation_curve")
    if isinstance(curve, Mapping) and curve.get("accuracy_after_step"):
        accuracy = list(curve["accuracy_after_step"])
        last = int(curve.get("after_steps", range(len(accuracy)))[-1])  # metrics.json before after_steps: every step
        text = f"{_number('accuracy', accuracy[0])} before adaptation → {_number('accuracy', accuracy[-1])} after {last} step{'s' * (last != 1)}"
        if isinstance(curve.get("episodes"), int) and curve["episodes"] != summary.get("test_episodes"):
            text += f" (mean of the first {curve['episodes']} episodes)"  # not the headline's episodes: say so
        rows.append(f'<tr class="metric-row" data-metric="adaptation_curve"><th>query accuracy</th>'
                    f'<td class="num">{html.escape(text)}</td></tr>')  # fmt: skip
    return '<table class="data metrics"><thead><tr><th>metric</th><th>mean ± 95% CI</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"


def _per_class_table(per_class: Mapping[str, Mapping[str, float]]) -> str:
    """One row per test class: one-vs-rest sensitivity and specificity with their CIs, and its episode count."""
    rows = []
    for name, rates in sorted(per_class.items()):
        sensitivity = _with_ci("accuracy", rates, "sensitivity")
        specificity = _with_ci("accuracy", rates, "specificity")
        rows.append(
            f'<tr class="class-row" data-class="{html.escape(name)}"><td>{html.escape(name)}</td>'
            f'<td class="num">{html.escape(sensitivity)}</td><td class="num">{html.escape(specificity)}</td>'
            f'<td class="num">{int(rates.get("episodes", 0))}</td></tr>'
        )
    head = "<tr><th>class</th><th>sensitivity ± 95% CI</th><th>specificity ± 95% CI</th><th>episodes</th></tr>"
    return f'<table class="data per-class"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _episodes_table(worst: Sequence[EpisodeRow]) -> str:
    """The worst episodes: index, classes and every per-episode metric."""
    columns = list(worst[0].metrics) if worst else []
    head = "".join(f"<th>{html.escape(SHORT_LABELS.get(c, c))}</th>" for c in ("episode", "classes", *columns))
    rows = [
        f'<tr class="episode-row" data-episode="{row.episode}"><td class="num">{row.episode}</td>'
        f"<td>{html.escape(', '.join(row.classes))}</td>"
        + "".join(f'<td class="num">{html.escape(_number(c, row.metrics[c]))}</td>' for c in columns)
        + "</tr>"
        for row in worst
    ]
    return f'<table class="data episodes"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _figures_html(figures: Sequence[Path]) -> str:
    """Each PNG embedded as a data URI in a captioned ``<figure>`` (the caption names the figure, not the file)."""
    items = []
    for path in figures:
        caption = html.escape(FIGURE_TITLES.get(Path(path).stem, Path(path).stem.replace("_", " ")))
        items.append(f'<figure data-figure="{html.escape(Path(path).stem)}"><img src="{data_uri(path)}" alt="{caption}">'
                     f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    return f'<div class="figures">{"".join(items)}</div>'


def render_test_report(
    *, summary: Mapping[str, Any], settings: Mapping[str, str], figures: Sequence[Path], worst: Sequence[EpisodeRow],
    extra_metrics: Sequence[str] = (), warnings: Sequence[str] = (),
) -> str:  # fmt: skip
    """The report as one HTML string (see :func:`write_test_report`)."""
    episodes = int(summary.get("test_episodes", 0))
    accuracy = float(summary["accuracy"])
    headline = (
        f'<p class="headline">Accuracy <strong id="accuracy" data-value="{accuracy:.6f}">'
        f"{html.escape(_with_ci('accuracy', summary))}</strong> (95% CI over {episodes} test episodes)</p>"
    )
    ci_method = f'<p class="note">{html.escape(str(summary["ci_method"]))}</p>' if "ci_method" in summary else ""
    body = f"""{key_value_table(dict(settings))}
{warnings_html(list(warnings))}
{headline}
{_metrics_table(summary, extra_metrics)}
{ci_method}
<h2>Figures</h2>
{_figures_html(figures)}
<h2>Per class (one-vs-rest, pooled over the episodes containing the class)</h2>
{_per_class_table(summary.get("per_class") or {})}
<h2>The {len(worst)} episodes of lowest accuracy</h2>
{_episodes_table(worst)}
<p class="note">All episodes are in per_episode.csv; replay them with --episodes test_episodes.json.</p>
"""
    return html_page(title=TITLE, css=BASE_CSS + _CSS, body=body)


def write_test_report(path: Path, **parts: Any) -> Path:
    """Write the self-contained test report (keyword arguments of :func:`render_test_report`) and return its path."""
    return write_page(path, render_test_report(**parts))
