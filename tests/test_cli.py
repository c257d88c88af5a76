"""The ``medmeta`` console script, run as a real subprocess (in this process where only its messages are checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml
import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _medmeta(*args: str, cwd: Path, timeout: float = 300, columns: str = "200") -> subprocess.CompletedProcess[str]:
    """The ``medmeta`` command in a subprocess; it never prints Lightning's warning about arguments given twice."""
    env = {**os.environ, "MEDMETA_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "2", "COLUMNS": columns}
    done = subprocess.run(
        [sys.executable, "-m", "medmeta.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert "args parameter is intended to run from within Python" not in done.stdout + done.stderr
    return done


def _medmeta_here(*args: str, cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``medmeta`` run in this process (no 6 s interpreter start-up): its exit status and everything it printed.

    For message tests; an exception escaping ``main`` fails the test just as a traceback would.
    """
    from medmeta.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MEDMETA_CACHE", str(cwd / "cache"))
    capsys.readouterr()
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def _tiny_fit_args(root: Path, out: Path) -> list[str]:
    return [
        "fit", "--config", str(QUICKSTART), "--data.root", str(root),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        "--data.image_size", "16", "--data.val_episodes", "4", "--data.test_episodes", "6",
        "--data.n_way", "3", "--data.q_query", "2", "--data.split_ratios", "[0.5, 0.25, 0.25]",
        "--model.backbone.class_path", "conv4", "--model.backbone.init_args.hidden_channels", "8",
        "--model.algorithm.init_args.inner_steps", "1", "--model.algorithm.init_args.eval_inner_steps", "2",
    ]  # fmt: skip


def test_synth_writes_dicom_classes(tmp_path: Path) -> None:
    result = _medmeta("synth", "--out", str(tmp_path / "synth"), "--classes", "6", "--patients", "2",
                      "--images", "2", "--size", "32", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 24 DICOM files in 6 lesion classes" in result.stdout
    assert len([p for p in (tmp_path / "synth").iterdir() if p.is_dir()]) == 6
    volumes = _medmeta("synth", "--out", str(tmp_path / "vols"), "--classes", "3", "--patients", "2",
                       "--images", "1", "--size", "16", "--spatial-dims", "3", cwd=tmp_path)  # fmt: skip
    assert volumes.returncode == 0 and "wrote 6 NIfTI volumes in 3 lesion classes" in volumes.stdout
    again = _medmeta("synth", "--out", str(tmp_path / "synth"), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stdout and "Traceback" not in again.stderr


def test_fit_then_test_end_to_end(tiny_dicom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _medmeta(*_tiny_fit_args(tiny_dicom_root, out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test accuracy:" in result.stdout and "(95% CI, 6 frozen test episodes)" in result.stdout
    metrics_line = next(line for line in result.stdout.splitlines() if line.startswith("metrics: "))
    metrics = json.loads(Path(metrics_line.removeprefix("metrics: ").strip()).read_text())
    assert metrics["test_episodes"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["normalisation"].startswith("transductive")
    checkpoint_line = next(line for line in result.stdout.splitlines() if line.startswith("checkpoint: "))
    checkpoint = torch.load(checkpoint_line.removeprefix("checkpoint: ").strip(), weights_only=True)
    assert checkpoint["hyper_parameters"]["n_way"] == 3  # linked from data.n_way
    assert checkpoint["state_dict"]["algorithm.model.head.weight"].shape[0] == 3
    assert not (tiny_dicom_root / "runs").exists()
    # the same checkpoint tested again on the frozen episodes of that run, through `--episodes`
    run_dir = Path(metrics_line.removeprefix("metrics: ").strip()).parent
    replay = _medmeta("test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", checkpoint_line.removeprefix("checkpoint: ").strip(),
                      "--episodes", str(run_dir / "test_episodes.json"), cwd=tmp_path)  # fmt: skip
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
    replay_line = next(line for line in replay.stdout.splitlines() if line.startswith("metrics: "))
    replay_dir = Path(replay_line.removeprefix("metrics: ").strip()).parent
    assert replay_dir != run_dir
    assert (replay_dir / "per_episode.csv").read_text() == (run_dir / "per_episode.csv").read_text()


def test_model_n_way_cannot_disagree_with_data(tiny_dicom_root: Path, tmp_path: Path) -> None:
    result = _medmeta(*_tiny_fit_args(tiny_dicom_root, tmp_path / "run"), "--model.n_way", "4", cwd=tmp_path)
    assert result.returncode != 0
    assert "n_way" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before any data was read or run started


def test_bad_data_folder_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = _medmeta(*_tiny_fit_args(tmp_path / "missing", tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_optimizer_choice_replaces_the_default_adam(tiny_dicom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*_tiny_fit_args(tiny_dicom_root, out), "--optimizer", "SGD", "--optimizer.lr", "0.0125"]
    result = _medmeta(*args, "--test_after_fit", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = next(out.rglob("last.ckpt"))
    groups = torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert groups[0]["lr"] == 0.0125 and "momentum" in groups[0] and "betas" not in groups[0]


def test_data_check_reports_feasibility_and_exit_codes(tiny_dicom_root: Path, tmp_path: Path) -> None:
    base = ["data", "check", str(tiny_dicom_root), "--n-way", "3", "--split-ratios", "0.5", "0.25", "0.25"]
    good = _medmeta(*base, "--q-query", "2", cwd=tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "test: 3-way 1-shot 2-query episodes ok" in good.stdout
    assert "144 usable images in 12 classes" in good.stdout
    too_many = _medmeta(*base, "--q-query", "20", cwd=tmp_path)
    assert too_many.returncode == 1 and "cannot" in too_many.stdout and "Traceback" not in too_many.stderr
    report = json.loads(_medmeta(*base, "--q-query", "2", "--json", cwd=tmp_path).stdout)
    assert report["ok"] is True and report["usable_images"] == 144 and len(report["classes"]) == 12
    assert set(report["class_splits"]) == {"train", "val", "test"}


def test_fit_skips_bad_files_with_a_one_line_summary(tiny_dicom_root: Path, tmp_path: Path) -> None:
    import shutil

    import nibabel as nib
    import numpy as np

    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "zero.dcm").write_bytes(b"")
    (first_class / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(500))
    nan_image = np.full((16, 16), np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan_image, np.eye(4)), first_class / "nan.nii.gz")
    check = _medmeta("data", "check", str(root), "--n-way", "3", "--q-query", "2", "--split-ratios", "0.5", "0.25",
                     "0.25", cwd=tmp_path)  # fmt: skip
    for reason in ("empty", "unreadable", "non-finite"):
        assert reason in check.stdout
    result = _medmeta(*_tiny_fit_args(root, tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skipped 3 (empty: 1, non-finite: 1, unreadable: 1)" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_3d_config_runs_end_to_end(tmp_path: Path) -> None:
    from medmeta.data.synthetic3d import generate_synthetic_volumes

    root = generate_synthetic_volumes(tmp_path / "vols", n_classes=8, patients_per_class=3, volumes_per_patient=2, size=16)
    out = tmp_path / "run3d"
    result = _medmeta(
        "fit", "--config", str(REPO / "configs" / "synthetic_3d.yaml"), "--data.root", str(root),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out), "--data.image_size", "8", "--data.roi_size", "[12, 12, 12]",
        "--data.n_way", "2", "--data.q_query", "2", "--data.split_ratios", "[0.5, 0.25, 0.25]",
        "--data.val_episodes", "2", "--data.test_episodes", "4", "--model.backbone.class_path", "conv4",
        "--model.backbone.init_args.hidden_channels", "4",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(95% CI, 4 frozen test episodes)" in result.stdout


INNER_STEPS = ["--model.algorithm.init_args.inner_steps", "1", "--model.algorithm.init_args.eval_inner_steps", "2"]


@pytest.mark.parametrize("algorithm", ["maml", "maml_pp", "meta_sgd", "anil", "protonet", "mann", "finetune"])
def test_each_algorithm_config_combines_with_the_data_config(tiny_dicom_root: Path, tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "run"
    result = _medmeta(
        "fit", "--config", str(REPO / "configs" / "synthetic_2d.yaml"), "--config", str(REPO / "configs" / f"{algorithm}.yaml"),
        "--data.root", str(tiny_dicom_root), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--data.train_batches_per_epoch", "2", "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out), "--data.image_size", "16", "--data.val_episodes", "2",
        "--data.test_episodes", "4", "--data.n_way", "3", "--data.q_query", "2", "--data.split_ratios",
        "[0.5, 0.25, 0.25]", "--model.backbone.class_path", "conv4", "--model.backbone.init_args.hidden_channels", "4",
        *(INNER_STEPS if algorithm in ("maml", "maml_pp", "meta_sgd", "anil") else []), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["algorithm"].startswith(algorithm) and metrics["test_episodes"] == 4


def test_help_lists_every_subcommand_with_a_description(tmp_path: Path) -> None:
    result = _medmeta("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("fit", "validate", "test", "predict", "synth", "data check", "evaluate", "diagnose"):
        assert re.search(rf"^ +{name} +\w.{{10,}}$", result.stdout, re.MULTILINE), f"{name!r} missing\n{result.stdout}"


@pytest.mark.parametrize(
    ("extra", "setting"),
    [
        (["--model.meta_lr", "-0.001"], "model.meta_lr"),
        (["--model.algorithm.init_args.inner_lr", "0"], "model.algorithm.init_args.inner_lr"),
        (["--optimizer", "SGD", "--optimizer.lr", "-0.1"], "optimizer.lr"),
    ],
)
def test_a_bad_learning_rate_is_a_one_line_message(
    tiny_dicom_root: Path, tmp_path: Path, extra: list[str], setting: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Zero or negative rates are refused by name before any data is read (a zero inner rate adapts nothing)."""
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), *extra, cwd=tmp_path, capsys=capsys,
                                    monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert f"{setting} must be a positive learning rate, got {float(extra[-1])}" in line
    assert not out.exists() and "usable images" not in printed  # refused before data or run


def test_a_learners_own_outer_rate_beside_optimizer_is_refused(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """``--optimizer`` puts every meta-parameter at one rate: Meta-SGD's ``rates_meta_lr`` would be silently ignored."""
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--model.algorithm", "meta_sgd",
                                    "--model.algorithm.init_args.rates_meta_lr", "0.01", "--optimizer", "SGD",
                                    "--optimizer.lr", "0.01", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert "model.algorithm.init_args.rates_meta_lr has no effect with --optimizer" in line
    assert not out.exists() and "usable images" not in printed


def test_inference_mode_is_refused_before_data_and_a_diverged_fit_stops_without_a_traceback(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Under ``torch.inference_mode`` no episode can be adapted; a non-finite meta-loss ends the run with one message."""
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--trainer.inference_mode", "true",
                                    cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert "trainer.inference_mode must be false" in line
    assert not out.exists() and "usable images" not in printed
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--model.algorithm.init_args.inner_lr", "1e30",
                                    cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 1, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: stopped:" in line]
    assert "non-finite" in line and "episodes [" in line and "Traceback" not in printed


def test_files_that_are_not_checkpoints_are_named_by_every_command(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    data = trained_checkpoint.read_bytes()
    bad = {"truncated": data[: len(data) // 3], "text": b"not a checkpoint\n", "empty": b""}
    words = {"truncated": "the file is truncated", "text": "it is a text file", "empty": "the file is empty (0 bytes)"}
    for name, content in bad.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
    test_args = _tiny_fit_args(tiny_dicom_root, tmp_path / "out")
    test_args[0] = "test"
    runs = {
        "truncated": [*test_args, "--ckpt_path", str(tmp_path / "truncated.ckpt")],
        "text": ["evaluate", str(tmp_path / "text.ckpt"), "--out", str(tmp_path / "out")],
        "empty": ["diagnose", "--ckpt", str(tmp_path / "empty.ckpt"), "--support", str(tiny_dicom_root), "--query",
                  str(tiny_dicom_root), "--out", str(tmp_path / "out")],
    }  # fmt: skip
    for name, args in runs.items():
        if name == "truncated":  # one of them as a real process: one line, no traceback
            result = _medmeta(*args, cwd=tmp_path)
            assert "Traceback" not in result.stdout + result.stderr, (name, result.stderr[-3000:])
            status, printed = result.returncode, result.stdout
        else:
            status, printed = _medmeta_here(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
        assert status == 2, (name, printed[-2000:])
        (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
        assert f"cannot load checkpoint {tmp_path / f'{name}.ckpt'}: " in line and words[name] in line, line
        assert "checkpoint" in line.split(f"{name}.ckpt: ", 1)[1], line
    assert not (tmp_path / "out").exists()


def test_data_check_shows_whole_paths_relative_to_the_data_in_80_columns(tiny_dicom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    nested = next(p for p in sorted(root.iterdir()) if p.is_dir()) / "patient-extra" / "series-0001" / "a-long-folder-name"
    nested.mkdir(parents=True)
    (nested / "an-empty-file-with-a-rather-long-name-0001.dcm").write_bytes(b"")
    expected = str((nested / "an-empty-file-with-a-rather-long-name-0001.dcm").relative_to(root))
    assert len(expected) > 80
    result = _medmeta("data", "check", str(root), "--n-way", "3", "--q-query", "2", "--split-ratios", "0.5", "0.25",
                      "0.25", cwd=tmp_path, columns="80")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "an-empty-file" in line]
    assert line.split()[0] == expected and "empty" in line.split()[1], line
    assert str(tmp_path) not in line


def test_data_check_with_nothing_usable_says_why(tmp_path: Path) -> None:
    from medmeta.data.synthetic3d import generate_synthetic_volumes

    root = generate_synthetic_volumes(tmp_path / "vols", n_classes=3, patients_per_class=2, volumes_per_patient=1, size=16)
    result = _medmeta("data", "check", str(root), cwd=tmp_path)  # 3D volumes checked as the default 2D
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "medmeta: error:" in line]
    assert f"no usable images under {root}: all 6 file(s) skipped (wrong-dims: 6)" in line
    first = sorted(root.rglob("*.nii.gz"))[0].relative_to(root)
    assert f"{first}: wrong-dims (a 3D volume with 16 slices, but 2D images are configured)" in line
    assert "--spatial-dims 3" in line


def test_evaluate_refuses_test_classes_the_model_meta_trained_on(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another data set sharing class names: a test class that was a meta-train or meta-val class is refused."""
    from medmeta.data.episodes import split_classes
    from medmeta.data.synthetic import generate_synthetic_dataset

    other = generate_synthetic_dataset(tmp_path / "other", n_classes=16, patients_per_class=3, images_per_patient=2,
                                       image_size=16, seed=7)  # fmt: skip
    checkpoint = torch.load(trained_checkpoint, weights_only=True)

    def split(root: Path) -> object:  # the trained model's data settings, on the data set under `root`
        return split_classes([p.name for p in root.iterdir() if p.is_dir()], ratios=(0.5, 0.25, 0.25), seed=0)

    trained = split(tiny_dicom_root)
    overlap = sorted(set(split(other).test) & {*trained.train, *trained.val})
    assert overlap, "the second data set must share a test class with the first one's meta-train/val classes"
    args = ["evaluate", "--ckpt", str(trained_checkpoint), "--data-root", str(other), "--out", str(tmp_path / "eval")]
    here = dict(cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    status, printed = _medmeta_here(*args, **here)
    assert status == 2, printed
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert all(name in line for name in overlap) and "--allow-seen-classes" in line, line
    assert not list((tmp_path / "eval").rglob("metrics.json"))
    status, printed = _medmeta_here(*args, "--allow-seen-classes", **here)
    assert status == 0, printed[-2000:]
    assert "warning:" in printed and all(name in printed for name in overlap)
    assert "test accuracy:" in printed
    (metrics,) = (tmp_path / "eval").rglob("metrics.json")  # the outputs say so too, not only the console
    assert json.loads(metrics.read_text())["seen_test_classes"] == overlap
    # a checkpoint written before the class names were recorded (and not in its run folder): a warning
    old = tmp_path / "old.ckpt"
    torch.save({k: v for k, v in checkpoint.items() if k != "medmeta_seen_classes"}, old)
    status, printed = _medmeta_here("evaluate", str(old), "--data-root", str(other), "--out", str(tmp_path / "eval"),
                                    **here)  # fmt: skip
    assert status == 0, printed[-2000:]
    assert "warning:" in printed and "cannot be checked" in printed.replace("\n", " ")


def test_short_names_on_the_command_line_become_class_paths(tmp_path: Path) -> None:
    """``--model.algorithm maml_pp --model.backbone resnet12``: the parsed config holds their class paths (no warnings)."""
    done = _medmeta("fit", "--model.algorithm", "maml_pp", "--model.backbone", "resnet12",
                    "--model.algorithm.init_args.inner_steps", "2", "--print_config", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    from medmeta.algorithms import MAMLPlusPlus, resolve_algorithm
    from medmeta.networks import ResNet12, resolve_backbone

    model = yaml.safe_load(done.stdout)["model"]
    assert resolve_algorithm(model["algorithm"]) == (MAMLPlusPlus, {**resolve_algorithm(MAMLPlusPlus)[1], "inner_steps": 2})
    assert resolve_backbone(model["backbone"])[0] is ResNet12


def _real_data_fit(config: str, root: Path, cwd: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:  # fmt: skip
    """``medmeta fit`` with a shipped real-data config, shrunk to the tiny DICOM set; outputs under ``cwd/runs`` as configured."""
    return _medmeta_here(
        "fit", "--config", str(REPO / "configs" / config), "--data.root", str(root), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "1", "--data.image_size", "16", "--data.val_episodes", "2",
        "--data.test_episodes", "4", "--data.n_way", "3", "--data.k_shot", "1", "--data.q_query", "2",
        "--data.split_ratios", "[0.5, 0.25, 0.25]", "--model.backbone.init_args.hidden_channels", "4", cwd=cwd,
        capsys=capsys, monkeypatch=monkeypatch,
    )  # fmt: skip


def test_the_real_data_configs_and_the_two_stage_recipe_run_as_documented(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/real_data.yaml fits and tests; both stage-2 configs (Meta-Baseline, MAML) start from stage 1's selected weights."""
    run = partial(_real_data_fit, root=tiny_dicom_root, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    status, printed = run("real_data.yaml")
    assert status == 0, printed[-3000:]
    metrics = json.loads(next((tmp_path / "runs" / "real_data").rglob("metrics.json")).read_text())
    assert metrics["test_episodes"] == 4 and metrics["algorithm"].startswith("finetune")
    recommended = torch.load(tmp_path / "runs" / "real_data" / "checkpoints" / "best.ckpt", weights_only=True)
    adaptation = recommended["hyper_parameters"]["algorithm"]["init_args"]
    assert (adaptation["feature_levels"], adaptation["support_augment"], adaptation["query_augment"]) == ("all", True, True)
    status, printed = run("real_data_pretrain.yaml")
    assert status == 0, printed[-3000:]
    best = tmp_path / "runs" / "real_data_pretrain" / "checkpoints" / "best.ckpt"
    assert best.is_file() and not list((tmp_path / "runs" / "real_data_pretrain").rglob("metrics.json"))  # not tested
    status, printed = run("real_data_meta_baseline.yaml")
    assert status == 0, printed[-3000:]
    last = torch.load(tmp_path / "runs" / "real_data_meta_baseline" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["init_from"] == "runs/real_data_pretrain/checkpoints/best.ckpt"
    assert last["hyper_parameters"]["algorithm"]["init_args"]["learn_temperature"] is True
    assert "algorithm.log_temperature" in last["state_dict"]
    assert next((tmp_path / "runs" / "real_data_meta_baseline").rglob("metrics.json")).is_file()
    status, printed = run("real_data_maml.yaml")  # the other stage 2: second-order MAML from the same pre-training
    assert status == 0, printed[-3000:]
    last = torch.load(tmp_path / "runs" / "real_data_maml" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["hyper_parameters"]["init_from"] == "runs/real_data_pretrain/checkpoints/best.ckpt"
    assert last["hyper_parameters"]["algorithm"]["init_args"]["eval_inner_steps"] == 20
    assert json.loads(next((tmp_path / "runs" / "real_data_maml").rglob("metrics.json")).read_text())["algorithm"] == (
        "maml-second-order")


def test_evaluate_takes_the_episode_shape_from_the_model_and_needs_data_settings_or_a_data_root(
    trained_checkpoint: Path, tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """No data settings saved: never the built-in data set with its defaults, but one line naming --data-root."""
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    here = dict(cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    nodata = tmp_path / "nodata.ckpt"
    torch.save({k: v for k, v in checkpoint.items() if k != "datamodule_hyper_parameters"}, nodata)
    for extra in ((), ("--allow-seen-classes",)):
        status, printed = _medmeta_here("evaluate", str(nodata), "--out", str(tmp_path / "eval"), *extra, **here)
        assert status == 2, printed
        (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
        assert "holds no data settings" in line and "--data-root" in line and "Traceback" not in printed
        assert not (tmp_path / "cache").exists() and not (tmp_path / "eval").exists()  # nothing generated, nothing run
    # with --data-root: the model's 3-way episodes (the tiny set's test split has 2 classes), and a warning on defaults
    status, printed = _medmeta_here("evaluate", str(nodata), "--data-root", str(tiny_dicom_root), "--out",
                                    str(tmp_path / "eval"), **here)  # fmt: skip
    assert status == 2 and "warning:" in printed and "holds no data settings" in printed.replace("\n", " ")
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert "n_way=3 episodes" in line and "n_way=5" not in printed
    # saved data settings that do not fit the model are refused, naming them
    checkpoint["datamodule_hyper_parameters"] = {**checkpoint["datamodule_hyper_parameters"], "n_way": 5}
    torch.save(checkpoint, tmp_path / "mismatch.ckpt")
    status, printed = _medmeta_here("evaluate", str(tmp_path / "mismatch.ckpt"), "--out", str(tmp_path / "eval2"),
                                    **here)  # fmt: skip
    assert status == 2, printed
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert "n_way=5 (the model: 3)" in line and not (tmp_path / "eval2").exists()


def test_evaluate_into_a_new_folder_does_not_warn_of_deleting_old_logs(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    """A fresh ``--out``: no Lightning warning that the run folder "exists and is not empty" (class_splits.json is ours)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, printed = _medmeta_here("evaluate", str(trained_checkpoint), "--out", str(tmp_path / "eval"),
                                        cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 0, printed[-2000:]
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    (run,) = (tmp_path / "eval" / "evaluate").iterdir()
    assert {"class_splits.json", "metrics.csv", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard's file in the same folder (docs/evaluation.md)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"], "--lr_scheduler needs --optimizer"),
        (["--optimizer", "SGD", "--optimizer.lr", "0.1", "--lr_scheduler", "ReduceLROnPlateau",
          "--lr_scheduler.monitor", "val/acc"], "ReduceLROnPlateau is not supported"),  # fmt: skip
        (["--model.cosine_annealing", "true", "--optimizer", "SGD", "--optimizer.lr", "0.1"],
         "model.cosine_annealing has no effect with --optimizer"),  # fmt: skip
        (["--trainer.precision", "bf16-true"], "trainer.precision bf16-true is not supported"),
        (["--trainer.max_steps", "2", "--trainer.val_check_interval", "5"],
         "no validation would run (trainer.val_check_interval 5 batches > trainer.max_steps 2)"),  # fmt: skip
        (["--trainer.limit_val_batches", "0"], "no validation would run (trainer.limit_val_batches 0)"),
    ],
)
def test_ignored_or_unsupported_training_settings_are_refused_before_data(
    tiny_dicom_root: Path, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A scheduler that would never be built, a schedule dropped by --optimizer, fp16/bf16 weights, a test after
    fit with no checkpoint selected on val/acc: one line each, before any data is read."""
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), *extra, cwd=tmp_path, capsys=capsys,
                                    monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-2000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert message in line and "Traceback" not in printed
    assert "usable images" not in printed


def test_a_cli_scheduler_steps_per_optimizer_step_and_the_progress_bar_can_be_turned_off(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """medmeta's epochs are longer than a fit: a per-epoch StepLR would never step (lr 1 after 3 steps, not 0.125).

    The configs' RichProgressBar is dropped under --trainer.enable_progress_bar false (Lightning refuses the two).
    """
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--optimizer", "SGD", "--optimizer.lr", "1",
                                    "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma",
                                    "0.5", "--test_after_fit", "false", "--trainer.limit_val_batches", "0",
                                    "--trainer.enable_progress_bar", "false", cwd=tmp_path, capsys=capsys,
                                    monkeypatch=monkeypatch)  # fmt: skip
    assert status == 0, printed[-3000:]
    checkpoint = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == 0.125
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3


def test_a_test_after_fit_without_validation_says_it_tested_the_last_weights(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Validation that never ran (here: one short epoch) is named in the console, metrics.json and report.html."""
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--trainer.max_steps", "-1",
                                    "--trainer.max_epochs", "1", "--data.train_batches_per_epoch", "2",
                                    "--data.test_episodes", "2", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 0, printed[-3000:]
    (line,) = [line for line in printed.splitlines() if "warning:" in line]
    assert "last weights, not selected on val/acc: no validation ran" in line and "max_epochs 1" in line
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    assert metrics["tested_weights"].startswith("last weights, not selected on val/acc")
    assert "last weights, not selected on val/acc" in next(out.rglob("report.html")).read_text()


def test_fit_with_test_after_fit_refuses_a_test_split_that_cannot_be_tested_before_training(
    tiny_dicom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two test classes for 3-way episodes: one line naming the split, before any step or checkpoint."""
    classes = sorted(p.name for p in tiny_dicom_root.iterdir() if p.is_dir())
    splits = {"train": classes[:5], "val": classes[5:10], "test": classes[10:]}
    out = tmp_path / "run"
    status, printed = _medmeta_here(*_tiny_fit_args(tiny_dicom_root, out), "--data.splits", json.dumps(splits),
                                    cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)  # fmt: skip
    assert status == 2, printed[-3000:]
    (line,) = [line for line in printed.splitlines() if "medmeta: error:" in line]
    assert "meta-split 'test' has 2 class(es)" in line and "n_way=3" in line and "before training" in line
    assert not list(out.rglob("*.ckpt")) and "Traceback" not in printed
