"""``medmeta predict``: run an adapted model saved as a bundle over a cohort and write one row per case.

Data flow: the inputs (files, folders searched recursively, DICOM series folders in 3D, CSV
manifests with a ``path`` column) -> cases named by their path relative to their input root ->
per batch: preflight (``check_image``: the reason codes of ``medmeta data check``) -> exactly
``diagnose``'s load transforms (``transform_images`` with the bundle's image settings) -> the
bundle's network (non-transductive: a case's probabilities never depend on its batch) ->
``predictions.csv`` rows, appended and flushed to disk (``fsync``) after every batch.
``predictions.json`` (the same rows, a summary of the bundle's metadata) is written from the CSV at the end.

An unusable case is a row without a prediction and with its reason in ``warnings``; a case that
is constant after the intensity window is predicted with ``diagnose``'s warning, and so is a case of a
kind (format family, grey or colour) the model was not trained on (the bundle's ``training_images``;
a bundle without it records nothing, and no case is warned about), and so is a case whose contents are
those of a support case the bundle was adapted on (its ``support_sha256``; a bundle without it: no
warning, nothing is known). A re-run with the
same output folder skips the cases already in ``predictions.csv`` (a partly written last line is
dropped), and refuses a folder written by another bundle (``predict_state.json``). On SIGTERM (or
Ctrl-C) the batch in flight is finished and written, then the run stops (``PredictResult.stopped``).
Log lines give counts only, never a case's path: a file name may hold a patient identifier.

Why this module is longer than 300 lines: it is one command's whole data flow (inputs, batches,
resumable outputs, signals), and its resume and privacy rules are easiest to check read together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from medmeta.bundle import Bundle
from medmeta.data.cohort import Case, find_cases
from medmeta.data.loading import transform_images
from medmeta.data.episode_manifest import content_hash
from medmeta.data.preflight import check_image
from medmeta.data.records import ImageRecord, resolved
from medmeta.diagnose import _constant_warning, _refuse_inside_inputs, constant_images
from medmeta.errors import DataError
from medmeta.data.image_kinds import image_kind, kind_warning, trained_kinds

logger = logging.getLogger(__name__)

BATCH_SIZE = 32
CSV_NAME, JSON_NAME, STATE_NAME = "predictions.csv", "predictions.json", "predict_state.json"
SEPARATOR = " | "  # between the warnings of one row (a warning may itself hold "; ")
# metadata.json keys that MONAI's bundle format asks for but that say nothing about the adapted model, and its hashes
MONAI_BOILERPLATE = ("changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                     "authors", "copyright", "description", "network_data_format", "image_settings",
                     "saved_sha256", "support_sha256")  # fmt: skip
SUPPORT_WARNING = ("the same image as a support case the model was adapted on (identical file contents): its prediction "
                   "repeats what the model was shown, it is no test of it")  # fmt: skip


@dataclass(frozen=True)
class PredictResult:
    """What one ``predict_cohort`` run did; ``stopped``: a signal ended it after a batch, before the last case."""

    out: Path
    cases: int
    done_before: int
    predicted: int
    not_predicted: int
    with_warnings: int
    stopped: bool


def predict_cohort(
    bundle: Bundle, inputs: Sequence[Path], out: Path, *, batch_size: int = BATCH_SIZE, progress: bool | None = None,
    bundle_folder: Path | None = None,
) -> PredictResult:  # fmt: skip
    """Predict every case of ``inputs`` with ``bundle`` into ``out`` (new, empty, or an earlier run's to resume).

    Args:
        bundle: the adapted model and its class names, image settings and metadata.
        inputs: image files, folders (recursive; DICOM series folders are one case in 3D) and CSV manifests.
        out: the output folder; never inside an input folder (links resolved).
        batch_size: cases per batch (preflight, transforms, one forward, one flushed write).
        progress: show a progress bar; ``None``: only when stderr is a terminal.
        bundle_folder: the bundle's folder, which ``out`` may not be inside either.

    Raises:
        DataError: a missing input, a manifest without a ``path`` column, two cases with one id,
            ``out`` inside an input, or ``out`` holding another bundle's or another command's files.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    out, inputs = Path(out).expanduser(), [Path(p).expanduser() for p in inputs]
    _refuse_inside_inputs(out, [*inputs, *([Path(bundle_folder)] if bundle_folder is not None else [])])
    spatial_dims = int(bundle.image_settings["spatial_dims"])
    cases = find_cases(inputs, spatial_dims)
    _refuse_inside_inputs(out, sorted({resolved(c.path).parent for c in cases}))  # manifest rows, links: anywhere
    names = list(bundle.class_names)
    header = ["case", "predicted", *(f"p({name})" for name in names), "warnings"]
    fingerprint = bundle_fingerprint(bundle)
    contents = {case.case_id: content_hash(case.path) if case.path.exists() else "missing" for case in cases}
    done = _open_output(out, fingerprint, header, contents)
    pending = [case for case in cases if case.case_id not in done]
    logger.info("%d case(s): %d already in %s, %d to predict", len(cases), len(cases) - len(pending), CSV_NAME,
                len(pending))  # fmt: skip
    counts = {"predicted": 0, "not_predicted": 0, "with_warnings": 0}
    with _stop_signals() as stop_requested, (out / CSV_NAME).open("a", newline="") as handle, _bar(progress) as bar:
        task = bar.add_task("predicting", total=len(pending))
        writer = csv.writer(handle, lineterminator="\n")
        for start in range(0, len(pending), batch_size):
            rows = predict_batch(bundle, pending[start : start + batch_size])
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
            for row in rows:
                counts["predicted" if row[1] else "not_predicted"] += 1
                counts["with_warnings"] += bool(row[-1])
            bar.advance(task, len(rows))
            if stop_requested() and start + batch_size < len(pending):
                break
    finished = sum(counts[key] for key in ("predicted", "not_predicted"))
    stopped = finished < len(pending)
    write_json(out, bundle, header, complete=not stopped, fingerprint=fingerprint)
    return PredictResult(out, len(cases), len(cases) - len(pending), stopped=stopped, **counts)


def predict_batch(bundle: Bundle, cases: Sequence[Case]) -> list[list[str]]:
    """One CSV row per case: preflight, ``diagnose``'s transforms, the network, warnings."""
    settings = bundle.image_settings
    spatial_dims = int(settings["spatial_dims"])
    trained = trained_kinds(bundle.metadata.get("training_images"))  # None: not recorded, nothing is known
    recorded = bundle.metadata.get("support_sha256")  # the support cases' content_hash; absent: nothing is known
    shown = {digest for digest in recorded if isinstance(digest, str)} if isinstance(recorded, list) else set()
    rows: dict[int, list[str]] = {}
    usable = []
    for i, case in enumerate(cases):
        problem = check_image(case.path, spatial_dims=spatial_dims)
        if problem is None:
            usable.append(i)
        else:
            rows[i] = _unpredicted(bundle, case, f"not predicted: {problem.reason} ({problem.detail})")
    images, usable = _load(bundle, cases, usable, rows)
    if usable:
        with torch.no_grad():
            logits = bundle.network(images)
        if tuple(logits.shape) != (len(usable), len(bundle.class_names)):
            raise DataError(f"the bundle's network gives outputs of shape {tuple(logits.shape)} for {len(usable)} "
                            f"cases of {len(bundle.class_names)} classes")  # fmt: skip
        probs = logits.float().softmax(-1)
        for j, (i, constant) in enumerate(zip(usable, constant_images(images))):
            if not bool(torch.isfinite(probs[j]).all()):
                rows[i] = _unpredicted(bundle, cases[i], "not predicted: the network's output is NaN or infinite")
                continue
            warnings = [_constant_warning(settings, float(images[j].max()))] if constant else []
            warnings += [w for w in [kind_warning(image_kind(cases[i].path), trained)] if w]
            warnings += [SUPPORT_WARNING] if shown and content_hash(cases[i].path) in shown else []
            predicted = bundle.class_names[int(probs[j].argmax())]
            rows[i] = [cases[i].case_id, predicted, *(f"{float(p):.6f}" for p in probs[j]), SEPARATOR.join(warnings)]
    return [rows[i] for i in range(len(cases))]


def _load(
    bundle: Bundle, cases: Sequence[Case], usable: list[int], rows: dict[int, list[str]]
) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """The usable cases' images; a case the transforms cannot read after all becomes an unpredicted row."""

    def load(indices: list[int]) -> torch.Tensor:
        records = [ImageRecord(cases[i].path, "?", "?") for i in indices]
        return transform_images(records, source="the cohort", **bundle.image_settings)

    if not usable:
        return torch.empty(0), []
    try:
        return load(usable), usable
    except DataError:  # find the case(s): each alone
        loaded, kept = [], []
        for i in usable:
            try:
                loaded.append(load([i]))
                kept.append(i)
            except DataError as error:
                cause = type(error.__cause__).__name__ if error.__cause__ else "wrong shape or values"
                warning = f"not predicted: unreadable (the load transforms failed: {cause})"
                rows[i] = _unpredicted(bundle, cases[i], warning)
        return (torch.cat(loaded) if loaded else torch.empty(0)), kept


def _unpredicted(bundle: Bundle, case: Case, warning: str) -> list[str]:
    return [case.case_id, "", *([""] * len(bundle.class_names)), warning]


def bundle_fingerprint(bundle: Bundle) -> str:
    """SHA-256 of the bundle's weights (names, dtypes, shapes, bytes), class names and image settings."""
    described = json.dumps([list(bundle.class_names), bundle.image_settings], sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode())
    for name, tensor in sorted(bundle.network.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _open_output(out: Path, fingerprint: str, header: list[str], contents: dict[str, str]) -> dict[str, list[str]]:
    """Prepare ``out`` (state file, CSV header) and return the rows already written, by case id.

    ``contents`` is each case's content hash (``episode_manifest.content_hash``) by case id: recorded
    in the state file, so that a re-run refuses to reuse a row whose case id now names other contents
    (another cohort with the same file names, or a file changed since it was predicted).
    """
    state_path = out / STATE_NAME
    state: dict[str, object] = {"bundle_sha256": fingerprint, "columns": header, "case_content_hash": {}}
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{state_path} cannot be read ({type(error).__name__}); choose a new --out") from None
        if not isinstance(state, dict) or state.get("bundle_sha256") != fingerprint:
            recorded = state.get("bundle_sha256") if isinstance(state, dict) else None
            raise DataError(f"output folder {out} holds predictions of another bundle (sha256 "
                            f"{str(recorded)[:12]}, this one {fingerprint[:12]}); choose a new --out")  # fmt: skip
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty and holds no earlier medmeta predict run; choose a new --out")
    else:  # a new run: the state file first, so that a folder holding predictions always has one
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(state_path, json.dumps({**state, "case_content_hash": contents}, indent=2) + "\n")
        return _existing_rows(out, header)
    recorded = state.get("case_content_hash")
    unverified = not isinstance(recorded, dict)  # written before the cases' contents were recorded
    recorded = {} if unverified else dict(recorded)
    done = _existing_rows(out, header)
    changed = [case for case in done if case in contents and case in recorded and recorded[case] != contents[case]]
    if changed:
        raise DataError(f"output folder {out} already holds predictions for {len(changed)} case(s) whose files now "
                        "have other contents (another cohort with the same file names, or files changed since they "
                        "were predicted); choose a new --out")  # fmt: skip
    unchecked = [case for case in done if case in contents and case not in recorded]
    if unchecked:
        logger.warning("%d case(s) in %s were predicted before medmeta recorded the cases' contents: they are kept "
                       "without checking that their files are unchanged", len(unchecked), CSV_NAME)  # fmt: skip
    recorded.update({case: digest for case, digest in contents.items() if case not in done or case in recorded})
    state["case_content_hash"] = recorded
    _write_atomic(state_path, json.dumps(state, indent=2) + "\n")
    return done


def _existing_rows(out: Path, header: list[str]) -> dict[str, list[str]]:
    """The rows an earlier run wrote to ``predictions.csv`` (a new file with the header if there is none)."""
    path = out / CSV_NAME
    if not path.exists():
        _write_atomic(path, _csv_text([header]))
        return {}
    rows, dropped = read_rows(path, header)
    if dropped:
        logger.warning("%s: dropped %d incomplete line(s) of an interrupted run; those cases are predicted again",
                       CSV_NAME, dropped)  # fmt: skip
        _write_atomic(path, _csv_text([header, *rows.values()]))
    return rows


def read_rows(path: Path, header: list[str]) -> tuple[dict[str, list[str]], int]:
    """The complete rows of a ``predictions.csv`` by case id, and how many incomplete lines were left out."""
    text = path.read_text(encoding="utf-8")
    dropped = 0
    if text and not text.endswith("\n"):  # the last line was cut short while being written
        text, dropped = text[: text.rfind("\n") + 1], 1
    lines = list(csv.reader(io.StringIO(text)))
    if not lines or lines[0] != header:
        raise DataError(f"{path} does not have the columns this bundle writes ({', '.join(header)}); choose a new --out")
    rows: dict[str, list[str]] = {}
    for row in lines[1:]:
        if len(row) != len(header) or row[0] in rows:
            dropped += 1
        else:
            rows[row[0]] = row
    return rows, dropped


def write_json(out: Path, bundle: Bundle, header: list[str], *, complete: bool, fingerprint: str) -> Path:
    """``predictions.json``: every row of ``predictions.csv`` (same values) and a summary of the bundle's metadata."""
    rows, _ = read_rows(out / CSV_NAME, header)
    names = list(bundle.class_names)
    cases = [
        {"case": row[0], "predicted": row[1] or None,
         "probabilities": {n: float(v) for n, v in zip(names, row[2:-1])} if row[1] else None,
         "warnings": row[-1].split(SEPARATOR) if row[-1] else []}
        for row in rows.values()
    ]  # fmt: skip
    document = {
        "classes": names, "complete": complete, "image_settings": bundle.image_settings,
        "bundle": {"sha256": fingerprint,
                   **{k: v for k, v in bundle.metadata.items() if k not in MONAI_BOILERPLATE}},
        "counts": {"cases": len(cases), "predicted": sum(c["predicted"] is not None for c in cases),
                   "with_warnings": sum(bool(c["warnings"]) for c in cases)},
        "cases": cases,
    }  # fmt: skip
    return _write_atomic(out / JSON_NAME, json.dumps(document, indent=2, default=str) + "\n")


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


@contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """While open, SIGTERM and Ctrl-C ask the loop to stop after its batch (a second Ctrl-C interrupts at once)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield lambda: False
        return

    def handle(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(requested)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _bar(show: bool | None) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not (console.is_terminal if show is None else show))  # fmt: skip
