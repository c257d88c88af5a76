"""``medmeta diagnose`` on generated cases: every output, sane probabilities, overlays, privacy, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import medmeta.diagnose
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.loading import transform_images
from medmeta.diagnose import (_image_settings, adapted_algorithm, diagnose, load_checkpoint, read_queries, read_support,
                              saliency_text)
from medmeta.errors import DataError
from tests.conftest import module_for
from tests.test_report import _chromium, _chromium_exe

# every algorithm diagnose accepts, in each batch-norm mode, and ProtoNet with both distances
VARIANTS = [
    (algorithm, norm_mode, distance)
    for algorithm in ("maml", "maml_pp", "meta_sgd", "anil", "proto_maml", "protonet")
    for norm_mode in ("transductive", "running")
    for distance in (("squared_euclidean", "cosine") if algorithm == "protonet" else ("squared_euclidean",))
]


def _cases(root: Path, tmp_path: Path, classes: int, per_class: int = 3) -> tuple[Path, Path]:
    """A support folder (``per_class`` cases of ``classes`` diagnoses, patients 0-2) and a query folder (patient 3)."""
    support, queries = tmp_path / "support", tmp_path / "queries"
    for name in sorted(p.name for p in root.iterdir() if p.is_dir())[:classes]:
        files = sorted((root / name).glob("*.dcm"))
        (support / name).mkdir(parents=True)
        for f in [f for f in files if not f.name.startswith("patient003")][:per_class]:
            shutil.copy(f, support / name / f.name)
        queries.mkdir(exist_ok=True)
        for f in [f for f in files if f.name.startswith("patient003")][:2]:
            shutil.copy(f, queries / f"{name}-{f.name}")
    return support, queries


@pytest.mark.parametrize("classes", [2, 3])  # 2: a new head (training had 3); 3: the meta-learned head
def test_diagnose_writes_every_output(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, classes: int) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, classes)
    (queries / "broken.dcm").write_bytes(b"DICM" + bytes(range(200)))  # left out with a reason
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    out = result.out
    for name in ("report.html", "predictions.csv", "predictions.json", "warnings.txt"):
        assert (out / name).is_file(), name
    body = json.loads((out / "predictions.json").read_text())
    assert len(body["classes"]) == classes and len(body["cases"]) == 2 * classes
    for case in body["cases"]:
        assert abs(sum(case["probabilities"].values()) - 1.0) < 1e-5
        assert case["predicted"] == max(case["probabilities"], key=case["probabilities"].get)
        with Image.open(out / "images" / f"{case['case']}.png") as image, Image.open(out / "overlays" / f"{case['case']}.png") as overlay:
            assert image.size == overlay.size and image.size[0] % 16 == 0  # the 16x16 input, scaled by a whole factor
    assert any("left out" in w and "unreadable" in w for w in result.warnings)
    csv_rows = (out / "predictions.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * classes
    everything = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in (".html", ".csv", ".json", ".txt"))
    assert "patient" not in everything and str(tiny_dicom_root) not in everything and str(tmp_path) not in everything


def test_report_renders_every_query_row_in_headless_chromium(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    exe = _chromium_exe()
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    url = result.report.resolve().as_uri()
    dom = _chromium(exe, "--dump-dom", url, user_data=tmp_path / "profile-dom").stdout
    assert len(re.findall(r'<tr class="case-row"', dom)) == len(result.predictions) == 4
    shot = tmp_path / "shot.png"
    _chromium(exe, f"--screenshot={shot}", "--window-size=1200,1400", url, user_data=tmp_path / "profile-shot")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 100.0 and (pixels < 250).any(axis=-1).mean() > 0.05


def test_unseparable_support_set_gets_a_leave_one_out_warning(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    first, second = sorted(support.iterdir())
    for f in second.iterdir():  # the second diagnosis gets the first one's images: nothing separates them
        f.unlink()
    for f in first.iterdir():
        shutil.copy(f, second / f.name)
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    assert any("leave-one-out" in w for w in result.warnings)
    assert "leave-one-out" in (result.out / "report.html").read_text()


def test_bad_inputs_are_clear_errors_and_nothing_is_written_into_the_data(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path) -> None:
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    before = sorted(p.name for p in support.rglob("*"))
    with pytest.raises(DataError, match="inside the input folder"):
        diagnose(trained_checkpoint, support, [queries], support / "out")
    assert sorted(p.name for p in support.rglob("*")) == before
    lonely = tmp_path / "lonely"
    shutil.copytree(support, lonely)
    for f in sorted(next(lonely.iterdir()).iterdir())[1:]:
        f.unlink()
    with pytest.raises(DataError, match="2 to 20 cases each"):
        diagnose(trained_checkpoint, lonely, [queries], tmp_path / "out1")
    with pytest.raises(DataError, match="cannot load checkpoint"):
        (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
        diagnose(tmp_path / "junk.ckpt", support, [queries], tmp_path / "out2")
    # through the command: a message naming the problem, exit code 2, no traceback
    command = [sys.executable, "-m", "medmeta.cli", "diagnose", "--ckpt", str(trained_checkpoint), "--support", str(lonely),
               "--query", str(queries), "--out", str(tmp_path / "out3")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "2 to 20 cases each" in done.stdout and "Traceback" not in done.stdout + done.stderr


def test_evaluate_command_draws_then_replays_the_same_episodes(trained_checkpoint: Path, tmp_path: Path) -> None:
    """``medmeta evaluate`` on the checkpoint's own data settings, then with ``--episodes``: identical per-episode rows."""

    def evaluate(out: Path, *extra: str) -> Path:
        command = [sys.executable, "-m", "medmeta.cli", "evaluate", "--ckpt", str(trained_checkpoint), "--out", str(out), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "macro AUROC" in done.stdout
        return next(out.rglob("per_episode.csv")).parent

    first = evaluate(tmp_path / "a", "--test-episodes", "5")
    replayed = evaluate(tmp_path / "b", "--episodes", str(first / "test_episodes.json"))
    assert (first / "per_episode.csv").read_text() == (replayed / "per_episode.csv").read_text()
    assert len((first / "per_episode.csv").read_text().splitlines()) == 6


@pytest.fixture(scope="module")
def checkpoint_for(tiny_dicom_root: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """``(algorithm, norm_mode, distance) -> checkpoint``: a 3-way model meta-trained for 2 steps (under a second each)."""
    cache: dict[tuple[str, str, str], Path] = {}
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=1, q_query=2, meta_batch_size=2, image_size=16,
                              val_episodes=2, test_episodes=2, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    # one data module for every fit: its preflight runs once

    def build(algorithm: str, norm_mode: str, distance: str) -> Path:
        key = (algorithm, norm_mode, distance)
        if key not in cache:
            torch.manual_seed(0)
            out = tmp_path_factory.mktemp(f"fit-{algorithm}-{norm_mode}-{distance}")
            if algorithm == "protonet":
                settings = {"distance": distance, **({"temperature": 0.1} if distance == "cosine" else {})}
            else:
                settings = {"inner_steps": 1, "eval_inner_steps": 2}
            module = module_for(algorithm, norm_mode=norm_mode, n_way=3, image_size=16, hidden_channels=8,
                                pixel_baseline=False, **settings)  # fmt: skip
            trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, inference_mode=False,
                                default_root_dir=out)  # fmt: skip
            trainer.fit(module, datamodule=data)
            cache[key] = out / "model.ckpt"
            trainer.save_checkpoint(cache[key])
        return cache[key]

    return build


@pytest.mark.parametrize(("algorithm", "norm_mode", "distance"), VARIANTS)
def test_grad_cam_explains_the_logits_that_were_predicted(
    checkpoint_for, tiny_dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
    algorithm: str, norm_mode: str, distance: str,
) -> None:  # fmt: skip
    """For every accepted algorithm: the logits Grad-CAM differentiates are the algorithm's own prediction.

    That prediction is ``adapt_and_predict`` (what ``evaluate`` measures) on the same support and
    query batch, with the checkpoint's batch-norm mode, distance and temperature; the probabilities
    diagnose reports are their softmax. Two diagnoses and a 3-way checkpoint: a new head is adapted.
    """
    ckpt = checkpoint_for(algorithm, norm_mode, distance)
    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    differentiated: list[torch.Tensor] = []
    real_grad_cam = medmeta.diagnose.grad_cam

    def recording_grad_cam(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        handle = model.register_forward_hook(lambda _m, _i, output: differentiated.append(output.detach().clone()))
        try:
            return real_grad_cam(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(medmeta.diagnose, "grad_cam", recording_grad_cam)
    result = diagnose(ckpt, support, [queries], tmp_path / "out")

    module, settings = load_checkpoint(ckpt)
    support_records, names = read_support(support, 2)
    query_records, _ = read_queries([queries], 2)
    support_x = transform_images(support_records, source=support, **_image_settings(settings))
    query_x = transform_images(query_records, source="queries", **_image_settings(settings))
    support_y = torch.tensor([names.index(r.label) for r in support_records])
    with torch.enable_grad():
        predicted = adapted_algorithm(module, len(names)).adapt_and_predict(support_x[None], support_y[None], query_x[None])[0]
    assert differentiated, "Grad-CAM ran no forward"
    for logits in differentiated:
        torch.testing.assert_close(logits, predicted, atol=1e-6, rtol=0.0)
    reported = torch.tensor([[case["probabilities"][name] for name in names] for case in result.predictions])
    torch.testing.assert_close(reported, predicted.softmax(-1), atol=1e-6, rtol=0.0)
    body = json.loads((result.out / "predictions.json").read_text())
    assert [c["predicted"] for c in body["cases"]] == [names[k] for k in predicted.argmax(-1).tolist()]
    for case in body["cases"]:
        with Image.open(result.out / "overlays" / f"{case['case']}.png") as overlay:
            assert overlay.size[0] % 16 == 0
    html = result.report.read_text()
    assert ("running" if norm_mode == "running" else "transductive") in html
    if algorithm == "protonet":
        assert f"{distance.replace('_', ' ')} distance, temperature {0.1 if distance == 'cosine' else 1:g}" in html


def test_out_inside_the_folder_of_a_query_file_is_refused_and_nothing_is_written(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    support, _ = _cases(tiny_dicom_root, tmp_path, 2)
    folder = tmp_path / "x"
    folder.mkdir()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(folder / "case.png")
    nested = tmp_path / "nested" / "deeper"
    nested.mkdir(parents=True)
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(nested / "case.png")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for query, out in [
        (folder / "case.png", folder / "out"),  # a sub-folder of the query file's folder
        (folder / "case.png", folder / "out" / "deeper"),
        (folder / "case.png", folder),  # the query file's folder itself
        (folder / "case.png", folder / "case.png"),  # the query file itself
        (nested / "case.png", nested / ".." / "deeper" / "out"),  # the same folder, spelled another way
        (folder, folder / "out"),  # a query folder
        (folder / "case.png", support / "out"),  # the support folder
        (folder / "case.png", support / next(iter(sorted(p.name for p in support.iterdir()))) / "out"),
    ]:
        with pytest.raises(DataError, match="inside the input folder"):
            diagnose(trained_checkpoint, support, [query], out)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before, out
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    with pytest.raises(DataError, match="inside the input folder"):
        diagnose(trained_checkpoint, support, [folder / "case.png"], link / "out")
    assert not (folder / "out").exists()


def _sixteen_bit_png(path: Path) -> Path:
    """A 16-bit grey PNG of values 1000..4071: above the default CT window, so it windows to one constant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 3 + 1000).astype(np.uint16)).save(path)
    return path


def test_a_query_that_is_constant_after_the_window_is_flagged_in_every_output(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    _sixteen_bit_png(queries / "zz-sixteen-bit.png")  # sorted last: query-005
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    body = json.loads((result.out / "predictions.json").read_text())
    flagged = {c["case"] for c in body["cases"] if any("constant after the intensity window" in w for w in c["warnings"])}
    assert flagged == {"query-005"} and len(body["cases"]) == 5
    assert any(w.startswith("query-005 (") and "constant after the intensity window" in w for w in result.warnings)
    rows = {row.split(",")[0]: row for row in (result.out / "predictions.csv").read_text().splitlines()}
    assert rows["case"].endswith(",warnings")
    assert "constant after the intensity window" in rows["query-005"]
    assert all("constant" not in rows[f"query-00{i}"] for i in range(1, 5))
    html_rows = result.report.read_text().split('<tr class="case-row"')[1:]
    assert [("case-warning" in row) for row in html_rows] == [False] * 4 + [True]
    assert "constant after the intensity window" in (result.out / "warnings.txt").read_text()


def test_a_query_that_is_a_support_case_is_flagged_and_bad_steps_are_refused(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    first_class = sorted(p for p in support.iterdir())[0]
    shutil.copy(sorted(first_class.iterdir())[0], queries / "zz-copy.dcm")  # sorted last: query-005
    result = diagnose(trained_checkpoint, support, [queries, sorted(first_class.iterdir())[1]], tmp_path / "out")
    body = json.loads((result.out / "predictions.json").read_text())
    repeated = {c["case"]: c["warnings"] for c in body["cases"] if any("same image as a support case" in w for w in c["warnings"])}
    assert sorted(repeated) == ["query-005", "query-006"] and len(body["cases"]) == 6
    assert all(f"a support case of {first_class.name} " in w[0] for w in repeated.values())
    assert sum("same image as a support case" in w for w in result.warnings) == 2
    assert "same image as a support case" in (result.out / "predictions.csv").read_text()
    for steps in (0, -1):
        with pytest.raises(DataError, match=f"--steps must be at least 1 .*got {steps}"):
            diagnose(trained_checkpoint, support, [queries], tmp_path / f"out{steps}", steps=steps)
    command = [sys.executable, "-m", "medmeta.cli", "diagnose", "--ckpt", str(trained_checkpoint), "--support", str(support),
               "--query", str(queries), "--out", str(tmp_path / "out-cli"), "--steps", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--steps must be at least 1" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr and not (tmp_path / "out-cli").exists()


def test_an_adaptation_that_diverges_writes_nothing(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    adapted = medmeta.diagnose.adapted_algorithm

    def diverging(module, n_classes):  # noqa: ANN001, ANN202 - an inner rate no adaptation survives
        algorithm = adapted(module, n_classes)
        algorithm.inner_lr = 1e30
        return algorithm

    monkeypatch.setattr(medmeta.diagnose, "adapted_algorithm", diverging)
    with pytest.raises(DataError, match="gives NaN or infinite outputs \\(its adaptation diverged\\)"):
        diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_support_case_that_is_constant_after_the_window_is_refused(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    flat = _sixteen_bit_png(next(p for p in sorted(support.iterdir())) / "flat.png")
    with pytest.raises(DataError, match="constant") as error:
        diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    assert str(flat) in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("learner", "settings", "caveat"),
    [("maml", {}, False), ("maml", {"feature_levels": "all"}, True),  # the backbone's every stage
     ("finetune", {"pretrain_classes": 4}, False), ("finetune", {"pretrain_classes": 4, "feature_levels": "all"}, True)],
)
def test_the_report_says_grad_cam_leaves_out_the_earlier_stages_a_head_sees(learner: str, settings: dict, caveat: bool) -> None:
    """Grad-CAM follows the last convolution; a head on every stage also sees what the map cannot show."""
    algorithm = module_for(learner, n_way=2, image_size=16, hidden_channels=4, pixel_baseline=False, **settings).algorithm
    text = saliency_text(algorithm)
    assert text.startswith("Grad-CAM (MONAI) of the function that gave the probabilities")
    assert ("at the last convolution only: the head also sees each earlier stage" in text) is caveat


def test_a_case_of_another_kind_than_the_training_images_is_flagged(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    """A colour and a grey PNG sent to a model trained on grey CT DICOM: predicted, with a warning; DICOM cases: none."""
    support, queries = _cases(tiny_dicom_root, tmp_path, 2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(queries / "zz-grey.png")  # query-005
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(queries / "zz-rgb.png")  # query-006
    second = sorted(support.iterdir())[1]
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "RGB").save(second / "photo.png")
    result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    body = json.loads((result.out / "predictions.json").read_text())
    kinds = {c["case"]: [w for w in c["warnings"] if "the model was trained on" in w] for c in body["cases"]}
    trained = "but the model was trained on grey DICOM images: its prediction may not mean anything"
    assert kinds == {**{f"query-00{i}": [] for i in range(1, 5)}, "query-005": [f"a grey PNG/JPEG image, {trained}"],
                     "query-006": [f"a colour PNG/JPEG image, {trained}"]}  # fmt: skip
    support_warnings = [w for w in result.warnings if w.startswith("support case")]
    assert len(support_warnings) == 1 and support_warnings[0].startswith(f"support case of {second.name} (")
    assert "a colour PNG/JPEG image, but the model was trained on grey DICOM images" in support_warnings[0]
    rows = {row.split(",")[0]: row for row in (result.out / "predictions.csv").read_text().splitlines()}
    assert "a colour PNG/JPEG image" in rows["query-006"] and "trained on" not in rows["query-001"]
    written = (result.out / "warnings.txt").read_text() + result.report.read_text()
    assert "query-005 (" in written and "photo" not in written and "zz-" not in written  # by case and hash, not name
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    del checkpoint["medmeta_training_images"]  # a checkpoint written before the record: nothing known, no warning
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = diagnose(tmp_path / "old.ckpt", support, [queries], tmp_path / "out-old")
    assert not any("the model was trained on" in w for w in old.warnings)


@pytest.mark.parametrize(("backbone", "target"), [
    ("conv4", "features.14"),  # the ReLU after the last convolution, before the last pool
    ("resnet12", "features.3.act"),  # the last block's activation after its residual addition, before its pool
    ("resnet18", "features.layer4"),  # the last stage's output, skip path included; not layer4.1.conv2 (registration order)
    ("monai.networks.nets.ResNet", "layer4"),
])  # fmt: skip
def test_grad_cam_target_is_the_last_feature_map_in_the_order_modules_run(backbone: str, target: str) -> None:
    """Grad-CAM explains the backbone's last feature map, found by running it, and the probe changes no weight or buffer."""
    from medmeta.diagnose import _target_layer
    from medmeta.networks.conv4 import Conv4
    from medmeta.networks.resnet import ResNet12, ResNet18

    torch.manual_seed(0)
    if backbone.startswith("monai"):
        from monai.networks.nets import ResNet

        model = ResNet("basic", [1, 1, 1, 1], [8, 16, 32, 64], spatial_dims=2, n_input_channels=1, num_classes=3)
    else:
        model = {"conv4": Conv4, "resnet12": ResNet12, "resnet18": ResNet18}[backbone](
            in_channels=1, image_size=64, n_way=3, **({} if backbone == "resnet18" else {"hidden_channels": 8}))
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert _target_layer(model, torch.randn(4, 1, 64, 64)) == target
    assert model.training and all(torch.equal(before[name], value) for name, value in model.state_dict().items())



def test_hidden_query_files_and_folders_are_left_out_and_counted(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # fmt: skip
    """As in discovery and ``medmeta predict``: a ``.x.dcm`` or ``.thumbnails/`` file is no query case, and under
    transductive batch norm it would otherwise change the visible case's probabilities."""
    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    visible, *others = sorted(queries.iterdir())
    for f in others:
        f.unlink()
    (queries / ".thumbnails").mkdir()
    shutil.copy(sorted(support.rglob("*.dcm"))[0], queries / ".x.dcm")
    shutil.copy(sorted(support.rglob("*.dcm"))[-1], queries / ".thumbnails" / "y.dcm")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(visible, alone / visible.name)
    with caplog.at_level("INFO"):
        result = diagnose(trained_checkpoint, support, [queries], tmp_path / "out")
    reference = diagnose(trained_checkpoint, support, [alone], tmp_path / "out-alone")
    assert [c["file_sha256_12"] for c in result.predictions] == [c["file_sha256_12"] for c in reference.predictions]
    got, expected = result.predictions[0]["probabilities"], reference.predictions[0]["probabilities"]
    assert len(result.predictions) == 1 and all(abs(got[k] - expected[k]) < 1e-6 for k in expected)
    assert "left out 2 hidden query file(s)" in caplog.text and "thumbnails" not in caplog.text  # a count, no name
    assert not any("Grad-CAM has no spatial resolution" in w for w in result.warnings)  # 16 px: a 2x2 map


def test_query_folders_keep_their_order_in_2d_and_a_dicom_series_is_one_case_in_3d(
    tiny_dicom_root: Path, tmp_path: Path
) -> None:  # fmt: skip
    """2D: every visible image file under a query folder, sorted by path as before (query-001 ... ids stay); 3D: a
    folder of DICOM slices, given itself or inside a query folder, is one query case, not slices refused as 2D."""
    from tests.data.test_readers import write_series

    flat = tmp_path / "flat"
    sources = sorted(tiny_dicom_root.rglob("*.dcm"))[:3]
    for source, name in zip(sources, ("b/1.dcm", "a.dcm", "b/c/0.dcm")):
        (flat / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, flat / name)
    records, warnings = read_queries([flat, sources[0]], 2)
    assert [r.path for r in records] == [flat / "a.dcm", flat / "b/1.dcm", flat / "b/c/0.dcm", sources[0]]
    assert not warnings
    volumes = tmp_path / "volumes"
    write_series(volumes / "case1" / "ct", n=4)
    write_series(volumes / "case2", n=4, seed=1)
    assert len(read_queries([volumes / "case1" / "ct"], 2)[0]) == 4  # 2D: slices, as before
    records, warnings = read_queries([volumes / "case1" / "ct"], 3)
    assert [r.path for r in records] == [volumes / "case1" / "ct"] and not warnings
    records, warnings = read_queries([volumes], 3)
    assert [r.path for r in records] == [volumes / "case1" / "ct", volumes / "case2"] and not warnings
    with pytest.raises(DataError, match="does not exist"):
        read_queries([tmp_path / "missing"], 3)


def test_steps_are_refused_for_a_learner_that_does_not_adapt_in_steps(
    checkpoint_for, tiny_dicom_root: Path, tmp_path: Path  # noqa: ANN001
) -> None:  # fmt: skip
    """ProtoNet and the logistic-regression probe have no steps: ``--steps`` is refused, not silently ignored."""
    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    ckpt = checkpoint_for("protonet", "transductive", "squared_euclidean")
    with pytest.raises(DataError, match=r"^protonet has no adaptation steps: leave --steps out$"):
        diagnose(ckpt, support, [queries], tmp_path / "o", steps=3)
    assert not (tmp_path / "o").exists()
    small = {"n_way": 2, "image_size": 16, "hidden_channels": 4, "pixel_baseline": False}
    settings = {"maml": {}, "anil": {}, "finetune": {"pretrain_classes": 4}, "logreg": {"pretrain_classes": 4},
                "protonet": {}, "mann": {}}
    learners = {name: module_for(name, **small, **extra).algorithm for name, extra in settings.items()}
    assert {name: learner.adapts_in_steps for name, learner in learners.items()} == {
        "maml": True, "anil": True, "finetune": True, "logreg": False, "protonet": False, "mann": False}


def _one_step_checkpoint(root: Path, out: Path, *, image_size: int, eval_inner_steps: int) -> Path:
    """A 3-way Conv-4 (4 channels) MAML meta-trained for one step on ``root``, saved as ``out/model.ckpt``."""
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=image_size, hidden_channels=4, inner_steps=1,
                        eval_inner_steps=eval_inner_steps, pixel_baseline=False)  # fmt: skip
    data = EpisodicDataModule(str(root), n_way=3, k_shot=1, q_query=1, meta_batch_size=1, image_size=image_size,
                              val_episodes=1, test_episodes=1, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, inference_mode=False, default_root_dir=out)  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(out / "model.ckpt")
    return out / "model.ckpt"


def test_grad_cam_without_spatial_resolution_is_said_in_the_report(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """A Conv-4 at 8 px has a 1x1 last feature map: its Grad-CAM maps are blank, and the report says so."""
    ckpt = _one_step_checkpoint(tiny_dicom_root, tmp_path, image_size=8, eval_inner_steps=1)
    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    result = diagnose(ckpt, support, [queries], tmp_path / "out")
    message = "Grad-CAM has no spatial resolution at this image size: the maps are blank (the last feature map is 1x1"
    assert sum(message in w for w in result.warnings) == 1
    assert message in result.report.read_text() and message in (result.out / "warnings.txt").read_text()


def test_a_new_head_with_zero_evaluation_steps_is_refused(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """A 3-way model evaluated with 0 steps, given 2 diagnoses: its new zero head would score both alike for every case."""
    ckpt = _one_step_checkpoint(tiny_dicom_root, tmp_path, image_size=16, eval_inner_steps=0)
    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    with pytest.raises(DataError, match=r"2 diagnoses need a new head.*0 steps.*give --steps"):
        diagnose(ckpt, support, [queries], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    three_support, three_queries = _cases(tiny_dicom_root, tmp_path / "three", 3, per_class=2)
    diagnose(ckpt, three_support, [three_queries], tmp_path / "o3")  # the trained head: 0 steps is fine
    assert (tmp_path / "o3" / "predictions.csv").is_file()


def test_the_normalisation_line_says_one_batch_only_when_queries_are_normalised_together() -> None:
    """``running`` mode's label says "non-transductive": diagnose must not read it as transductive."""
    from medmeta.diagnose import _normalisation

    small = {"n_way": 2, "image_size": 16, "hidden_channels": 4}
    assert "one batch" in _normalisation(module_for(**small))
    assert "one batch" not in _normalisation(module_for(norm_mode="running", **small))


def test_a_query_file_given_twice_is_one_case(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """A file given itself and inside a query folder, or through a link, is predicted once (not twice in the batch)."""
    folder = tmp_path / "queries"
    folder.mkdir()
    for source in sorted(tiny_dicom_root.rglob("*.dcm"))[:2]:
        shutil.copy(source, folder / source.name)
    first = sorted(folder.iterdir())[0]
    (tmp_path / "link.dcm").symlink_to(first)
    records, _ = read_queries([first, folder, tmp_path / "link.dcm"], 2)
    assert [r.path for r in records] == [first, sorted(folder.iterdir())[1]]


@pytest.mark.parametrize("norm_mode", ["transductive", "running"])
def test_save_adapted_with_transductive_batch_norm_says_its_probabilities_are_the_exported_networks(
    norm_mode: str, checkpoint_for, tiny_dicom_root: Path, tmp_path: Path  # noqa: ANN001
) -> None:  # fmt: skip
    """The saved network normalises with the support set's statistics, not the query batch's that meta-test measures."""
    import html

    from medmeta.diagnose import SAVED_TRANSDUCTIVE

    support, queries = _cases(tiny_dicom_root, tmp_path, 2, per_class=2)
    result = diagnose(checkpoint_for("maml", norm_mode, "squared_euclidean"), support, [queries], tmp_path / "out",
                      save_adapted=tmp_path / "model")  # fmt: skip
    normalisation = json.loads((result.out / "predictions.json").read_text())["normalisation"]
    assert normalisation.startswith("batch norm with fixed statistics") and "the saved model's" in normalisation
    said = "normalises with the support set's batch statistics, so these probabilities (and medmeta predict's)"
    report = html.unescape(result.report.read_text())
    assert (said in normalisation) == (norm_mode == "transductive") == (said in report)
    assert SAVED_TRANSDUCTIVE.count(".") == 0  # one sentence
    documented = " ".join((Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text().split())
    assert "for 23% of the queries (125 of 540)" in documented and "differ slightly" not in documented
