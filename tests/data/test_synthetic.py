"""Tests of the synthetic DICOM lesion data set generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medmeta.data.synthetic import (
    ALL_LESION_CLASSES,
    DENSITIES,
    MARGINS,
    SHAPES,
    LesionClass,
    generate_synthetic_dataset,
    image_rngs,
    lesion_classes,
    render_slice,
    render_slice_with_mask,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SMALL = dict(n_classes=4, patients_per_class=2, images_per_patient=2, image_size=32, pixel_spacing_mm=0.7)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ds", seed=3, **SMALL)


def _read_all(root: Path) -> dict[str, pydicom.Dataset]:
    return {str(p.relative_to(root)): pydicom.dcmread(p) for p in sorted(root.rglob("*.dcm"))}


def test_all_lesion_classes_are_the_full_product() -> None:
    assert len(ALL_LESION_CLASSES) == len(set(ALL_LESION_CLASSES)) == 5 * 2 * 8
    assert len({c.name for c in ALL_LESION_CLASSES}) == 80
    assert LesionClass("spiculated", "sharp", "calcified").name == "spiculated-sharp-calcified"
    with pytest.raises(ValueError):
        LesionClass("square", "sharp", "solid")


def test_lesion_classes_are_distinct_and_cover_all_attributes() -> None:
    classes = lesion_classes(30)
    assert len(classes) == len(set(classes)) == 30
    assert {c.shape for c in classes} == set(SHAPES)
    assert {c.margin for c in classes} == set(MARGINS)
    assert {c.density for c in classes} == set(DENSITIES)
    for attr, values in (("shape", SHAPES), ("margin", MARGINS), ("density", DENSITIES)):
        counts = [sum(getattr(c, attr) == v for c in classes) for v in values]
        assert min(counts) >= 3, (attr, counts)
    assert lesion_classes(80) == lesion_classes(80)  # fixed
    assert set(lesion_classes(80)) == set(ALL_LESION_CLASSES)
    assert lesion_classes(12) == classes[:12]  # stable class indices
    assert len(lesion_classes(24)) == 24
    for bad in (0, 81):
        with pytest.raises(ValueError):
            lesion_classes(bad)


def test_layout_and_metadata(small_dataset: Path) -> None:
    classes = lesion_classes(SMALL["n_classes"])
    assert sorted(p.name for p in small_dataset.iterdir() if p.is_dir()) == sorted(c.name for c in classes)
    per_class = SMALL["patients_per_class"] * SMALL["images_per_patient"]
    for c in classes:
        assert len(list((small_dataset / c.name).glob("*.dcm"))) == per_class
    meta = json.loads((small_dataset / "dataset.json").read_text())
    assert meta["seed"] == 3 and [c["name"] for c in meta["classes"]] == [c.name for c in classes]
    assert not [p for p in small_dataset.parent.iterdir() if ".tmp-" in p.name]


def test_dicom_files_are_valid_ct_images(small_dataset: Path) -> None:
    files = _read_all(small_dataset)
    raw = (small_dataset / next(iter(files))).read_bytes()
    assert raw[128:132] == b"DICM"
    patients: dict[str, set[str]] = {}
    for rel, ds in files.items():
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
        assert (ds.Rows, ds.Columns) == (32, 32) and ds.pixel_array.shape == (32, 32)
        assert ds.RescaleType == "HU" and ds.PixelRepresentation == 1
        patients.setdefault(ds.PatientID, set()).add(rel.split("/")[0])
        assert str(ds.PatientName).startswith("Synthetic^")
    n_patients = SMALL["n_classes"] * SMALL["patients_per_class"]
    assert len(patients) == n_patients  # several images share one patient, each patient in one class
    assert all(len(v) == 1 for v in patients.values())
    by_patient: dict[str, set[tuple[str, str]]] = {}
    for ds in files.values():
        by_patient.setdefault(ds.PatientID, set()).add((ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert all(len(v) == 1 for v in by_patient.values())
    assert len({ds.SOPInstanceUID for ds in files.values()}) == len(files)


def test_hu_values_round_trip(small_dataset: Path) -> None:
    classes = lesion_classes(SMALL["n_classes"])
    for ci in (0, 3):
        for p, k in ((0, 0), (1, 1)):
            ds = pydicom.dcmread(small_dataset / classes[ci].name / f"patient{p:03d}_{k:02d}.dcm")
            assert ds.PatientID == f"SYNTH-{ci:03d}-{p:03d}" and ds.InstanceNumber == k + 1
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            expected = np.round(render_slice(classes[ci], *image_rngs(3, ci, p, k), size=32))
            np.testing.assert_array_equal(hu, expected)
            assert float(ds.RescaleIntercept) == -1024 and ds.pixel_array.min() >= 0  # stored = HU + 1024


def test_deterministic_and_seed_dependent(tmp_path: Path, small_dataset: Path) -> None:
    again = generate_synthetic_dataset(tmp_path / "again", seed=3, **SMALL)
    other = generate_synthetic_dataset(tmp_path / "other", seed=4, **SMALL)
    a, b, c = _read_all(small_dataset), _read_all(again), _read_all(other)
    assert a.keys() == b.keys() == c.keys()
    for rel in a:
        np.testing.assert_array_equal(a[rel].pixel_array, b[rel].pixel_array)
        for uid in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert a[rel][uid].value == b[rel][uid].value
            assert a[rel][uid].value != c[rel][uid].value
        assert not np.array_equal(a[rel].pixel_array, c[rel].pixel_array)
    first = sorted(small_dataset.rglob("*.dcm"))[0]
    assert first.read_bytes() == (again / first.relative_to(small_dataset)).read_bytes()


def test_existing_output_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(target, **SMALL)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_synthetic_dataset(empty, **{**SMALL, "n_classes": 1}) == empty
    assert len(list(empty.rglob("*.dcm"))) == 4


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmeta.data.synthetic as synthetic

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return render_slice(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_slice", failing)
    with pytest.raises(RuntimeError):
        generate_synthetic_dataset(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []


def _lesion_stats(lesion: LesionClass, n: int = 6, size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_slice_with_mask(lesion, *image_rngs(0, 99, p, 0), size=size) for p in range(n)]


def test_render_slice_basic_properties() -> None:
    lesion = lesion_classes(1)[0]
    hu = render_slice(lesion, *image_rngs(0, 0, 0, 0))
    assert hu.dtype == np.float32 and hu.shape == (64, 64)
    assert -1024 <= hu.min() and hu.max() <= 3071
    np.testing.assert_array_equal(hu, render_slice(lesion, *image_rngs(0, 0, 0, 0)))
    other_image = render_slice(lesion, *image_rngs(0, 0, 0, 1))
    other_patient = render_slice(lesion, *image_rngs(0, 0, 1, 0))
    assert 0 < np.abs(hu - other_image).mean() < np.abs(hu - other_patient).mean()  # neighbouring slices
    assert render_slice(lesion, *image_rngs(0, 0, 0, 0), size=32).shape == (32, 32)


def test_densities_look_as_expected() -> None:
    def mean_inside(density: str) -> float:
        stats = _lesion_stats(LesionClass("round", "sharp", density))
        return float(np.mean([np.median(hu[m]) for hu, m in stats]))

    means = {d: mean_inside(d) for d in DENSITIES}
    assert means["fat"] < means["solid"] < means["calcified"]
    assert means["ground-glass"] < means["fat"]
    assert means["ground-glass"] < means["part-solid"] < means["solid"]
    assert means["cystic"] < means["solid"]
    for hu, m in _lesion_stats(LesionClass("round", "sharp", "cavitary")):
        assert np.percentile(hu[m], 5) < -850  # air inside
    for hu, m in _lesion_stats(LesionClass("oval", "sharp", "calcified")):
        assert hu[m].max() > 250
    for hu, m in _lesion_stats(LesionClass("round", "sharp", "solid")):
        assert np.median(hu[~m]) < -500  # lesion on a lung background


def test_shapes_and_margins_differ() -> None:
    def edge_width(margin: str) -> float:
        # fraction of pixels near the lesion with intermediate HU values
        fractions = []
        for hu, m in _lesion_stats(LesionClass("round", margin, "solid"), n=8):
            ring = m ^ (np.roll(m, 4, 0) | np.roll(m, -4, 0) | np.roll(m, 4, 1) | np.roll(m, -4, 1))
            fractions.append(np.mean((hu[ring] > -650) & (hu[ring] < -150)))
        return float(np.mean(fractions))

    assert edge_width("ill-defined") > edge_width("sharp") + 0.1

    def compactness(shape: str) -> float:
        # perimeter^2 / area of the mask: 4*pi for a disc, larger for complex outlines
        values = []
        for _, m in _lesion_stats(LesionClass(shape, "sharp", "solid"), n=8):
            perimeter = np.sum(m[1:, :] != m[:-1, :]) + np.sum(m[:, 1:] != m[:, :-1])
            values.append(perimeter**2 / m.sum())
        return float(np.mean(values))

    assert compactness("round") < compactness("oval") < compactness("spiculated")
    assert compactness("round") < compactness("lobulated")
    assert compactness("round") < compactness("irregular")
