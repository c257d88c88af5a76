"""No DICOM tag value reaches anything medmeta writes or prints."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from medmeta.data.synthetic import generate_synthetic_dataset
from tests.test_cli import _medmeta, _tiny_fit_args

SENTINELS = {
    "PatientName": "Zzsentinelname^Qq",
    "PatientID": "ZZSENTINELID",
    "PatientBirthDate": "18991231",
    "AccessionNumber": "ZZSENTACC",
    "InstitutionName": "ZZSENTINELHOSPITAL",
    "StudyDate": "18991230",
    "ReferringPhysicianName": "Zzsentineldoctor",
}


@pytest.fixture(scope="module")
def identified_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = generate_synthetic_dataset(
        tmp_path_factory.mktemp("phi") / "lesions", n_classes=12, patients_per_class=4, images_per_patient=3,
        image_size=32, seed=5,
    )  # fmt: skip
    for path in root.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in SENTINELS.items():
            # keep patients distinct: the real PatientID structure survives behind the sentinel
            setattr(ds, keyword, value + ds.PatientID[-7:] if keyword == "PatientID" else value)
        ds.save_as(path)
    return root


def _leaks(texts: list[bytes]) -> list[str]:
    needles = [v.split("^")[0].encode() for v in SENTINELS.values()]
    return [needle.decode() for needle in needles if any(needle in text for text in texts)]


def test_no_tag_value_in_outputs_logs_configs_checkpoints_or_caches(identified_root: Path, tmp_path: Path) -> None:
    check = _medmeta("data", "check", str(identified_root), "--n-way", "3", "--q-query", "2",
                     "--split-ratios", "0.5", "0.25", "0.25", "--json", cwd=tmp_path)  # fmt: skip
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    run = _medmeta(*_tiny_fit_args(identified_root, tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "metrics.json" for p in written)
    assert any(p.name == "class_splits.json" for p in written)
    texts = [p.read_bytes() for p in written]
    texts += [check.stdout.encode(), check.stderr.encode(), run.stdout.encode(), run.stderr.encode()]
    assert _leaks(texts) == []


def test_require_deidentified_refuses_identified_files(identified_root: Path, tmp_path: Path) -> None:
    result = _medmeta(*_tiny_fit_args(identified_root, tmp_path / "run"), "--data.require_deidentified", "true",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "PatientIdentityRemoved" in result.stdout and "Traceback" not in result.stdout + result.stderr
