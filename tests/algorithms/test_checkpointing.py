"""Checkpointed inner steps give the same second-order meta-gradient as stored ones."""

from __future__ import annotations

import pytest
import torch

from medmeta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from medmeta.algorithms import maml as maml_module
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes
from tests.algorithms.test_maml import reference_meta_gradient

ALGORITHMS = {"maml": MAML, "meta_sgd": MetaSGD, "anil": ANIL}


def _model() -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12).double()


def _meta_gradient(algo: MAML, batch) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(algo.outer_loss(*batch), list(algo.parameters()))])


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_checkpointed_meta_gradient_equals_the_stored_one(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = maml_module.checkpoint
    monkeypatch.setattr(maml_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = random_episodes(tasks=2, q=3)
    stored = ALGORITHMS[name](_model(), inner_lr=0.3, inner_steps=3, task_parallel="loop")
    checkpointed = ALGORITHMS[name](_model(), inner_lr=0.3, inner_steps=3, checkpoint_inner_steps=True)
    if name == "meta_sgd":
        with torch.no_grad():
            for a, b in zip(stored.inner_lrs.values(), checkpointed.inner_lrs.values()):
                a.uniform_(0.1, 0.4), b.copy_(a)
    expected, ours = _meta_gradient(stored, batch), _meta_gradient(checkpointed, batch)
    assert float((ours - expected).norm() / expected.norm()) < 1e-10
    assert len(calls) == 2 * 3  # every inner step of both tasks went through the checkpoint
    assert not checkpointed.vectorises(torch.device("cuda"))  # checkpointing runs the loop


def test_checkpointed_maml_matches_the_sequential_reference() -> None:
    model, batch = _model(), random_episodes(tasks=3, q=3)
    reference = reference_meta_gradient(model, *batch, lr=0.2, steps=2)
    algo = MAML(model, inner_lr=0.2, inner_steps=2, checkpoint_inner_steps=True)
    ours = torch.autograd.grad(algo.outer_loss(*batch), list(model.parameters()))
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    assert float((flat(ours) - flat(reference)).norm() / flat(reference).norm()) < 1e-10


@pytest.mark.parametrize("msl", [True, False])
def test_checkpointed_maml_pp_meta_gradient_equals_the_stored_one(msl: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Learned per-step rates and per-step norm weights (read inside the recomputed steps) included."""
    calls = []
    original = maml_module.checkpoint
    monkeypatch.setattr(maml_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = random_episodes(tasks=2, q=3)
    built = []
    for flag in (False, True):
        algo = MAMLPlusPlus(_model(), inner_lr=0.3, inner_steps=3, multi_step_loss=msl, task_parallel="loop",
                            checkpoint_inner_steps=flag).double()  # fmt: skip
        torch.manual_seed(1)
        with torch.no_grad():  # distinct per-step rates and norm weights, the same in both
            for p in [*algo.inner_lrs.values(), *algo.norm_weights.values()]:
                p.add_(torch.rand_like(p) * 0.1)
        built.append(algo)
    stored, checkpointed = built
    expected, ours = _meta_gradient(stored, batch), _meta_gradient(checkpointed, batch)
    assert float((ours - expected).norm() / expected.norm()) < 1e-10
    assert len(calls) == 2 * 3
    names = [n for n, _ in checkpointed.named_parameters()]
    assert any(n.startswith("inner_lrs.") for n in names) and any(n.startswith("norm_weights.") for n in names)
    grads = torch.autograd.grad(checkpointed.outer_loss(*batch), list(checkpointed.parameters()))
    by_name = dict(zip(names, grads))
    assert all(by_name[n].abs().sum() > 0 for n in names if n.startswith(("inner_lrs.", "norm_weights.")))


def test_checkpointing_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="task_parallel='loop'"):
        MAML(_model(), checkpoint_inner_steps=True, task_parallel="vmap").vectorises(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_checkpointing_lowers_peak_cuda_memory_at_many_inner_steps() -> None:
    peaks = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = Conv4(in_channels=1, n_way=5, hidden_channels=32, image_size=28).cuda()
        algo = MAML(model, inner_lr=0.1, inner_steps=10, task_parallel="loop", checkpoint_inner_steps=flag)
        batch = tuple(t.cuda() for t in random_episodes(tasks=2, n_way=5, k=5, q=5, side=28, dtype=torch.float32))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.autograd.grad(algo.outer_loss(*batch), list(model.parameters()))
        torch.cuda.synchronize()
        peaks[flag] = torch.cuda.max_memory_allocated()
    print(f"peak CUDA memory at 10 inner steps: stored {peaks[False] / 2**20:.0f} MiB, checkpointed {peaks[True] / 2**20:.0f} MiB")
    assert peaks[True] < 0.8 * peaks[False]
