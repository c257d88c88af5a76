"""docs/extending.md, executed: its own learner, backbone, file format and metric, as the page shows them.

The page's learner is ``tests/extending_example.py`` (checked equal to the page's block, so page and
test cannot drift); it is trained, tested, evaluated and diagnosed through the real ``medmeta`` command by its
class path. The page's other files (``doc_files``) are written to a folder on ``PYTHONPATH`` and used
as the page says; its unnamed Python blocks are run as they are.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_cli import _medmeta, _medmeta_here
from tests.test_diagnose import _cases
from tests.test_docs import doc_files

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "extending.md").read_text()
FILES = doc_files(PAGE)
LEARNER = "tests.extending_example.CosineCentroids"


@pytest.fixture(scope="module")
def page_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's own files in a folder that is importable for the duration of the module."""
    folder = tmp_path_factory.mktemp("page_files")
    for name, body in FILES.items():
        (folder / name).write_text(body)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def _run_block(containing: str) -> dict[str, object]:
    """Run the page's one unnamed Python block containing ``containing``; its namespace."""
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```$", PAGE, flags=re.M | re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} Python blocks of docs/extending.md contain {containing!r}"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "docs/extending.md", "exec"), namespace)  # noqa: S102 - the page's own code
    return namespace


def test_the_page_defines_its_files_and_its_learner_is_the_example_file() -> None:
    assert set(FILES) == {"my_learners.py", "my_backbones.py", "my_backbone.yaml", "my_densenet.yaml", "numpy_format.py",
                          "my_metrics.py"}  # fmt: skip
    assert FILES["my_learners.py"] == (REPO / "tests" / "extending_example.py").read_text(), (
        "docs/extending.md's my_learners.py and tests/extending_example.py differ: edit both the same way"
    )


def test_own_learner_trains_tests_evaluates_and_diagnoses_through_the_cli(
    tiny_dicom_root: Path, tmp_path: Path, page_files: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(page_files)]))
    out = tmp_path / "run"
    fit = _medmeta(
        "fit", "--config", str(REPO / "configs" / "synthetic_2d.yaml"), "--data.root", str(tiny_dicom_root),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out), "--data.image_size", "16", "--data.val_episodes", "4",
        "--data.test_episodes", "6", "--data.n_way", "3", "--data.q_query", "2", "--data.split_ratios", "[0.5, 0.25, 0.25]",
        "--model.backbone.init_args.hidden_channels", "8",
        "--model.algorithm.class_path", LEARNER, "--model.algorithm.init_args.temperature", "0.05", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    checkpoint = next(line for line in fit.stdout.splitlines() if line.startswith("checkpoint: ")).split(": ", 1)[1].strip()
    metrics_file = Path(next(line for line in fit.stdout.splitlines() if line.startswith("metrics: ")).split(": ", 1)[1].strip())
    metrics = json.loads(metrics_file.read_text())
    assert metrics["algorithm"] == "CosineCentroids" and metrics["test_episodes"] == 6
    assert "adaptation_curve" not in metrics  # the learner has no per-step curve: the hook's default
    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["algorithm"] == {"class_path": LEARNER, "init_args": {"temperature": 0.05}}

    test = _medmeta("test", "--config", str(metrics_file.parent / "config.yaml"), "--ckpt_path", checkpoint,
                    "--trainer.callbacks+=medmeta.evaluation.callback.EvaluationReport",
                    "--trainer.callbacks.metrics", '{"brier": "my_metrics.brier"}', cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    tested = Path(next(line for line in test.stdout.splitlines() if line.startswith("metrics: ")).split(": ", 1)[1].strip())
    summary = json.loads(tested.read_text())
    assert summary["algorithm"] == "CosineCentroids"
    assert 0.0 <= summary["brier"] <= 2.0 and summary["brier_ci95"] >= 0.0  # the page's metric, by dotted path
    assert "brier" in (tested.parent / "per_episode.csv").read_text().splitlines()[0]

    status, printed = _medmeta_here("evaluate", checkpoint, "--test-episodes", "4", "--out", str(tmp_path / "evaluate"),
                                     cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 0, printed
    evaluated = json.loads(next((tmp_path / "evaluate").rglob("metrics.json")).read_text())
    assert evaluated["algorithm"] == "CosineCentroids" and evaluated["test_episodes"] == 4

    support, queries = _cases(tiny_dicom_root, tmp_path, classes=2)  # 2 diagnoses: the 3-way learner resizes
    diagnosed = _medmeta("diagnose", "--ckpt", checkpoint, "--support", str(support), "--query", str(queries),
                         "--out", str(tmp_path / "diagnosis"), cwd=tmp_path)  # fmt: skip
    assert diagnosed.returncode == 0, diagnosed.stdout[-3000:] + diagnosed.stderr[-3000:]
    predictions = json.loads((tmp_path / "diagnosis" / "predictions.json").read_text())
    assert len(predictions["classes"]) == 2 and len(predictions["cases"]) == 4
    assert "cosine class centroids (temperature 0.05)" in (tmp_path / "diagnosis" / "report.html").read_text()
    assert len(list((tmp_path / "diagnosis" / "overlays").glob("*.png"))) == 4  # Grad-CAM on the query call


def test_the_learner_predictor_gives_the_logits_of_adapt_and_predict() -> None:
    from medmeta import FewShotModule

    torch.manual_seed(0)
    module = FewShotModule(algorithm={"class_path": LEARNER, "init_args": {"temperature": 0.05}},
                           backbone={"class_path": "conv4", "init_args": {"hidden_channels": 8}}, n_way=3, image_size=16)  # fmt: skip
    support_x, support_y, query_x = torch.rand(2, 6, 1, 16, 16), torch.arange(3).repeat(2, 2), torch.rand(2, 9, 1, 16, 16)
    logits = module.algorithm.adapt_and_predict(support_x, support_y, query_x)
    predictor = module.algorithm.predictor(support_x[1], support_y[1])
    torch.testing.assert_close(predictor.forward(query_x[1]), logits[1])
    assert logits.shape == (2, 9, 3) and predictor.backbone_calls == 2


def test_own_backbone_and_a_monai_network_are_backbones(page_files: Path) -> None:
    from medmeta import FewShotModule

    torch.manual_seed(0)
    module = FewShotModule(algorithm=LEARNER, backbone={"class_path": "my_backbones.TinyConvNet", "init_args": {"width": 8}},
                           n_way=3, image_size=16)  # fmt: skip
    assert module.hparams["backbone"] == {"class_path": "my_backbones.TinyConvNet", "init_args": {"width": 8}}
    batch = {"support_x": torch.rand(2, 3, 1, 16, 16), "support_y": torch.arange(3).repeat(2, 1),
             "query_x": torch.rand(2, 6, 1, 16, 16), "query_y": torch.arange(3).repeat_interleave(2).repeat(2, 1)}  # fmt: skip
    loss, _ = module.algorithm.meta_loss(batch)
    loss.backward()
    assert module.model.features[0].weight.grad is not None
    module = _run_block("monai.networks.nets.DenseNet")["module"]  # the page's Python block, MAML on a MONAI DenseNet
    loss, logits = module.algorithm.meta_loss(batch)
    loss.backward()
    assert logits.shape == (2, 6, 3) and module.normalisation_label().startswith("instance norm")


def test_numpy_format_is_discovered_preflighted_and_loaded(page_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medmeta.data.formats as formats
    from medmeta.data.loading import transform_images
    from medmeta.data.preflight import check_image
    from medmeta.data.records import discover_records
    from numpy_format import NUMPY  # the page's file

    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, NUMPY))  # the page's one edit, in memory
    rng = np.random.default_rng(0)
    for name in ("cyst", "nodule"):
        (tmp_path / name).mkdir()
        for patient in range(2):
            np.save(tmp_path / name / f"patient{patient}.npy", rng.normal(size=(20, 24)).astype(np.float32))
    np.save(tmp_path / "cyst" / "pickled.npy", np.array([object()], dtype=object), allow_pickle=True)
    records, skipped = discover_records(tmp_path)
    assert len(records) == 5 and not skipped
    problems = {r.path.name: check_image(r.path) for r in records}
    assert problems["pickled.npy"].reason == "unreadable"
    usable = [r for r in records if problems[r.path.name] is None]
    images = transform_images(usable, source=tmp_path, image_size=16, window=None, preset=None, spatial_dims=2,
                              in_channels=1, spacing=None, roi_size=None)  # fmt: skip
    assert images.shape == (4, 1, 16, 16) and bool(torch.isfinite(images).all())


def test_metric_matches_a_hand_computation(page_files: Path) -> None:
    from my_metrics import brier  # the page's file

    probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.0, 1.0]]])
    labels = torch.tensor([[0, 0], [0, 1]])
    # episode 0: 0 and 0.25 + 0.25; episode 1: 1 + 1 and 0
    torch.testing.assert_close(brier(probs, labels), torch.tensor([0.25, 1.0]))
