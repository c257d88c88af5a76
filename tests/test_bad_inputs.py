"""Bad inputs (section 5 of the engineering notes), every row through the real ``medmeta`` command line.

Each row (a :class:`Case`) writes its bad input into a copy of a small good data set, and the command of its
:class:`Run` checks it in a subprocess. Rows that share a command share one copy and one subprocess (``medmeta``
needs about 4 s to start), and the runs go two at a time, so the module stays well under a minute. Every row
checks the exit code, the file (or class, or key) and the reason in the output, that no ``Traceback`` reaches the
user, and that the data folder is unchanged (names, sizes, modification times).

Rows of the table tested elsewhere: same patient in support and query, class overlap across meta-splits
(tests/data/test_episodes.py); non-finite loss and evaluation under inference mode (tests/test_module.py,
tests/test_reliability.py); crafted, truncated or mismatched checkpoints and SIGTERM (tests/test_reliability.py).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medmeta.data.episodes import split_classes
from medmeta.data.synthetic import generate_synthetic_dataset
from tests.data.test_preflight import ct, cut, nifti, png, raw
from tests.data.test_readers import _mix_spacing, _remove_middle, write_series
from tests.test_cli import _tiny_fit_args

RATIOS = (0.34, 0.33, 0.33)  # 6 classes: 2 per meta-split
PER_CLASS = {"2d": 6, "3d": 2}  # usable images (3D: series) per class of the good data sets
TIMEOUT_S = 120
# the RLE decoder made unavailable in the child process, as tests/data/test_preflight.py does with monkeypatch
NO_RLE_DECODER = """
import sys
import medmeta.cli
from pydicom.pixels import get_decoder
from pydicom.uid import RLELossless
decoder = get_decoder(RLELossless)
decoder._available = {}
decoder._unavailable = {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")}
sys.exit(medmeta.cli.main(sys.argv[1:]))
"""


# ---- good data sets -------------------------------------------------------------------------------------------


def _good_2d(root: Path) -> Path:
    """6 classes x 3 patients x 2 DICOM images of 16x16."""
    return generate_synthetic_dataset(root, n_classes=6, patients_per_class=3, images_per_patient=2, image_size=16,
                                      seed=1)  # fmt: skip


def _series(folder: Path, patient: str, seed: int, n: int = 3) -> Path:
    """One CT series of ``n`` slices with its own PatientID (``write_series`` gives every series the same one)."""
    write_series(folder, n=n, seed=seed)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientID = patient
        ds.save_as(path)
    return folder


def _good_3d(root: Path) -> Path:
    """6 classes x 2 patients x one 3-slice DICOM series."""
    for c in range(6):
        for p in range(2):
            _series(root / f"class{c}" / f"patient{p}", f"c{c}p{p}", seed=10 * c + p)
    return root


def _class(root: Path, index: int = 0) -> Path:
    return sorted(p for p in root.iterdir() if p.is_dir())[index]


def _good_dicom_bytes(root: Path) -> bytes:
    """A good synthetic DICOM file of the last class (no row writes there)."""
    return sorted(_class(root, -1).glob("patient*.dcm"))[0].read_bytes()


def _offset(data: bytes, tag: tuple[int, int], *, last: bool = False) -> int:
    """Byte offset of a (little-endian) tag after the 128-byte preamble."""
    needle = tag[0].to_bytes(2, "little") + tag[1].to_bytes(2, "little")
    at = data.rfind(needle, 132) if last else data.find(needle, 132)
    assert at > 0, tag
    return at


PIXEL_DATA, META_VERSION, SOP_CLASS = (0x7FE0, 0x0010), (0x0002, 0x0001), (0x0008, 0x0016)


def _image() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)


def _nifti_bytes() -> bytes:
    return nib.Nifti1Image(_image(), np.eye(4)).to_bytes()


# ---- bad inputs: each writes one into the data folder and returns its path -------------------------------------


def _dicom_cut(keep: Callable[[bytes], int], name: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        data = _good_dicom_bytes(root)
        return raw(_class(root, 1) / name, data[: keep(data)])

    return build


def _decoder_missing(root: Path) -> Path:
    return ct(_class(root) / "rle.dcm", compress=True)


def _nifti_bad_gzip(root: Path) -> Path:
    """Real gzip magic, corrupt deflate stream."""
    data = bytearray(gzip.compress(_nifti_bytes()))
    data[20:60] = bytes(40)
    return raw(_class(root, 2) / "badgz.nii.gz", bytes(data))


def _nifti_bad_header(root: Path) -> Path:
    """The NIfTI magic string ``n+1`` overwritten."""
    data = bytearray(_nifti_bytes())
    data[344:348] = b"xxxx"
    return raw(_class(root, 2) / "badheader.nii", bytes(data))


def _nan(root: Path) -> Path:
    image = _image()
    image[3, 5] = np.nan
    return nifti(_class(root, 3) / "nan.nii.gz", image)


def _series_damaged(damage: Callable[[Path], None], name: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        folder = _series(_class(root, 1) / name, f"bad-{name}", seed=77, n=4)
        damage(folder)
        return folder

    return build


def _series_no_valid_slice(root: Path) -> Path:
    """A patient folder whose three ``.dcm`` slices are all random bytes."""
    folder = _class(root, 2) / "no-valid-slice"
    folder.mkdir()
    for k in range(3):
        raw(folder / f"slice{k}.dcm", np.random.default_rng(k).bytes(400))
    return folder


def _too_small_class(root: Path) -> Path:
    """A meta-train class left with 2 images from 1 patient (a 1-shot 2-query episode needs 3, from 2 patients)."""
    victim = root / split_classes([p.name for p in root.iterdir() if p.is_dir()], ratios=RATIOS, seed=0).train[0]
    for path in victim.glob("*.dcm"):
        if not path.name.startswith("patient000"):
            path.unlink()
    return victim


def _bad_yaml(root: Path) -> Path:
    """A config with a misspelt key (``n_wya``), next to (not in) the data folder."""
    path = root.parent / "bad.yaml"
    path.write_text("data:\n  n_wya: 3\n")
    return path


def _garbled_yaml(root: Path) -> Path:
    """A config whose YAML does not parse (an unclosed list on line 2)."""
    path = root.parent / "garbled.yaml"
    path.write_text("model:\n  meta_lr: [0.1\ndata:\n  n_way: 2\n")
    return path


# ---- the commands -----------------------------------------------------------------------------------------------


def _check(*extra: str, q_query: int = 2) -> Callable[[Path, Path], list[str]]:
    def argv(data: Path, out: Path) -> list[str]:
        ratios = [str(r) for r in RATIOS]
        return ["data", "check", str(data), "--json", "--n-way", "2", "--q-query", str(q_query), "--split-ratios",
                *ratios, *extra]  # fmt: skip

    return argv


def _fit(*extra: str) -> Callable[[Path, Path], list[str]]:
    def argv(data: Path, out: Path) -> list[str]:
        return [*_tiny_fit_args(data, out), "--data.n_way", "2", "--data.split_ratios", json.dumps(list(RATIOS)),
                "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.val_episodes", "1",
                "--data.test_episodes", "1", *extra]  # fmt: skip

    return argv


@dataclass(frozen=True)
class Run:
    """One real command over one copy of a good data set (``"2d"`` or ``"3d"``), shared by the rows it checks."""

    data: str
    argv: Callable[[Path, Path], list[str]]
    no_rle_decoder: bool = False


RUNS: dict[str, Run] = {
    # the RLE decoder is unavailable in the whole 2D check (no other file there is RLE-compressed): one run fewer
    "check-2d": Run("2d", _check(), no_rle_decoder=True),
    "check-2d-crash": Run("2d", _check()),  # apart: a traceback here must not hide the other rows
    "check-3d": Run("3d", _check("--spatial-dims", "3", q_query=1)),
    "check-3d-crash": Run("3d", _check("--spatial-dims", "3", q_query=1)),
    "check-2d-as-3d": Run("2d", _check("--spatial-dims", "3")),  # every class folder is then one mixed "series"
    "fit-no-decoder": Run("2d", _fit(), no_rle_decoder=True),
    "fit-too-small-class": Run("2d", _fit()),
    "fit-n-way-3": Run("2d", _fit("--data.n_way", "3")),
    "fit-bad-yaml": Run("2d", _fit("--config", "bad.yaml")),  # in the working folder
    "fit-garbled-yaml": Run("2d", _fit("--config=garbled.yaml")),
    "fit-n-way-mismatch": Run("2d", _fit("--model.n_way", "4")),
}


@dataclass(frozen=True)
class Case:
    """One row: its command, how it writes the bad input, and what must be reported.

    ``code`` set: the command exits 0 and lists the file among the skipped ones with that reason code, and its class
    keeps exactly its good images (never a partial record). ``code`` None: the command exits 2 before training.
    ``words`` must appear in the file's skip entry (reason and detail), else in the output.
    """

    name: str
    run: str
    build: Callable[[Path], Path]
    code: str | None
    words: tuple[str, ...] = ()
    named: str = ""  # error rows: "file" (its full path) or "class" (its name) must be in the message
    before_data: bool = False  # refused at parsing: no run folder, no data read


# fmt: off
CASES = [
    Case("zero-byte", "check-2d", lambda r: raw(_class(r) / "zero.dcm", b""), "empty"),
    Case("non-image", "check-2d", lambda r: raw(_class(r) / "notes.txt", b"not an image"), "not-image"),
    Case("random-bytes-dcm", "check-2d", lambda r: raw(_class(r) / "noise.dcm", np.random.default_rng(0).bytes(700)),
         "unreadable"),
    Case("dicom-cut-in-header", "check-2d", _dicom_cut(lambda d: _offset(d, PIXEL_DATA, last=True) // 2, "header.dcm"),
         "truncated", ("truncated",)),
    Case("dicom-cut-in-pixels", "check-2d", _dicom_cut(lambda d: len(d) - 40, "pixels.dcm"), "truncated",
         ("truncated",)),
    Case("dicom-cut-before-sop-class", "check-2d", _dicom_cut(lambda d: _offset(d, SOP_CLASS), "sop.dcm"), "truncated",
         ("truncated",)),
    Case("dicom-cut-in-meta-element-length", "check-2d-crash",
         _dicom_cut(lambda d: _offset(d, META_VERSION) + 10, "meta-length.dcm"), "truncated", ("truncated",)),
    Case("dicom-cut-in-pixel-element-length", "check-2d-crash",
         _dicom_cut(lambda d: _offset(d, PIXEL_DATA, last=True) + 10, "pixel-length.dcm"), "truncated", ("truncated",)),
    Case("decoder-missing-skipped", "check-2d", _decoder_missing, "decoder-missing",
         ("decoder-missing:pylibjpeg,pylibjpeg-rle", "install pylibjpeg, pylibjpeg-rle")),
    Case("decoder-missing-error", "fit-no-decoder", _decoder_missing, None,
         ("medmeta: error: cannot decode", "RLE Lossless", "install pylibjpeg, pylibjpeg-rle"), named="file"),
    Case("series-missing-slice", "check-3d", _series_damaged(_remove_middle, "missing-slice"), "inconsistent-series",
         ("slice gaps", "a slice is missing")),
    Case("series-mixed-spacing", "check-3d", _series_damaged(_mix_spacing, "mixed-spacing"), "inconsistent-series",
         ("mixed pixel spacing",)),
    Case("series-no-valid-slice", "check-3d-crash", _series_no_valid_slice, "inconsistent-series", ("not DICOM",)),
    Case("nifti-zero-byte", "check-2d", lambda r: raw(_class(r, 2) / "zero.nii.gz", b""), "empty"),
    Case("nifti-garbled", "check-2d",
         lambda r: raw(_class(r, 2) / "garbled.nii.gz", np.random.default_rng(1).bytes(700)), "unreadable",
         ("not gzip",)),
    Case("nifti-bad-gzip", "check-2d", _nifti_bad_gzip, "unreadable", ("corrupt gzip",)),
    Case("nifti-bad-header", "check-2d", _nifti_bad_header, "unreadable", ("NIfTI header",)),
    Case("nifti-truncated-gzip", "check-2d", lambda r: cut(nifti(_class(r, 2) / "cut.nii.gz", _image()), 300),
         "truncated", ("gzip stream ends early",)),
    Case("nifti-truncated-voxels", "check-2d", lambda r: cut(nifti(_class(r, 2) / "cut.nii", _image()), -100),
         "truncated", ("voxel data",)),
    Case("nan-image", "check-2d", _nan, "non-finite", ("NaN",)),
    Case("inf-image", "check-2d", lambda r: nifti(_class(r, 3) / "inf.nii", np.full((16, 16), np.inf, np.float32)),
         "non-finite"),
    Case("constant-image", "check-2d", lambda r: png(_class(r, 3) / "constant.png", np.full((16, 16), 7, np.uint8)),
         "constant"),
    Case("nothing-usable", "check-2d-as-3d", lambda r: r, None,
         ("no usable images under", "all 6 file(s) skipped (inconsistent-series: 6)", "mixed series"), named="file"),
    Case("too-small-class", "fit-too-small-class", _too_small_class, None,
         ("has 2 image(s) from 1 patient(s)", "1 support + 2 query = 3 images"), named="class"),
    Case("n-way-above-classes", "fit-n-way-3", lambda r: r, None, ("has 2 class(es)", "n_way=3", "at least 3")),
    Case("bad-yaml-key", "fit-bad-yaml", _bad_yaml, None, ("unknown key 'data.n_wya'", "did you mean 'n_way'"),
         named="file", before_data=True),
    Case("garbled-yaml", "fit-garbled-yaml", _garbled_yaml, None, ("not valid YAML", "line 3"), named="file",
         before_data=True),
    Case("data-model-n-way-mismatch", "fit-n-way-mismatch", lambda r: r, None, ("model.n_way", "data.n_way"),
         before_data=True),
]
# fmt: on


# ---- running every selected run once, two at a time ----------------------------------------------------------


@dataclass
class Outcome:
    """What one run printed, and its data folder before and after."""

    folder: Path
    returncode: int
    stdout: str
    stderr: str
    built: dict[str, Path]
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]

    @property
    def text(self) -> str:
        """stdout and stderr with every run of whitespace made one space (rich wraps long lines)."""
        return " ".join((self.stdout + "\n" + self.stderr).split())

    def report(self) -> dict:
        """The ``data check --json`` report (empty if the command printed none)."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            return {}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _execute(run: Run, folder: Path) -> subprocess.CompletedProcess[str]:
    argv = run.argv(folder / "data", folder / "out")
    python = [sys.executable, "-c", NO_RLE_DECODER] if run.no_rle_decoder else [sys.executable, "-m", "medmeta.cli"]
    env = {**os.environ, "MEDMETA_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run([*python, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Build the data of every selected run, run them (two subprocesses at a time) and collect the outcomes."""
    selected = {item.callspec.params["case"].run for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)}  # fmt: skip
    base = tmp_path_factory.mktemp("bad-inputs")
    good = {"2d": _good_2d(base / "good-2d"), "3d": _good_3d(base / "good-3d")}
    prepared: dict[str, tuple[Path, dict[str, Path], dict[str, tuple[int, int]]]] = {}
    for name in sorted(selected):
        folder = base / name
        folder.mkdir()
        shutil.copytree(good[RUNS[name].data], folder / "data")
        built = {case.name: case.build(folder / "data") for case in CASES if case.run == name}
        prepared[name] = (folder, built, _snapshot(folder / "data"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(prepared, pool.map(lambda n: _execute(RUNS[n], prepared[n][0]), prepared)))
    outcomes = {}
    for name, (folder, built, before) in prepared.items():
        done, after = results[name], _snapshot(folder / "data")
        outcomes[name] = Outcome(folder, done.returncode, done.stdout, done.stderr, built, before, after)
    return outcomes


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_bad_input_is_reported_without_a_traceback(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.run]
    path = outcome.built[case.name]
    context = f"exit {outcome.returncode}\n{outcome.stdout[-3000:]}\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stdout + outcome.stderr, context
    assert outcome.after == outcome.before, "the data folder was written to"
    if case.code is not None:
        assert outcome.returncode == 0, context
        report = outcome.report()
        entries = [entry for entry in report.get("skipped", []) if Path(entry["path"]) == path]
        assert len(entries) == 1, f"{path} not reported once among the skipped files\n{context}"
        entry = entries[0]
        assert entry["reason"].split(":")[0] == case.code, entry
        for word in case.words:
            assert word in f"{entry['reason']} {entry['detail']}", entry
        label = path.relative_to(outcome.folder / "data").parts[0]
        assert report["classes"][label]["images"] == PER_CLASS[RUNS[case.run].data], "a bad file became a record"
        assert report["usable_images"] == 6 * PER_CLASS[RUNS[case.run].data]
    else:
        assert outcome.returncode == 2, context
        named = {"file": str(path), "class": f"class '{path.name}'", "": ""}[case.named]
        for word in (*case.words, named):
            assert word in outcome.text, f"{word!r} missing\n{context}"
        out = outcome.folder / "out"
        assert not (out.exists() and list(out.rglob("*.ckpt"))), "training ran"
        if case.before_data:
            assert not out.exists(), "a run folder was created"
            assert "usable images" not in outcome.text, "data was read"
