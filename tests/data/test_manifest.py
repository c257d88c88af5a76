"""CSV manifests: relative paths, patient columns, split column, clear errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta.data.episode_manifest import sample_id
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
    records, skipped = read_manifest(manifest)
    assert not skipped
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


def test_manifest_reports_missing_and_non_image_files(tiny_dicom_root: Path, tmp_path: Path) -> None:
    first = sorted(tiny_dicom_root.rglob("*.dcm"))[0]
    shutil.copy(first, tmp_path / "a.dcm")
    manifest = _write(tmp_path / "m.csv", "path,label\na.dcm,x\nmissing.dcm,x\nnotes.txt,y\n")
    (tmp_path / "notes.txt").write_text("hello")
    inventory = take_inventory(manifest, n_way=2, k_shot=1, q_query=1)
    assert [r.path.name for r in inventory.records] == ["a.dcm"]
    assert {p.path.name: p.reason for p in inventory.problems} == {"missing.dcm": "unreadable", "notes.txt": "not-image"}


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    return path


def test_a_file_listed_twice_is_one_image_of_one_patient(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    for k in range(3):
        _png(folder / "imgs" / f"{k}.png", seed=k)
    (folder / "imgs" / "link.png").symlink_to(folder / "imgs" / "2.png")
    rows = ["imgs/0.png", f"{folder}/imgs/0.png", "imgs/1.png", "imgs/1.png", "./imgs/../imgs/2.png", "imgs/link.png"]
    manifest = _write(folder / "m.csv", "path,label\n" + "".join(f"{row},cyst\n" for row in rows))
    inventory = take_inventory(manifest, n_way=1, k_shot=1, q_query=1)
    assert sorted(r.path.resolve() for r in inventory.records) == [(folder / "imgs" / f"{k}.png").resolve() for k in range(3)]
    assert inventory.classes() == {"cyst": (3, 3)}  # three images, three patients (not six)
    assert [(p.reason, p.detail) for p in inventory.problems] == [
        ("duplicate", "manifest row 3: same file as row 2"), ("duplicate", "manifest row 5: same file as row 4"),
        ("duplicate", "manifest row 7: same file as row 6"),
    ]  # fmt: skip
    assert "skipped 3 (duplicate: 3)" in inventory.summary_line()


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("imgs/a.png,nodule,P1", r"rows 2 and 3 list the same file .*a\.png under classes 'cyst' and 'nodule'"),
        ("{folder}/imgs/a.png,cyst,P2", r"rows 2 and 3 list the same file .*a\.png under two different patient_id"),
    ],
)
def test_one_file_under_two_classes_or_patients_is_an_error(tmp_path: Path, second: str, message: str) -> None:
    _png(tmp_path / "imgs" / "a.png", seed=0)
    text = "path,label,patient_id\nimgs/a.png,cyst,P1\n" + second.format(folder=tmp_path) + "\n"
    with pytest.raises(DataError, match=message):
        take_inventory(_write(tmp_path / "m.csv", text), n_way=1, k_shot=1, q_query=1)


def test_ids_are_unique_per_file_and_the_same_for_relative_and_absolute_rows(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    files = [_png(folder / patient / "IM0000.png", seed=i) for i, patient in enumerate(["p1", "p2", "p3"])]
    relative = _write(folder / "rel.csv", "path,label\n" + "".join(f"p{i}/IM0000.png,x\n" for i in (1, 2, 3)))
    absolute = _write(folder / "abs.csv", "path,label\n" + "".join(f"{f},x\n" for f in files))
    linked = tmp_path / "linked"  # the same folder reached through a link
    linked.symlink_to(folder, target_is_directory=True)
    sources = (relative, absolute, linked / "rel.csv")
    ids = [[sample_id(r, m) for r in take_inventory(m, n_way=1, k_shot=1, q_query=1).records] for m in sources]
    assert len(set(ids[0])) == 3 and ids[0] == ids[1] == ids[2]


def test_a_hard_link_listed_beside_its_target_is_one_image(tmp_path: Path) -> None:
    for k in range(2):
        _png(tmp_path / "imgs" / f"{k}.png", seed=k)
    os.link(tmp_path / "imgs" / "0.png", tmp_path / "imgs" / "hard.png")  # same inode, two names
    manifest = _write(tmp_path / "m.csv", "path,label\nimgs/0.png,cyst\nimgs/1.png,cyst\nimgs/hard.png,cyst\n")
    records, skipped = read_manifest(manifest)
    assert [r.path.name for r in records] == ["0.png", "1.png"]
    assert [(s.path.name, s.reason, s.detail) for s in skipped] == [
        ("hard.png", "duplicate", "manifest row 4: same file as row 2")
    ]


def test_dicom_rows_without_patient_columns_take_the_header_patient_id_as_folders_do(tmp_path: Path) -> None:
    from medmeta.data.records import discover_records
    from tests.data.test_readers import ct_dataset, stored_image, write

    rows = ["path,label"]
    for c, name in enumerate(["cyst", "met"]):
        for p in range(2):
            for k in range(2):
                ds = ct_dataset(stored_image(100 * c + 10 * p + k))
                ds.PatientID = f"PAT{p}"  # one patient in both classes
                write(ds, tmp_path / "data" / name / f"{c}{p}{k}.dcm")
                rows.append(f"data/{name}/{c}{p}{k}.dcm,{name}")
    _png(tmp_path / "data" / "met" / "extra.png", seed=9)
    (tmp_path / "data" / "met" / "broken.dcm").write_bytes(b"not dicom")
    rows += ["data/met/extra.png,met", "data/met/broken.dcm,met"]
    records, _ = read_manifest(_write(tmp_path / "m.csv", "\n".join(rows) + "\n"))
    by_name = {r.path.name: r.patient for r in records}
    assert len(set(by_name.values())) == 4  # PAT0, PAT1, and the PNG and the unreadable file each on their own
    assert by_name["000.dcm"] == by_name["001.dcm"] == by_name["100.dcm"] != by_name["010.dcm"]
    folder, _ = discover_records(tmp_path / "data")
    assert {r.path.name: r.patient for r in folder if r.path.suffix == ".dcm"} == {
        n: p for n, p in by_name.items() if n.endswith(".dcm") and n != "broken.dcm"
    }  # the same keys (and salt) as folder discovery
    assert all("PAT" not in patient for patient in by_name.values())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("path,label\nimgs/a.png,lésion\n".encode("cp1252"), r"m\.csv is not UTF-8 text: byte 23 \(line 2\).*UTF-8"),
        (b"path,label\na.png,cyst\n" + b"x" * 200_000 + b",cyst\n", r"m\.csv line 3: not valid CSV \(field larger"),
    ],
)
def test_a_manifest_that_is_not_utf8_csv_is_refused_naming_it(tmp_path: Path, data: bytes, message: str) -> None:
    from medmeta.data.cohort import find_cases

    manifest = tmp_path / "m.csv"
    manifest.write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_manifest(manifest)
    with pytest.raises(DataError, match=message):
        find_cases([manifest], spatial_dims=2)  # medmeta predict reads it the same way
