"""The Lightning module: confidence intervals, non-finite losses, inference-mode safety."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medmeta.evaluation.metrics import mean_and_ci95
from medmeta.module import FewShotModule
from tests.conftest import module_for


def _batch(tasks: int = 2, n_way: int = 3, side: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "support_x": torch.rand(tasks, n_way, 1, side, side, generator=g),
        "support_y": torch.arange(n_way).repeat(tasks, 1),
        "query_x": torch.rand(tasks, 2 * n_way, 1, side, side, generator=g),
        "query_y": torch.arange(n_way).repeat_interleave(2).repeat(tasks, 1),
        "episode": torch.arange(7, 7 + tasks),
    }


def _module() -> FewShotModule:
    return module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, eval_inner_steps=2)


def test_mean_and_ci95_by_hand() -> None:
    values = torch.tensor([0.2, 0.4, 0.6, 0.8])
    mean, ci = mean_and_ci95(values)
    sd = math.sqrt(((0.3**2 + 0.1**2) * 2) / 3)  # sample sd around 0.5
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(1.96 * sd / 2)


def test_non_finite_loss_stops_with_episode_ids_and_applies_no_update(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = _batch()
    batch["query_x"][1, 0, 0, 0, 0] = float("nan")
    loader = DataLoader([{k: v[t] for k, v in batch.items()} for t in range(2)], batch_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"training episodes \[7, 8\].*no update was applied"):
        trainer.fit(module, loader)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_non_finite_predictions_at_evaluation_stop_naming_the_episodes(tmp_path: Path, stage: str) -> None:
    """A diverged adaptation's NaN logits would be scored as predictions of class 0: stopped instead."""
    batch = _batch()
    batch["query_x"][1, 0, 0, 0, 0] = float("inf")  # episode 8 only
    loader = DataLoader([{k: v[t] for k, v in batch.items()} for t in range(2)], batch_size=2)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, inference_mode=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=rf"after adapting to {stage[:4]}\w* episodes \[8\]: the adaptation diverged"):
        getattr(trainer, stage)(_module(), loader, verbose=False)
    diverging = _module()
    diverging.algorithm.inner_lr = 1e30  # every episode
    clean = DataLoader([{k: v[t] for k, v in _batch().items()} for t in range(2)], batch_size=2)
    with pytest.raises(FloatingPointError, match=r"episodes \[7, 8\]"):
        getattr(trainer, stage)(diverging, clean, verbose=False)


def test_evaluation_under_inference_mode_is_a_clear_error(tmp_path: Path) -> None:
    module = _module()
    loader = DataLoader([{k: v[0] for k, v in _batch().items()}], batch_size=1)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, inference_mode=True, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        trainer.validate(module, loader, verbose=False)


@pytest.mark.parametrize("backbone", ["conv4", "resnet12", "resnet18"])
@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
def test_backbones_are_chosen_by_name_and_train(backbone: str, algorithm: str) -> None:
    torch.manual_seed(0)
    steps = {"inner_steps": 1, "eval_inner_steps": 1} if algorithm == "maml" else {}
    module = module_for(algorithm, backbone, n_way=3, image_size=16, hidden_channels=4, **steps)
    batch = _batch(side=16)
    loss, _ = module.algorithm.meta_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert module.model.__class__.__name__.lower() == backbone


def test_maml_pp_sees_the_epoch_and_cosine_annealing_lowers_the_outer_rate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = module_for("maml_pp", n_way=3, image_size=8, hidden_channels=4, inner_steps=2, eval_inner_steps=2,
                        cosine_annealing=True, meta_lr=0.01)  # fmt: skip
    loader = DataLoader([{k: v[t] for k, v in _batch().items()} for t in range(2)], batch_size=1)
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        inference_mode=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, loader)
    assert module.algorithm.epoch == 2  # steps 5 with 2 batches per epoch: epochs 0, 1, 2
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.01 * 0.5


def test_hparams_hold_the_complete_plain_specs_of_learner_and_backbone() -> None:
    """Whatever spelling built the module, checkpoints store class paths and every setting (defaults included)."""
    from medmeta.algorithms import MAMLPlusPlus

    module = FewShotModule(algorithm=MAMLPlusPlus, backbone={"class_path": "resnet12", "init_args": {"hidden_channels": 4}},
                           n_way=3, image_size=16)  # fmt: skip
    algorithm, backbone = module.hparams["algorithm"], module.hparams["backbone"]
    assert algorithm["class_path"] == "medmeta.algorithms.maml_pp.MAMLPlusPlus"
    assert set(algorithm["init_args"]) == set(MAMLPlusPlus.settings()) and algorithm["init_args"]["inner_steps"] == 5
    assert backbone == {"class_path": "medmeta.networks.resnet.ResNet12",
                        "init_args": {**backbone["init_args"], "hidden_channels": 4}} and "norm" in backbone["init_args"]  # fmt: skip
    assert FewShotModule(**module.hparams).hparams == module.hparams  # rebuilt from them alone


def test_the_test_curve_is_at_curve_steps_or_every_step_of_a_learner_without_counted_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    module = module_for(n_way=3, image_size=8, hidden_channels=4, inner_steps=1, eval_inner_steps=12)
    batch = _batch()
    sx, sy, qx = batch["support_x"], batch["support_y"], batch["query_x"]
    per_step, steps = module._adaptation_curve(sx, sy, qx)
    assert steps == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12] and per_step.shape[0] == 11
    assert torch.equal(per_step, module.algorithm.adapt_and_predict_every_step(sx, sy, qx)[steps])

    monkeypatch.setattr(module.algorithm, "adaptation_steps", lambda: None)  # e.g. a plug-in written before at_steps
    per_step, steps = module._adaptation_curve(sx, sy, qx)
    assert steps == list(range(13)) and per_step.shape[0] == 13

    monkeypatch.setattr(module.algorithm, "adaptation_steps", lambda: 12)
    monkeypatch.setattr(module.algorithm, "adapt_and_predict_every_step", lambda *a, **k: torch.zeros(13, 2, 6, 3))
    with pytest.raises(RuntimeError, match="gave 13 rows for at_steps"):  # a hook that ignores at_steps: never mislabel
        module._adaptation_curve(sx, sy, qx)
