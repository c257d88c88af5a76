"""Tests of the synthetic 3D (NIfTI) lesion data set generator."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmeta.data.synthetic import DENSITIES, LesionClass, image_rngs, lesion_classes
from medmeta.data.synthetic3d import (
    NIFTI_DESCRIP,
    generate_synthetic_volumes,
    render_volume,
    render_volume_with_mask,
    volume_affine,
)

SMALL = dict(n_classes=3, patients_per_class=2, volumes_per_patient=2, size=24, spacing_mm=0.8)


@pytest.fixture(scope="module")
def small_volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_volumes(tmp_path_factory.mktemp("synth3d") / "ds", seed=3, **SMALL)


def _load_all(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asanyarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def test_layout_and_metadata(small_volumes: Path) -> None:
    classes = lesion_classes(SMALL["n_classes"])
    assert sorted(p.name for p in small_volumes.iterdir() if p.is_dir()) == sorted(c.name for c in classes)
    for ci, c in enumerate(classes):  # patient folders named apart across classes: a folder name is one patient
        first, second = (f"patient{2 * ci + p:04d}" for p in (0, 1))
        assert sorted(str(p.relative_to(small_volumes / c.name)) for p in (small_volumes / c.name).rglob("*.nii.gz")) == [
            f"{first}/00.nii.gz", f"{first}/01.nii.gz", f"{second}/00.nii.gz", f"{second}/01.nii.gz"]
    meta = json.loads((small_volumes / "dataset.json").read_text())
    assert meta["seed"] == 3 and meta["size"] == 24 and meta["spacing_mm"] == 0.8
    assert [c["name"] for c in meta["classes"]] == [c.name for c in classes]
    assert not [p for p in small_volumes.parent.iterdir() if ".tmp-" in p.name]


def test_nifti_files_are_valid(small_volumes: Path) -> None:
    files = sorted(small_volumes.rglob("*.nii.gz"))
    assert files and all(f.read_bytes()[:2] == b"\x1f\x8b" for f in files)  # really gzipped
    for f in files:
        img = nib.load(f)
        header = img.header
        assert isinstance(img, nib.Nifti1Image) and img.shape == (24, 24, 24)
        assert header.get_data_dtype() == np.int16 and np.asanyarray(img.dataobj).dtype == np.int16
        assert (img.dataobj.slope, img.dataobj.inter) == (1.0, 0.0)
        np.testing.assert_allclose(header.get_zooms(), (0.8, 0.8, 0.8), rtol=1e-6)
        np.testing.assert_allclose(img.affine, volume_affine(24, 0.8), atol=1e-5)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert header.get_xyzt_units()[0] == "mm"
        assert int(header["sform_code"]) == int(header["qform_code"]) == 1
        assert header["descrip"].tobytes().rstrip(b"\0").decode() == NIFTI_DESCRIP
        assert not header["db_name"].tobytes().strip(b"\0") and not header["aux_file"].tobytes().strip(b"\0")
    np.testing.assert_allclose(volume_affine(24, 0.8)[:3, 3], [-9.2] * 3)  # centred on the origin


def test_hu_values_round_trip(small_volumes: Path) -> None:
    classes = lesion_classes(SMALL["n_classes"])
    for ci in (0, 2):
        for p, k in ((0, 0), (1, 1)):
            img = nib.load(small_volumes / classes[ci].name / f"patient{2 * ci + p:04d}" / f"{k:02d}.nii.gz")
            expected = np.round(render_volume(classes[ci], *image_rngs(3, ci, p, k), size=24))
            np.testing.assert_array_equal(np.asanyarray(img.dataobj), expected)
            np.testing.assert_array_equal(img.get_fdata(), expected)


def test_deterministic_and_seed_dependent(tmp_path: Path, small_volumes: Path) -> None:
    again = generate_synthetic_volumes(tmp_path / "again", seed=3, **SMALL)
    other = generate_synthetic_volumes(tmp_path / "other", seed=4, **SMALL)
    a, b, c = _load_all(small_volumes), _load_all(again), _load_all(other)
    assert a.keys() == b.keys() == c.keys() and len(a) == 12
    for rel in a:
        np.testing.assert_array_equal(a[rel], b[rel])
        assert not np.array_equal(a[rel], c[rel])
    for f in sorted(small_volumes.rglob("*.nii.gz"))[:2]:  # byte-identical, gzip header included
        assert f.read_bytes() == (again / f.relative_to(small_volumes)).read_bytes()


def test_existing_output_is_refused(tmp_path: Path) -> None:
    occupied = tmp_path / "ds"
    (occupied / "sub").mkdir(parents=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target in (occupied, a_file):
        with pytest.raises(FileExistsError):
            generate_synthetic_volumes(target, **SMALL)
    assert [p.name for p in occupied.iterdir()] == ["sub"] and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "file"]  # no staging folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_synthetic_volumes(empty, **{**SMALL, "n_classes": 1, "patients_per_class": 1}) == empty
    assert len(list(empty.rglob("*.nii.gz"))) == 2


def test_invalid_arguments(tmp_path: Path) -> None:
    for bad in ({"n_classes": 0}, {"patients_per_class": 0}, {"volumes_per_patient": 0}, {"size": 8},
                {"spacing_mm": 0.0}, {"seed": -1}):
        with pytest.raises(ValueError):
            generate_synthetic_volumes(tmp_path / "ds", **{**SMALL, **bad})
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmeta.data.synthetic3d as synthetic3d

    rendered = iter(range(100))

    def interrupted(*args, **kwargs):
        if next(rendered) == 3:
            raise KeyboardInterrupt
        return render_volume(*args, **kwargs)

    monkeypatch.setattr(synthetic3d, "render_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_volumes(tmp_path / "ds", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_render_volume_basic_properties() -> None:
    lesion = lesion_classes(1)[0]
    vol = render_volume(lesion, *image_rngs(0, 0, 0, 0), size=24)
    assert vol.dtype == np.float32 and vol.shape == (24, 24, 24)
    assert -1024 <= vol.min() and vol.max() <= 3071
    np.testing.assert_array_equal(vol, render_volume(lesion, *image_rngs(0, 0, 0, 0), size=24))
    other_volume = render_volume(lesion, *image_rngs(0, 0, 0, 1), size=24)
    other_patient = render_volume(lesion, *image_rngs(0, 0, 1, 0), size=24)
    assert 0 < np.abs(vol - other_volume).mean() < np.abs(vol - other_patient).mean()  # repeated scans
    assert render_volume(lesion, *image_rngs(0, 0, 0, 0)).shape == (32, 32, 32)  # default size


def _stats(lesion: LesionClass, n: int = 4, size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_volume_with_mask(lesion, *image_rngs(0, 99, p, 0), size=size) for p in range(n)]


def _erode(mask: np.ndarray, k: int = 1) -> np.ndarray:
    core = mask.copy()
    for axis in range(3):
        core &= np.roll(mask, k, axis) & np.roll(mask, -k, axis)
    return core


def test_densities_look_as_expected_in_3d() -> None:
    stats = {d: _stats(LesionClass("round", "sharp", d)) for d in DENSITIES}
    # the lesion interior (one voxel in from the edge, away from partial-volume voxels)
    median = {d: float(np.mean([np.median(v[_erode(m)]) for v, m in s])) for d, s in stats.items()}
    high = {d: float(np.mean([np.percentile(v[m], 95) for v, m in s])) for d, s in stats.items()}
    assert median["ground-glass"] < median["fat"] < median["solid"]
    assert median["cystic"] < median["solid"] + 30 and median["fat"] < median["cystic"]
    assert high["ground-glass"] < high["part-solid"] < high["solid"]  # a small solid core in ground glass
    assert high["calcified"] > high["solid"] + 100
    for v, m in stats["calcified"]:
        assert v[m].max() > 250
    for v, m in stats["cavitary"]:
        assert np.sum(v[m] < -850) >= 3 and v[m].min() < -900  # air inside
    for v, m in stats["solid"]:
        assert m.sum() > 50 and np.median(v[~m]) < -500  # a real 3D lesion on a lung background
    rim_minus_core = [np.median(v[m & ~_erode(m, 2)]) - np.median(v[_erode(m, 2)]) for v, m in stats["rim-enhancing"]]
    assert np.mean(rim_minus_core) > 20  # enhancing rim, darker centre


def _compactness(mask: np.ndarray) -> float:
    """(voxel faces)^1.5 / voxels: minimal for a ball, larger for complex outlines."""
    faces = sum(np.sum(np.diff(mask, axis=a) != 0) for a in range(3))
    return float(faces**1.5 / mask.sum())


def _elongation(mask: np.ndarray) -> float:
    """sqrt of the largest / smallest eigenvalue of the voxel-position covariance (1 for a ball)."""
    eigenvalues = np.linalg.eigvalsh(np.cov(np.argwhere(mask).T.astype(np.float64)))
    return float(np.sqrt(eigenvalues[-1] / eigenvalues[0]))


def test_shapes_and_margins_differ_in_3d() -> None:
    masks = {s: [m for _, m in _stats(LesionClass(s, "sharp", "solid"), n=6)]
             for s in ("round", "oval", "lobulated", "spiculated", "irregular")}
    compact = {s: float(np.mean([_compactness(m) for m in ms])) for s, ms in masks.items()}
    assert compact["round"] + 1 < compact["lobulated"] < compact["spiculated"]
    assert compact["round"] + 1 < compact["irregular"] < compact["spiculated"]
    elongation = {s: [_elongation(m) for m in masks[s]] for s in ("round", "oval")}
    assert max(elongation["round"]) < 1.2 < 1.35 < min(elongation["oval"])  # an ellipsoid, any orientation

    def edge_fraction(margin: str) -> float:
        fractions = []
        for v, m in _stats(LesionClass("round", margin, "solid"), n=4):
            grown = m.copy()
            for a in range(3):
                grown |= np.roll(m, 1, a) | np.roll(m, -1, a)
            ring = grown & ~m
            fractions.append(np.mean((v[ring] > -650) & (v[ring] < -150)))
        return float(np.mean(fractions))

    assert edge_fraction("ill-defined") > edge_fraction("sharp") + 0.15
