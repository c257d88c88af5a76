"""``medmeta diagnose`` on generated cases: every output, sane probabilities, overlays, privacy, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta.diagnose import diagnose
from medmeta.errors import DataError
from tests.test_report import _chromium


def _cases(root: Path, tmp_path: Path, classes: int, per_class: int = 3) -> tuple[Path, Path]:
    """A support folder (``per_class`` cases of ``classes`` diagnoses, patients 0-2) and a query folder (patient 3)."""
    support, queries = tmp_path / "support", tmp_path / "queries"
    for name in sorted(p.name for p in root.iterdir() if p.is_dir())[:classes]:
        files = sorted((root / name).glob("*.dcm"))
        (support / name).mkdir(parents=True)
        for f in [f for f in files if not f.name.startswith("patient003")][:per_class]:
            shutil.copy(f, support / name / f.name)
        queries.mkdir(exist_ok=True)
        for f in [f for f in files if f.name.startswith("patient003")][:2]:
            shutil.copy(f, queries / f"{name}-{f.name}")
    return support, queries


@pytest.mark.parametrize("classes", [2, 3])  # 2: a new head (training had 3); 3: the meta-learned head
def test_diagnose_writes_every_output(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, classes: int) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, classes)
    (queries / "broken.dcm").write_bytes(b"DICM" + bytes(range(200)))  # left out with a reason
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    out = result.out
    for name in ("report.html", "predictions.csv", "predictions.json", "warnings.txt"):
        assert (out / name).is_file(), name
    body = json.loads((out / "predictions.json").read_text())
    assert len(body["classes"]) == classes and len(body["cases"]) == 2 * classes
    for case in body["cases"]:
        assert abs(sum(case["probabilities"].values()) - 1.0) < 1e-5
        assert case["predicted"] == max(case["probabilities"], key=case["probabilities"].get)
        with Image.open(out / "images" / f"{case['case']}.png") as image, Image.open(out / "overlays" / f"{case['case']}.png") as overlay:
            assert image.size == overlay.size and image.size[0] % 16 == 0  # the 16x16 input, scaled by a whole factor
    assert any("left out" in w and "unreadable" in w for w in result.warnings)
    csv_rows = (out / "predictions.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * classes
    everything = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in (".html", ".csv", ".json", ".txt"))
    assert "patient" not in everything and str(tiny_dicom_root) not in everything and str(tmp_path) not in everything


def test_report_renders_every_query_row_in_headless_chromium(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    url = result.report.resolve().as_uri()
    dom = _chromium(exe, "--dump-dom", url, user_data=tmp_path / "profile-dom").stdout
    assert len(re.findall(r'<tr class="case-row"', dom)) == len(result.predictions) == 4
    shot = tmp_path / "shot.png"
    _chromium(exe, f"--screenshot={shot}", "--window-size=1200,1400", url, user_data=tmp_path / "profile-shot")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 100.0 and (pixels < 250).any(axis=-1).mean() > 0.05


def test_unseparable_support_set_gets_a_leave_one_out_warning(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    first, second = sorted(support.iterdir())
    for f in second.iterdir():  # the second diagnosis gets the first one's images: nothing separates them
        f.unlink()
    for f in first.iterdir():
        shutil.copy(f, second / f.name)
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    assert any("leave-one-out" in w for w in result.warnings)
    assert "leave-one-out" in (result.out / "report.html").read_text()


def test_bad_inputs_are_clear_errors_and_nothing_is_written_into_the_data(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    before = sorted(p.name for p in support.rglob("*"))
    with pytest.raises(DataError, match="inside the input folder"):
        diagnose(trained_checkpoint, support, [queries], support / "out")
    assert sorted(p.name for p in support.rglob("*")) == before
    lonely = tmp_path / "lonely"
    shutil.copytree(support, lonely)
    for f in sorted(next(lonely.iterdir()).iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match="2 to 20 cases each"):
        diagnose(trained_checkpoint, lonely, [queries], tmp_path / "out1")
    with pytest.raises(DataError, match="cannot load checkpoint"):
        (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
        diagnose(tmp_path / "junk.ckpt", support, [queries], tmp_path / "out2")
    # through the command: a message naming the problem, exit code 2, no traceback
    command = [sys.executable, "-m", "medmeta.cli", "diagnose", "--ckpt", str(trained_checkpoint), "--support", str(lonely),
               "--query", str(queries), "--out", str(tmp_path / "out3")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "2 to 20 cases each" in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_evaluate_command_draws_then_replays_the_same_episodes(trained_checkpoint: Path, tmp_path: Path) -> None:
    """``medmeta evaluate`` on the checkpoint's own data settings, then with ``--episodes``: identical per-episode rows."""

    def evaluate(out: Path, *extra: str) -> Path:
        command = [sys.executable, "-m", "medmeta.cli", "evaluate", "--ckpt", str(trained_checkpoint), "--out", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "macro AUROC" in done.stdout
        return next(out.rglob("per_episode.csv")).parent

    first = evaluate(tmp_path / "a", "--test-episodes", "5")
    replayed = evaluate(tmp_path / "b", "--episodes", str(first / "test_episodes.json"))
    assert (first / "per_episode.csv").read_text() == (replayed / "per_episode.csv").read_text()
    assert len((first / "per_episode.csv").read_text().splitlines()) == 6
