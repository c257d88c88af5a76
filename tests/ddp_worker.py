"""Run by tests/test_ddp.py as a real script: Lightning DDP on 2 CPU processes (gloo).

    python tests/ddp_worker.py grad OUT_DIR          one meta-step on 4 fixed tasks, 2 per rank
    python tests/ddp_worker.py data OUT_DIR ROOT     two meta-steps on the real data module
    python tests/ddp_worker.py eval OUT_DIR          validate and test on 5 fixed tasks (not a multiple of 2 ranks),
                                                     with an adaptation curve over the first 2

Each rank writes ``OUT_DIR/<mode>-rank<R>.pt`` with what it saw (Lightning re-runs this script for
rank 1, so it must stay importable and deterministic).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

import medmeta.module
from medmeta.data.datamodule import EpisodicDataModule, default_cache_dir
from medmeta.module import FewShotModule

TASKS, N_WAY, SIDE = 4, 3, 12


def fixed_tasks() -> list[dict[str, torch.Tensor]]:
    """Four deterministic 3-way 2-shot tasks, one dict per task (no task dimension)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for index in range(TASKS):
        rows.append({
            "support_x": torch.randn(N_WAY * 2, 1, SIDE, SIDE, generator=g),
            "support_y": torch.arange(N_WAY).repeat_interleave(2),
            "query_x": torch.randn(N_WAY * 3, 1, SIDE, SIDE, generator=g),
            "query_y": torch.arange(N_WAY).repeat_interleave(3),
            "episode": torch.tensor(index),
        })  # fmt: skip
    return rows


def eval_tasks() -> list[dict[str, torch.Tensor]]:
    """Five fixed tasks (ids 0-4): two ranks get three each, one of them repeated by the distributed sampler."""
    return [*fixed_tasks(), {**fixed_tasks()[0], "query_x": fixed_tasks()[1]["query_x"], "episode": torch.tensor(4)}]


def fresh_module(n_way: int = N_WAY) -> FewShotModule:
    """The same initial weights in every process and in the single-process reference."""
    torch.manual_seed(0)
    return FewShotModule(
        algorithm={"class_path": "maml", "init_args": {"inner_lr": 0.1, "inner_steps": 2}},
        backbone={"class_path": "conv4", "init_args": {"hidden_channels": 4}}, n_way=n_way, image_size=SIDE,
    )  # fmt: skip


class Record(L.Callback):
    """Keep the episode ids of every batch and the (already all-reduced) gradients of step 0."""

    def __init__(self) -> None:
        self.episodes: list[int] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        self.episodes += batch["episode"].tolist()

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: object) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=1 if mode == "grad" else 2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
        callbacks=[record], default_root_dir=out, limit_val_batches=None if mode == "eval" else 0, num_sanity_val_steps=0,
    )  # fmt: skip
    if mode == "eval":
        medmeta.module.CURVE_EPISODES = 2  # fewer than each rank's 3 episodes: the curve must be the first 2 by id
        module = fresh_module()
        scores = trainer.validate(module, DataLoader(eval_tasks(), batch_size=1), verbose=False)[0]
        trainer.test(module, DataLoader(eval_tasks(), batch_size=1), verbose=False)
        result = module.test_results
        torch.save({"val_acc": scores["val/acc"], "episode_ids": result.episode_ids, "probs": result.probs, "curve": result.curve,
                    "test_episodes": module.test_summary.get("test_episodes"), "world": trainer.world_size},
                   out / f"eval-rank{trainer.global_rank}.pt")  # fmt: skip
        return
    module = fresh_module(N_WAY if mode == "grad" else 2)
    if mode == "grad":
        trainer.fit(module, DataLoader(fixed_tasks(), batch_size=TASKS // 2))
        mapped: list[str] = []
    else:
        data = EpisodicDataModule(
            sys.argv[3], n_way=2, k_shot=1, q_query=2, meta_batch_size=4, image_size=SIDE,
            train_batches_per_epoch=2, val_episodes=2, test_episodes=2,
        )  # fmt: skip
        trainer.fit(module, data)
        caches = [str(p) for p in (default_cache_dir() / "tensors").glob("*.pt")]
        maps = Path("/proc/self/maps").read_text()
        mapped = [path for path in caches if path in maps]
    torch.save({"episodes": record.episodes, "grads": record.grads, "mapped": mapped, "world": trainer.world_size},
               out / f"{mode}-rank{trainer.global_rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main()
