"""``medmeta diagnose``: adapt a meta-trained model to a new diagnostic task from a few labelled cases.

Data flow: checkpoint -> model and image settings; support folder (one sub-folder per diagnosis)
and query files -> preflight (reason codes as in ``medmeta data check``) -> the training
transforms -> adaptation on the support set (a new head when the number of diagnoses differs
from training) -> query probabilities, Grad-CAM overlays, a leave-one-out check of the support
set -> ``predictions.csv``, ``predictions.json``, PNGs and one self-contained ``report.html``.

Query cases are named ``query-001``, ... with a hash of the file's bytes, never by file name or
path, so no patient identifier reaches the outputs or the log. Nothing is written inside the input
folders (the support folder, a query folder, or the folder of a query file).

The probabilities come from the very function Grad-CAM differentiates (:func:`explainer`): the
learner's own :meth:`~medmeta.algorithms.MetaLearner.predictor` for the support set (for a
gradient-based learner, its query forward after adaptation with the checkpoint's ``norm_mode``; for
a prototype learner, its prototype logits). With ``--save-adapted``, or for a learner without a
predictor, they come from the learner's exported adapted model
(:meth:`~medmeta.algorithms.MetaLearner.adapted_network`: a standalone, non-transductive network,
saved as a MONAI bundle by :mod:`medmeta.bundle`). Any learner that offers either can be diagnosed.
A query image that is constant after the intensity window carries no information: it is still
predicted, with a warning on its row, in ``predictions.csv``/``.json`` and in the report. So is a query
of a kind (format family, grey or colour) the model was not trained on (:mod:`medmeta.data.image_kinds`;
nothing is known for a checkpoint without that record); a support case of such a kind is warned about
in the report.

Why this module is longer than 300 lines: it is one command's whole data flow (inputs, adaptation,
explanation, outputs), and its privacy and refusal rules are easiest to check read together.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from medmeta.adapted import exported_normalisation
from medmeta.algorithms import MetaLearner, Predictor
from medmeta.bundle import network_definition, save_bundle
from medmeta.checkpoints import load_trained
from medmeta.data.loading import transform_images
from medmeta.data.preflight import check_image, window_problem
from medmeta.data.presets import DEFAULT_WINDOW, Intensity
from medmeta.data.cohort import find_cases
from medmeta.data.episode_manifest import content_hash
from medmeta.data.formats import format_of
from medmeta.data.image_kinds import image_kind, kind_warning
from medmeta.data.records import ImageRecord, discover_records, file_key
from medmeta.errors import DataError
from medmeta.explain import grad_cam, image_png, overlay_png
from medmeta.module import FewShotModule
from medmeta.report import ReportRow, write_html_report

logger = logging.getLogger(__name__)

MIN_CASES, MAX_CASES = 2, 20  # labelled support cases per diagnosis
LOO_WARNING_BELOW = 0.5  # leave-one-out accuracy under which the support set is flagged
SAVED_TRANSDUCTIVE = (  # the report's and predictions.json's normalisation, --save-adapted with transductive batch norm
    "The saved network normalises with the support set's batch statistics, so these probabilities (and medmeta "
    "predict's) are the exported network's, which differ from those of the transductive setting (query-batch "
    "statistics) that meta-test accuracy measures"
)


@dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose`` wrote: the output folder, the report and the per-case predictions."""

    out: Path
    report: Path
    predictions: list[dict[str, object]]
    warnings: list[str]
    bundle: Path | None = None  # the adapted model as a MONAI bundle (``save_adapted``)


def diagnose(
    ckpt: Path, support: Path, queries: list[Path], out: Path, *, steps: int | None = None, save_adapted: Path | None = None
) -> Diagnosis:  # fmt: skip
    """Adapt the checkpoint's model to the diagnoses in ``support`` and predict and explain every query case.

    With ``save_adapted`` the adapted model is also saved there as a MONAI bundle
    (:mod:`medmeta.bundle`), and the probabilities reported are the saved network's.
    """
    out, save_adapted = Path(out).expanduser(), None if save_adapted is None else Path(save_adapted).expanduser()
    for folder, flag in ((out, "--out"), (save_adapted, "--save-adapted")):
        if folder is not None:
            _refuse_inside_inputs(folder, [Path(support), *map(Path, queries)], flag)
            if folder.exists() and any(folder.iterdir()):
                raise DataError(f"output folder {folder} exists and is not empty; choose a new {flag} (nothing is overwritten)")
    if save_adapted is not None and save_adapted.resolve() == out.resolve():
        raise DataError("--save-adapted and --out must be different folders")
    if steps is not None and steps < 1:
        raise DataError(f"--steps must be at least 1 (inner steps of adaptation to the support set), got {steps}")
    module, settings = load_checkpoint(Path(ckpt))
    if steps is not None and not module.algorithm.adapts_in_steps:
        raise DataError(f"{module.algorithm.label()} has no adaptation steps: leave --steps out")
    spatial_dims = int(settings["spatial_dims"])
    support_records, names = read_support(Path(support), spatial_dims)
    evaluation_steps = steps if steps is not None else module.algorithm.adaptation_steps()
    if len(names) != module.hparams.n_way and evaluation_steps == 0:
        raise DataError(f"{len(names)} diagnoses need a new head, fitted by adaptation, but the model adapts with 0 "
                        f"steps (eval_inner_steps: 0): every case would score the diagnoses alike; give --steps")  # fmt: skip
    query_records, warnings = read_queries([Path(q) for q in queries], spatial_dims)
    trained = getattr(module, "training_images", None)  # the kinds of images it was trained on; None: unknown
    warnings += [f"support case of {r.label} ({_file_id(r.path)}): {w}" for r in support_records
                 if (w := kind_warning(image_kind(r.path), trained))]  # fmt: skip
    support_x = transform_images(support_records, source=support, **_image_settings(settings))
    _refuse_constant_support(support_records, support_x, settings)
    query_x = transform_images(query_records, source="the query cases", **_image_settings(settings))
    support_y = torch.tensor([names.index(r.label) for r in support_records])
    algorithm = adapted_algorithm(module, len(names))
    exported = None  # the adapted model as a standalone network: saved, or the predictor of a learner without one
    if save_adapted is not None or not _offers(algorithm, "predictor"):
        exported = exported_network(algorithm, support_x, support_y, steps, ckpt, saving=save_adapted is not None)
    explained = explainer(algorithm, support_x, support_y, steps, network=exported)
    with torch.no_grad():  # the function Grad-CAM explains below is the one that predicts
        probs = explained(query_x).softmax(-1)
    if explained.resolution is not None and all(n == 1 for n in explained.resolution):
        shape = "x".join(map(str, explained.resolution))
        warnings.append("Grad-CAM has no spatial resolution at this image size: the maps are blank "
                        f"(the last feature map is {shape} at image_size {settings['image_size']})")  # fmt: skip
        logger.warning("%s", warnings[-1])
    if not bool(torch.isfinite(probs).all()):
        raise DataError(f"the model adapted to {support} gives NaN or infinite outputs (its adaptation diverged): "
                        "nothing was written; try fewer --steps, or check the support images")  # fmt: skip
    warnings += leave_one_out_warnings(algorithm, support_x, support_y, names, steps, query_x)
    counts = {name: int((support_y == k).sum()) for k, name in enumerate(names)}
    bundle = None if exported is None or save_adapted is None else save_bundle(
        save_adapted, exported, network_definition(exported, module.hparams["backbone"], settings), names,
        _image_settings(settings), _bundle_metadata(module, algorithm, exported, counts, steps, support_records),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir()
    (out / "overlays").mkdir()
    predicted = probs.argmax(-1)
    with torch.enable_grad():
        cams = grad_cam(explained, query_x, predicted, target_layer=explained.TARGET)
    constant = constant_images(query_x)
    shown = {content_hash(r.path): r.label for r in support_records}  # a query that is a support case is no test
    rows, predictions = [], []
    for i, record in enumerate(query_records):
        case_id = f"query-{i + 1:03d}"
        file_id = _file_id(record.path)
        case_warnings = [_constant_warning(settings, float(query_x[i].max()))] if constant[i] else []
        case_warnings += [w for w in [kind_warning(image_kind(record.path), trained)] if w]
        if (digest := content_hash(record.path)) in shown:
            case_warnings.append(f"the same image as a support case of {shown[digest]} (identical file contents): "
                                 "its prediction repeats what the model was shown, it is no test of it")  # fmt: skip
        warnings += [f"{case_id} ({file_id}): {w}" for w in case_warnings]
        image = image_png(query_x[i], out / "images" / f"{case_id}.png", scale=_scale(query_x))
        overlay = overlay_png(query_x[i], cams[i], out / "overlays" / f"{case_id}.png", scale=_scale(query_x))
        probabilities = {name: float(probs[i, k]) for k, name in enumerate(names)}
        predictions.append({"case": case_id, "file_sha256_12": file_id, "predicted": names[int(predicted[i])],
                            "probabilities": probabilities, "warnings": case_warnings})  # fmt: skip
        rows.append(ReportRow(f"{case_id} ({file_id})", image, overlay, names[int(predicted[i])], probabilities,
                              tuple(case_warnings)))  # fmt: skip
    header = {
        "model": f"{Path(ckpt).name} ({algorithm.label()}, {type(algorithm.model).__name__} backbone)",
        "support set": ", ".join(f"{name}: {n}" for name, n in counts.items()),
        "query cases": str(len(query_records)),
        "adaptation": algorithm.adaptation_text(steps),
        "normalisation": _normalisation(module) if exported is None else exported_normalisation(exported)
        + ("; the saved model's" if bundle else "; the exported adapted model's")
        + (f". {SAVED_TRANSDUCTIVE}" if bundle and module.normalisation_label().startswith("transductive") else ""),
        "saliency": saliency_text(algorithm),
    }
    _write_predictions(out, predictions, names, header["normalisation"])
    report = write_html_report(out / "report.html", title="medmeta diagnose", header=header, rows=rows, warnings=warnings)
    (out / "warnings.txt").write_text("".join(f"{w}\n" for w in warnings))
    return Diagnosis(out, report, predictions, warnings, bundle)


def load_checkpoint(ckpt: Path) -> tuple[FewShotModule, dict[str, object]]:
    """The meta-trained module (weights only, CPU) and the image settings it was trained with."""
    module, settings = load_trained(ckpt)
    if not (_offers(module.algorithm, "predictor") or _offers(module.algorithm, "adapted_network")):
        raise DataError(
            f"diagnose cannot adapt and explain {module.algorithm.label()} (checkpoint {ckpt}): the learner offers "
            "neither a predictor (MetaLearner.predictor) nor an adapted model (MetaLearner.adapted_network)"
        )
    settings.setdefault("window", DEFAULT_WINDOW)
    for key in ("image_size", "in_channels", "spatial_dims"):
        settings[key] = module.hparams[key]
    return module, settings


def read_support(folder: Path, spatial_dims: int) -> tuple[list[ImageRecord], list[str]]:
    """Support records (preflighted) and the sorted diagnosis names; a clear error if the set is unusable."""
    records, skipped = discover_records(folder, spatial_dims=spatial_dims)
    problems = [f"{s.path}: {s.reason}" for s in skipped]
    problems += [f"{p.path}: {p.reason} ({p.detail})" for r in records if (p := check_image(r.path, spatial_dims=spatial_dims))]
    if problems:
        raise DataError(f"support set {folder} has unusable files (fix or remove them):\n  " + "\n  ".join(problems))
    names = sorted({r.label for r in records})
    counts = {name: sum(r.label == name for r in records) for name in names}
    wrong = {name: n for name, n in counts.items() if not MIN_CASES <= n <= MAX_CASES}
    if len(names) < 2 or wrong:
        raise DataError(
            f"support set {folder} needs at least 2 diagnosis sub-folders with {MIN_CASES} to {MAX_CASES} cases each; "
            f"found {counts}"
        )
    return records, names


def read_queries(paths: list[Path], spatial_dims: int) -> tuple[list[ImageRecord], list[str]]:
    """Query records from files and folders; unusable files are left out with a warning naming the reason.

    A folder is searched as ``medmeta predict`` searches one (:func:`medmeta.data.cohort.find_cases`):
    recursively, links followed, hidden files and folders left out (counted in the log), and in 3D a
    folder of DICOM slices is one series, one query case. A file reached twice is one case.
    """
    files: list[Path] = []
    hidden = 0
    for path in paths:
        if path.is_dir():
            found, left_out = _folder_queries(path, spatial_dims)
            files, hidden = files + found, hidden + left_out
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"query {path} does not exist")
    if hidden:
        logger.info("left out %d hidden query file(s) (a name starting with '.', or in such a folder), "
                    "as medmeta predict does", hidden)  # fmt: skip
    seen: set[tuple[int, int] | Path] = set()  # a file given twice (two inputs, a link) is one case
    unique: list[Path] = []
    for path in files:
        if file_key(path) not in seen:
            seen.add(file_key(path))
            unique.append(path)
    if len(unique) < len(files):
        logger.info("%d query file(s) given twice are used once", len(files) - len(unique))
    files = unique
    warnings, records = [], []
    for number, path in enumerate(files, start=1):
        problem = check_image(path, spatial_dims=spatial_dims)
        if problem is None:
            records.append(ImageRecord(path, "?", "?"))
        else:  # the report names it by position and content hash, not by file name
            warnings.append(f"query file {number} ({_file_id(path)}) left out: {problem.reason} ({problem.detail})")
            logger.warning("%s", warnings[-1])  # by position and content hash: a file name may hold a patient id
    if not records:
        also = f" ({hidden} hidden file(s) left out)" if hidden else ""
        raise DataError(f"no usable query images in {', '.join(map(str, paths))}{also}")
    return records, warnings


def _folder_queries(folder: Path, spatial_dims: int) -> tuple[list[Path], int]:
    """The query cases under ``folder`` (3D: a DICOM series folder is one), sorted, and the hidden files left out."""
    hidden = sum(1 for p in folder.rglob("*") if format_of(p) is not None and p.is_file()
                 and any(part.startswith(".") for part in p.relative_to(folder).parts))  # fmt: skip
    walk = [logging.getLogger(name) for name in ("medmeta.data.records", "medmeta.data.cohort")]
    levels = [log.level for log in walk]
    for log in walk:  # the walk's INFO lines name the paths it skips: a query's name may hold a patient id
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        return [case.path for case in find_cases([folder], spatial_dims)], hidden
    except DataError:  # the only refusal for one folder: it holds no image file (other query inputs may)
        return [], hidden
    finally:
        for log, level in zip(walk, levels):
            log.setLevel(level)


def adapted_algorithm(module: FewShotModule, n_classes: int) -> MetaLearner:
    """A copy of the module's learner, resized (``MetaLearner.resize_head``) when ``n_classes`` differs from training.

    The default resize gives a zero-initialised head, which scores every class alike before
    adaptation, so no class is favoured by the order of the folders.
    """
    algorithm = copy.deepcopy(module.algorithm)
    if n_classes != module.hparams.n_way:
        algorithm.resize_head(n_classes)
    return algorithm


def leave_one_out_warnings(
    algorithm: MetaLearner, support_x: Tensor, support_y: Tensor, names: list[str], steps: int | None, query_x: Tensor
) -> list[str]:  # fmt: skip
    """Adapt on all support cases but one and predict it, for each; warn when the support set does not separate.

    The left-out case is predicted in one batch with the query cases, as the queries themselves are
    (transductive batch norm would otherwise see a batch of one image).
    """
    correct = torch.zeros(len(support_y), dtype=torch.bool)
    for i in range(len(support_y)):
        keep = torch.arange(len(support_y)) != i
        batch = torch.cat([support_x[i : i + 1], query_x])
        with torch.enable_grad():
            logits = algorithm.adapt_and_predict(support_x[keep][None], support_y[keep][None], batch[None], steps=steps)
        correct[i] = bool(logits[0, 0].argmax() == support_y[i])
    accuracy = float(correct.float().mean())
    recalls = {name: float(correct[support_y == k].float().mean()) for k, name in enumerate(names)}
    warnings = []
    if accuracy < LOO_WARNING_BELOW or min(recalls.values()) == 0.0:
        never = [name for name, r in recalls.items() if r == 0.0]
        warnings.append(
            f"leave-one-out check: adapting on all support cases but one predicted the left-out case correctly for "
            f"{100 * accuracy:.0f}% of them (chance {100 / len(names):.0f}%)"
            + (f"; never for {', '.join(never)}" if never else "")
            + ". The support set may not separate these diagnoses: add cases or check the labels."
        )
    return warnings


class _Explained(nn.Module):
    """The function that predicts the query cases, as a module of the query images (for Grad-CAM).

    Grad-CAM's target is ``tap``, an identity through which the query rows of the backbone's
    last spatial activation (``target``: after its last convolution) pass exactly once per forward:
    the last rows of the predictor's last backbone call. A forward that also runs support images
    through the backbone (a prototype learner) thus never mixes their activations or gradients into the query
    maps. ``forward`` refuses to return logits when the target did not run as the predictor said,
    rather than explain the wrong activations.
    """

    TARGET = "tap"

    def __init__(self, model: nn.Module, predictor: Predictor, target: str) -> None:
        super().__init__()
        self.model, self.tap, self.target, self.predictor = model, nn.Identity(), target, predictor
        self.resolution: tuple[int, ...] | None = None  # the target's spatial shape, known after a forward

    def forward(self, x: Tensor) -> Tensor:
        with self._tapped(x.shape[0], calls=self.predictor.backbone_calls):
            return self.predictor.forward(x)

    @contextmanager
    def _tapped(self, batch: int, calls: int) -> Iterator[None]:
        """Route the last ``batch`` rows of call number ``calls`` of the target layer through ``tap``."""
        seen: list[int] = []

        def route(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            seen.append(output.shape[0])
            if len(seen) != calls:
                return None
            self.resolution = tuple(output.shape[2:])
            return torch.cat([output[: output.shape[0] - batch], self.tap(output[output.shape[0] - batch :])])

        handle = dict(self.model.named_modules())[self.target].register_forward_hook(route)
        try:
            yield
        finally:
            handle.remove()
        if len(seen) != calls or seen[-1] < batch:
            raise RuntimeError(f"Grad-CAM target {self.target!r} ran {len(seen)} times ({seen} rows), expected {calls}")


def explainer(
    algorithm: MetaLearner, support_x: Tensor, support_y: Tensor, steps: int | None, *, network: nn.Module | None = None
) -> _Explained:  # fmt: skip
    """The adapted model's query logits as a module of the query images, in eval mode.

    Its output is the learner's ``adapt_and_predict`` on the same support and query batch (the
    same adaptation, query forward, batch-norm mode, distance and temperature); ``diagnose``
    predicts with it and Grad-CAM differentiates it at the module named ``_Explained.TARGET``.
    Given the exported ``network`` (``--save-adapted``) it is that network's logits instead.
    """
    if network is not None:
        calls = getattr(network, "backbone_calls", 1)  # an AdaptedClassifier averaging over flips runs it once per flip
        return _Explained(network, Predictor(network, backbone_calls=calls), _target_layer(network, support_x)).eval()
    predictor = algorithm.predictor(support_x, support_y, steps=steps)
    if predictor is None:
        raise DataError(f"diagnose cannot explain {algorithm.label()}: the learner offers no predictor")
    return _Explained(algorithm.model, predictor, _target_layer(algorithm.model, support_x)).eval()


def _target_layer(model: nn.Module, example: Tensor) -> str:
    """The backbone's last feature map: the last module to finish at its last convolution's resolution.

    Found by running ``example[:2]`` through a copy of ``model`` (its weights and buffers untouched),
    in the order modules finish, not the order they are registered: after a residual block's last
    convolution that is the block (or its stage), whose output includes the skip path, then any
    activation after it, never a pooled map. A module must run as often as that convolution (a
    ReLU reused inside a block does not), so Grad-CAM's tap counts its calls right.
    """
    finished: list[tuple[str, torch.Size]] = []
    probe = copy.deepcopy(model).eval()
    for name, module in probe.named_modules():
        if name:
            module.register_forward_hook(lambda _m, _i, out, name=name: finished.append((name, out.shape))
                                         if isinstance(out, Tensor) else None)  # fmt: skip
    with torch.no_grad():
        probe(example[:2])  # two images: a transductive batch norm needs more than one value per channel
    modules = dict(probe.named_modules())
    convs = [i for i, (name, _) in enumerate(finished) if isinstance(modules[name], (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise DataError("the backbone has no convolution to explain with Grad-CAM")
    conv, shape = finished[convs[-1]]
    calls = Counter(name for name, _ in finished)
    pooling = "torch.nn.modules.pooling"  # a pool can keep a 1x1 map's shape, but it is no longer a feature map
    same = [name for name, out in finished[convs[-1]:] if out[2:] == shape[2:] and len(out) == len(shape)
            and calls[name] == calls[conv] and type(modules[name]).__module__ != pooling]  # fmt: skip
    return same[-1]


def saliency_text(algorithm: MetaLearner) -> str:
    """The report's saliency line: what Grad-CAM shows, and what it leaves out when the head sees every stage."""
    text = "Grad-CAM (MONAI) of the function that gave the probabilities, for the predicted class"
    if "all" in (getattr(algorithm.model, "feature_levels", "last"), getattr(algorithm, "feature_levels", "last")):
        text += ("; at the last convolution only: the head also sees each earlier stage's per-channel mean and standard "
                 "deviation (feature_levels: all), whose part in the prediction the map does not show")  # fmt: skip
    return text


def constant_images(images: Tensor) -> list[bool]:
    """Per image (after the window): whether it became one constant (preflight's ``window_problem``)."""
    return [window_problem(image) is not None for image in images]


def _constant_warning(settings: dict[str, object], value: float) -> str:
    return (
        f"the image is constant after the intensity {_window_label(settings)} (every pixel {value:.2f}): "
        "its prediction carries no information; check that it was acquired like the training data"
    )


def _window_label(settings: dict[str, object]) -> str:
    return Intensity(preset=settings.get("preset"), window=settings.get("window")).describe()


def _refuse_constant_support(records: list[ImageRecord], images: Tensor, settings: dict[str, object]) -> None:
    """A labelled support case that is constant after the window would teach nothing: name it and stop."""
    window = _window_label(settings)
    bad = [f"{r.path}: constant after the intensity {window}" for r, c in zip(records, constant_images(images)) if c]
    if bad:
        raise DataError("support set has cases without contrast (fix or remove them):\n  " + "\n  ".join(bad))


def _image_settings(settings: dict[str, object]) -> dict[str, object]:
    window = settings.get("window")
    return {
        "image_size": int(settings["image_size"]), "window": tuple(window) if window is not None else None,
        "preset": settings.get("preset"), "spatial_dims": int(settings["spatial_dims"]),
        "in_channels": int(settings["in_channels"]), "spacing": settings.get("spacing"), "roi_size": settings.get("roi_size"),
    }  # fmt: skip


def exported_network(
    algorithm: MetaLearner, support_x: Tensor, support_y: Tensor, steps: int | None, ckpt: Path, *, saving: bool = True
) -> nn.Module:  # fmt: skip
    """The learner's adapted model as a standalone classifier (:meth:`MetaLearner.adapted_network`), or a clear refusal."""
    try:
        with torch.enable_grad():
            return algorithm.adapted_network(support_x, support_y, steps=steps)
    except NotImplementedError as error:
        raise DataError(f"{'--save-adapted' if saving else 'diagnose'}: {error} (checkpoint {Path(ckpt).name})") from None


def _offers(algorithm: MetaLearner, hook: str) -> bool:
    """Whether the learner overrides the optional hook ``hook`` of :class:`MetaLearner`."""
    return getattr(type(algorithm), hook) is not getattr(MetaLearner, hook)


def _bundle_metadata(
    module: FewShotModule, algorithm: MetaLearner, network: nn.Module, counts: dict[str, int], steps: int | None,
    support: list[ImageRecord],
) -> dict[str, object]:  # fmt: skip
    """What ``metadata.json`` says about the adaptation besides the class names and image settings (no names of files).

    ``support_sha256``: the support cases' content hashes (``episode_manifest.content_hash``, as the
    check of a query against the support set uses), so that ``medmeta predict`` can flag a support case.
    """
    return {
        "algorithm": algorithm.label(), "backbone": type(algorithm.model).__name__,
        "adaptation": algorithm.adaptation_text(steps), "norm_mode": module.hparams["norm_mode"],
        "normalisation": exported_normalisation(network), "support_counts": counts, "n_way_trained": int(module.hparams["n_way"]),
        **({"training_images": kinds} if (kinds := getattr(module, "training_images", None)) else {}),
        "support_sha256": sorted({content_hash(r.path) for r in support}),
    }  # fmt: skip


def _normalisation(module: FewShotModule) -> str:
    label = module.normalisation_label()
    if label.startswith("transductive"):  # not "running (... non-transductive)"
        label += "; here the query cases are normalised together as one batch"
    return label


def _scale(images: Tensor) -> int:
    """An integer upscaling so that small images are at least 192 pixels wide in the report."""
    return max(1, 192 // images.shape[-1])


def _file_id(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of the file's bytes (a folder: of its sorted files)."""
    digest = hashlib.sha256()
    for part in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if part.is_file():
            digest.update(part.read_bytes())
    return digest.hexdigest()[:12]


def _write_predictions(out: Path, predictions: list[dict[str, object]], names: list[str], normalisation: str) -> None:
    body = {"classes": names, "normalisation": normalisation, "cases": predictions}
    (out / "predictions.json").write_text(json.dumps(body, indent=2) + "\n")
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("case", "file_sha256_12", "predicted", *(f"p({name})" for name in names), "warnings"))
        for p in predictions:
            probabilities = (f"{p['probabilities'][n]:.6f}" for n in names)
            writer.writerow((p["case"], p["file_sha256_12"], p["predicted"], *probabilities, "; ".join(p["warnings"])))


def _refuse_inside_inputs(out: Path, inputs: list[Path], flag: str = "--out") -> None:
    """Nothing is ever written into a user's data folder: the support folder, a query folder, a query file's folder.

    ``out`` may be none of them nor any folder below one of them (links resolved); it may not be
    an existing file either.
    """
    resolved = out.resolve()
    for path in inputs:
        folder = path.resolve() if path.is_dir() else path.resolve().parent
        if resolved == folder or folder in resolved.parents:
            raise DataError(f"output folder {out} is inside the input folder {folder}; choose {flag} elsewhere")
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is an existing file; choose a new {flag}")
