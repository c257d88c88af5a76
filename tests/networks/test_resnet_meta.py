"""The ResNet backbones under meta-learning: exact second-order MAML meta-gradients, and every learner on a 3D ResNet-12.

Exactness: in float64, with medmeta's transductive batch norm (``EpisodeBatchNorm``) and its
weights moved away from 1 and 0, MAML's meta-gradient on tiny ResNet-12s (2D and 3D) and a tiny
ResNet-18 (torchvision widths, 8x8 images) equals the plain sequential
``torch.autograd.grad(create_graph=True)`` reference of ``tests/algorithms/test_maml.py`` to 1e-10:
in the loop, with checkpointed inner steps, and under ``vmap``. ResNet-18's 11 M float64 weights
take seconds per meta-gradient (memory-bound on weight-sized tensors): its cases are marked slow,
like the run of ``benchmarks/backbone_memory.py --quick`` (eight subprocesses). ResNet-18's episodes have
4 shots: batch norm at layer3/4 normalises single-pixel maps over the support images, and over 6
images (2 shots) the meta-gradient is so ill-conditioned that vmap's reordered sums alone move it by ~1e-10.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from medmeta.algorithms import MAML, SHORT_NAMES, build_algorithm
from medmeta.networks import build_backbone
from tests.algorithms.episodes import random_episodes
from tests.algorithms.test_maml import reference_meta_gradient

REPO = Path(__file__).resolve().parents[2]
STEPS, N_WAY = 2, 3


class Setting(NamedTuple):
    """A tiny backbone and its episodes for the exactness check."""

    spec: dict[str, object]
    spatial_dims: int
    side: int
    shots: int
    inner_lr: float


SETTINGS = {
    "resnet12-2d": Setting({"class_path": "resnet12", "init_args": {"widths": (3, 4, 5, 6)}}, 2, 10, 2, 0.3),
    "resnet12-3d": Setting({"class_path": "resnet12", "init_args": {"widths": (2, 3, 4, 5)}}, 3, 6, 2, 0.3),
    "resnet18-2d": Setting({"class_path": "resnet18", "init_args": {}}, 2, 8, 4, 0.1),
}
CASES = [
    pytest.param(name, how, marks=[pytest.mark.slow] if name == "resnet18-2d" else [])
    for name in SETTINGS for how in ("loop", "checkpointed", "vmap")
]
LEARNER_SETTINGS: dict[str, object] = {  # small settings where a learner has them
    "inner_steps": 1, "eval_inner_steps": 2, "inner_lr": 0.1, "pretrain_classes": 10, "finetune_steps": 2,
    "max_iterations": 5, "multi_step_loss_epochs": 1,
}  # fmt: skip


def _backbone(name: str) -> torch.nn.Module:
    """Float64 backbone ``name`` (batch norm), its norm weights randomised so that every gradient term shows."""
    spec, spatial_dims, side, _, _ = SETTINGS[name]
    torch.manual_seed(0)
    model = build_backbone(spec, in_channels=1, n_way=N_WAY, spatial_dims=spatial_dims, image_size=side).double()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if p.dim() == 1 and "head" not in param_name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _episodes(
    spatial_dims: int, side: int, *, shots: int = 2, tasks: int = 2, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``random_episodes``' labels (3-way, 2 queries) with images (2D) or volumes (3D) of side ``side``."""
    _, sy, _, qy = random_episodes(tasks=tasks, n_way=N_WAY, k=shots, q=2, side=1)
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(*sy.shape, 1, *(side,) * spatial_dims, generator=g, dtype=dtype)
    qx = torch.randn(*qy.shape, 1, *(side,) * spatial_dims, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def _relative(a: list[torch.Tensor] | tuple[torch.Tensor, ...], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]]:
    """Each backbone's episodes and sequential reference meta-gradient, computed once in this module."""
    return {}


def _reference(name: str, cache: dict) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    if name not in cache:
        setting = SETTINGS[name]
        batch = _episodes(setting.spatial_dims, setting.side, shots=setting.shots)
        cache[name] = batch, reference_meta_gradient(_backbone(name), *batch, lr=setting.inner_lr, steps=STEPS)
    return cache[name]


@pytest.mark.parametrize(("name", "how"), CASES)
def test_second_order_maml_meta_gradient_is_exact(name: str, how: str, references: dict) -> None:
    (batch, expected), lr = _reference(name, references), SETTINGS[name].inner_lr
    model = _backbone(name)
    algo = MAML(model, inner_lr=lr, inner_steps=STEPS, task_parallel="vmap" if how == "vmap" else "loop",
                checkpoint_inner_steps=how == "checkpointed")  # fmt: skip
    assert algo.vectorises(batch[0].device) == (how == "vmap")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallback from vmap to the loop
        ours = torch.autograd.grad(algo.outer_loss(*batch), list(model.parameters()))
    assert _relative(ours, expected) < 1e-10
    if how == "loop":  # the check can tell second order from first order
        first_order = MAML(model, inner_lr=lr, inner_steps=STEPS, first_order=True, task_parallel="loop")
        dropped = torch.autograd.grad(first_order.outer_loss(*batch), list(model.parameters()))
        assert _relative(dropped, expected) > 1e-4


def _volume_batch(seed: int, tasks: int = 2, side: int = 8) -> dict[str, torch.Tensor]:
    """A 3-way 2-shot 2-query meta-batch of ``side``^3 volumes with meta-train class ids (as the data module gives)."""
    sx, sy, qx, qy = _episodes(3, side, tasks=tasks, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    classes = torch.stack([torch.randperm(10, generator=g)[:N_WAY] for _ in range(tasks)])
    return {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy,
            "support_class": classes.gather(1, sy), "query_class": classes.gather(1, qy)}  # fmt: skip


@pytest.mark.parametrize("algorithm", sorted(SHORT_NAMES))
def test_every_learner_trains_and_adapts_on_a_3d_resnet12(algorithm: str) -> None:
    torch.manual_seed(0)
    model = build_backbone({"class_path": "resnet12", "init_args": {"widths": (4, 4, 6, 8)}}, in_channels=1,
                           n_way=N_WAY, spatial_dims=3, image_size=8)  # fmt: skip
    settings = {k: v for k, v in LEARNER_SETTINGS.items() if k in SHORT_NAMES[algorithm].settings()}
    learner = build_algorithm({"class_path": algorithm, "init_args": settings}, model, N_WAY)
    first_conv = next(p for p in model.parameters() if p.dim() == 5)
    before = first_conv.detach().clone()
    optimiser = torch.optim.SGD(learner.parameters(), lr=0.1)
    batch = _volume_batch(0)
    loss, logits = learner.meta_loss(batch)
    assert torch.isfinite(loss) and logits.shape == (2, N_WAY * 2, N_WAY)
    optimiser.zero_grad()
    loss.backward()
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0  # the meta-gradient reaches the first block
    optimiser.step()
    assert not torch.equal(first_conv.detach(), before)
    test = _volume_batch(1)
    predicted = learner.adapt_and_predict(test["support_x"], test["support_y"], test["query_x"])
    assert predicted.shape == (2, N_WAY * 2, N_WAY) and torch.isfinite(predicted).all()


@pytest.mark.slow
def test_backbone_memory_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks/backbone_memory.py --quick``: every backbone in both modes, checkpointed equal to stored."""
    out = tmp_path / "memory.json"
    command = [sys.executable, str(REPO / "benchmarks" / "backbone_memory.py"), "--quick", "--threads", "1", "--json", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| resnet12-64 |" in done.stdout and "total memory" in done.stdout
    report = json.loads(out.read_text())
    assert report["quick"] and report["machine"]["total_memory_gib"] > 0
    rows = {(row["backbone"], row["mode"]): row for row in report["rows"]}
    assert set(rows) == {(name, mode) for name in ("conv4-32", "resnet12-64", "resnet12-32", "resnet18")
                         for mode in ("stored", "checkpointed")}  # fmt: skip
    for (name, mode), row in rows.items():
        assert row["status"] == "ok", row
        assert row["peak_growth_mib"] > 0 and row["step_s"] > 0 and row["process_peak_rss_mib"] > row["peak_growth_mib"]
        if mode == "checkpointed":
            assert row["agrees"] and row["rel_diff"] <= 1e-4
