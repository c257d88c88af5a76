"""CUDA-graph replay of the meta-step: same meta-gradient as eager on a GPU, eager fallback elsewhere."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medmeta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from medmeta.algorithms.cuda_graph import GraphedOuterLoss
from medmeta.module import FewShotModule
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes
from tests.conftest import module_for

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model() -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=12, norm="batch")


def _batches(steps: int, tasks: int = 2) -> list[dict[str, torch.Tensor]]:
    """Distinct episode batches of one shape (as the datamodule gives them)."""
    out = []
    for seed in range(steps):
        g = torch.Generator().manual_seed(seed)
        sx, sy, qx, qy = random_episodes(tasks=tasks, q=2, side=12, dtype=torch.float32)
        out.append({
            "support_x": sx + torch.randn(sx.shape, generator=g), "support_y": sy,
            "query_x": qx + torch.randn(qx.shape, generator=g), "query_y": qy, "episode": torch.arange(tasks) + seed,
        })  # fmt: skip
    return out


def _train(
    module: FewShotModule, batches: list[dict[str, torch.Tensor]], root: Path, accelerator: str, precision: str = "32-true"
) -> list[float]:
    """``len(batches)`` meta-steps with a real Trainer; the logged losses."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, *_: object) -> None:
            losses.append(float(outputs["loss"]))

    loader = DataLoader([{k: v[t] for k, v in b.items()} for b in batches for t in range(2)], batch_size=2)
    trainer = L.Trainer(max_steps=len(batches), accelerator=accelerator, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        inference_mode=False, default_root_dir=root, callbacks=[Record()])  # fmt: skip
    trainer.fit(module, loader)
    return losses


def test_cpu_falls_back_to_eager_with_one_warning_and_trains_identically(tmp_path: Path) -> None:
    batches = _batches(3)
    torch.manual_seed(0)
    eager = module_for(n_way=3, image_size=12, hidden_channels=8, inner_steps=2, pixel_baseline=False)
    torch.manual_seed(0)
    graphed = module_for(n_way=3, image_size=12, hidden_channels=8, inner_steps=2, pixel_baseline=False, cuda_graph=True)
    expected = _train(eager, batches, tmp_path / "eager", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _train(graphed, batches, tmp_path / "graphed", "cpu")
    assert got == expected
    fallback = [w for w in caught if "cuda_graph: running eagerly" in str(w.message)]
    assert len(fallback) == 1
    for name, value in eager.state_dict().items():
        assert torch.equal(value, graphed.state_dict()[name]), name


def test_refused_where_the_graph_would_freeze_changing_settings() -> None:
    with pytest.raises(ValueError, match="cuda_graph is for learners that can record a fixed meta-step; maml_pp-"):
        GraphedOuterLoss(MAMLPlusPlus(_model(), inner_steps=2))
    with pytest.raises(ValueError, match="cuda_graph is for learners that can record a fixed meta-step; protonet"):
        FewShotModule(algorithm="protonet", n_way=3, image_size=12, cuda_graph=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("algorithm", [MAML, MetaSGD, ANIL])
@pytest.mark.parametrize("task_parallel", ["loop", "vmap"])
def test_replayed_meta_gradient_equals_eager_across_weight_updates(algorithm: type, task_parallel: str) -> None:
    """Three meta-steps with an SGD update between them: graphs read the updated weights in place."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    eager_algo = algorithm(_model().cuda(), inner_steps=3, task_parallel=task_parallel)
    graph_algo = algorithm(_model().cuda(), inner_steps=3, task_parallel=task_parallel)
    graph_algo.load_state_dict(eager_algo.state_dict())
    graphed = GraphedOuterLoss(graph_algo)
    eager_opt = torch.optim.SGD(eager_algo.parameters(), lr=0.1)
    graph_opt = torch.optim.SGD(graph_algo.parameters(), lr=0.1)
    for batch in _batches(3):
        episodes = [batch[k].cuda() for k in ("support_x", "support_y", "query_x", "query_y")]
        for algo, outer, opt in ((eager_algo, eager_algo.outer_loss_and_logits, eager_opt), (graph_algo, graphed, graph_opt)):
            opt.zero_grad(set_to_none=True)
            loss, _ = outer(*episodes)
            loss.backward()
        # over the whole meta-gradient: a conv bias before batch norm has a ~0 gradient of its own
        expected = torch.cat([p.grad.flatten() for p in eager_algo.parameters()])
        got = torch.cat([p.grad.flatten() for p in graph_algo.parameters()])
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        eager_opt.step()
        graph_opt.step()
    assert len(graphed._graphs) == 1  # one shape, one recording, replayed


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_trainer_with_cuda_graph_trains_like_eager_on_gpu(tmp_path: Path, precision: str) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    batches = _batches(4)
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        module = module_for(n_way=3, image_size=12, hidden_channels=8, inner_steps=2, pixel_baseline=False,
                            task_parallel="vmap", cuda_graph=flag)  # fmt: skip
        losses[flag] = _train(module, batches, tmp_path / str(flag), "gpu", precision)
    tolerance = 1e-5 if precision == "32-true" else 5e-2  # bf16: same kernels, autocast cache off in the graph
    assert losses[True] == pytest.approx(losses[False], rel=tolerance)
