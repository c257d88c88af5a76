"""Frozen test-episode manifests: replay gives identical episodes and results; a changed data set is refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.episode_manifest import EpisodeManifest
from medmeta.errors import DataError
from medmeta.module import FewShotModule

SETTINGS: dict = dict(
    n_way=3, k_shot=2, q_query=3, meta_batch_size=2, eval_batch_size=4, image_size=16, test_episodes=8,
    split_ratios=(0.5, 0.25, 0.25), augment=False,
)  # fmt: skip


def _test_run(root: Path, out: Path, episodes_file: Path | None = None, **overrides: object) -> list[list[str]]:
    """A real ``Trainer.test`` of an untrained (seeded) model; the rows of its ``per_episode.csv``."""
    torch.manual_seed(0)
    module = FewShotModule(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=2)
    data = EpisodicDataModule(str(root), episodes_file=str(episodes_file) if episodes_file else None,
                              **{**SETTINGS, **overrides})  # fmt: skip
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        default_root_dir=out)  # fmt: skip
    trainer.test(module, datamodule=data, verbose=False)
    with (out / "per_episode.csv").open() as handle:
        return list(csv.reader(handle))


def test_replayed_manifest_gives_identical_episodes_and_results(tiny_dicom_root: Path, tmp_path: Path) -> None:
    first = _test_run(tiny_dicom_root, tmp_path / "a")
    manifest = tmp_path / "a" / "test_episodes.json"
    body = json.loads(manifest.read_text())
    assert len(body["episodes"]) == 8 and body["n_way"] == 3 and len(body["episodes"][0]["query"]) == 9
    # the manifest, not test_episodes, decides what is tested
    replayed = _test_run(tiny_dicom_root, tmp_path / "b", episodes_file=manifest, test_episodes=3)
    assert replayed == first and len(first) == 9  # header + 8 episodes
    assert json.loads((tmp_path / "b" / "test_episodes.json").read_text()) == body
    shuffled = tmp_path / "shuffled.json"  # the counter-check: other episodes, other results
    shuffled.write_text(json.dumps({**body, "episodes": [{**e, "query": e["query"][::-1]} for e in body["episodes"]]}))
    assert _test_run(tiny_dicom_root, tmp_path / "c", episodes_file=shuffled) != first


def test_manifest_from_another_class_split_is_refused(tiny_dicom_root: Path, tmp_path: Path) -> None:
    _test_run(tiny_dicom_root, tmp_path / "a")
    with pytest.raises(DataError, match="not test classes under this data config"):
        _test_run(tiny_dicom_root, tmp_path / "b", episodes_file=tmp_path / "a" / "test_episodes.json", seed=5)


def test_manifest_holds_no_paths_or_file_names(tiny_dicom_root: Path, tmp_path: Path) -> None:
    _test_run(tiny_dicom_root, tmp_path)
    text = (tmp_path / "test_episodes.json").read_text()
    assert str(tiny_dicom_root) not in text and ".dcm" not in text
    assert "/" not in json.dumps(json.loads(text)["episodes"])  # ids and class names only


def test_changed_data_set_is_detected_and_replay_refused(tiny_dicom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    _test_run(root, tmp_path / "a")
    manifest = tmp_path / "a" / "test_episodes.json"
    _test_run(root, tmp_path / "copy-ok", episodes_file=manifest)  # a copy (new times) keeps the hash
    victim = sorted(root.rglob("*.dcm"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"test_episodes.json was frozen on a different data set.*replay refused"):
        _test_run(root, tmp_path / "b", episodes_file=manifest)


def test_malformed_or_mismatched_manifest_is_a_clear_error(tiny_dicom_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="cannot read episode manifest .*bad.json"):
        EpisodeManifest.read(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="is not a medmeta episode manifest"):
        EpisodeManifest.read(bad)
    _test_run(tiny_dicom_root, tmp_path / "a")
    manifest = tmp_path / "a" / "test_episodes.json"
    data = EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(manifest), **{**SETTINGS, "k_shot": 1})
    with pytest.raises(DataError, match="holds 3-way 2-shot 3-query episodes but the data config asks for 3-way 1-shot"):
        data.setup("test")
