"""Frozen test-episode manifests: replay gives identical episodes and results; a changed data set is refused."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from medmeta.data.datamodule import EpisodicDataModule
from medmeta.data.episode_manifest import EpisodeManifest, data_hash
from medmeta.data.records import ImageRecord
from medmeta.data.synthetic import generate_synthetic_dataset
from medmeta.errors import DataError
from tests.conftest import module_for

SETTINGS: dict = dict(
    n_way=3, k_shot=2, q_query=3, meta_batch_size=2, eval_batch_size=4, image_size=16, test_episodes=8,
    split_ratios=(0.5, 0.25, 0.25), augment=False,
)  # fmt: skip


def _test_run(root: Path, out: Path, episodes_file: Path | None = None, **overrides: object) -> list[list[str]]:
    """A real ``Trainer.test`` of an untrained (seeded) model; the rows of its ``per_episode.csv``."""
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=2)
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
    rotated = tmp_path / "rotated.json"  # the counter-check: other valid episodes under the same indices, other results
    episodes = body["episodes"]
    moved = [{**e, "index": at["index"]} for at, e in zip(episodes, episodes[1:] + episodes[:1])]
    rotated.write_text(json.dumps({**body, "episodes": moved}))
    assert _test_run(tiny_dicom_root, tmp_path / "c", episodes_file=rotated) != first


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


def _dicom_export(tmp_path: Path) -> Path:
    """A CSV manifest over DICOM files named ``IM0000.dcm``/``IM0001.dcm`` in every patient folder."""
    source = generate_synthetic_dataset(tmp_path / "synth", n_classes=6, patients_per_class=4, images_per_patient=2,
                                        image_size=32, seed=1)  # fmt: skip
    export = tmp_path / "export"
    rows = ["path,label,patient_id,split"]
    for c, class_dir in enumerate(sorted(p for p in source.iterdir() if p.is_dir())):
        for p in range(4):
            for k in range(2):
                target = export / f"c{c}p{p}" / f"IM{k:04d}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(class_dir / f"patient{p:03d}_{k:02d}.dcm", target)
                split = "train" if c < 2 else "val" if c < 4 else "test"
                rows.append(f"c{c}p{p}/IM{k:04d}.dcm,{class_dir.name},c{c}p{p},{split}")
    manifest = export / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _episode_files(data: EpisodicDataModule, index: int) -> tuple[list[Path], list[Path]]:
    """The resolved support and query files of test episode ``index``."""
    episode = data._datasets["test"].sampler.episode(index)
    files = [data._test_records[i].path.resolve() for i in (*episode.support, *episode.query)]
    return files[: len(episode.support)], files[len(episode.support):]


def test_replay_over_a_csv_manifest_uses_exactly_the_frozen_files(tmp_path: Path) -> None:
    manifest = _dicom_export(tmp_path)
    settings = dict(n_way=2, k_shot=1, q_query=2, image_size=16, test_episodes=30, augment=False)
    drawn = EpisodicDataModule(str(manifest), **settings)
    drawn.setup("test")
    frozen = drawn.freeze_test_episodes(tmp_path / "run" / "test_episodes.json")
    ids = [i for e in json.loads(frozen.read_text())["episodes"] for i in (*e["support"], *e["query"])]
    assert len(set(ids)) > 2  # not one id per file name
    replayed = EpisodicDataModule(str(manifest), episodes_file=str(frozen), **settings)
    replayed.setup("test")
    for index in range(30):
        support, query = _episode_files(replayed, index)
        assert (support, query) == _episode_files(drawn, index), index
        assert not set(support) & set(query)
        labels = {f.parent.name[:2] for f in support} | {f.parent.name[:2] for f in query}
        assert labels <= {"c4", "c5"}  # test classes only


def test_same_size_pixel_change_is_refused_at_replay(tiny_dicom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    settings = dict(SETTINGS, test_episodes=4)
    drawn = EpisodicDataModule(str(root), **settings)
    drawn.setup("test")
    frozen = drawn.freeze_test_episodes(tmp_path / "run" / "test_episodes.json")
    victim = sorted(root.rglob("*.dcm"))[5]
    content = bytearray(victim.read_bytes())
    content[-64:] = bytes(255 - b for b in content[-64:])  # pixel data, same size
    victim.write_bytes(bytes(content))
    replayed = EpisodicDataModule(str(root), episodes_file=str(frozen), **settings)
    with pytest.raises(DataError, match=r"test_episodes.json was frozen on a different data set.*replay refused"):
        replayed.setup("test")


def test_series_folder_hash_covers_every_slice_s_bytes(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for k in range(3):
        (series / f"IM{k:04d}.dcm").write_bytes(bytes(range(k, k + 200)))
    record = ImageRecord(series, "cyst", "patient")
    before = data_hash([record], ["id"])
    (series / "IM0001.dcm").write_bytes(bytes(range(9, 209)))
    assert data_hash([record], ["id"]) != before


def test_manifest_of_the_old_format_is_refused_with_a_reason(tmp_path: Path) -> None:
    old = tmp_path / "test_episodes.json"
    old.write_text(json.dumps({"format": "medmeta-episodes/1", "split": "test", "seed": 0, "n_way": 1, "k_shot": 1,
                               "q_query": 1, "data_hash": "x", "episodes": []}))  # fmt: skip
    with pytest.raises(DataError, match="older medmeta.*freeze the test episodes again"):
        EpisodeManifest.read(old)


def test_replay_refuses_an_episode_whose_support_and_query_share_a_patient(tmp_path: Path) -> None:
    """A manifest frozen before episodes were patient-disjoint across classes is refused, naming the episode."""
    from medmeta.data.episode_manifest import ManifestEpisodeSampler
    from medmeta.data.episodes import Episode

    ids = ["a0", "a1", "b0", "b1"]
    patients = ["p1", "p2", "p2", "p3"]  # p2 has an image in class a and one in class b
    frozen = Episode(index=7, classes=("a", "b"), support=torch.tensor([0, 2]).numpy(),
                     support_labels=torch.tensor([0, 1]).numpy(), query=torch.tensor([1, 3]).numpy(),
                     query_labels=torch.tensor([0, 1]).numpy())  # fmt: skip
    manifest = EpisodeManifest.freeze([frozen], ids, split="test", seed=0, k_shot=1, q_query=1, data_hash="x")
    labels = ["a", "a", "b", "b"]
    source = tmp_path / "m.json"
    sampler = ManifestEpisodeSampler(manifest, ids, ["a", "b"], labels=labels, source=source)  # no patients: no check
    assert sampler.episode(0).index == 7
    with pytest.raises(DataError, match="episode 7 has 1 patient"):
        ManifestEpisodeSampler(manifest, ids, ["a", "b"], labels=labels, source=source, patients=patients)
    fine = ["p1", "p2", "p3", "p4"]
    assert len(ManifestEpisodeSampler(manifest, ids, ["a", "b"], labels=labels, source=source, patients=fine)) == 1


def _frozen_body(root: Path, tmp_path: Path, **overrides: object) -> tuple[dict, dict]:
    """The settings and the manifest (as JSON) of 4 test episodes drawn and frozen by a data module."""
    settings = {**SETTINGS, "test_episodes": 4, **overrides}
    drawn = EpisodicDataModule(str(root), **settings)
    drawn.setup("test")
    return settings, json.loads(drawn.freeze_test_episodes(tmp_path / "run" / "test_episodes.json").read_text())


def test_an_image_listed_under_another_class_or_twice_is_refused(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """Reversed query lists put class A's images in class B's slots: they would be scored against the wrong label."""
    settings, body = _frozen_body(tiny_dicom_root, tmp_path)
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps({**body, "episodes": [{**e, "query": e["query"][::-1]} for e in body["episodes"]]}))
    first = body["episodes"][0]
    expected = (f"swapped.json: episode {first['index']} lists an image of class {first['classes'][-1]!r} as class "
                f"{first['classes'][0]!r}, so it would be scored against the wrong label; replay refused")  # fmt: skip
    with pytest.raises(DataError, match=re.escape(expected)) as refused:
        EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(swapped), **settings).setup("test")
    assert str(tiny_dicom_root) not in str(refused.value) and ".dcm" not in str(refused.value)
    twice = tmp_path / "twice.json"  # an image in two query slots of its own class
    twice.write_text(json.dumps({**body, "episodes": [{**first, "query": [first["query"][0], *first["query"][:-1]]}]}))
    with pytest.raises(DataError, match=rf"twice.json: episode {first['index']} lists the same image more than once"):
        EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(twice), **settings).setup("test")


def test_replay_reports_the_manifest_s_seed_not_the_config_s(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """With explicit splits another seed passes the class check; episodes and seed reported are the manifest's."""
    drawn = EpisodicDataModule(str(tiny_dicom_root), **SETTINGS)
    drawn.setup("test")
    splits = drawn.class_splits.to_json()
    first = _test_run(tiny_dicom_root, tmp_path / "a", splits=splits, seed=0)
    replayed = _test_run(tiny_dicom_root, tmp_path / "b", episodes_file=tmp_path / "a" / "test_episodes.json",
                         splits=splits, seed=7)  # fmt: skip
    assert replayed == first
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["episodes"]["seed"] == 0 and metrics["episodes"]["episodes_file"] == "replayed"
    report = (tmp_path / "b" / "report.html").read_text()
    assert "replayed, seed 0" in report and "seed 7" not in report


def test_replay_under_other_image_settings_is_refused(
    tiny_dicom_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same ids under another size or window are other images; a manifest without settings replays, warned."""
    settings, body = _frozen_body(tiny_dicom_root, tmp_path)
    assert body["images"] == {"image_size": 16, "in_channels": 1, "spatial_dims": 2, "preset": None,
                              "window": [-1100.0, 400.0], "spacing": None, "roi_size": None}  # fmt: skip
    frozen = tmp_path / "run" / "test_episodes.json"
    for change, reason in [({"image_size": 8}, "image_size 16 there, 8 now"),
                           ({"window": None}, "window [-1100.0, 400.0] there, None now"),
                           ({"preset": "ct-brain"}, "preset None there, 'ct-brain' now")]:  # fmt: skip
        expected = f"test_episodes.json was frozen with other image settings ({reason}"
        with pytest.raises(DataError, match=re.escape(expected)):
            EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(frozen), **{**settings, **change}).setup("test")
    EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(frozen), **settings).setup("test")  # the same: replayed
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in body.items() if k != "images"}))
    with caplog.at_level(logging.WARNING, logger="medmeta.data.episode_manifest"):
        data = EpisodicDataModule(str(tiny_dicom_root), episodes_file=str(old), **{**settings, "image_size": 8})
        data.setup("test")
    assert len(data._datasets["test"]) == 4
    assert "old.json stores no image settings" in caplog.text and "cannot be checked" in caplog.text

