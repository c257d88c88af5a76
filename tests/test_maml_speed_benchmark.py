"""``benchmarks/maml_speed.py --quick``, run as a real subprocess, and the JSON it writes.

Passes with or without the ``bench`` extra: a peer that cannot be imported must be reported as
skipped with its reason; one that runs must agree with medmeta's sequential meta-gradient.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "maml_speed.py"
GRAPHS = {"medmeta-vmap-graph", "medmeta-loop-graph", "medmeta-vmap-bf16-graph"}
IMPLEMENTATIONS = {
    "medmeta-loop", "medmeta-checkpoint", "medmeta-vmap", "medmeta-vmap-bf16", "medmeta-compiled", "higher", "torchopt",
} | GRAPHS
# Where a variant may be skipped: peers without the `bench` extra, a compiler that fails here,
# CUDA graphs on the CPU.
MAY_SKIP = {"medmeta-compiled", "higher", "torchopt"} | GRAPHS


@pytest.mark.slow  # 40 s; MAML's exactness against the sequential reference is tests/algorithms/test_maml.py's
def test_quick_run_reports_every_implementation(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--threads", "1",
               "--compile-backend", "aot_eager", "--check-fp64", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "medmeta-loop" in result.stdout and "peak memory = CPU" in result.stdout

    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"] and report["torch"]
    assert "resident" in report["memory"]
    rows = {row["implementation"]: row for row in report["results"]}
    assert set(rows) == IMPLEMENTATIONS and len(report["results"]) == len(IMPLEMENTATIONS)

    for name, row in rows.items():
        if row["status"] == "skipped":
            assert name in MAY_SKIP and row["reason"], row
            continue
        assert name not in GRAPHS, row  # never on the CPU
        assert row["status"] == "ok", row
        assert row["steps_per_s"] > 0 and math.isclose(row["tasks_per_s"], row["meta_batch"] * row["steps_per_s"])
        assert row["peak_memory_mb"] is not None
        assert math.isfinite(row["rel_diff"]) and row["agrees"] == (row["rel_diff"] <= row["tolerance"])
        # flagged beyond the fixed tolerance or twice the rounding floor of its precision, whichever is larger
        fixed = {"fp32": 1e-4, "bf16": 5e-2}[row["precision"]]
        assert row["floor"] == row[f"{row['precision']}_floor"] > 0, row
        assert row["tolerance"] == max(fixed, 2 * row["floor"]), row
        if row["precision"] == "fp32":  # same function: equal up to rounding, and exactly in float64
            assert row["agrees"] and row["agrees_fp64"], row
        else:  # bf16 rounding alone moves this meta-gradient a lot: only ask for that order of size
            assert row["rel_diff"] <= max(row["tolerance"], 3 * row["bf16_floor"]), row
    assert rows["medmeta-loop"]["rel_diff"] == 0.0
