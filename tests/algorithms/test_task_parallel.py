"""The task-vectorised (vmap) inner loop against the plain sequential autograd references.

fp32, every norm type, every gradient-based algorithm: the vmap meta-gradient must agree with
``torch.autograd.grad(create_graph=True)`` task by task to 1e-5 relative (engineering notes, trap 1:
torch's own batch/instance norm under vmap gets second-order terms wrong). The references run with
the same normalisation arithmetic (``composite_norms``), so that only the batching differs; the
composite and fused norms are shown equal in float64 in tests/networks/test_norm.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmeta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from medmeta.algorithms.meta_sgd import lr_key
from medmeta.networks import Conv4
from medmeta.networks.norm import composite_norms
from tests.algorithms.episodes import random_episodes
from tests.algorithms.test_anil import reference_meta_gradient as anil_reference
from tests.algorithms.test_maml import reference_meta_gradient as maml_reference
from tests.algorithms.test_maml_pp import _randomise, reference_query_logits
from tests.algorithms.test_meta_sgd import reference_meta_gradient as meta_sgd_reference
from tests.conftest import module_for

NORMS = ["batch", "group", "instance"]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]
# fp32 tolerance per device. On an H100 (torch 2.11, TF32 off) MAML with instance norm came out
# 1.2e-5 from the reference: cuDNN picks different convolution algorithms for the batched and the
# per-task calls. The float64 test below shows the vmap path exact on the GPU.
TOLERANCE = {"cpu": 1e-5, "cuda": 2e-5}


def _episodes(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 on GPUs too
    return tuple(t.to(device) for t in random_episodes(tasks=3, q=3, side=12, dtype=dtype))


def _model(norm: str, device: str = "cpu") -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=12, norm=norm).to(device)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _composite(reference, model):
    with composite_norms(model):
        return reference()


def _vmap_grads(algo: MAML, params: list[torch.Tensor], batch) -> list[torch.Tensor]:
    assert algo.vectorises(batch[0].device)
    return list(torch.autograd.grad(algo.outer_loss(*batch), params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_maml_vmap_matches_sequential_reference(norm: str, device: str) -> None:
    model, batch = _model(norm, device), _episodes(device)
    reference = _composite(lambda: maml_reference(model, *batch, lr=0.2, steps=2), model)
    ours = _vmap_grads(MAML(model, inner_lr=0.2, inner_steps=2, task_parallel="vmap"), list(model.parameters()), batch)
    assert _relative(ours, reference) < TOLERANCE[device]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("norm", NORMS)
def test_maml_vmap_matches_sequential_reference_in_float64_on_gpu(norm: str) -> None:
    model, batch = _model(norm, "cuda").double(), _episodes("cuda", torch.float64)
    reference = _composite(lambda: maml_reference(model, *batch, lr=0.2, steps=2), model)
    ours = _vmap_grads(MAML(model, inner_lr=0.2, inner_steps=2, task_parallel="vmap"), list(model.parameters()), batch)
    assert _relative(ours, reference) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_meta_sgd_vmap_matches_sequential_reference(norm: str, device: str) -> None:
    model, batch = _model(norm, device), _episodes(device)
    algo = MetaSGD(model, inner_lr=0.2, inner_steps=2, task_parallel="vmap")
    with torch.no_grad():
        for rates in algo.inner_lrs.values():
            rates.uniform_(0.05, 0.3)
    names = [name for name, _ in model.named_parameters()]
    lrs = {name: algo.inner_lrs[lr_key(name)] for name in names}
    ref_theta, ref_lrs = _composite(lambda: meta_sgd_reference(model, lrs, *batch, steps=2), model)
    ours = _vmap_grads(algo, list(model.parameters()) + [lrs[n] for n in names], batch)
    assert _relative(ours, ref_theta + ref_lrs) < TOLERANCE[device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_anil_vmap_matches_sequential_reference(norm: str, device: str) -> None:
    model, batch = _model(norm, device), _episodes(device)
    reference = _composite(lambda: anil_reference(model, *batch, lr=0.5, steps=2), model)
    ours = _vmap_grads(ANIL(model, inner_lr=0.5, inner_steps=2, task_parallel="vmap"), list(model.parameters()), batch)
    assert _relative(ours, reference) < TOLERANCE[device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_maml_pp_vmap_matches_sequential_reference(norm: str, device: str) -> None:
    algo = MAMLPlusPlus(_model(norm), inner_lr=0.3, inner_steps=2, multi_step_loss_epochs=10, task_parallel="vmap")
    algo.set_epoch(3)
    _randomise(algo)
    algo.to(device)
    sx, sy, qx, qy = batch = _episodes(device)
    logits = _composite(lambda: reference_query_logits(algo, sx, sy, qx, steps=2), algo.model)
    losses = torch.stack([torch.stack([F.cross_entropy(lg, qy[t]) for lg in row]) for t, row in enumerate(logits)])
    reference_loss = (losses * algo.multi_step_loss_weights().float().to(losses.device)).sum(1).mean()
    params = [*algo.model.parameters(), *algo.norm_weights.values(), *algo.inner_lrs.values()]
    reference = list(torch.autograd.grad(reference_loss, params))
    assert _relative(_vmap_grads(algo, params, batch), reference) < TOLERANCE[device]


def test_vmap_and_loop_give_the_same_logits_and_loss() -> None:
    model, batch = _model("batch"), _episodes()
    loop_loss, loop_logits = MAML(model, inner_lr=0.2, inner_steps=2, task_parallel="loop").outer_loss_and_logits(*batch)
    vmap_loss, vmap_logits = MAML(model, inner_lr=0.2, inner_steps=2, task_parallel="vmap").outer_loss_and_logits(*batch)
    torch.testing.assert_close(vmap_logits, loop_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vmap_loss, loop_loss, rtol=1e-6, atol=1e-7)


def test_auto_picks_the_loop_on_cpu_and_vmap_on_cuda() -> None:
    algo = MAML(_model("batch"), task_parallel="auto")
    assert not algo.vectorises(torch.device("cpu"))
    assert algo.vectorises(torch.device("cuda"))
    assert not MAML(_model("batch"), task_parallel="loop").vectorises(torch.device("cuda"))
    with pytest.raises(ValueError, match="task_parallel"):
        MAML(_model("batch"), task_parallel="threads")  # type: ignore[arg-type]


def test_running_statistics_force_the_loop() -> None:
    module = module_for(norm_mode="running", task_parallel="auto", hidden_channels=4, image_size=12, n_way=3)
    assert not module.algorithm.vectorises(torch.device("cuda"))
    forced = module_for(norm_mode="running", task_parallel="vmap", hidden_channels=4, image_size=12, n_way=3)
    with pytest.raises(ValueError, match="running batch-norm statistics"):
        forced.algorithm.vectorises(torch.device("cpu"))
