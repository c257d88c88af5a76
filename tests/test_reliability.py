"""Reliability: exact resume, pre-emption signals, untrusted checkpoints, numerical faults, determinism."""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from medmeta.callbacks import LastCheckpoint, RandomStateCheckpoint
from medmeta.checkpoints import check_checkpoint
from medmeta.data import datamodule as datamodule_module
from medmeta.data.datamodule import EpisodicDataModule
from medmeta.errors import DataError
from medmeta.module import FewShotModule
from tests.conftest import module_for
from tests.test_cli import _medmeta, _tiny_fit_args

DATA: dict = dict(
    n_way=3, k_shot=1, q_query=2, meta_batch_size=2, image_size=16, train_batches_per_epoch=4, val_episodes=2,
    test_episodes=2, split_ratios=(0.5, 0.25, 0.25),
)  # fmt: skip


class EpisodeLog(L.Callback):
    """Records the training episode indices and losses of every step."""

    def __init__(self) -> None:
        self.episodes: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: dict, *_: object) -> None:
        self.episodes.append(batch["episode"].tolist())
        self.losses.append(float(outputs["loss"]))


class GlobalRandomNoise(L.Callback):
    """Adds noise drawn from the global torch, NumPy and Python RNGs to every training batch.

    medmeta itself draws no global randomness while training (episodes and augmentation come from
    seeded local generators), but a user's model or callback may (dropout, noise): this stands in
    for them, so that a resume that does not restore the global RNG states gives different losses.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *_: object) -> None:
        for key in ("support_x", "query_x"):
            x = batch[key]
            noise = torch.randn_like(x) + torch.from_numpy(np.random.standard_normal(x.shape)).to(x.dtype)
            batch[key] = x + 0.1 * (noise + random.gauss(0.0, 1.0))


def _fit(
    root: Path, out: Path, max_steps: int, ckpt_path: str | None = None, *, noise: bool = False, rng_state: bool = True
) -> tuple[FewShotModule, EpisodeLog]:
    L.seed_everything(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1, pixel_baseline=False)
    log = EpisodeLog()
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=1, save_top_k=0)
    callbacks = [checkpoints, *([RandomStateCheckpoint()] if rng_state else []), *([GlobalRandomNoise()] if noise else []), log]
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, inference_mode=False, default_root_dir=out, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=EpisodicDataModule(str(root), **DATA), ckpt_path=ckpt_path, weights_only=True)
    return module, log


def test_resumed_run_equals_the_uninterrupted_one(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """Stopped at step 3 (mid-epoch: 4 steps per epoch) and resumed to 6, with global-RNG noise in every step
    (crossing the epoch boundary at step 4): same episodes, bit-identical losses and weights."""
    full, full_log = _fit(tiny_dicom_root, tmp_path / "full", 6, noise=True)
    _fit(tiny_dicom_root, tmp_path / "part", 3, noise=True)
    resumed, resumed_log = _fit(tiny_dicom_root, tmp_path / "part", 6, ckpt_path=str(tmp_path / "part/checkpoints/last.ckpt"), noise=True)
    assert resumed_log.episodes == full_log.episodes[3:]
    assert resumed_log.losses == full_log.losses[3:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_without_the_rng_state_a_resume_with_global_randomness_differs(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """The counter-check: with global-RNG noise in training, the restored RNG states are what make the resumed
    run equal the uninterrupted one (same episodes, different losses without them)."""
    _, full_log = _fit(tiny_dicom_root, tmp_path / "full", 6, noise=True, rng_state=False)
    _fit(tiny_dicom_root, tmp_path / "part", 3, noise=True, rng_state=False)
    _, resumed_log = _fit(tiny_dicom_root, tmp_path / "part", 6, ckpt_path=str(tmp_path / "part/checkpoints/last.ckpt"),
                          noise=True, rng_state=False)  # fmt: skip
    assert resumed_log.episodes == full_log.episodes[3:]
    assert all(a != b for a, b in zip(resumed_log.losses, full_log.losses[3:], strict=True))


@pytest.mark.parametrize("fresh", [True, False])
def test_last_checkpoint_is_refreshed_after_every_validation(tiny_dicom_root: Path, tmp_path: Path, fresh: bool) -> None:
    """A monitored metric that never improves (``step`` in ``min`` mode): Lightning alone leaves last.ckpt at the first
    validation; with ``LastCheckpoint`` it holds the newest validated step, and the final one when training ends."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    seen: list[tuple[int, int]] = []

    class Probe(L.Callback):  # at the start of a step, every hook of the previous validation has run
        def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
            if last.exists():
                seen.append((trainer.global_step, torch.load(last, weights_only=True)["global_step"]))

    L.seed_everything(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1, pixel_baseline=False)
    checkpoints = ModelCheckpoint(dirpath=last.parent, monitor="step", mode="min", save_top_k=1, save_last=True)
    trainer = L.Trainer(max_steps=7, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        inference_mode=False, default_root_dir=tmp_path,
                        callbacks=[checkpoints, Probe(), *([LastCheckpoint()] if fresh else [])])  # fmt: skip
    trainer.fit(module, datamodule=EpisodicDataModule(str(tiny_dicom_root), **DATA))
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no last-v1.ckpt
    if fresh:
        assert seen == [(2, 2), (3, 2), (4, 4), (5, 4), (6, 6)]
        assert torch.load(last, weights_only=True)["global_step"] == 7
    else:
        assert {stored for _, stored in seen} == {2}


def test_without_the_loader_state_a_mid_epoch_resume_repeats_episodes(
    tiny_dicom_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counter-check: the saved loader position is what makes the resumed episode stream right."""
    _, full_log = _fit(tiny_dicom_root, tmp_path / "full", 6)
    _fit(tiny_dicom_root, tmp_path / "part", 3)
    monkeypatch.setattr(datamodule_module.ResumableLoader, "load_state_dict", lambda self, state: None)
    _, resumed_log = _fit(tiny_dicom_root, tmp_path / "part", 6, ckpt_path=str(tmp_path / "part/checkpoints/last.ckpt"))
    assert resumed_log.episodes != full_log.episodes[3:]


def test_same_seed_gives_bitwise_identical_checkpoints_and_metrics(tiny_dicom_root: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        module, _ = _fit(tiny_dicom_root, tmp_path / name, 4)
        checkpoint = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, inference_mode=False, default_root_dir=tmp_path / name)
        trainer.test(module, datamodule=EpisodicDataModule(str(tiny_dicom_root), **DATA), verbose=False)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        runs.append((checkpoint["state_dict"], checkpoint["optimizer_states"], metrics.pop("figures"), metrics))
    (state_a, optim_a, _, metrics_a), (state_b, optim_b, _, metrics_b) = runs
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(optim_a), _tensors(optim_b), strict=True))
    assert metrics_a == metrics_b


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _batches(nan_step: int | None = None, steps: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = []
    for step in range(steps):
        for task in range(2):
            item = {"support_x": torch.rand(3, 1, 8, 8, generator=g), "support_y": torch.arange(3),
                    "query_x": torch.rand(6, 1, 8, 8, generator=g), "query_y": torch.arange(3).repeat_interleave(2),
                    "episode": torch.tensor(10 * step + task)}  # fmt: skip
            if step == nan_step and task == 1:
                item["query_x"][0, 0, 0, 0] = float("nan")  # an image that escaped the preflight
            items.append(item)
    return DataLoader(items, batch_size=2)


@pytest.mark.parametrize("norm_mode", ["transductive", "running"])  # running: the step's statistics are put back too
def test_nonfinite_skip_mode_skips_only_the_bad_update_and_counts_it(tmp_path: Path, norm_mode: str) -> None:
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, nonfinite="skip", pixel_baseline=False,
                        norm_mode=norm_mode)  # fmt: skip
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: object) -> None:
            snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        inference_mode=False, default_root_dir=tmp_path, callbacks=[Snapshot()])  # fmt: skip
    trainer.fit(module, _batches(nan_step=1))
    assert module.skipped_steps == 1
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert not same(snapshots[0], snapshots[2]) and same(snapshots[0], snapshots[1])  # step 2 (index 1) changed nothing
    assert all(torch.isfinite(v).all() for v in snapshots[2].values() if v.is_floating_point())


def test_nonfinite_meta_gradient_stops_with_the_episodes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, pixel_baseline=False)
    module.model.head.weight.register_hook(lambda grad: grad * float("inf"))  # finite loss, non-finite meta-gradient
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"non-finite meta-gradient at training episodes \[0, 1\]"):
        trainer.fit(module, _batches())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_during_fit_writes_a_checkpoint_and_fit_last_continues(
    tiny_dicom_root: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """A real ``medmeta fit`` subprocess, a real SIGTERM (or SLURM's SIGUSR1), then ``--ckpt_path last``."""
    out = tmp_path / "run"
    args = [*_tiny_fit_args(tiny_dicom_root, out), "--trainer.max_steps", "100000", "--trainer.val_check_interval", "50",
            "--trainer.log_every_n_steps", "1", "--test_after_fit", "false"]  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "medmeta.cli", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and _logged_steps(out) < 3:  # training is under way
        time.sleep(0.2)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stdout[-2000:] + stderr[-2000:]
    message = [line for line in stdout.splitlines() if line.startswith("medmeta: stopped by a termination signal")]
    assert len(message) == 1 and "last.ckpt" in message[0] and "Traceback" not in stdout + stderr
    last = next(out.rglob("last.ckpt"))
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert stopped_at >= 3
    if signum != signal.SIGTERM:
        return  # the resume is the same for both signals
    # the same validation interval as the stopped run: Lightning numbers logged steps one higher when a run
    # resumes on a step that the new configuration would have validated at
    resumed = _medmeta(*_tiny_fit_args(tiny_dicom_root, out), "--trainer.max_steps", str(stopped_at + 2),
                       "--trainer.val_check_interval", "50", "--trainer.log_every_n_steps", "1", "--ckpt_path", "last",
                       "--test_after_fit", "false", cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from {last}" in resumed.stdout.replace("\n", "")
    # the run's one log goes on: the resumed run trained exactly the two steps after the checkpoint, not from step 0
    (log,) = out.rglob("metrics.csv")
    trained = [int(row["step"]) for row in csv.DictReader(log.open()) if row.get("train/loss")]
    assert trained == list(range(stopped_at + 2))  # CSVLogger counts steps from 0


def _logged_steps(out: Path) -> int:
    """Training steps logged so far by the CSV logger of a run folder."""
    files = list(out.rglob("metrics.csv"))
    return max((len(f.read_text().splitlines()) - 1 for f in files), default=0)


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_untrusted_checkpoints_are_refused_with_clear_errors(tiny_dicom_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Evil(marker)}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    run = _medmeta(*_tiny_fit_args(tiny_dicom_root, tmp_path / "run"), "--test_after_fit", "false", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    good = next((tmp_path / "run").rglob("last.ckpt"))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        ("fit", evil, [], "holds objects other than tensors and plain values"),
        ("test", truncated, [], "cannot load checkpoint"),
        ("test", good, ["--data.n_way", "4"], "trained for a different model: n_way=3 (this run: 4)"),
    ]  # (a --model.* value is replaced by the checkpoint's own hyperparameters: LightningCLI's rule)
    for command, path, extra, message in cases:
        args = _tiny_fit_args(tiny_dicom_root, tmp_path / "other")
        args[0] = command
        result = _medmeta(*args, *extra, "--ckpt_path", str(path), cwd=tmp_path)
        assert result.returncode == 2, (command, path.name, result.stdout[-1500:], result.stderr[-1500:])
        assert message in result.stdout.replace("\n", ""), (command, path.name, result.stdout[-1500:])
        assert "Traceback" not in result.stdout + result.stderr
    unsafe = _medmeta(*_tiny_fit_args(tiny_dicom_root, tmp_path / "other"), "--ckpt_path", str(good), "--weights_only",
                      "false", cwd=tmp_path)  # fmt: skip
    assert unsafe.returncode == 2 and "--weights_only false is refused" in unsafe.stdout
    for tool in ("diagnose", "evaluate"):
        extra = ["--support", str(tiny_dicom_root), "--query", str(tiny_dicom_root)] if tool == "diagnose" else []
        result = _medmeta(tool, "--ckpt", str(evil), *extra, "--out", str(tmp_path / tool), cwd=tmp_path)
        assert result.returncode == 2 and "cannot load checkpoint" in result.stdout and "Traceback" not in result.stderr
    assert not marker.exists()
    with pytest.raises(DataError, match=r"different model: backbone=medmeta\.networks\.conv4\.Conv4\(hidden_channels=8, "
                       r"norm='batch', feature_levels='last'\) \(this run: medmeta\.networks\.resnet\.ResNet12\(hidden_channels=8"):
        check_checkpoint(good, module_for(backbone="resnet12", n_way=3, image_size=16, hidden_channels=8).hparams)


def test_full_pipeline_on_a_read_only_data_folder(tiny_dicom_root: Path, tmp_path: Path) -> None:
    """fit + test, then diagnose and evaluate (on the command line's own checkpoint), on a data folder made
    read-only; nothing in it changes.

    Tests may run as root, which ignores file modes, so the snapshot of names, sizes and times is
    what proves that nothing was written.
    """
    import shutil
    import stat

    root = tmp_path / "data"
    shutil.copytree(tiny_dicom_root, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    snapshot = lambda: {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}  # noqa: E731
    before = snapshot()
    try:
        fit = _medmeta(*_tiny_fit_args(root, tmp_path / "run"), cwd=tmp_path)
        assert fit.returncode == 0 and "test accuracy:" in fit.stdout, fit.stdout[-2000:] + fit.stderr[-2000:]
        checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
        diagnosed = _medmeta("diagnose", "--ckpt", str(checkpoint), "--support", str(root), "--query",
                             str(next(root.iterdir())), "--out", str(tmp_path / "dx"), cwd=tmp_path)  # fmt: skip
        assert diagnosed.returncode == 0, diagnosed.stdout[-2000:] + diagnosed.stderr[-2000:]
        evaluated = _medmeta("evaluate", "--ckpt", str(checkpoint), "--test-episodes", "3", "--out", str(tmp_path / "ev"),
                             cwd=tmp_path)  # fmt: skip
        assert evaluated.returncode == 0 and "macro AUROC" in evaluated.stdout, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
        assert snapshot() == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


class _SignalAt(L.Callback):
    """Sends this process SIGTERM at the start of training step ``step`` (0-based), as a scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit_validated(
    root: Path, out: Path, max_steps: int, ckpt_path: str | None = None, signal_at: int | None = None
) -> tuple[FewShotModule, EpisodeLog]:
    """``_fit`` with ``medmeta fit``'s callbacks and a validation after every step (the best model kept)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from medmeta.callbacks import PreemptionCheckpoint

    L.seed_everything(0)
    module = module_for(n_way=3, image_size=16, hidden_channels=8, inner_steps=1, eval_inner_steps=1, pixel_baseline=False)
    log = EpisodeLog()
    callbacks = [PreemptionCheckpoint(), LastCheckpoint(), RandomStateCheckpoint(), log,
                 ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/acc", mode="max", save_last=True),
                 *([_SignalAt(signal_at)] if signal_at is not None else [])]  # fmt: skip
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=1, check_val_every_n_epoch=None, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        inference_mode=False, default_root_dir=out, callbacks=callbacks)  # fmt: skip
    try:
        trainer.fit(module, datamodule=EpisodicDataModule(str(root), **DATA), ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        pass
    return module, log


def test_resume_at_an_epoch_boundary_with_validation_equals_the_uninterrupted_run(
    tiny_dicom_root: Path, tmp_path: Path
) -> None:
    """4 steps per epoch, validation after every step; stopped by ``max_steps`` inside an epoch (3) and at its last
    step (4), and by SIGTERM during an epoch's last step: the resumed run trains the same episodes, with the same
    losses, to the same weights (Lightning counts an epoch cut by ``max_steps`` as done: it must not skip its rest)."""
    full, full_log = _fit_validated(tiny_dicom_root, tmp_path / "full", 8)
    for name, stop, signal_at in (("cut", 3, None), ("epoch_end", 4, None), ("sigterm", 8, 3)):
        out = tmp_path / name
        _fit_validated(tiny_dicom_root, out, stop, signal_at=signal_at)
        stopped_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert stopped_at == min(stop, 4), name
        resumed, resumed_log = _fit_validated(tiny_dicom_root, out, 8, ckpt_path=str(out / "checkpoints" / "last.ckpt"))
        assert resumed_log.episodes == full_log.episodes[stopped_at:], name
        assert resumed_log.losses == full_log.losses[stopped_at:], name
        for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, key)


@pytest.mark.parametrize("how", ["last", pytest.param("path", marks=pytest.mark.slow)])  # 1 min each
def test_fit_last_keeps_the_best_checkpoint_of_the_whole_run(tiny_dicom_root: Path, tmp_path: Path, how: str) -> None:
    """``medmeta fit`` stopped at step 3, then ``--ckpt_path last`` (or the checkpoint's path) to step 6 (validation
    after every step): the run goes on in its own version folder and log, and the best checkpoint at the end is the
    uninterrupted run's, chosen over the validations before and after the resume."""

    def fit(out: Path, steps: int, *extra: str) -> Path:
        done = _medmeta(*_tiny_fit_args(tiny_dicom_root, out), "--trainer.max_steps", str(steps),
                        "--trainer.val_check_interval", "1", "--trainer.log_every_n_steps", "1",
                        "--model.meta_lr", "0.05", "--test_after_fit", "false", *extra, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "dirpath has changed" not in done.stdout + done.stderr
        return next(out.rglob("last.ckpt"))

    def best(last: Path) -> tuple[str, float, int]:
        checkpoint = torch.load(last, weights_only=True)
        (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint")]
        return Path(state["best_model_path"]).name, float(state["best_model_score"]), checkpoint["global_step"]

    full = best(fit(tmp_path / "full", 6))
    stopped = fit(tmp_path / "part", 3)
    resumed = best(fit(tmp_path / "part", 6, "--ckpt_path", "last" if how == "last" else str(stopped)))
    assert resumed == full
    (log,) = (tmp_path / "part").rglob("metrics.csv")  # one run folder, one log
    scores = [float(row["val/acc"]) for row in csv.DictReader(log.open()) if row.get("val/acc")]
    assert len(scores) == 6 and resumed[1] == pytest.approx(max(scores))
    assert sorted(p.name for p in log.parent.glob("config*.yaml")) == ["config.yaml", "config_resume_1.yaml"]


def test_nonfinite_skip_with_accumulation_puts_back_every_micro_batch_and_names_its_episodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With accumulate_grad_batches 2 a skipped update's statistics are those before its first micro-batch."""
    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, nonfinite="skip", pixel_baseline=False,
                        norm_mode="running")  # fmt: skip
    before = {k: v.clone() for k, v in module.named_buffers()}
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    with caplog.at_level("WARNING", logger="medmeta.module"):
        trainer.fit(module, _batches(nan_step=1, steps=2))  # the second micro-batch of the step is the bad one
    assert module.skipped_steps == 1
    assert [k for k, v in module.named_buffers() if not torch.equal(v, before[k])] == []
    assert "training episodes [0, 1, 10, 11]" in caplog.text


def test_a_grad_scaler_overflow_is_left_to_the_scaler(tmp_path: Path) -> None:
    """Under 16-mixed an inf gradient is a loss-scale overflow: the scaler skips it and lowers its scale, no stop."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    module = module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, pixel_baseline=False)  # nonfinite: stop
    scaler = torch.amp.GradScaler("cpu", init_scale=1e12)  # overflows at once in float16
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        inference_mode=False, default_root_dir=tmp_path,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])  # fmt: skip
    trainer.fit(module, _batches(steps=3))
    assert trainer.global_step == 3 and scaler.get_scale() < 1e12 and module.skipped_steps == 0
