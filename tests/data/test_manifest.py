"""CSV manifests: relative paths, patient columns, split column, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medmeta.data.inventory import take_inventory
from medmeta.data.manifest import read_manifest
from medmeta.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_relative_paths_patients_and_splits(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    manifest = _write(
        tmp_path / "m.csv",
        "path,label,patient_id,study_id,split\nimgs/a.dcm,cyst,P1,S1,train\n/abs/b.dcm,cyst,P1,S2,train\n"
        "imgs/c.png,nodule,,S3,test\nimgs/d.png,nodule,,,test\n",
    )
    records = read_manifest(manifest)
    assert records[0].path == tmp_path / "imgs" / "a.dcm" and records[1].path == Path("/abs/b.dcm")
    assert records[0].patient == records[1].patient  # same patient_id
    assert records[2].patient != records[3].patient
    assert all("P1" not in r.patient and "S3" not in r.patient for r in records)
    assert [r.split for r in records] == ["train", "train", "test", "test"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file,label\nx.dcm,a\n", r"lacks column\(s\) \['path'\]"),
        ("path,label\n", "lists no images"),
        ("path,label,split\nx.dcm,a,training\n", "split 'training' is not one of"),
        ("path,label,split\nx.dcm,a,train\ny.dcm,a,test\n", "class 'a' has rows in several meta-splits"),
        ("path,label\n,a\n", "row 2: empty path or label"),
    ],
)
def test_bad_manifests_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_manifest(_write(tmp_path / "bad.csv", text))


def test_manifest_split_column_drives_the_meta_splits(tiny_dicom_root: Path, tmp_path: Path) -> None:
    classes = sorted(p.name for p in tiny_dicom_root.iterdir() if p.is_dir())
    chosen = {"train": classes[:6], "val": classes[6:9], "test": classes[9:12]}
    lines = ["path,label,split"]
    for split, names in chosen.items():
        for name in names:
            for path in sorted((tiny_dicom_root / name).glob("*.dcm")):
                lines.append(f"{path},{name},{split}")
    manifest = _write(tmp_path / "m.csv", "\n".join(lines) + "\n")
    inventory = take_inventory(manifest, n_way=3, k_shot=1, q_query=2)
    assert {s: list(inventory.class_splits.of(s)) for s in chosen} == chosen
    assert inventory.ok and not inventory.problems


def test_manifest_can_mix_formats_and_reports_missing_files(tiny_dicom_root: Path, tmp_path: Path) -> None:
    first = sorted(tiny_dicom_root.rglob("*.dcm"))[0]
    shutil.copy(first, tmp_path / "a.dcm")
    manifest = _write(tmp_path / "m.csv", "path,label\na.dcm,x\nmissing.dcm,x\nnotes.txt,y\n")
    (tmp_path / "notes.txt").write_text("hello")
    inventory = take_inventory(manifest, n_way=2, k_shot=1, q_query=1)
    assert [r.path.name for r in inventory.records] == ["a.dcm"]
    assert {p.path.name: p.reason for p in inventory.problems} == {"missing.dcm": "unreadable", "notes.txt": "not-image"}
