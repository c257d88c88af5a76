"""The benchmark scripts the README and docs quote run end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MEDMETA_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_compare_script_at_small_size(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    done = _run(str(REPO / "benchmarks" / "compare.py"), "--algorithms", "protonet", "maml", "--shots", "1", "--steps", "2",
                "--test-episodes", "4", "--out", str(out), "--set", "distance=cosine", "inner_steps=1", cwd=tmp_path,
                timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "compare.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert {row["algorithm"] for row in rows} == {"protonet", "maml"}
    assert all(row["options"] == {"distance": "cosine", "inner_steps": 1} for row in rows)
    settings = {row["algorithm"]: row["settings"] for row in rows}  # each learner took the settings it has
    assert settings["protonet"] == {"distance": "cosine", "temperature": 1.0}
    assert settings["maml"]["inner_steps"] == 1 and settings["maml"]["inner_lr"] == 0.05 and "distance" not in settings["maml"]
    bad = _run(str(REPO / "benchmarks" / "compare.py"), "--set", "distance", "--out", str(out), cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "--set expects KEY=VALUE, got 'distance'" in bad.stderr
    old = _run(str(REPO / "benchmarks" / "compare.py"), "--set", "mann_controller=lstm", "--out", str(out), cwd=tmp_path,
               timeout=60)  # fmt: skip
    assert old.returncode == 2 and "mann_controller (now 'controller')" in old.stderr
    assert (out / "compare.png").stat().st_size > 5000 and (out / "compare.md").is_file()


@pytest.mark.slow
def test_data_pipeline_script_runs(tmp_path: Path) -> None:
    done = _run(str(REPO / "benchmarks" / "data_pipeline.py"), "--out", str(tmp_path / "pipeline.json"), cwd=tmp_path,
                timeout=2400)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "pipeline.json").read_text())


def test_ab_versions_loads_another_checkout_beside_this_one(tmp_path: Path) -> None:
    """benchmarks/ab_versions.py: the other version imports as ``medmeta_old`` and computes beside this one."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ab_versions
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    old = ab_versions.import_old(REPO, tmp_path)  # this checkout as "the other version"
    from medmeta.algorithms import MAML
    from medmeta.networks import Conv4

    assert old.algorithms.MAML is not MAML and old.algorithms.MAML.__module__.startswith("medmeta_old.")
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=2, hidden_channels=4, image_size=8)
    other = sys.modules["medmeta_old.networks"].Conv4(in_channels=1, n_way=2, hidden_channels=4, image_size=8)
    other.load_state_dict(model.state_dict())
    sx, qx = torch.randn(1, 2, 1, 8, 8), torch.randn(1, 4, 1, 8, 8)
    sy, qy = torch.tensor([[0, 1]]), torch.tensor([[0, 0, 1, 1]])
    ours = MAML(model, inner_steps=1).outer_loss(sx, sy, qx, qy)
    theirs = old.algorithms.MAML(other, inner_steps=1).outer_loss(sx, sy, qx, qy)
    assert torch.equal(ours, theirs)


SHARED_DATA = REPO.parent / "shared" / "data"
REAL_DATA = pytest.mark.skipif(
    not (SHARED_DATA / "realdev").is_dir() or not (SHARED_DATA / "mednist-mini").is_dir(),
    reason="the real development images (../shared/data) are only in development checkouts",
)


def _real_data_module() -> object:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import real_data
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return real_data


@REAL_DATA
def test_real_data_protocols_are_domain_and_class_disjoint_and_written_outside_the_data(tmp_path: Path) -> None:
    from medmeta.data.manifest import read_manifest

    real_data = _real_data_module()
    expected = {"R1": {"train": {"mednist", "pbc"}, "val": {"busi", "cxr"}, "test": {"isic"}},
                "R2": {"train": {"mednist", "isic"}, "val": {"busi", "cxr"}, "test": {"pbc"}},
                "R1o": {"train": {"mednist", "busi", "cxr"}, "val": {"pbc"}, "test": {"isic"}},
                "R2o": {"train": {"mednist", "busi", "cxr"}, "val": {"isic"}, "test": {"pbc"}}}  # fmt: skip
    assert set(expected) == set(real_data.PROTOCOLS)
    for protocol, splits in expected.items():
        manifest = real_data.build_protocol(protocol, SHARED_DATA, tmp_path)
        assert manifest.parent == tmp_path  # never into ../shared
        records, skipped = read_manifest(manifest)  # refuses a class under two splits, a file under two labels
        assert not skipped and len(records) > 2000
        domains = {split: {r.label.split("-")[0] for r in records if r.split == split} for split in splits}
        assert domains == splits
        by_split = {split: {r.label for r in records if r.split == split} for split in splits}
        assert sum(len(v) for v in by_split.values()) == len(set().union(*by_split.values()))  # class-disjoint
        assert all(len(classes) >= 4 for classes in by_split.values())  # 4-way episodes in every split
        assert all(r.path.is_file() for r in records[:: max(1, len(records) // 50)])


@REAL_DATA
def test_real_data_orientation_free_protocols_test_on_the_same_frozen_episodes(tmp_path: Path) -> None:
    """R1o/R2o change meta-train and meta-val only: their test episodes are R1's/R2's, image for image."""
    from medmeta.data.inventory import take_inventory

    real_data = _real_data_module()

    def test_episodes(protocol: str) -> list[list[tuple[str, str]]]:
        """The first test episodes as the benchmark's data module draws them (its inventory, its sampler, seed 0)."""
        shape = {"n_way": real_data.N_WAY, "k_shot": 5, "q_query": real_data.Q_QUERY}
        inventory = take_inventory(real_data.build_protocol(protocol, SHARED_DATA, tmp_path), **shape, preflight=False)
        records = inventory.split_records("test")
        sampler = inventory.episode_sampler("test", **shape, seed=0)
        episodes = [sampler.episode(index) for index in range(50)]
        return [[(str(records[i].path), records[i].label) for i in [*e.support, *e.query]] for e in episodes]

    assert test_episodes("R1o") == test_episodes("R1")
    assert test_episodes("R2o") == test_episodes("R2")
    assert test_episodes("R1") != test_episodes("R2")  # the comparison can fail


@REAL_DATA
@pytest.mark.slow
def test_real_data_script_quick_run(tmp_path: Path) -> None:
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R2", "--algorithms", "finetune",
                "maml", "--shots", "1", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "real_data.json").read_text())
    assert [(r["protocol"], r["method"], r["test_episodes"]) for r in results] == [("R2", "finetune", 8), ("R2", "maml", 8)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["best_val_acc"] is not None for r in results)
    assert (tmp_path / "out" / "real_data.png").is_file() and "| R2 | maml | 1 | 0 |" in (tmp_path / "out" / "real_data.md").read_text()
    first = (tmp_path / "out" / "results" / "R2-finetune-1.json").read_text()
    # another seed in the same --out trains again beside seed 0 (same test episodes), and does not overwrite it
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R2", "--algorithms", "finetune",
                "--shots", "1", "--seed", "1", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (seeded,) = json.loads((tmp_path / "out" / "real_data.json").read_text())
    assert seeded["seed"] == 1 and seeded["test_episodes"] == 8
    assert (tmp_path / "out" / "results" / "R2-finetune-1-seed1.json").is_file()
    assert (tmp_path / "out" / "results" / "R2-finetune-1.json").read_text() == first
    assert len(list((tmp_path / "out" / "checkpoints" / "R2-finetune-1-seed1").glob("*.ckpt"))) == 1
    episodes = [(tmp_path / "out" / run / "test_episodes.json").read_text() for run in ("R2-finetune-1shot", "R2-finetune-1shot-seed1")]
    assert episodes[0] == episodes[1]  # the seed changes the weights, never the frozen test episodes
    assert "| R2 | 1 | finetune | 0, 1 |" in (tmp_path / "out" / "seeds.md").read_text()  # both invocations' seeds
    # another backbone into the same --out is refused before anything runs, naming a kept row
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R2", "--algorithms", "finetune",
                "--shots", "1", "--set", "hidden_channels=8", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode != 0, done.stdout[-3000:]
    assert ".json: an earlier run with other settings (set [] there, ['hidden_channels=8'] now)" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "results").iterdir()) == [
        "R2-finetune-1-seed1.json", "R2-finetune-1.json", "R2-maml-1.json"]


@REAL_DATA
@pytest.mark.slow
def test_real_data_ctrl_c_stops_every_run_and_keeps_the_finished_ones(tmp_path: Path) -> None:
    """SIGINT to the benchmark alone (not its runs): the run in progress is stopped, no traceback, the finished row kept."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R2", "--algorithms",
               "finetune", "maml", "--shots", "1", "--out", str(out)]  # fmt: skip
    with subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as bench:
        first = bench.stdout.readline()  # finetune's row: maml's run starts next
        assert first.startswith("R2 finetune"), first + bench.stderr.read()[-3000:]
        time.sleep(3)  # maml's run is under way
        bench.send_signal(signal.SIGINT)
        _, stderr = bench.communicate(timeout=120)
    assert bench.returncode == 130, stderr[-3000:]
    assert "interrupted: the finished runs are kept in" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert sorted(p.name for p in (out / "results").iterdir()) == ["R2-finetune-1.json"]
    still = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(out) in _cmdline(p)]
    assert not still, [_cmdline(p) for p in still]  # maml's run was stopped, not left to finish


def _cmdline(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # ended meanwhile
        return ""


@pytest.mark.slow  # about a minute; the seeds.md table it once crashed on is test_real_data_seed_summary_*
@REAL_DATA
def test_real_data_second_stage_can_start_from_the_pretrainings_final_weights(tmp_path: Path) -> None:
    """The pre-training keeps its last weights beside its selected ones; ``pretrain="final"`` starts from them."""
    out = tmp_path / "out"
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R2", "--algorithms", "maml_init_final",
                "--shots", "1", "--out", str(out), cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    real_data = _real_data_module()
    final = real_data.final_checkpoint(out, "R2", 1)
    assert final.parent.name == "R2-pretrain-1-final"
    assert torch.load(final, map_location="cpu", weights_only=True)["global_step"] == 2  # --quick: 4 steps // 2
    (stage_two,) = (out / "checkpoints" / "R2-maml_init_final-1").glob("*.ckpt")
    assert torch.load(stage_two, map_location="cpu", weights_only=True)["hyper_parameters"]["init_from"] == str(final)
    assert [r["method"] for r in json.loads((out / "real_data.json").read_text())] == ["pretrain", "maml_init_final"]
    final.unlink()  # a pre-training from before final weights were kept: named, with what to delete
    with pytest.raises(SystemExit, match=r"final.ckpt: the pre-training's last weights are missing .* delete .*R2-pretrain-1.json"):
        real_data.final_checkpoint(out, "R2", 1)


@REAL_DATA
@pytest.mark.slow
def test_real_data_script_compares_another_backbone(tmp_path: Path) -> None:
    """``--backbone`` and ``--set`` (BENCHMARKS.md's wider Conv-4 and ResNet-12 rows) reach every method, recorded per row."""
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--quick", "--protocols", "R1", "--algorithms", "finetune",
                "finetune_levels_flips", "--shots", "1", "--backbone", "resnet12", "--set", "hidden_channels=8",
                "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "real_data.json").read_text())
    assert [r["method"] for r in results] == ["finetune", "finetune_levels_flips"]
    assert all(r["backbone"] == {"class_path": "resnet12", "init_args": {"hidden_channels": 8}} for r in results)


def test_real_data_keeps_each_seed_apart(tmp_path: Path) -> None:
    """Seed 0's runs keep their names; another seed's runs, and the weights its methods reuse, are its own."""
    real_data = _real_data_module()
    assert real_data.run_name("R1", "finetune", 5, 0) == "R1-finetune-5"
    assert real_data.run_name("R1", "finetune", 5, 2) == "R1-finetune-5-seed2"
    for name in ("R1-finetune-5", "R1-finetune-5-seed2"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "best.ckpt").write_bytes(b"")
    assert real_data.best_checkpoint(tmp_path, "R1", "finetune", 5).parent.name == "R1-finetune-5"
    assert real_data.best_checkpoint(tmp_path, "R1", "finetune", 5, 2).parent.name == "R1-finetune-5-seed2"
    with pytest.raises(SystemExit, match=r"finetune \(seed 1\) for R1 5-shot"):
        real_data.best_checkpoint(tmp_path, "R1", "finetune", 5, 1)


def test_real_data_seed_summary_pairs_each_seed_with_its_own_baseline(tmp_path: Path) -> None:
    """seeds.md: every seed's accuracy, mean and sd, and the gain over the baseline of the same seed only."""
    real_data = _real_data_module()
    rows = [("finetune", 0, 0.40), ("finetune", 1, 0.50), ("finetune", 2, 0.45), ("levels", 0, 0.43), ("levels", 1, 0.52),
            ("levels", 3, 0.90), ("maml", 2, 0.41), ("proto", 5, 0.30)]  # fmt: skip
    for method, seed, accuracy in rows:
        row = {"protocol": "R1", "shots": 5, "method": method, "accuracy": accuracy, **({"seed": seed} if seed else {})}
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / f"{real_data.run_name('R1', method, 5, seed)}.json").write_text(json.dumps(row))
    table = real_data.seed_summary(real_data.saved_results(tmp_path)).splitlines()
    assert table[2] == "| R1 | 5 | finetune | 0, 1, 2 | 40.0 / 50.0 / 45.0 | 45.0 (sd 5.0) |  |  |"  # the baseline first
    # seed 3 has no baseline row: its accuracy counts, its gain does not (+3.0 and +2.0, not +50)
    # and each gain names its seed, since the gains no longer line up with the seeds column
    assert table[3] == ("| R1 | 5 | levels | 0, 1, 3 | 43.0 / 52.0 / 90.0 | 61.7 (sd 24.9) | seed 0: +3.0 / seed 1: +2.0 | "
                        "+2.5 (sd 0.7), 2 of 3 seeds |")  # fmt: skip
    assert table[4] == "| R1 | 5 | maml | 2 | 41.0 | 41.0 | -4.0 | -4.0 |"
    assert table[5] == "| R1 | 5 | proto | 5 | 30.0 | 30.0 |  |  |"  # no seed the baseline ran: no gain, and no crash


def test_real_data_meta_val_selection_picks_by_meta_val_never_by_test() -> None:
    """seeds.md's selection: per learner and seed the best meta-val row, its test gain over the same seed's baseline."""
    real_data = _real_data_module()

    def row(method: str, seed: int, val: float, test: float) -> dict[str, object]:
        return {"protocol": "R1o", "shots": 5, "method": method, "seed": seed, "best_val_acc": val, "accuracy": test}

    results = [row("finetune", 0, 0.60, 0.40), row("finetune", 1, 0.62, 0.50),
               row("maml_init", 0, 0.55, 0.48), row("maml_init_steps20", 0, 0.58, 0.42),  # best test is not selected
               row("maml_init", 1, 0.57, 0.53), row("maml_init_steps20_qflips", 1, 0.57 + 3e-8, 0.60),  # a tie (float32 noise)
               row("maml_init", 2, 0.50, 0.45),  # no baseline on seed 2: no gain
               row("pretrain", 0, 0.99, 0.99)]  # fmt: skip  # not a compared method: never a candidate
    table = real_data.meta_val_selection(results).splitlines()
    assert table[2] == "| R1o | 5 | finetune | 0 | finetune (60.0) | finetune | 40.0 | +0.0 |"
    assert table[4] == ("| R1o | 5 | maml | 0 | maml_init_steps20 (58.0), maml_init (55.0) | maml_init_steps20 | 42.0 | +2.0 |")
    assert table[5] == ("| R1o | 5 | maml | 1 | maml_init (57.0), maml_init_steps20_qflips (57.0) | "
                        "maml_init (tie: maml_init_steps20_qflips) | 53.0 | +3.0 |")  # fmt: skip
    assert table[6] == "| R1o | 5 | maml | 2 | maml_init (50.0) | maml_init | 45.0 |  |"
    assert "| R1o | 5 | maml | 2 | +2.5 (sd 0.7) |" in table  # seeds 0 and 1 only
    assert not any("pretrain" in line for line in table)


def test_real_data_summarise_merges_seeds_run_in_separate_outs_and_refuses_what_does_not_compare(tmp_path: Path) -> None:
    """--summarise: seeds.md over several --out folders; other environments, settings, manifests or figures are refused."""
    real_data = _real_data_module()
    settings = {"steps": 300, "val_episodes": 50, "test_episodes": 600, "in_channels": 3, "backbone": None, "set": []}

    def out(name: str, rows: list[tuple[str, int, float, float]], manifest: str = "path,label,split\na.png,x,test\n") -> Path:
        folder = tmp_path / name
        (folder / "results").mkdir(parents=True)
        (folder / "R1o.csv").write_text(manifest)
        (folder / "environment.json").write_text(json.dumps({"python": "3.11.7", "cpu": "x", "packages": {"torch": "2.14.1"}}))
        for method, seed, val, test in rows:
            row = {"protocol": "R1o", "shots": 5, "method": method, "seed": seed, "steps": 300, "test_episodes": 600,
                   "in_channels": 3, "best_val_acc": val, "accuracy": test, "run_settings": settings}  # fmt: skip
            (folder / "results" / f"{real_data.run_name('R1o', method, 5, seed)}.json").write_text(json.dumps(row))
        return folder

    seed2 = out("s2", [("pretrain", 2, 0.6, 0.37), ("finetune", 2, 0.67, 0.386), ("maml_init_steps40_qflips", 2, 0.64, 0.43)])
    seed3 = out("s3", [("pretrain", 2, 0.6, 0.37), ("finetune", 3, 0.66, 0.40), ("maml_init_steps40_qflips", 3, 0.61, 0.42)])
    merged = real_data.merged_results([seed2, seed3])
    assert len(merged) == 5  # seed 2's pre-training, found with the same figures in both folders, counts once
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--summarise", str(seed2), str(seed3), "--data", str(tmp_path / "none"),
                cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| R1o | 5 | maml_init_steps40_qflips | 2, 3 | 43.0 / 42.0 | 42.5 (sd 0.7) | +4.4 / +2.0 | +3.2 (sd 1.7) |" in done.stdout
    assert "| R1o | 5 | maml | 2 | +3.2 (sd 1.7) |" in done.stdout  # the meta-val rule's mean gain over both folders
    assert not list(tmp_path.glob("s*/seeds.md"))  # it runs nothing and writes nothing

    def refused(*folders: Path, match: str, **kwargs: bool) -> None:
        with pytest.raises(SystemExit, match=match):
            real_data.merged_results([seed2, *folders], **kwargs)

    refused(out("other_figures", [("pretrain", 2, 0.6, 0.38)]), match=r"s2/results/R1o-pretrain-5-seed2.json and .*other_figures/"
            r"results/R1o-pretrain-5-seed2.json: the same run gave other figures \(37.00% against 38.00%\)")  # fmt: skip
    refused(out("other_manifest", [("finetune", 4, 0.6, 0.4)], manifest="path,label,split\nb.png,x,test\n"),
            match=r"s2/R1o.csv and .*other_manifest/R1o.csv: other R1o manifests, so other classes or test episodes")  # fmt: skip
    broken = out("broken", [("finetune", 7, 0.6, 0.4)])
    next((broken / "results").glob("*.json")).write_text('{"protocol": "R1o"')
    refused(broken, match=r"broken/results/R1o-finetune-5-seed7.json: not a real_data.py result row")
    next((broken / "results").glob("*.json")).write_text('{"protocol": "R1o"}')
    refused(broken, match=r"broken/results/R1o-finetune-5-seed7.json: not a real_data.py result row \(KeyError\('shots'\)\)")
    (tmp_path / "empty" / "results").mkdir(parents=True)
    refused(tmp_path / "empty", match=r"empty: no results")
    moved = out("other_environment", [("finetune", 5, 0.6, 0.4)])
    (moved / "environment.json").write_text(json.dumps({"python": "3.11.7", "cpu": "x", "packages": {"torch": "2.15.0"}}))
    refused(moved, match=r"other environments \(torch: 2.14.1 -> 2.15.0\).*--allow-new-environment")
    assert len(real_data.merged_results([seed2, moved], allow_new_environment=True)) == 4
    longer = out("other_settings", [("finetune", 6, 0.6, 0.4)])
    row_path = next((longer / "results").glob("*.json"))
    row_path.write_text(json.dumps({**json.loads(row_path.read_text()), "run_settings": {**settings, "set": ["hidden_channels=64"]}}))
    refused(longer, match=r"other_settings/results/R1o-finetune-5-seed6.json: runs made with other settings")


def test_real_data_refuses_to_resume_a_run_made_with_other_settings(tmp_path: Path) -> None:
    """A kept row is reused only by an invocation with the same steps, episodes, channels, backbone and --set."""
    import argparse

    real_data = _real_data_module()
    args = argparse.Namespace(steps=300, val_episodes=50, test_episodes=600, in_channels=3, backbone=None, raw_settings=[])
    kept = tmp_path / "R1-finetune-5.json"
    kept.write_text(json.dumps({"accuracy": 0.43, "steps": 300, "test_episodes": 600, "in_channels": 3,
                                "run_settings": real_data.run_settings(args)}))  # fmt: skip
    assert real_data.saved_row(kept, args)["accuracy"] == 0.43
    wider = argparse.Namespace(**{**vars(args), "raw_settings": [["hidden_channels", "64"]]})
    with pytest.raises(SystemExit, match=r"R1-finetune-5.json: an earlier run with other settings \(set \[\] there"):
        real_data.saved_row(kept, wider)
    with pytest.raises(SystemExit, match="backbone None there, 'resnet12' now"):
        real_data.saved_row(kept, argparse.Namespace(**{**vars(args), "backbone": "resnet12"}))
    # a row from before rows recorded their settings: its steps are checked, --backbone and --set cannot be
    kept.write_text(json.dumps({"accuracy": 0.43, "steps": 300, "test_episodes": 600, "in_channels": 3}))
    assert real_data.saved_row(kept, args)["accuracy"] == 0.43
    with pytest.raises(SystemExit, match="steps 300 there, 150 now"):
        real_data.saved_row(kept, argparse.Namespace(**{**vars(args), "steps": 150}))
    with pytest.raises(SystemExit, match="cannot be told whether it ran with them"):
        real_data.saved_row(kept, wider)


def test_real_data_refuses_a_seed_lightning_would_replace(tmp_path: Path) -> None:
    """A seed outside Lightning's range would silently become a random one: refused before anything runs."""
    done = _run(str(REPO / "benchmarks" / "real_data.py"), "--seed", "-1", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "--seed must be between 0 and 2**32 - 1, got -1" in done.stderr
    assert not (tmp_path / "out").exists()


def test_real_data_refuses_to_mix_rows_from_another_environment(tmp_path: Path) -> None:
    """A resumed --out whose rows ran with other package versions is refused, naming what changed, unless allowed."""
    real_data = _real_data_module()
    current = real_data.environment()
    assert current["packages"]["torch"] == torch.__version__.split("+")[0] and current["python"] == sys.version.split()[0]
    assert real_data.check_environment(tmp_path, current, allow_new=False) == []  # recorded
    assert json.loads((tmp_path / "environment.json").read_text()) == current
    assert real_data.check_environment(tmp_path, current, allow_new=False) == []  # the same environment resumes
    other = {**current, "packages": {**current["packages"], "numpy": "0.0.1", "pillow": None}}
    other["packages"].pop("pillow")
    with pytest.raises(SystemExit, match=r"(?s)another environment.*numpy: .* -> 0\.0\.1.*pillow: .* -> absent.*--allow-new-environment"):
        real_data.check_environment(tmp_path, other, allow_new=False)
    changed = real_data.check_environment(tmp_path, other, allow_new=True)
    assert changed == [f"numpy: {current['packages']['numpy']} -> 0.0.1", f"pillow: {current['packages']['pillow']} -> absent"]
    assert json.loads((tmp_path / "environment.json").read_text())["later"] == [other]


def test_real_data_methods_reuse_trained_weights_and_are_documented() -> None:
    """A ``reuse`` method tests a run that trains (never another reuse); the module docstring names every method."""
    real_data = _real_data_module()
    for name, method in real_data.METHODS.items():
        if method.start == "reuse":
            assert real_data.METHODS[method.source].start in ("scratch", "two_stage"), name
        assert f"``{name}``" in real_data.__doc__, name
    with pytest.raises(ValueError, match="pretrain 'last'"):  # a misspelt start or pretrain is refused, never read as the default
        real_data.Method("maml", start="two_stage", pretrain="last")


def test_configs_real_data_is_the_measured_recommended_method() -> None:
    """The shipped starting configuration adapts, trains and shapes episodes as the benchmark row it cites."""
    real_data = _real_data_module()
    config = yaml.safe_load((REPO / "configs" / "real_data.yaml").read_text())
    method = real_data.METHODS[real_data.RECOMMENDED]
    assert method.source == "finetune" and config["model"]["algorithm"]["class_path"].endswith(".FineTune")
    init_args = config["model"]["algorithm"]["init_args"]
    assert {key: init_args.get(key) for key in method.settings} == method.settings
    assert config["trainer"]["max_steps"] == 300 and config["model"]["meta_lr"] == 0.003  # compare.module_settings
    backbone = config["model"]["backbone"]["init_args"]
    assert backbone["hidden_channels"] == 32 and {key: backbone.get(key) for key in method.backbone} == method.backbone
    data = config["data"]
    assert (data["n_way"], data["k_shot"], data["q_query"], data["image_size"], data["in_channels"], data["preset"]) == (
        real_data.N_WAY, 5, real_data.Q_QUERY, real_data.IMAGE_SIZE, 3, "photo")


def test_configs_real_data_maml_is_the_measured_best_maml_method() -> None:
    """The shipped MAML stage 2 adapts and trains as the benchmark's best MAML row (chosen on meta-val)."""
    real_data = _real_data_module()
    config = yaml.safe_load((REPO / "configs" / "real_data_maml.yaml").read_text())
    method = real_data.METHODS[real_data.BEST_MAML]
    assert method.learner == "maml" and real_data.METHODS[method.source].start == "two_stage"
    assert config["model"]["algorithm"]["class_path"].endswith(".MAML")
    init_args = config["model"]["algorithm"]["init_args"]
    expected = {**real_data.module_settings("maml")["algorithm"]["init_args"], **method.settings}
    expected.pop("meta_lr")  # a module setting
    assert {key: init_args.get(key) for key in expected} == expected
    assert config["model"]["meta_lr"] == method.settings["meta_lr"] and config["trainer"]["max_steps"] == 150


def test_curve_cost_times_the_test_batch_with_and_without_the_curve(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """benchmarks/curve_cost.py on a MAML checkpoint: three timings of the same final logits; a learner without steps is refused."""
    from tests.test_bundle import _checkpoint

    ckpt = _checkpoint(tiny_dicom_root, tmp_path, "maml", inner_steps=1)
    done = _run(str(REPO / "benchmarks" / "curve_cost.py"), str(ckpt), "--steps", "12", "--query-flips", "--tasks", "2",
                "--repeats", "1", "--out", str(tmp_path / "cost.json"), cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["steps"] == 12 and sorted(cost["seconds"]) == ["curve_steps", "every_step", "none"]
    assert all(seconds > 0 for seconds in cost["seconds"].values())
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["none", "curve_steps", "every_step"]
    refused = _run(str(REPO / "benchmarks" / "curve_cost.py"), str(_checkpoint(tiny_dicom_root, tmp_path / "p", "protonet")),
                   cwd=tmp_path, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "has no inner steps to count" in refused.stderr


def test_adaptation_steps_counts_meta_val_accuracy_after_each_step(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """benchmarks/adaptation_steps.py on a MAML checkpoint: the curve from 0 steps, its CIs and the suggestion rule."""
    from tests.test_bundle import _checkpoint

    ckpt = _checkpoint(tiny_dicom_root, tmp_path, "maml", inner_steps=1)
    done = _run(str(REPO / "benchmarks" / "adaptation_steps.py"), str(ckpt), "--max-steps", "3", "--every", "1",
                "--episodes", "4", "--out", str(tmp_path / "steps.json"), cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    curve = json.loads((tmp_path / "steps.json").read_text())
    assert curve["episodes"] == 4 and len(curve["accuracy_after_step"]) == len(curve["ci95"]) == 4
    assert curve["after_steps"] == [0, 1, 2, 3]
    every_other = _run(str(REPO / "benchmarks" / "adaptation_steps.py"), str(ckpt), "--max-steps", "3", "--every", "2",
                       "--episodes", "4", "--out", str(tmp_path / "steps2.json"), cwd=tmp_path, timeout=300)  # fmt: skip
    assert every_other.returncode == 0, every_other.stderr[-2000:]
    sparse = json.loads((tmp_path / "steps2.json").read_text())  # the queries predicted after 0, 2, 3 steps only
    assert sparse["after_steps"] == [0, 2, 3]
    assert sparse["accuracy_after_step"] == [curve["accuracy_after_step"][k] for k in (0, 2, 3)]
    assert f"suggested eval_inner_steps: {curve['suggested_steps']} " in done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()[:4]] == ["0", "1", "2", "3"]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from adaptation_steps import suggested_steps
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    mean = torch.tensor([25.0, 59.1, 66.4, 68.0, 68.4, 68.7, 68.9, 68.8])  # R1's meta-val curve at 0, 5, ..., 35 steps
    assert suggested_steps(mean, 0.5, list(range(8))) == 4 and suggested_steps(mean, 0.0, list(range(8))) == 6
    assert suggested_steps(mean, 0.5, list(range(0, 40, 5))) == 20  # the same curve labelled with its steps
    refused = _run(str(REPO / "benchmarks" / "adaptation_steps.py"), str(_checkpoint(tiny_dicom_root, tmp_path / "p", "protonet")),
                   "--max-steps", "2", cwd=tmp_path, timeout=300)  # fmt: skip
    assert refused.returncode != 0 and "has no inner steps to count" in refused.stderr
