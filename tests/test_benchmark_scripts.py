"""The benchmark scripts the README and docs quote run end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEDMETA_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_compare_script_at_small_size(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    done = _run(str(REPO / "benchmarks" / "compare.py"), "--algorithms", "protonet", "maml", "--shots", "1", "--steps", "2",
                "--test-episodes", "4", "--out", str(out), "--set", "distance=cosine", "inner_steps=1", cwd=tmp_path,
                timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "compare.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert {row["algorithm"] for row in rows} == {"protonet", "maml"}
    assert all(row["options"] == {"distance": "cosine", "inner_steps": 1} for row in rows)
    settings = {row["algorithm"]: row["settings"] for row in rows}  # each learner took the settings it has
    assert settings["protonet"] == {"distance": "cosine", "temperature": 1.0}
    assert settings["maml"]["inner_steps"] == 1 and settings["maml"]["inner_lr"] == 0.05 and "distance" not in settings["maml"]
    bad = _run(str(REPO / "benchmarks" / "compare.py"), "--set", "distance", "--out", str(out), cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "--set expects KEY=VALUE, got 'distance'" in bad.stderr
    old = _run(str(REPO / "benchmarks" / "compare.py"), "--set", "mann_controller=lstm", "--out", str(out), cwd=tmp_path,
               timeout=60)  # fmt: skip
    assert old.returncode == 2 and "mann_controller (now 'controller')" in old.stderr
    assert (out / "compare.png").stat().st_size > 5000 and (out / "compare.md").is_file()


@pytest.mark.slow
def test_data_pipeline_script_runs(tmp_path: Path) -> None:
    done = _run(str(REPO / "benchmarks" / "data_pipeline.py"), "--out", str(tmp_path / "pipeline.json"), cwd=tmp_path,
                timeout=2400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "pipeline.json").read_text())
