"""The self-contained HTML report, checked as text and as rendered by headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medmeta.explain import image_png, overlay_png
from medmeta.report import DISCLAIMER, ReportRow, write_html_report

MALICIOUS = "<script>alert(1)</script>"


def _rows(tmp_path: Path, n: int = 3) -> list[ReportRow]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        image = 0.3 * torch.rand(1, 32, 32, generator=g)
        image[:, 2:10, 2:10] = 1.0
        cam = torch.zeros(1, 32, 32)
        cam[:, :12, :12] = 1.0
        case_id = f"query-{i:03d} ({i:012x})"
        rows.append(
            ReportRow(
                case_id=case_id,
                image_png=image_png(image, tmp_path / f"case{i}_image.png", scale=2),
                overlay_png=overlay_png(image, cam, tmp_path / f"case{i}_overlay.png", title=case_id, scale=2),
                predicted=MALICIOUS if i == 0 else "benign",
                probabilities={MALICIOUS: 0.6, "benign": 0.3, "naevus": 0.1},
            )
        )
    return rows


def _write(tmp_path: Path, rows: list[ReportRow], warnings: list[str]) -> Path:
    header = {"checkpoint": "maml_conv4.ckpt", "algorithm": "maml", "support": "benign: 5, naevus: 5"}
    return write_html_report(tmp_path / "report.html", title="Diagnosis", header=header, rows=rows, warnings=warnings)


def test_report_is_self_contained_with_disclaimer_and_rows(tmp_path: Path) -> None:
    rows = _rows(tmp_path)
    text = _write(tmp_path, rows, warnings=[]).read_text(encoding="utf-8")
    assert DISCLAIMER in text and "not a medical device" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|file:|//)""", text, re.IGNORECASE)
    assert "<script" not in text.lower() and str(tmp_path) not in text  # no scripts, no file paths
    assert text.count('src="data:image/png;base64,') == 2 * len(rows)
    assert text.count('class="case-row"') == len(rows)
    for row in rows:
        assert f'data-case="{row.case_id}"' in text
    for key in ("checkpoint", "maml_conv4.ckpt", "algorithm", "benign: 5, naevus: 5"):
        assert key in text
    assert 'class="warnings"' not in text


def test_report_escapes_text_and_shows_warnings(tmp_path: Path) -> None:
    text = _write(tmp_path, _rows(tmp_path, 1), warnings=["only 2 support cases for <naevus>"]).read_text()
    assert MALICIOUS not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert 'class="warnings"' in text and "only 2 support cases for &lt;naevus&gt;" in text


def test_a_rows_own_warnings_are_shown_in_that_row_escaped(tmp_path: Path) -> None:
    rows = _rows(tmp_path, 2)
    rows[1] = ReportRow(**{**rows[1].__dict__, "warnings": ("constant after the window <10, 20>",)})
    text = _write(tmp_path, rows, warnings=[]).read_text()
    first, second = text.split('<tr class="case-row"')[1:]
    assert "case-warning" not in first
    assert second.count('class="case-warning"') == 1 and "constant after the window &lt;10, 20&gt;" in second


def test_probabilities_are_sorted_with_bars(tmp_path: Path) -> None:
    png = _rows(tmp_path, 1)[0].image_png
    rows = [ReportRow("q (1)", png, png, "b", {"a": 0.1, "b": 0.7, "c": 0.2})]
    text = _write(tmp_path, rows, warnings=[]).read_text()
    assert re.findall(r'class="name" title="(\w)"', text) == ["b", "c", "a"]
    assert "width: 70.0%" in text and "<strong>b</strong>" in text


def _chromium_exe() -> str:
    """The ``chromium`` executable; the test skips without it, or fails when ``CI`` is set (``.ci/run`` installs it)."""
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail("chromium is not installed, and under CI the browser tests must run (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _chromium(exe: str, *args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile and a 60 s timeout."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    cmd = [exe, *flags, f"--user-data-dir={user_data}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = _chromium_exe()
    rows = _rows(tmp_path, 4)
    report = _write(tmp_path, rows, warnings=["support set is small"])
    url = report.resolve().as_uri()

    dom = _chromium(exe, "--dump-dom", url, user_data=tmp_path / "profile-dom").stdout
    assert len(re.findall(r'<tr class="case-row"', dom)) == len(rows)
    for row in rows:
        assert f'data-case="{row.case_id}"' in dom
    assert DISCLAIMER in dom

    shot, height = tmp_path / "shot.png", 900
    _chromium(exe, f"--screenshot={shot}", f"--window-size=1200,{height}", url, user_data=tmp_path / "profile-shot")
    assert shot.exists()
    with Image.open(shot) as im:
        assert im.size == (1200, height)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 100.0
    assert (pixels < 250).any(axis=-1).mean() > 0.01  # not (almost) all white
