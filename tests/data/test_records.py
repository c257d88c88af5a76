"""Discovery in class folders: each real file and folder once; links, duplicates and loops reported."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta.data.records import discover_records
from medmeta.errors import DataError


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    return path


def _folder(root: Path) -> Path:
    """Classes ``a`` and ``b``, two patient sub-folders each, two PNGs per patient."""
    for c, name in enumerate("ab"):
        for p in range(2):
            for k in range(2):
                _png(root / name / f"p{p}" / f"IM{k:04d}.png", seed=100 * c + 10 * p + k)
    return root


def test_class_folder_linking_to_an_ancestor_is_a_reported_loop_not_a_class(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "everything").symlink_to(root, target_is_directory=True)  # the whole data set as one more "class"
    (root / "above").symlink_to(tmp_path, target_is_directory=True)
    (root / "a" / "p0" / "back").symlink_to(root / "a", target_is_directory=True)  # a loop inside a class
    (root / "b" / "p1" / "up").symlink_to(root, target_is_directory=True)
    (root / "b" / "p0" / "self").symlink_to(root / "b" / "p0" / "self")  # a link to itself
    (root / "b" / "p0" / "gone.png").symlink_to(tmp_path / "deleted.png")
    records, skipped = discover_records(root)
    assert sorted({r.label for r in records}) == ["a", "b"]
    assert len(records) == 8 and len({r.path.resolve() for r in records}) == 8
    assert sorted((s.path.relative_to(root).as_posix(), s.reason) for s in skipped) == [
        ("a/p0/back", "symlink-loop"), ("above", "symlink-loop"), ("b/p0/gone.png", "unreadable"),
        ("b/p0/self", "symlink-loop"), ("b/p1/up", "symlink-loop"), ("everything", "symlink-loop"),
    ]  # fmt: skip
    assert all(s.detail for s in skipped)


def test_linked_files_and_folders_are_one_image_each(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "a" / "p0_again").symlink_to(root / "a" / "p0", target_is_directory=True)
    (root / "a" / "p1" / "copy.png").symlink_to(root / "a" / "p1" / "IM0000.png")
    outside = _png(tmp_path / "elsewhere" / "scan.png", seed=7)
    (root / "b" / "p1" / "scan.png").symlink_to(outside)  # a link out of the data folder is followed
    (root / "b" / "p1" / "scan-again.png").symlink_to(outside)
    (root / "b" / "p2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # the folder of that file
    records, skipped = discover_records(root)
    real = [r.path.resolve() for r in records]
    assert len(real) == len(set(real)) == 9 and outside.resolve() in real
    assert sorted((s.path.relative_to(root).as_posix(), s.reason) for s in skipped) == [
        ("a/p0_again", "duplicate"), ("a/p1/copy.png", "duplicate"), ("b/p1/scan.png", "duplicate"),
        ("b/p2/scan.png", "duplicate"),
    ]  # fmt: skip
    assert all("same" in s.detail for s in skipped)


def test_class_folder_that_is_another_class_is_reported_not_a_second_class(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "c").symlink_to(root / "a", target_is_directory=True)
    records, skipped = discover_records(root)
    assert sorted({r.label for r in records}) == ["a", "b"] and len(records) == 8
    assert [(s.path.name, s.reason) for s in skipped] == [("c", "duplicate")] and "'a'" in skipped[0].detail


@pytest.mark.parametrize("link", ["file", "folder"])
def test_one_image_under_two_classes_is_an_error_naming_both(tmp_path: Path, link: str) -> None:
    root = _folder(tmp_path / "data")
    if link == "file":
        (root / "b" / "p1" / "borrowed.png").symlink_to(root / "a" / "p0" / "IM0001.png")
        message = r"b/p1/borrowed\.png \(class 'b'\) is the same file as .*a/p0/IM0001\.png \(class 'a'\)"
    else:
        (root / "b" / "p9").symlink_to(root / "a" / "p0", target_is_directory=True)
        message = r"b/p9 \(class 'b'\) is the same folder as .*a/p0 \(class 'a'\)"
    with pytest.raises(DataError, match=message):
        discover_records(root)


def test_a_linked_series_folder_is_one_volume_in_3d(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for c, name in enumerate("ab"):
        for p in range(2):
            for k in range(2):
                (root / name / f"s{p}").mkdir(parents=True, exist_ok=True)
                (root / name / f"s{p}" / f"IM{k:04d}.dcm").write_bytes(b"\0" * 200)  # series found, not read
    (root / "a" / "s0_link").symlink_to(root / "a" / "s0", target_is_directory=True)
    records, skipped = discover_records(root, spatial_dims=3)
    assert len(records) == 4 and all(r.path.is_dir() for r in records)
    assert [(s.path.name, s.reason) for s in skipped] == [("s0_link", "duplicate")]
    assert os.path.islink(skipped[0].path)


def test_a_hard_link_is_one_image_reported_like_a_symbolic_link(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    os.link(root / "a" / "p0" / "IM0000.png", root / "a" / "p1" / "IM0000_copy.png")  # same inode, two names
    os.link(root / "b" / "p0" / "IM0001.png", root / "a" / "p1" / "borrowed.png")
    with pytest.raises(DataError, match=r"b/p0/IM0001\.png \(class 'b'\) is the same file as .*a/p1/borrowed\.png"):
        discover_records(root)
    (root / "a" / "p1" / "borrowed.png").unlink()
    records, skipped = discover_records(root)
    assert len(records) == 8 and len({os.stat(r.path).st_ino for r in records}) == 8
    assert [(s.path.relative_to(root).as_posix(), s.reason, s.detail) for s in skipped] == [
        ("a/p1/IM0000_copy.png", "duplicate", f"same file as {root / 'a' / 'p0' / 'IM0000.png'}")
    ]


def test_unreadable_slices_of_a_series_in_the_class_folder_itself_are_left_to_the_preflight(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "c").mkdir()
    (root / "c" / "a.dcm").write_bytes(b"")
    (root / "c" / "b.dcm").write_bytes(b"not dicom at all")
    records, skipped = discover_records(root, spatial_dims=3)
    series = [r for r in records if r.label == "c"]
    assert [r.path for r in series] == [root / "c"] and not skipped


def test_a_dicom_header_that_pydicom_cannot_parse_is_reported_unreadable_by_type_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.data.test_readers import ct_dataset, stored_image, write

    root = _folder(tmp_path / "data")
    ds = ct_dataset(stored_image(0))
    ds.PatientID = "SECRET-ID-42"
    bad = write(ds, root / "a" / "p0" / "odd.dcm")
    data = bytearray(bad.read_bytes())
    at = data.find(b"\x10\x00\x20\x00LO")  # PatientID's VR made unknown: pydicom raises NotImplementedError
    data[at + 4 : at + 6] = b"L^"
    bad.write_bytes(bytes(data))
    records, skipped = discover_records(root)
    assert len(records) == 8
    assert [(s.path.name, s.reason, s.detail) for s in skipped] == [
        ("odd.dcm", "unreadable", "cannot read the DICOM header (NotImplementedError)")
    ]
    assert "SECRET" not in caplog.text


def test_a_patient_folder_under_two_classes_is_one_patient(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")  # a/p0, a/p1, b/p0, b/p1: p0 and p1 each have images in both classes
    _png(root / "b" / "loose.png", seed=99)
    records, _ = discover_records(root)
    patient = {r.path.relative_to(root).as_posix(): r.patient for r in records}
    assert patient["a/p0/IM0000.png"] == patient["b/p0/IM0001.png"] != patient["a/p1/IM0000.png"]
    assert len(set(patient.values())) == 3  # p0, p1 and the loose file


def test_a_hidden_sub_folder_of_a_class_is_reported_and_not_used(tmp_path: Path) -> None:
    """Thumbnails or a tool's folder inside a class folder would be near-copies of its images, maybe in support and query."""
    root = _folder(tmp_path / "data")
    _png(root / "a" / ".thumbnails" / "IM0000.png", seed=7)
    _png(root / "a" / "p0" / ".cache" / "IM0000.png", seed=8)
    records, skipped = discover_records(root)
    assert not [r for r in records if "/." in r.path.as_posix()] and len(records) == 8
    hidden = {s.path.relative_to(root).as_posix(): (s.reason, s.detail) for s in skipped}
    assert hidden == {name: ("not-image", "hidden folder: its files are not used") for name in ("a/.thumbnails", "a/p0/.cache")}


def test_images_inside_a_series_folder_are_listed_as_skipped_in_3d(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in "ab":
        for k in range(2):
            (root / name / "s0").mkdir(parents=True, exist_ok=True)
            (root / name / "s0" / f"IM{k:04d}.dcm").write_bytes(b"\0" * 200)  # a series, found not read
        (root / name / "s0" / "converted.nii.gz").write_bytes(b"\0" * 200)
    _png(root / "a" / "s0" / "key.png", seed=1)
    _png(root / "a" / "flat.png", seed=2)  # beside the series folder, not in it: a record as before
    records, skipped = discover_records(root, spatial_dims=3)
    assert sorted(r.path.relative_to(root).as_posix() for r in records) == ["a/flat.png", "a/s0", "b/s0"]
    assert [(s.path.relative_to(root).as_posix(), s.reason) for s in skipped] == [
        ("a/s0/converted.nii.gz", "in-series"), ("a/s0/key.png", "in-series"), ("b/s0/converted.nii.gz", "in-series"),
    ]  # fmt: skip
    assert all("DICOM series folder" in s.detail for s in skipped)
    records, skipped = discover_records(root, spatial_dims=2)  # 2D: every file is an image of its own
    assert {"a/s0/converted.nii.gz", "a/s0/key.png", "b/s0/converted.nii.gz"} <= {
        r.path.relative_to(root).as_posix() for r in records
    } and not [s for s in skipped if s.reason == "in-series"]


def _mixed_patient_folders(root: Path) -> Path:
    """Classes ``a`` and ``b``, 3 patient folders each: 2 DICOMs with a PatientID, 1 with it blank, 1 PNG export."""
    from tests.data.test_readers import ct_dataset, stored_image, write

    for c, name in enumerate("ab"):
        for p in range(3):
            folder = root / name / f"pt{name}{p}"
            for k, patient_id in enumerate((f"ID-{name}{p}", f"ID-{name}{p}", "")):
                ds = ct_dataset(stored_image(100 * c + 10 * p + k))
                ds.PatientID = patient_id
                write(ds, folder / f"IM{k:04d}.dcm")
            _png(folder / "export.png", seed=100 * c + 10 * p + 9)
    return root


def test_every_file_of_a_patient_folder_is_one_patient_with_or_without_a_patient_id(tmp_path: Path) -> None:
    """A PNG export or a DICOM with a blanked PatientID beside DICOMs with one: the same patient, not a second one."""
    root = _mixed_patient_folders(tmp_path / "data")
    _png(root / "a" / "flat.png", seed=7)  # right in the class folder: its own patient, as before
    records, _ = discover_records(root)
    by_folder: dict[str, set[str]] = {}
    for r in records:
        by_folder.setdefault(r.path.relative_to(root).parts[1], set()).add(r.patient)
    assert {name: len(keys) for name, keys in by_folder.items()} == {
        **{f"pt{c}{p}": 1 for c in "ab" for p in range(3)}, "flat.png": 1}
    assert len({r.patient for r in records}) == 7
    assert all(len(r.patient) == 16 and "ID-" not in r.patient for r in records)  # salted hashes only


def test_a_patient_id_in_two_folders_links_them(tmp_path: Path) -> None:
    from tests.data.test_readers import ct_dataset, stored_image, write

    root = _folder(tmp_path / "data")  # a/p0, a/p1, b/p0, b/p1 (PNG)
    for k, folder in enumerate(("p1", "p7")):  # one PatientID in b/p1 and b/p7: p1 and p7 are one patient
        ds = ct_dataset(stored_image(k))
        ds.PatientID = "SAME-PERSON"
        write(ds, root / "b" / folder / "scan.dcm")
    records, _ = discover_records(root)
    patient = {r.path.relative_to(root).as_posix(): r.patient for r in records}
    assert patient["b/p7/scan.dcm"] == patient["a/p1/IM0000.png"] == patient["b/p1/scan.dcm"] != patient["a/p0/IM0000.png"]


def test_no_episode_takes_support_and_query_from_one_mixed_patient_folder(tmp_path: Path) -> None:
    from medmeta.data.episodes import EpisodeSampler

    records, _ = discover_records(_mixed_patient_folders(tmp_path / "data"))
    sampler = EpisodeSampler([r.label for r in records], [r.patient for r in records], ["a", "b"], split="test",
                             n_way=2, k_shot=1, q_query=1)  # fmt: skip
    folder = [r.path.parent for r in records]
    for index in range(100):
        episode = sampler.episode(index)
        assert not {folder[i] for i in episode.support} & {folder[i] for i in episode.query}, index


def test_a_3d_series_and_a_volume_in_one_patient_folder_are_one_patient(tmp_path: Path) -> None:
    from tests.data.test_readers import ct_dataset, stored_image, write

    root = tmp_path / "data"
    for k in range(2):
        ds = ct_dataset(stored_image(k), instance=k + 1)
        ds.PatientID = "ID-3D"
        write(ds, root / "a" / "pt0" / "s0" / f"IM{k:04d}.dcm")
    (root / "a" / "pt0" / "converted.nii.gz").write_bytes(b"\0" * 200)  # found, not read
    records, _ = discover_records(root, spatial_dims=3)
    assert sorted(r.path.relative_to(root).as_posix() for r in records) == ["a/pt0/converted.nii.gz", "a/pt0/s0"]
    assert len({r.patient for r in records}) == 1


def test_a_folder_whose_dicoms_all_carry_patient_ids_is_split_by_them(tmp_path: Path) -> None:
    """A generic sub-folder (``images/``) of DICOMs from several patients, in every class: patients by PatientID."""
    from tests.data.test_readers import ct_dataset, stored_image, write

    root = tmp_path / "data"
    for c, label in enumerate("ab"):
        for p in range(3):
            ds = ct_dataset(stored_image(3 * c + p))
            ds.PatientID = f"ID-{label}{p}"
            write(ds, root / label / "images" / f"{p}.dcm")
    records, _ = discover_records(root)
    assert len({r.patient for r in records}) == 6  # not one patient called "images" across both classes
