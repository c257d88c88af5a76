"""``report.html`` of a test run: a real test through Lightning, the page checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.evaluation.html_report import EpisodeRow, render_test_report, worst_episodes
from medmeta.evaluation.metrics import summarise
from medmeta.report import DISCLAIMER
from tests.conftest import module_for
from tests.test_report import _chromium, _chromium_exe

TEST_EPISODES = 12  # more than the 10 worst episodes the report lists


@pytest.fixture(scope="module")
def test_run(trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a real ``trainer.test`` of the session's trained checkpoint (12 episodes, CSV logger)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report-run")
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1)
    data = EpisodicDataModule(str(tiny_dicom_root), n_way=3, k_shot=1, q_query=2, eval_batch_size=6, image_size=16,
                              test_episodes=TEST_EPISODES, split_ratios=(0.5, 0.25, 0.25))  # fmt: skip
    trainer = L.Trainer(logger=CSVLogger(out, name="run"), enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False, default_root_dir=out)  # fmt: skip
    trainer.test(module, datamodule=data, ckpt_path=str(trained_checkpoint), verbose=False, weights_only=True)
    return Path(trainer.log_dir)


def _per_episode(run: Path) -> list[dict[str, str]]:
    with (run / "per_episode.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_report_states_the_settings_results_and_worst_episodes(test_run: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    text = (test_run / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((test_run / "metrics.json").read_text())
    for setting in ("maml-second-order", "learner: eval_inner_steps</th><td>1",
                    "Conv4 (hidden_channels=8, norm=batch, feature_levels=last)", metrics["normalisation"], "3-way 1-shot, 2 queries per class", f"{TEST_EPISODES}, drawn (seed, split, index), seed 0",
                    "2D 16×16 px, 1 channel, window [-1100, 400]", "checkpoint</th><td>model.ckpt"):  # fmt: skip
        assert setting in text, setting
    accuracy = f"{100 * metrics['accuracy']:.1f}% ± {100 * metrics['accuracy_ci95']:.1f}%"
    assert f'<strong id="accuracy" data-value="{metrics["accuracy"]:.6f}">{accuracy}</strong>' in text
    assert f"{metrics['macro_auroc']:.3f} ± {metrics['macro_auroc_ci95']:.3f}" in text
    assert re.findall(r'data-metric="(\w+)"', text) == ["balanced_accuracy", "macro_auroc", "ece", "pixel_nn_accuracy", "adaptation_curve"]
    assert re.findall(r'class="class-row" data-class="([^"]+)"', text) == sorted(metrics["per_class"])
    rows = sorted(_per_episode(test_run), key=lambda r: (float(r["accuracy"]), int(r["episode"])))[:10]
    shown = re.findall(r'class="episode-row" data-episode="(\d+)"><td class="num">\d+</td><td>([^<]*)</td>', text)
    assert shown == [(r["episode"], r["classes"].replace(";", ", ")) for r in rows]
    assert text.count('src="data:image/png;base64,') == len(metrics["figures"]) == 4
    assert "<script" not in text.lower() and str(tmp_path_factory.getbasetemp()) not in text  # no scripts, no paths
    assert "patient" not in text.lower() and ".dcm" not in text and DISCLAIMER in text


def test_report_escapes_names_and_lists_the_lowest_accuracy_episodes() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(14, 6, 3, generator=g), dim=-1)
    labels = torch.arange(3).repeat_interleave(2).expand(14, 6)
    classes = [("<b>bold</b>", "benign & co", f"c{e}") for e in range(14)]
    ids = torch.arange(14)
    per_episode = {"accuracy": (probs.argmax(-1) == labels).float().mean(-1), "ece": torch.full((14,), float("nan"))}
    worst = worst_episodes(ids, classes, per_episode, count=10)
    assert [row.metrics["accuracy"] for row in worst] == sorted(per_episode["accuracy"].tolist())[:10]
    assert all(isinstance(row, EpisodeRow) and row.classes == classes[row.episode] for row in worst)
    summary = {"test_episodes": 14, **summarise(probs, labels, classes)}
    text = render_test_report(summary=summary, settings={"learner <x>": "a & b"}, figures=[], worst=worst,
                              warnings=["seen <class>"])  # fmt: skip
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text and "benign &amp; co" in text
    assert "learner &lt;x&gt;" in text and "a &amp; b" in text and "seen &lt;class&gt;" in text
    assert text.count('class="episode-row"') == 10 and ">n/a<" in text  # an undefined value is "n/a", not "nan"


def test_report_renders_in_headless_chromium(test_run: Path, tmp_path: Path) -> None:
    exe = _chromium_exe()
    metrics = json.loads((test_run / "metrics.json").read_text())
    url = (test_run / "report.html").resolve().as_uri()

    dom = _chromium(exe, "--dump-dom", url, user_data=tmp_path / "profile-dom").stdout
    shown = re.search(r'<strong id="accuracy" data-value="([0-9.]+)">([0-9.]+)% ± ([0-9.]+)%</strong>', dom)
    assert shown is not None
    assert float(shown[1]) == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert (float(shown[2]), float(shown[3])) == pytest.approx((100 * metrics["accuracy"], 100 * metrics["accuracy_ci95"]), abs=0.05)
    assert len(re.findall(r'<tr class="class-row"', dom)) == len(metrics["per_class"])
    assert len(re.findall(r'<tr class="episode-row"', dom)) == 10
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(sources) == len(metrics["figures"])
    for source in sources:  # every embedded figure is a whole PNG
        with Image.open(io.BytesIO(base64.b64decode(source))) as image:
            image.load()
            assert image.width > 100 and image.height > 100

    shot = tmp_path / "shot.png"
    _chromium(exe, f"--screenshot={shot}", "--window-size=1280,2400", url, user_data=tmp_path / "profile-shot")
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.var() > 100.0
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # the page's own styles hold no blue: blue pixels are the decoded figures (Blues colour map, blue bars)
    assert ((b > r + 60) & (b > g + 15)).mean() > 0.005


@pytest.mark.parametrize(("curve", "text"), [
    ({"accuracy_after_step": [0.25, 0.5, 0.75], "after_steps": [0, 20, 40]}, "25.0% before adaptation → 75.0% after 40 steps"),
    ({"accuracy_after_step": [0.25, 0.5, 0.75]}, "25.0% before adaptation → 75.0% after 2 steps"),  # written before after_steps
    ({"accuracy_after_step": [0.25, 0.75], "episodes": 4}, "75.0% after 1 step</td>"),  # every test episode: nothing to add
    ({"accuracy_after_step": [0.25, 0.75], "episodes": 2}, "75.0% after 1 step (mean of the first 2 episodes)"),
])  # fmt: skip
def test_report_names_the_curve_s_last_step(curve: dict[str, list[float]], text: str) -> None:
    g = torch.Generator().manual_seed(0)
    probs, labels = torch.softmax(torch.randn(4, 6, 3, generator=g), dim=-1), torch.arange(3).repeat(2).expand(4, 6)
    summary = {"test_episodes": 4, **summarise(probs, labels, [("a", "b", "c")] * 4), "adaptation_curve": curve}
    assert text in render_test_report(summary=summary, settings={}, figures=[], worst=[], warnings=[])
