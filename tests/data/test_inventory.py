"""The inventory shared by `medmeta data check` and the data module's setup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medmeta.cli import data_check_main
from medmeta.data.dicom import load_dicom
from medmeta.data.inventory import take_inventory
from medmeta.errors import DataError
from tests.data.test_preflight import _decoder_missing
from tests.data.test_readers import write_series


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


def test_data_check_reports_duplicates_and_loops_and_counts_them_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    for c, name in enumerate(("cyst", "nodule")):
        for p in range(2):
            path = root / name / f"p{p}" / "IM0000.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(np.random.default_rng(10 * c + p).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    (root / "cyst" / "p1" / "IM0001.png").symlink_to(root / "cyst" / "p1" / "IM0000.png")
    (root / "all").symlink_to(root, target_is_directory=True)
    inventory = take_inventory(root, n_way=2, k_shot=1, q_query=1)
    assert inventory.classes() == {"cyst": (2, 2), "nodule": (2, 2)}
    assert "4 usable images in 2 classes" in inventory.summary_line()
    assert "skipped 2 (duplicate: 1, symlink-loop: 1)" in inventory.summary_line()
    data_check_main([str(root), "--n-way", "2", "--q-query", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert sorted((Path(s["path"]).name, s["reason"]) for s in report["skipped"]) == [
        ("IM0001.png", "duplicate"), ("all", "symlink-loop")
    ]
    data_check_main([str(root), "--n-way", "2", "--q-query", "1"])
    table = capsys.readouterr().out
    assert "duplicate" in table and "symlink-loop" in table


def _deidentified_series(root: Path, classes: int = 2, patients: int = 2) -> None:
    """3D DICOM series folders ``class<c>/patient<p>``, every slice marked de-identified."""
    for c in range(classes):
        for p in range(patients):
            folder = root / f"class{c}" / f"patient{p}"
            write_series(folder, n=3, seed=10 * c + p)
            for path in folder.glob("*.dcm"):
                ds = pydicom.dcmread(path)
                ds.PatientID, ds.PatientIdentityRemoved = f"anon{c}{p}", "YES"
                ds.save_as(path)


def test_require_deidentified_checks_suffixless_slices_the_series_reader_reads(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _deidentified_series(root)
    folder = root / "class0" / "patient0"
    victim = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(victim)
    del ds.PatientIdentityRemoved
    ds.save_as(folder / "IM0003")  # a PACS-style name without suffix: the series reader still stacks it
    victim.unlink()
    assert load_dicom(folder).array.shape[0] == 3
    with pytest.raises(DataError, match=r"IM0003 is not marked de-identified"):
        take_inventory(root, spatial_dims=3, n_way=2, k_shot=1, q_query=1, require_deidentified=True, window=None)


def test_require_deidentified_skips_a_rejected_series_and_names_an_unreadable_slice(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _deidentified_series(root, classes=3)
    (root / "class0" / "patient0" / "slice99.dcm").write_bytes(np.random.default_rng(0).bytes(500))
    inventory = take_inventory(root, spatial_dims=3, n_way=2, k_shot=1, q_query=1, require_deidentified=True,
                               window=None)  # fmt: skip
    assert [(p.path.name, p.reason) for p in inventory.problems] == [("patient0", "inconsistent-series")]
    assert len(inventory.records) == 5
    # without preflight, a listed .dcm file the gate cannot parse is named, not a traceback
    manifest = tmp_path / "manifest.csv"
    files = sorted(root.rglob("*.dcm"))
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.parent.name}\n" for f in files))
    with pytest.raises(DataError, match=r"slice99\.dcm cannot be read to check that it is de-identified"):
        take_inventory(manifest, n_way=2, k_shot=1, q_query=1, require_deidentified=True, preflight=False)
