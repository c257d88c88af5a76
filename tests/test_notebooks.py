"""Every notebook under notebooks/ runs end to end with its quick parameters, and is stored clean.

Each notebook has one cell tagged ``parameters`` (papermill) defining at least ``quick = False``
and ``out_dir``; the test runs it with ``quick=True`` and ``out_dir`` in a temporary folder.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
ALLOWED_PROJECT_IMPORTS = ("medmeta",)  # never benchmarks/ or tests/: no logic lives only outside the package


def _cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())["cells"]


def test_there_are_five_notebooks() -> None:
    assert [n.name[:3] for n in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda n: n.stem)
def test_notebook_is_stored_without_outputs_and_has_parameters(notebook: Path) -> None:
    cells = _cells(notebook)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs before commit"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    names = {t.id for node in ast.parse("".join(tagged[0]["source"])).body if isinstance(node, ast.Assign) for t in node.targets}
    assert {"quick", "out_dir"} <= names
    for cell in code:
        source = "".join(cell["source"])
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            for module in modules:
                assert not module.split(".")[0] in ("benchmarks", "tests"), f"{notebook.name} imports {module}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda n: n.stem)
def test_notebook_runs_with_quick_parameters(notebook: Path, tmp_path: Path) -> None:
    papermill = pytest.importorskip("papermill", reason="pip install -e '.[dev]' installs papermill")
    papermill.execute_notebook(
        str(notebook), str(tmp_path / notebook.name), parameters={"quick": True, "out_dir": str(tmp_path / "out")},
        cwd=str(notebook.parent), kernel_name="python3", progress_bar=False, execution_timeout=600,
    )  # fmt: skip
