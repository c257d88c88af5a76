"""Lightning DDP on 2 CPU processes (gloo), run as real subprocesses: the same meta-gradient as one
process, distinct tasks per rank, and one memory-mapped image cache shared by the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning as L
import medmeta.module
from torch.utils.data import DataLoader

from tests.ddp_worker import eval_tasks, fixed_tasks, fresh_module

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = WORKER.parent.parent


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "MEDMETA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(WORKER), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_meta_gradient_equals_the_single_process_one(tmp_path: Path) -> None:
    _run(["grad", str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"grad-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["episodes"] + ranks[1]["episodes"]) == [0, 1, 2, 3]  # 2 distinct tasks each
    assert len(set(ranks[0]["episodes"])) == 2

    module = fresh_module()
    batch = {k: torch.stack([row[k] for row in fixed_tasks()]) for k in ("support_x", "support_y", "query_x", "query_y")}
    loss = module.algorithm.outer_loss(batch["support_x"], batch["support_y"], batch["query_x"], batch["query_y"])
    reference = dict(zip([n for n, _ in module.named_parameters()], torch.autograd.grad(loss, list(module.parameters()))))
    for rank in ranks:
        assert set(rank["grads"]) == set(reference)
        flat = torch.cat([rank["grads"][n].flatten() for n in reference])
        expected = torch.cat([g.flatten() for g in reference.values()])
        assert float((flat - expected).norm() / expected.norm()) < 1e-5


def test_ddp_ranks_get_distinct_episodes_and_share_one_mapped_cache(tmp_path: Path, tiny_dicom_root: Path) -> None:
    _run(["data", str(tmp_path), str(tiny_dicom_root)], tmp_path)
    ranks = [torch.load(tmp_path / f"data-rank{r}.pt", weights_only=True) for r in (0, 1)]
    episodes = [set(r["episodes"]) for r in ranks]
    assert all(len(e) == 4 for e in episodes)  # 2 meta-steps x 2 tasks per rank
    assert not episodes[0] & episodes[1]
    caches = list((tmp_path / "cache" / "tensors").glob("*.pt"))
    assert len(caches) == 2  # train and val images, each cached once
    assert all(r["mapped"] and set(r["mapped"]) <= {str(p) for p in caches} for r in ranks)
    assert ranks[0]["mapped"] == ranks[1]["mapped"]
    assert not any(p.suffix == ".partial" for p in (tmp_path / "cache" / "tensors").iterdir())


def test_ddp_evaluation_counts_each_episode_once_and_validates_on_all_of_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 episodes on 2 ranks: the sampler repeats one to give each rank 3; val/acc and the test count each once.

    The adaptation curve covers the first 2 episodes by id (ids 0 and 1, one from each rank), as on one process.
    """
    _run(["eval", str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"eval-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False, default_root_dir=tmp_path / "one")  # fmt: skip
    monkeypatch.setattr(medmeta.module, "CURVE_EPISODES", 2)
    module = fresh_module()
    single = trainer.validate(module, DataLoader(eval_tasks(), batch_size=1), verbose=False)[0]["val/acc"]
    trainer.test(module, DataLoader(eval_tasks(), batch_size=1), verbose=False)
    for rank in ranks:
        assert rank["val_acc"] == pytest.approx(single, abs=1e-6)  # every episode once, on every rank
    assert ranks[0]["episode_ids"].tolist() == [0, 1, 2, 3, 4] and ranks[0]["test_episodes"] == 5
    assert torch.allclose(ranks[0]["probs"], module.test_results.probs, atol=1e-5)
    assert module.test_results.curve.shape[0] == 2
    for rank in ranks:  # not each rank's own first 2 (ids 0, 2 on rank 0): that curve would differ
        assert torch.allclose(rank["curve"], module.test_results.curve, atol=1e-5)
