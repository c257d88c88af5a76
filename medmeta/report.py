"""A self-contained HTML report of few-shot diagnoses: one file, images embedded, no scripts.

Query cases are named by the caller's opaque ``case_id``; the report never writes file paths (the
PNGs are embedded as base64 data URIs). A content security policy forbids any external request.
The page parts (``html_page``, ``key_value_table``, ``warnings_html``, ``data_uri``) are shared with
the test-run report, ``medmeta.evaluation.html_report``.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

DISCLAIMER = "Research tool — not a medical device; not for clinical decisions."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1b1f24;
  background: #ffffff; }
h1 { font-size: 22px; margin: 0 0 12px; }
.disclaimer { border: 2px solid #b42318; background: #fef3f2; color: #7a271a; font-weight: 700; font-size: 16px;
  padding: 10px 14px; margin: 12px 0; border-radius: 6px; }
.header { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
.header th { text-align: left; padding: 3px 16px 3px 0; color: #57606a; font-weight: 600; vertical-align: top; }
.header td { padding: 3px 0; }
.warnings { border: 1px solid #d4a72c; background: #fff8c5; color: #4d2d00; padding: 8px 14px; margin: 12px 0;
  border-radius: 6px; font-size: 14px; }
.warnings ul { margin: 4px 0 0; padding-left: 20px; }
"""
_CASES_CSS = """table.cases { border-collapse: collapse; margin-top: 16px; }
table.cases th, table.cases td { border: 1px solid #d0d7de; padding: 6px 10px; vertical-align: middle; font-size: 14px; }
table.cases thead th { background: #f6f8fa; text-align: left; }
.case-id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
img.thumb { width: 160px; height: auto; image-rendering: pixelated; display: block; background: #000000; }
.predicted { font-weight: 700; font-size: 15px; }
ul.probs { list-style: none; margin: 0; padding: 0; min-width: 260px; }
ul.probs li { display: flex; align-items: center; gap: 8px; margin: 2px 0; font-size: 13px; }
ul.probs .name { flex: 0 0 110px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
ul.probs .bar { flex: 0 0 100px; height: 10px; background: #eaeef2; border-radius: 3px; overflow: hidden; }
ul.probs .fill { display: block; height: 100%; background: #0969da; }
ul.probs .pct { font-variant-numeric: tabular-nums; color: #57606a; }
.case-warning { margin-top: 6px; padding: 4px 8px; max-width: 260px; font-size: 12px; font-weight: 400;
  border: 1px solid #d4a72c; background: #fff8c5; color: #4d2d00; border-radius: 4px; }
"""


@dataclass(frozen=True)
class ReportRow:
    """One query case: its opaque id, rendered PNGs, predicted class, class probabilities and its own warnings."""

    case_id: str
    image_png: Path
    overlay_png: Path
    predicted: str
    probabilities: dict[str, float]
    warnings: tuple[str, ...] = ()


def data_uri(path: Path) -> str:
    """The PNG file at ``path`` as a base64 data URI."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("report images must be PNG files")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _clean(p: float) -> float:
    """A probability clipped to [0, 1]; NaN becomes 0."""
    p = float(p)
    return 0.0 if math.isnan(p) else min(max(p, 0.0), 1.0)


def _probabilities_html(probabilities: dict[str, float]) -> str:
    """A list of classes sorted by probability, each with a bar of CSS width%."""
    items = []
    for name, p in sorted(probabilities.items(), key=lambda kv: (-_clean(kv[1]), kv[0])):
        pct = 100.0 * _clean(p)
        items.append(
            f'<li><span class="name" title="{html.escape(name)}">{html.escape(name)}</span>'
            f'<span class="bar"><span class="fill" style="width: {pct:.1f}%"></span></span>'
            f'<span class="pct">{pct:.1f}%</span></li>'
        )
    return '<ul class="probs">' + "".join(items) + "</ul>"


def _row_html(row: ReportRow) -> str:
    """One ``<tr class="case-row">`` of the case table."""
    case = html.escape(row.case_id)
    notes = "".join(f'<div class="case-warning" role="alert">&#9888; {html.escape(w)}</div>' for w in row.warnings)
    return (
        f'<tr class="case-row" data-case="{case}">'
        f'<td class="case-id">{case}</td>'
        f'<td><img class="thumb" src="{data_uri(row.image_png)}" alt="image of {case}"></td>'
        f'<td><img class="thumb" src="{data_uri(row.overlay_png)}" alt="Grad-CAM of {case}"></td>'
        f'<td class="predicted"><strong>{html.escape(row.predicted)}</strong>{notes}</td>'
        f"<td>{_probabilities_html(row.probabilities)}</td>"
        "</tr>"
    )


def key_value_table(rows: dict[str, str]) -> str:
    """A ``<table class="header">`` of escaped key/value pairs (a run's settings)."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f'<table class="header">{cells}</table>'


def warnings_html(warnings: list[str]) -> str:
    """A yellow ``role="alert"`` box listing the escaped warnings; empty when there are none."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="warnings" role="alert"><strong>Warnings</strong><ul>{items}</ul></div>'


def html_page(*, title: str, css: str, body: str) -> str:
    """A whole self-contained page: CSP forbidding any request but data: images, title, disclaimer, then ``body``.

    ``body`` is trusted HTML (its parts escaped by the caller); ``title`` is escaped here.
    """
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{css}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<div class="disclaimer" role="note">{html.escape(DISCLAIMER)}</div>
{body}</body>
</html>
"""


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, creating its folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def render_html_report(*, title: str, header: dict[str, str], rows: list[ReportRow], warnings: list[str]) -> str:
    """The report as one HTML string (see :func:`write_html_report`)."""
    body_rows = "\n".join(_row_html(r) for r in rows)
    body = f"""{key_value_table(header)}
{warnings_html(warnings)}
<table class="cases">
<thead><tr><th>Case</th><th>Image</th><th>Grad-CAM</th><th>Predicted</th><th>Probabilities</th></tr></thead>
<tbody>
{body_rows}
</tbody>
</table>
"""
    return html_page(title=title, css=BASE_CSS + _CASES_CSS, body=body)


def write_html_report(
    path: Path, *, title: str, header: dict[str, str], rows: list[ReportRow], warnings: list[str]
) -> Path:
    """Write one self-contained HTML report (embedded PNGs, inline CSS, no scripts) and return its path.

    Args:
        path: output ``.html`` file.
        title: page title and heading.
        header: run details shown as key/value pairs (checkpoint, algorithm, support counts, ...).
        rows: one per query case, in display order; a row's own warnings are shown under its prediction.
        warnings: shown in a yellow box when non-empty.
    """
    return write_page(path, render_html_report(title=title, header=header, rows=rows, warnings=warnings))
