"""No DICOM tag value reaches anything medmeta writes or prints."""

from __future__ import annotations

import base64
import io
import re
import shutil
import zipfile
from pathlib import Path

import lightning as L
import pydicom
import pytest
import torch
from PIL import Image

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.synthetic import generate_synthetic_dataset
from tests.conftest import module_for
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


# patient folder and file names that hold identifiers (``<class>/<FOLDER>-patient000/<FILE>-patient000_00.dcm``)
NAME_SENTINELS = {"folder": "ZZSENTFOLDER", "file": "ZZSENTFILE"}


def _leaks(texts: list[bytes]) -> list[str]:
    needles = [v.split("^")[0].encode() for v in [*SENTINELS.values(), *NAME_SENTINELS.values()]]
    return [needle.decode() for needle in needles if any(needle.lower() in text.lower() for text in texts)]


def _png_texts(data: bytes) -> list[bytes]:
    """A PNG's text chunks and other info as ``key=value`` bytes."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return [f"{k}={v}".encode() for k, v in {**image.info, **getattr(image, "text", {})}.items()]


def _contents(path: Path) -> list[bytes]:
    """The bytes of a written file, of each member of a zip archive (checkpoints), a PNG's text chunks, and the
    decoded images embedded in an HTML report (data URIs) with their text chunks."""
    data = path.read_bytes()
    texts = [data, str(path).encode()]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            texts += [archive.read(name) for name in archive.namelist()] + [name.encode() for name in archive.namelist()]
    if data.startswith(b"\x89PNG"):
        texts += _png_texts(data)
    for embedded in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", data) if path.suffix == ".html" else []:
        png = base64.b64decode(embedded)
        texts += [png, *_png_texts(png)]
    return texts


@pytest.fixture(scope="module")
def named_root(identified_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The identified data set with sentinel patient-folder and file names as well as tag values."""
    root = tmp_path_factory.mktemp("phi-names") / "lesions"
    for path in sorted(identified_root.rglob("*.dcm")):
        patient = path.name.split("_")[0]
        target = root / path.parent.name / f"{NAME_SENTINELS['folder']}-{patient}" / f"{NAME_SENTINELS['file']}-{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return root


@pytest.fixture(scope="module")
def named_checkpoint(named_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-way MAML meta-trained for 2 steps on ``named_root`` (which ``evaluate`` then reads again)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("phi-fit")
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=2, pixel_baseline=False)
    data = EpisodicDataModule(str(named_root), n_way=3, k_shot=1, q_query=2, meta_batch_size=2, image_size=16,
                              val_episodes=2, test_episodes=3, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, inference_mode=False, default_root_dir=out)  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(out / "model.ckpt")
    return out / "model.ckpt"


def test_no_identifier_in_what_diagnose_and_evaluate_write(named_root: Path, named_checkpoint: Path, tmp_path: Path) -> None:
    """Tag values and identifying folder and file names of the inputs reach no output, log or console line."""
    support, queries, single = tmp_path / "in" / "support", tmp_path / "in" / "queries", tmp_path / "in" / "single"
    for class_dir in sorted(p for p in named_root.iterdir() if p.is_dir())[:2]:
        for patient_dir in sorted(class_dir.iterdir()):
            into = queries if patient_dir.name.endswith("patient003") else support
            shutil.copytree(patient_dir, into / class_dir.name / patient_dir.name)
    broken = queries / f"{NAME_SENTINELS['folder']}-patient009" / f"{NAME_SENTINELS['file']}-broken.dcm"
    broken.parent.mkdir()
    broken.write_bytes(b"DICM" + bytes(200))
    single.mkdir()
    shutil.copy(next(queries.rglob("*.dcm")), single / f"{NAME_SENTINELS['file']}-single.dcm")
    inputs = [text for p in (tmp_path / "in").rglob("*") if p.is_file() for text in _contents(p)]
    assert len(_leaks(inputs)) == len(SENTINELS) + len(NAME_SENTINELS)  # every sentinel is there to leak
    diagnosed = _medmeta("diagnose", "--ckpt", str(named_checkpoint), "--support", str(support), "--query", str(queries),
                         str(single / f"{NAME_SENTINELS['file']}-single.dcm"), "--out", str(tmp_path / "diagnosis"),
                         cwd=tmp_path)  # fmt: skip
    assert diagnosed.returncode == 0, diagnosed.stdout[-2000:] + diagnosed.stderr[-2000:]
    assert "left out" in diagnosed.stdout  # the broken query is reported, by position and hash
    evaluated = _medmeta("evaluate", "--ckpt", str(named_checkpoint), "--out", str(tmp_path / "evaluate"),
                         "--test-episodes", "3", cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and (tmp_path / "in") not in p.parents]
    names = {p.name for p in written}
    assert {"report.html", "predictions.csv", "predictions.json", "warnings.txt", "metrics.json"} <= names
    assert any(p.name == "report.html" and tmp_path / "evaluate" in p.parents for p in written)  # the test report
    assert any(p.suffix == ".png" for p in written) and any(p.name.startswith("events.out.tfevents") for p in written)
    texts = [text for p in [*written, named_checkpoint] for text in _contents(p)]
    texts = [text.replace(str(tmp_path).encode(), b"") for text in texts]  # the test's own folder names are not ours
    texts += [s.encode() for s in (diagnosed.stdout, diagnosed.stderr, evaluated.stdout, evaluated.stderr)]
    assert _leaks(texts) == []


def test_no_tag_value_in_outputs_logs_configs_checkpoints_or_caches(identified_root: Path, tmp_path: Path) -> None:
    check = _medmeta("data", "check", str(identified_root), "--n-way", "3", "--q-query", "2",
                     "--split-ratios", "0.5", "0.25", "0.25", "--json", cwd=tmp_path)  # fmt: skip
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    run = _medmeta(*_tiny_fit_args(identified_root, tmp_path / "run"), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "metrics.json" for p in written)
    assert any(p.name == "class_splits.json" for p in written)
    assert any(p.name == "report.html" for p in written)  # test_after_fit's report, embedded figures decoded
    texts = [p.read_bytes() for p in written]
    texts += [check.stdout.encode(), check.stderr.encode(), run.stdout.encode(), run.stderr.encode()]
    assert _leaks(texts) == []


def test_require_deidentified_refuses_identified_files(identified_root: Path, tmp_path: Path) -> None:
    result = _medmeta(*_tiny_fit_args(identified_root, tmp_path / "run"), "--data.require_deidentified", "true",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "PatientIdentityRemoved" in result.stdout and "Traceback" not in result.stdout + result.stderr
