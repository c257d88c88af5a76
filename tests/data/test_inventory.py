"""The inventory shared by `medmeta data check` and the data module's setup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medmeta.data.inventory import take_inventory
from medmeta.errors import DataError
from tests.data.test_preflight import _decoder_missing


def test_missing_decoder_is_an_error_naming_packages_or_a_reported_skip(
    tiny_dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    compressed = _decoder_missing(tmp_path, monkeypatch)
    target = sorted(p for p in root.iterdir() if p.is_dir())[0] / "compressed.dcm"
    shutil.copy(compressed, target)
    with pytest.raises(DataError, match=r"cannot decode .*compressed\.dcm.*pylibjpeg"):
        take_inventory(root, n_way=3, q_query=2)
    inventory = take_inventory(root, n_way=3, q_query=2, skip_undecodable=True)
    assert [(p.path.name, p.reason) for p in inventory.problems] == [
        ("compressed.dcm", "decoder-missing:pylibjpeg,pylibjpeg-rle")
    ]
    assert "skipped 1 (decoder-missing:pylibjpeg,pylibjpeg-rle: 1)" in inventory.summary_line()


def test_json_report_holds_counts_not_patient_keys(tiny_dicom_root: Path) -> None:
    inventory = take_inventory(tiny_dicom_root, n_way=3, q_query=2, split_ratios=(0.5, 0.25, 0.25))
    report = inventory.to_json()
    assert report["ok"] and report["usable_images"] == 144
    assert all(v == {"images": 12, "patients": 4} for v in report["classes"].values())
    assert not any(r.patient in str(report) for r in inventory.records)
