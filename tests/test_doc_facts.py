"""Statements in README.md, docs/*.md and config comments that the code decides: each checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _text(name: str) -> str:
    """A doc page with its lines joined by single spaces (a sentence may wrap anywhere)."""
    return " ".join((REPO / name).read_text().split())


def _table_row(page: str, first_cell: str) -> str:
    (row,) = [line for line in (REPO / page).read_text().splitlines() if line.startswith(f"| {first_cell} |")]
    return row


def test_the_bundle_table_names_the_files_and_inference_keys_that_are_written() -> None:
    """evaluation.md's bundle table: every file save_bundle writes, inference.json's keys and no others of MONAI's."""
    from medmeta.bundle import INFERENCE, METADATA, README, WEIGHTS, inference_config

    for path in (INFERENCE, METADATA, WEIGHTS, README):
        _table_row("docs/evaluation.md", f"`{path.as_posix()}`")
    row = _table_row("docs/evaluation.md", f"`{INFERENCE.as_posix()}`")
    written = inference_config({}, {"window": None, "preset": None})
    assert all(f"`{key}`" in row for key in written), row
    assert "`dataset`" not in row and "`dataloader`" not in row and "`evaluator`" not in row
    assert "`n_way_trained`" in _table_row("docs/evaluation.md", f"`{METADATA.as_posix()}`")


def test_the_predict_docs_quote_the_kind_warning_as_printed() -> None:
    from medmeta.data.image_kinds import kind_warning

    warning = kind_warning(("picture", 3), {"dicom": [1]})
    assert warning is not None and f"`{warning}`" in _text("docs/predict.md"), warning


def test_the_learner_short_names_are_all_listed() -> None:
    from medmeta.algorithms import SHORT_NAMES

    (listed,) = re.findall(r"`--model.algorithm` takes a short name \(([^)]*)\)", _text("docs/algorithms.md"))
    assert sorted(re.findall(r"`(\w+)`", listed)) == sorted(SHORT_NAMES)


def test_the_cache_folder_is_described_with_every_fallback() -> None:
    """medmeta/data/cache_folder.py: ``$MEDMETA_CACHE``, else ``$XDG_CACHE_HOME/medmeta``, else ``~/.cache/medmeta``."""
    for page in ("README.md", "docs/privacy.md", "docs/data.md"):
        text = _text(page)
        assert "MEDMETA_CACHE" in text and "XDG_CACHE_HOME" in text and ".cache/medmeta" in text, page


def test_config_comments_name_settings_by_todays_spelling() -> None:
    """A setting renamed when learners became plug-ins (``mann_label_timing``) is not named in a shipped config."""
    from medmeta.algorithms import LEGACY_MODULE_SETTINGS, legacy_setting_name

    renamed = [name for name in LEGACY_MODULE_SETTINGS if legacy_setting_name(name) != name]
    assert "mann_label_timing" in renamed
    for config in sorted((REPO / "configs").glob("*.yaml")):
        yaml.safe_load(config.read_text())
        named = [name for name in renamed if re.search(rf"\b{name}\b", config.read_text())]
        assert not named, f"{config.name} names {named}"
