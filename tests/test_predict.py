"""``medmeta predict``: a mixed DICOM/NIfTI/PNG cohort through a saved bundle; batches, resume, SIGTERM, refusals."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.adapted import AdaptedClassifier
from medmeta.bundle import load_bundle, save_bundle
from medmeta.cli import main
from medmeta.data.loading import transform_images
from medmeta.data.records import ImageRecord
from medmeta.diagnose import diagnose
from medmeta.errors import DataError
from medmeta.predict import CSV_NAME, JSON_NAME, SEPARATOR, predict_cohort
from tests.data.test_preflight import ct, cut, nifti, png, png16, raw
from tests.data.test_readers import _remove_middle, write_series

CLASSES = ["benign", "malignant", "unclear"]
USABLE = {"dcm": 70, "nii.gz": 65, "png": 65}  # 200 usable 2D cases
# file -> what its row says (an unusable case: its reason code; the 16-bit PNG: predicted with diagnose's warning)
SPECIAL = {
    "bad/cut.dcm": "not predicted: truncated", "bad/empty.png": "not predicted: empty",
    "bad/volume.nii.gz": "not predicted: wrong-dims", "bad/flat.png": "not predicted: constant",
    "bad/white.png": "the image is constant after the intensity window [-1100, 400]",
}  # fmt: skip


def make_bundle(folder: Path, *, spatial_dims: int = 2, image_size: int = 16, seed: int = 0) -> Path:
    """A 3-class Conv-4 (group norm, random weights, a head that separates) saved with ``save_bundle``."""
    torch.manual_seed(seed)
    spec = {"class_path": "conv4", "init_args": {"hidden_channels": 4, "norm": "group"}}
    shape = {"in_channels": 1, "spatial_dims": spatial_dims, "image_size": image_size}
    network = AdaptedClassifier(spec, n_classes=len(CLASSES), **shape).eval()
    with torch.no_grad():  # a head centred on random images (untrained, it would pick one class for every case)
        features = network.backbone.features(torch.rand(64, 1, *[image_size] * spatial_dims))
        head = network.backbone.head
        head.weight.div_((features - features.mean(0)).matmul(head.weight.T).std(0).clamp_min(1e-6)[:, None])
        head.bias.copy_(-features.mean(0).matmul(head.weight.T))
    network_def = {"_target_": "medmeta.adapted.AdaptedClassifier", "backbone": spec, "n_classes": len(CLASSES), **shape}
    settings = {**shape, "window": (-1100.0, 400.0), "preset": None, "spacing": None, "roi_size": None}
    return save_bundle(folder, network, network_def, CLASSES, settings, {"support_counts": {c: 3 for c in CLASSES}})


def make_cohort(root: Path) -> Path:
    """200 usable 16x16 cases (DICOM, NIfTI, PNG) in site/patient folders, 5 special files and a text file."""
    rng = np.random.default_rng(0)
    for suffix, n in USABLE.items():
        for i in range(n):
            path = root / f"site{i % 3}" / f"p{i % 7:02d}" / f"case{i:03d}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if suffix == "dcm":
                ct(path, rng.integers(0, 2000, (16, 16)).astype(np.uint16))
            elif suffix == "png":
                png(path, rng.integers(0, 200, (16, 16)).astype(np.uint8))
            else:
                nifti(path, rng.normal(-300, 300, (16, 16)).astype(np.float32))
    (root / "bad").mkdir()
    cut(ct(root / "bad/cut.dcm", rng.integers(0, 2000, (16, 16)).astype(np.uint16)), 300)
    raw(root / "bad/empty.png", b"")
    nifti(root / "bad/volume.nii.gz", rng.normal(0, 300, (16, 16, 5)).astype(np.float32))
    png(root / "bad/flat.png", np.full((16, 16), 7, np.uint8))
    png16(root / "bad/white.png")
    (root / "README.txt").write_text("not an image\n")
    return root


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / CSV_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_rows(got: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    """Same cases, classes and warnings; probabilities to float32 rounding (batches of other sizes run other kernels)."""
    assert [r["case"] for r in got] == [r["case"] for r in expected]
    for a, b in zip(got, expected):
        assert (a["predicted"], a["warnings"]) == (b["predicted"], b["warnings"]), a["case"]
        if a["predicted"]:
            assert [float(a[f"p({n})"]) for n in CLASSES] == pytest.approx([float(b[f"p({n})"]) for n in CLASSES], abs=1e-5)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "adapted")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("inputs") / "cohort")


@pytest.fixture(scope="module")
def reference(bundle_dir: Path, cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole cohort predicted in one uninterrupted run, batches of 32."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = predict_cohort(load_bundle(bundle_dir), [cohort], out, batch_size=32)
    assert (result.cases, result.done_before, result.stopped) == (205, 0, False)
    assert (result.predicted, result.not_predicted, result.with_warnings) == (201, 4, 5)
    return out


def test_every_case_is_one_row_as_diagnose_would_see_it(reference: Path, bundle_dir: Path, cohort: Path) -> None:
    rows = {row["case"]: row for row in csv_rows(reference)}
    assert len(rows) == 205 and "README.txt" not in rows
    assert {case: rows[case]["warnings"].split(SEPARATOR)[0][: len(text)] for case, text in SPECIAL.items()} == SPECIAL
    assert rows["bad/white.png"]["predicted"] in CLASSES
    assert rows["bad/cut.dcm"]["predicted"] == "" and rows["bad/cut.dcm"]["p(benign)"] == ""
    bundle = load_bundle(bundle_dir)
    usable = sorted(case for case, row in rows.items() if row["predicted"])
    images = transform_images([ImageRecord(cohort / case, "?", "?") for case in usable], **bundle.image_settings)
    with torch.no_grad():  # diagnose's transforms, then the network, all at once
        probs = bundle.network(images).softmax(-1)
    for case, p in zip(usable, probs):
        assert rows[case]["predicted"] == CLASSES[int(p.argmax())]
        got = [float(rows[case][f"p({name})"]) for name in CLASSES]
        assert got == pytest.approx(p.tolist(), abs=1e-6), case
    assert len({row["predicted"] for row in rows.values() if row["predicted"]}) > 1, "a constant model tests nothing"


def test_json_holds_the_csv_rows_and_the_bundle_metadata(reference: Path) -> None:
    document = json.loads((reference / JSON_NAME).read_text())
    assert document["complete"] is True and document["classes"] == CLASSES
    assert document["bundle"]["support_counts"] == {c: 3 for c in CLASSES} and len(document["bundle"]["sha256"]) == 64
    assert document["bundle"]["class_names"] == CLASSES and "network_data_format" not in document["bundle"]
    assert document["counts"] == {"cases": 205, "predicted": 201, "with_warnings": 5}
    for row, case in zip(csv_rows(reference), document["cases"], strict=True):
        assert case["case"] == row["case"] and (case["predicted"] or "") == row["predicted"]
        assert SEPARATOR.join(case["warnings"]) == row["warnings"]
        if case["predicted"]:
            assert case["probabilities"] == {n: float(row[f"p({n})"]) for n in CLASSES}


def test_batch_size_one_gives_the_same_rows(reference: Path, bundle_dir: Path, cohort: Path, tmp_path: Path) -> None:
    """Non-transductive: a case's prediction never depends on its batch (up to float32 rounding of the convolutions)."""
    folders = [cohort / "site0" / f"p0{k}" for k in range(2)]
    predict_cohort(load_bundle(bundle_dir), folders, tmp_path / "one", batch_size=1)
    one, many = csv_rows(tmp_path / "one"), {row["case"]: row for row in csv_rows(reference)}
    where = {path.name: f"site0/{path.parent.name}/{path.name}" for folder in folders for path in folder.iterdir()}
    assert len(one) == len(where) > 15
    assert_same_rows(one, [{**many[where[row["case"]]], "case": row["case"]} for row in one])


def test_rerun_skips_done_cases_and_drops_a_cut_line(reference: Path, bundle_dir: Path, cohort: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = (out / CSV_NAME).read_bytes()
    again = predict_cohort(load_bundle(bundle_dir), [cohort], out)
    assert (again.done_before, again.predicted, again.not_predicted) == (205, 0, 0)
    assert (out / CSV_NAME).read_bytes() == before
    lines = before.decode().splitlines(keepends=True)  # an interrupted write: two rows lost, the next cut short
    (out / CSV_NAME).write_text("".join(lines[:-3]) + lines[-3][:25])
    with caplog.at_level(logging.INFO, logger="medmeta"):
        resumed = predict_cohort(load_bundle(bundle_dir), [cohort], out)
    assert resumed.done_before == 202 and resumed.predicted + resumed.not_predicted == 3
    assert_same_rows(csv_rows(out), csv_rows(reference))
    assert csv_rows(out)[:202] == csv_rows(reference)[:202]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "dropped 1 incomplete line" in logged and "205 case(s): 202 already in predictions.csv, 3 to predict" in logged
    assert not any(part in logged for part in ("site0", "case0", "bad/", str(cohort))), logged  # counts only


def test_a_different_bundle_or_a_foreign_folder_is_refused(reference: Path, cohort: Path, tmp_path: Path) -> None:
    other = load_bundle(make_bundle(tmp_path / "other", seed=1))
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(DataError, match="predictions of another bundle"):
        predict_cohort(other, [cohort], out)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no earlier medmeta predict run"):
        predict_cohort(other, [cohort], tmp_path / "notes")


def test_a_rerun_refuses_rows_whose_case_now_names_other_contents(
    bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    """Same file names, other images (a second cohort, or a file replaced): the earlier rows are not reused."""
    rng = np.random.default_rng(1)
    first, second = tmp_path / "cohort_a", tmp_path / "cohort_b"
    for root in (first, second):
        for i in range(4):
            (root / f"p{i}").mkdir(parents=True)
            ct(root / f"p{i}" / "case.dcm", rng.integers(0, 2000, (16, 16)).astype(np.uint16))
    bundle, out = load_bundle(bundle_dir), tmp_path / "out"
    assert predict_cohort(bundle, [first], out).predicted == 4
    before = (out / CSV_NAME).read_bytes()
    with pytest.raises(DataError, match="4 case\\(s\\) whose files now have other contents"):
        predict_cohort(bundle, [second], out)
    shutil.copy(second / "p2" / "case.dcm", first / "p2" / "case.dcm")  # one file replaced in place
    with pytest.raises(DataError, match="1 case\\(s\\) whose files now have other contents"):
        predict_cohort(bundle, [first], out)
    assert (out / CSV_NAME).read_bytes() == before
    ct(first / "p9" / "case.dcm", rng.integers(0, 2000, (16, 16)).astype(np.uint16))  # a new case is fine
    (first / "p2" / "case.dcm").unlink()  # and a case gone: its row stays, nothing to compare
    resumed = predict_cohort(bundle, [first], out)
    assert (resumed.done_before, resumed.predicted) == (3, 1)
    state = json.loads((out / "predict_state.json").read_text())
    state.pop("case_content_hash")  # a folder written before the contents were recorded: kept, with a warning
    (out / "predict_state.json").write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="medmeta"):
        assert predict_cohort(bundle, [first], out).done_before == 4
    assert "4 case(s) in predictions.csv were predicted before medmeta recorded" in caplog.text
    assert "case.dcm" not in caplog.text and "p9" not in caplog.text  # counts only


def test_non_finite_weights_and_bad_image_settings_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    metadata_path = folder / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for settings, message in (
        (None, "image_settings in configs/metadata.json must be a JSON object"),
        ({**metadata["image_settings"], "spatial_dims": None}, "image_settings.spatial_dims .* must be an integer"),
        ({**metadata["image_settings"], "in_channels": 3}, "image_settings.in_channels = 3 .* built for 1"),
        ({**metadata["image_settings"], "image_size": 32}, "image_settings.image_size = 32 .* built for 16"),
    ):  # fmt: skip
        metadata_path.write_text(json.dumps({**metadata, "image_settings": settings}))
        with pytest.raises(DataError, match=f"bundle {folder}: {message}"):
            load_bundle(folder)
    metadata_path.write_text(json.dumps(metadata))
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    torch.save(state, folder / "models" / "model.pt")
    with pytest.raises(DataError, match=f"1 weight tensor\\(s\\) hold NaN or infinite values \\({name}\\)"):
        load_bundle(folder)


def test_output_inside_an_input_is_refused(bundle_dir: Path, cohort: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    (tmp_path / "link").symlink_to(cohort / "site1", target_is_directory=True)
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path\n{cohort / 'site0/p00/case000.png'}\n")
    for inputs, out in [
        ([cohort], cohort / "site0" / "predictions"),
        ([cohort], tmp_path / "link" / "out"),  # inside the input through a link
        ([cohort / "site2" / "p02" / "case002.dcm"], cohort / "site2" / "p02" / "out"),  # a file input's folder
        ([manifest], tmp_path / "lists" / "out"),  # the manifest's folder
        ([manifest], cohort / "site0" / "p00" / "out"),  # the folder of a file the manifest lists
    ]:  # fmt: skip
        with pytest.raises(DataError, match="inside the input folder"):
            predict_cohort(bundle, inputs, out)
        assert not out.exists()
    with pytest.raises(DataError, match="inside the input folder"):
        predict_cohort(bundle, [cohort / "site1"], bundle_dir / "out", bundle_folder=bundle_dir)


def test_manifest_rows_relative_absolute_and_missing(reference: Path, bundle_dir: Path, cohort: Path, tmp_path: Path) -> None:
    manifest = cohort.parent / "cohort.csv"
    absolute = cohort / "site1" / "p01" / "case001.nii.gz"
    manifest.write_text(f"path,label\ncohort/site0/p00/case000.dcm,x\n{absolute},y\ncohort/gone.png,z\n")
    result = predict_cohort(load_bundle(bundle_dir), [manifest], tmp_path / "out")
    rows = {row["case"]: row for row in csv_rows(tmp_path / "out")}
    assert list(rows) == ["cohort/site0/p00/case000.dcm", absolute.as_posix(), "cohort/gone.png"]
    assert rows["cohort/gone.png"]["warnings"] == "not predicted: unreadable (no such file)"
    expected = {row["case"]: row for row in csv_rows(reference)}
    pairs = [("cohort/site0/p00/case000.dcm", "site0/p00/case000.dcm"), (absolute.as_posix(), "site1/p01/case001.nii.gz")]
    assert_same_rows([rows[case] for case, _ in pairs], [{**expected[name], "case": case} for case, name in pairs])
    assert (result.predicted, result.not_predicted) == (2, 1)
    (cohort.parent / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(DataError, match="no 'path' column"):
        predict_cohort(load_bundle(bundle_dir), [cohort.parent / "bad.csv"], tmp_path / "out2")


def test_3d_series_folders_and_volumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b3", spatial_dims=3, image_size=8))
    cohort = tmp_path / "volumes"
    write_series(cohort / "patient1" / "ct", n=5)
    write_series(cohort / "patient2" / "ct", n=5, seed=1)
    write_series(cohort / "patient3" / "ct", n=5, seed=2)
    _remove_middle(cohort / "patient3" / "ct")
    rng = np.random.default_rng(1)
    nifti(cohort / "patient4.nii.gz", rng.normal(-300, 300, (10, 10, 10)).astype(np.float32))
    png(cohort / "photo.png", rng.integers(0, 200, (16, 16)).astype(np.uint8))
    result = predict_cohort(bundle, [cohort, cohort / "patient2" / "ct"], tmp_path / "out", progress=True)  # a series twice
    rows = {row["case"]: row for row in csv_rows(tmp_path / "out")}
    assert sorted(rows) == ["patient1/ct", "patient2/ct", "patient3/ct", "patient4.nii.gz", "photo.png"]
    assert rows["patient3/ct"]["warnings"].startswith("not predicted: inconsistent-series")
    assert rows["photo.png"]["warnings"].startswith("not predicted: wrong-dims")
    assert all(rows[case]["predicted"] in CLASSES for case in ("patient1/ct", "patient2/ct", "patient4.nii.gz"))
    assert (result.predicted, result.not_predicted) == (3, 2)
    progress = capsys.readouterr().err
    assert "predicting" in progress and "5/5" in progress  # the progress bar
    alone = predict_cohort(bundle, [cohort / "patient1" / "ct"], tmp_path / "alone")  # a series folder as the input
    assert [row["case"] for row in csv_rows(alone.out)] == ["ct"]
    assert_same_rows(csv_rows(alone.out), [{**rows["patient1/ct"], "case": "ct"}])


def test_a_case_the_load_transforms_cannot_read_is_a_row(
    bundle_dir: Path, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A file that passes the preflight but fails in the transforms: its row says so, its batch-mates are predicted."""
    broken = cohort / "site0" / "p00" / "case000.png"

    def transform(records: list[ImageRecord], **settings: object) -> torch.Tensor:
        if any(r.path == broken for r in records):
            raise DataError(f"cannot read {broken}: ValueError: bad") from ValueError("bad")
        return transform_images(records, **settings)

    monkeypatch.setattr("medmeta.predict.transform_images", transform)
    result = predict_cohort(load_bundle(bundle_dir), [cohort / "site0" / "p00"], tmp_path / "out")
    rows = {row["case"]: row for row in csv_rows(tmp_path / "out")}
    assert rows["case000.png"]["warnings"] == "not predicted: unreadable (the load transforms failed: ValueError)"
    assert result.not_predicted == 1 and result.predicted == len(rows) - 1 > 5


def test_cli_without_a_bundle_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["predict"], ["predict", "--config", "configs/quickstart.yaml", "--ckpt_path", "x.ckpt"]):
        assert main(argv) == 2
        printed = capsys.readouterr().out
        assert "needs --bundle DIR" in printed and "--save-adapted" in printed and "medmeta test" in printed
        assert "Traceback" not in printed


def test_cli_predicts_and_reports_counts_only(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    cohort = tmp_path / "few"
    cohort.mkdir()
    for i in range(3):
        png(cohort / f"ZZNAME{i}.png", np.eye(16, dtype=np.uint8) * (50 + i))
    raw(cohort / "ZZNAMEbroken.dcm", b"not a dicom")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):  # what medmeta shows (preflight names files at DEBUG only)
        assert main(["predict", "--bundle", str(bundle_dir), "--input", str(cohort), "--out", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "4 case(s): 3 predicted now, 1 not predicted" in printed.out and f"predictions: {out / CSV_NAME}" in printed.out
    assert "4 case(s): 0 already in predictions.csv, 4 to predict" in caplog.text
    assert "ZZNAME" not in printed.out + printed.err + caplog.text and "ZZNAME" in (out / CSV_NAME).read_text()
    assert main(["predict", "--bundle", str(bundle_dir), "--input", str(cohort), "--out", str(out)]) == 0
    assert "0 predicted now, 0 not predicted (reason in the warnings column), 0 with warnings; 4 already predicted" in (
        capsys.readouterr().out
    )  # same folder: everything skipped
    assert main(["predict", "--bundle", str(tmp_path / "nothing"), "--input", str(cohort), "--out", str(out)]) == 2
    assert "bundle" in capsys.readouterr().out


def test_sigterm_stops_after_a_batch_and_a_rerun_completes(reference: Path, bundle_dir: Path, cohort: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """A real SIGTERM mid-cohort: exit 143 with a message; the re-run predicts the rest, no case lost or twice."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medmeta.cli", "predict", "--bundle", str(bundle_dir), "--input", str(cohort),
               "--out", str(out), "--batch-size", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # generous: start-up alone takes minutes on an overloaded machine
    while not ((out / CSV_NAME).is_file() and len(csv_rows(out)) >= 6) and process.poll() is None:
        assert time.monotonic() < deadline, "no rows written"
        time.sleep(0.01)
    seen = len(csv_rows(out))
    os.kill(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 143, stdout + stderr
    assert "stopped by a signal after the batch in flight" in stdout and "Traceback" not in stdout + stderr
    stopped = csv_rows(out)
    assert seen <= len(stopped) < 205 and json.loads((out / JSON_NAME).read_text())["complete"] is False
    assert main(["predict", "--bundle", str(bundle_dir), "--input", str(cohort), "--out", str(out)]) == 0
    rows = csv_rows(out)
    assert rows[: len(stopped)] == stopped
    assert_same_rows(rows, csv_rows(reference))  # none lost, none twice, in order, the same values
    assert json.loads((out / JSON_NAME).read_text())["complete"] is True



def test_diagnose_save_adapted_then_predict_gives_diagnoses_probabilities(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    """The workflow: adapt once and save (``diagnose --save-adapted``), then ``predict`` the same queries."""
    support, queries = tmp_path / "support", tmp_path / "queries"
    for name in sorted(p.name for p in tiny_dicom_root.iterdir() if p.is_dir())[:2]:
        files = sorted((tiny_dicom_root / name).glob("*.dcm"))
        for f in files[:3]:
            (support / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, support / name / f.name)
        for f in files[-3:]:
            (queries / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, queries / name / f.name)
    common = ["--ckpt", str(trained_checkpoint), "--support", str(support), "--query", str(queries)]
    assert main(["diagnose", *common, "--out", str(tmp_path / "dx"), "--save-adapted", str(tmp_path / "model")]) == 0
    assert main(["predict", "--bundle", str(tmp_path / "model"), "--input", str(queries), "--out", str(tmp_path / "px")]) == 0
    assert "6 case(s): 6 predicted now" in capsys.readouterr().out
    diagnosed = json.loads((tmp_path / "dx" / JSON_NAME).read_text())["cases"]  # query-001, ... in sorted file order
    predicted = json.loads((tmp_path / "px" / JSON_NAME).read_text())["cases"]
    assert [c["case"] for c in predicted] == sorted(c["case"] for c in predicted)
    assert [c["predicted"] for c in predicted] == [c["predicted"] for c in diagnosed]
    for ours, theirs in zip(predicted, diagnosed, strict=True):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)


@pytest.mark.slow
def test_throughput_benchmark_runs_at_small_size(tmp_path: Path) -> None:
    """benchmarks/predict_speed.py end to end with 50 2D cases per format and 10 volumes (about 20 s)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "predict_speed.py"
    done = subprocess.run([sys.executable, str(script), "--cases-2d", "50", "--cases-3d", "10", "--out", str(tmp_path / "s.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "s.json").read_text())["results"]
    assert [(r["cohort"], r["cases"]) for r in results] == [("2D DICOM 64x64", 50), ("2D PNG 64x64", 50), ("3D NIfTI 64^3", 10)]
    assert all(r["cases_per_s"] > 0 and 0 < r["forward_share"] < 1 for r in results)
    assert "| 2D DICOM 64x64 | 64^2 | 50 |" in done.stdout and "command: python benchmarks/predict_speed.py" in done.stdout


def test_cohort_folders_follow_links_like_discovery_and_count_each_file_once(tmp_path: Path) -> None:
    from medmeta.data.cohort import find_cases

    def image(path: Path, seed: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return png(path, np.random.default_rng(seed).integers(0, 200, (16, 16)).astype(np.uint8))

    image(tmp_path / "store" / "patientB" / "img.png", 1)
    cohort = tmp_path / "cohort"
    image(cohort / "patientA" / "img.png", 2)
    (cohort / "patientB").symlink_to(tmp_path / "store" / "patientB", target_is_directory=True)  # a linked case folder
    (cohort / "patientA" / "again").symlink_to(cohort / "patientA", target_is_directory=True)  # a loop: not descended
    os.link(cohort / "patientA" / "img.png", cohort / "patientA" / "img_hard.png")  # the same file twice
    (cohort / "patientA" / "gone.png").symlink_to(tmp_path / "deleted.png")  # a broken link: a case, not silence
    cases = find_cases([cohort], spatial_dims=2)
    assert [c.case_id for c in cases] == ["patientA/gone.png", "patientA/img.png", "patientB/img.png"]
    assert [c.case_id for c in find_cases([cohort, tmp_path / "store"], spatial_dims=2)] == [
        c.case_id for c in cases
    ]  # the store's file is the linked case already listed


def test_a_case_of_another_kind_than_the_model_was_trained_on_is_flagged(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    """The bundle keeps the checkpoint's record (grey DICOM); a colour or grey PNG is predicted with a warning."""
    from PIL import Image

    support, cohort = tmp_path / "support", tmp_path / "cohort"
    for name in sorted(p.name for p in tiny_dicom_root.iterdir() if p.is_dir())[:2]:
        (support / name).mkdir(parents=True)
        for f in sorted((tiny_dicom_root / name).glob("*.dcm"))[:3]:
            shutil.copy(f, support / name / f.name)
    cohort.mkdir()
    shutil.copy(sorted((tiny_dicom_root / name).glob("*.dcm"))[-1], cohort / "ct.dcm")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(cohort / "grey.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(cohort / "rgb_photo.png")
    diagnose(trained_checkpoint, support, [cohort], tmp_path / "dx", save_adapted=tmp_path / "model")
    metadata = json.loads((tmp_path / "model" / "configs" / "metadata.json").read_text())
    assert metadata["training_images"] == {"dicom": [1]}
    assert "- trained on: grey DICOM images" in (tmp_path / "model" / "docs" / "README.md").read_text()
    predict_cohort(load_bundle(tmp_path / "model"), [cohort], tmp_path / "px", progress=False)
    rows = {row["case"]: row for row in csv_rows(tmp_path / "px")}
    trained = "but the model was trained on grey DICOM images: its prediction may not mean anything"
    assert rows["grey.png"]["warnings"] == f"a grey PNG/JPEG image, {trained}" and rows["grey.png"]["predicted"]
    assert rows["rgb_photo.png"]["warnings"] == f"a colour PNG/JPEG image, {trained}" and rows["rgb_photo.png"]["predicted"]
    assert rows["ct.dcm"]["warnings"] == ""
    old = tmp_path / "old-model"  # a bundle written before the record: nothing known, no warning
    shutil.copytree(tmp_path / "model", old)
    del metadata["training_images"]
    (old / "configs" / "metadata.json").write_text(json.dumps(metadata))
    predict_cohort(load_bundle(old), [cohort], tmp_path / "px-old", progress=False)
    assert all(row["warnings"] == "" for row in csv_rows(tmp_path / "px-old"))


def test_a_cohort_case_that_is_a_support_case_of_the_bundle_is_flagged(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    """diagnose flags a query that is a support case; predict flags it too, from the bundle's support hashes."""
    support, cohort = tmp_path / "support", tmp_path / "cohort"
    for name in sorted(p.name for p in tiny_dicom_root.iterdir() if p.is_dir())[:2]:
        files = sorted((tiny_dicom_root / name).glob("*.dcm"))
        for target in (support / name, cohort / "shown" / name):
            target.mkdir(parents=True)
            for f in files[:3]:
                shutil.copy(f, target / f"renamed-{f.name}")  # other names, the same contents
        (cohort / "new").mkdir(exist_ok=True)
        shutil.copy(files[-1], cohort / "new" / files[-1].name)
    diagnose(trained_checkpoint, support, [cohort / "new"], tmp_path / "dx", save_adapted=tmp_path / "model")
    metadata = json.loads((tmp_path / "model" / "configs" / "metadata.json").read_text())
    assert len(metadata["support_sha256"]) == 6 and "renamed" not in json.dumps(metadata)  # hashes only
    predict_cohort(load_bundle(tmp_path / "model"), [cohort], tmp_path / "px", progress=False)
    warned = {row["case"] for row in csv_rows(tmp_path / "px") if "the same image as a support case" in row["warnings"]}
    assert warned == {str(p.relative_to(cohort)) for p in (cohort / "shown").rglob("*.dcm")} and len(warned) == 6
    assert "support_sha256" not in json.loads((tmp_path / "px" / JSON_NAME).read_text())["bundle"]
    old = tmp_path / "old-model"  # a bundle written before the record: nothing known, no warning
    shutil.copytree(tmp_path / "model", old)
    del metadata["support_sha256"]
    (old / "configs" / "metadata.json").write_text(json.dumps(metadata))
    predict_cohort(load_bundle(old), [cohort], tmp_path / "px-old", progress=False)
    assert all(row["warnings"] == "" for row in csv_rows(tmp_path / "px-old"))


def test_a_bundle_with_an_invalid_window_is_one_line_and_writes_nothing(
    bundle_dir: Path, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    for window in ([400.0, -1100.0], "soft tissue"):
        metadata["image_settings"]["window"] = window
        (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
        out = tmp_path / "out"
        assert main(["predict", "--bundle", str(folder), "--input", str(cohort), "--out", str(out)]) == 2
        printed = capsys.readouterr()
        assert printed.out.strip().startswith(f"medmeta: error: bundle {folder}: image_settings in configs/")
        assert len(printed.out.strip().splitlines()) == 1 and "invalid intensity setting" in printed.out
        assert "Traceback" not in printed.out + printed.err
        assert not out.exists()
