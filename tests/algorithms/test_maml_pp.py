"""MAML++ against MAML (switches off) and a sequential autograd reference (switches on)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta.algorithms.maml import MAML
from medmeta.algorithms.maml_pp import MAMLPlusPlus
from medmeta.algorithms.meta_sgd import lr_key
from medmeta.networks import Conv4
from medmeta.networks.norm import EpisodeBatchNorm
from tests.algorithms.episodes import random_episodes

OFF = {"multi_step_loss": False, "per_step_norm_weights": False, "learn_inner_lrs": False}


def reference_query_logits(algo: MAMLPlusPlus, sx, sy, qx, *, steps: int, create_graph: bool = True):
    """Sequential MAML++ inner loop with torch.autograd.grad: query logits [task][after step 1..steps].

    Conventions under test: the forward with θ_k uses the model's own norm weights for k = 0 and
    row min(k, S) - 1 of the per-step copies otherwise; update s uses rate entry min(s, S - 1).
    """
    model, last = algo.model, algo.inner_steps - 1
    names = [n for n, _ in model.named_parameters() if n not in algo.norm_names]
    theta = [model.get_parameter(n) for n in names]
    lrs = [algo.inner_lrs[lr_key(n)] for n in names]

    def norms(k: int) -> dict[str, torch.Tensor]:
        if k == 0:
            return {n: model.get_parameter(n) for n in algo.norm_names}
        return {n: algo.norm_weights[lr_key(n)][min(k - 1, last)] for n in algo.norm_names}

    def forward(fast: list[torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**dict(zip(names, fast)), **norms(k)}, (x,))

    out = []
    for t in range(sx.shape[0]):
        fast, logits = list(theta), []
        for s in range(steps):
            loss = F.cross_entropy(forward(fast, s, sx[t]), sy[t])
            grads = torch.autograd.grad(loss, fast, create_graph=create_graph)
            fast = [w - a[min(s, last)] * g for w, a, g in zip(fast, lrs, grads)]
            logits.append(forward(fast, s + 1, qx[t]))
        out.append(logits)
    return out


_episodes = partial(random_episodes, tasks=2, q=2, side=8)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm="batch").double()


def _randomise(algo: MAMLPlusPlus) -> None:
    """Distinct rates and norm weights per step, so an indexing bug cannot pass."""
    with torch.no_grad():
        for lr in algo.inner_lrs.values():
            lr.uniform_(0.05, 0.4)
        for name, w in algo.norm_weights.items():
            w.uniform_(0.5, 1.5) if name.endswith("weight") else w.normal_(0.0, 0.2)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _meta_grad(algo: nn.Module, batch, params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    algo.zero_grad()
    loss = algo.outer_loss(*batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def test_all_switches_off_is_exactly_maml() -> None:
    model, batch = _model(), _episodes()
    plus = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, **OFF)
    assert [id(p) for p in plus.parameters()] == [id(p) for p in model.parameters()]
    maml = MAML(model, inner_lr=0.3, inner_steps=2)
    loss_pp, grads_pp = _meta_grad(plus, batch, list(model.parameters()))
    loss_maml, grads_maml = _meta_grad(maml, batch, list(model.parameters()))
    assert torch.equal(loss_pp, loss_maml)
    assert all(torch.equal(a, b) for a, b in zip(grads_pp, grads_maml))
    assert torch.equal(plus.outer_loss_and_logits(*batch)[1], maml.outer_loss_and_logits(*batch)[1])


def test_all_switches_on_meta_gradient_matches_sequential_reference() -> None:
    algo = MAMLPlusPlus(_model(), inner_lr=0.3, inner_steps=2, multi_step_loss_epochs=10)
    algo.set_epoch(3)  # non-uniform multi-step weights: [0.35, 0.65]
    _randomise(algo)
    sx, sy, qx, qy = batch = _episodes()
    weights = algo.multi_step_loss_weights()
    assert torch.allclose(weights, torch.tensor([0.35, 0.65], dtype=torch.float64))
    logits = reference_query_logits(algo, sx, sy, qx, steps=2)
    losses = torch.stack([torch.stack([F.cross_entropy(lg, qy[t]) for lg in row]) for t, row in enumerate(logits)])
    reference_loss = (losses * weights).sum(1).mean()
    groups = [list(algo.model.parameters()), list(algo.norm_weights.values()), list(algo.inner_lrs.values())]
    reference = torch.autograd.grad(reference_loss, [p for group in groups for p in group])

    loss, ours = _meta_grad(algo, batch, [p for group in groups for p in group])
    assert torch.allclose(loss, reference_loss.detach(), rtol=1e-12)
    start = 0
    for group in groups:  # model weights (incl. the step-0 norm weights), per-step norms, per-step lrs
        end = start + len(group)
        assert _relative(ours[start:end], list(reference[start:end])) < 1e-5
        assert torch.cat([g.flatten() for g in ours[start:end]]).norm() > 1e-6
        start = end
    _, final_logits = algo.outer_loss_and_logits(*batch)
    assert torch.allclose(final_logits, torch.stack([row[-1] for row in logits]), atol=1e-12)


def test_multi_step_loss_weights_anneal_onto_the_last_step() -> None:
    algo = MAMLPlusPlus(_model(), inner_lr=0.3, inner_steps=4, multi_step_loss_epochs=10)
    for epoch in range(13):
        algo.set_epoch(epoch)
        weights = algo.multi_step_loss_weights()
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
        expected_other = 0.25 - epoch / 40 if epoch < 10 else 0.0
        assert torch.allclose(weights[:-1], torch.full((3,), expected_other, dtype=torch.float64))
    algo.set_epoch(0)
    assert torch.equal(algo.multi_step_loss_weights(), torch.full((4,), 0.25, dtype=torch.float64))
    algo.set_epoch(10)
    assert torch.equal(algo.multi_step_loss_weights(), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    slow = MAMLPlusPlus(_model(), inner_steps=4, multi_step_loss_epochs=100)
    slow.set_epoch(99)  # non-final weights floor at 0.03 / S
    assert torch.allclose(slow.multi_step_loss_weights(), torch.tensor([0.0075] * 3 + [0.9775], dtype=torch.float64))

    algo = MAMLPlusPlus(_model(), inner_lr=0.3, inner_steps=3)
    _randomise(algo)
    sx, sy, qx, qy = _episodes()
    logits = reference_query_logits(algo, sx, sy, qx, steps=3, create_graph=False)
    per_step = torch.stack([torch.stack([F.cross_entropy(lg, qy[t]) for lg in row]) for t, row in enumerate(logits)])
    loss = algo.outer_loss(sx, sy, qx, qy).item()
    assert loss == pytest.approx(per_step.mean().item(), rel=1e-10)
    assert loss != pytest.approx(per_step[:, -1].mean().item(), rel=1e-6)


def test_per_step_lrs_and_norm_weights_are_learned_and_differ_between_steps() -> None:
    algo = MAMLPlusPlus(_model(), inner_lr=0.2, inner_steps=2)
    model = algo.model
    norms = [m for m, mod in model.named_modules() if isinstance(mod, EpisodeBatchNorm)]
    norm_names = {f"{m}.{p}" for m in norms for p in ("weight", "bias")}
    assert set(algo.norm_names) == norm_names and len(norm_names) == 8
    assert not norm_names & set(algo.adaptable_parameters())  # norm weights are not adapted
    assert set(algo.inner_lrs) == {lr_key(n) for n in algo.adaptable_parameters()}
    assert all(lr.shape == (2,) for lr in algo.inner_lrs.values())
    assert all(algo.norm_weights[lr_key(n)].shape == (2, 4) for n in norm_names)
    initial = {name: p.detach().clone() for name, p in algo.named_parameters()}

    optimiser = torch.optim.Adam(algo.parameters(), lr=1e-2)
    for _ in range(3):
        optimiser.zero_grad()
        algo.outer_loss(*_episodes()).backward()
        for name in ("head__weight", "features__0__weight"):
            g = algo.inner_lrs[name].grad
            assert g.abs().min() > 1e-8 and not torch.allclose(g[0], g[1])
        # every γ copy gets a gradient; a β copy may get none at 8 px (a shift that the next
        # batch norm removes), so the β copies are checked together
        for key, w in algo.norm_weights.items():
            assert (w.grad.abs().min() > 1e-8) if key.endswith("weight") else w.grad is not None, key
        rows = torch.cat([w.grad.flatten(1) for w in algo.norm_weights.values()], dim=1)
        assert rows[0].norm() > 1e-6 and rows[1].norm() > 1e-6 and not torch.allclose(rows[0], rows[1])
        optimiser.step()
    for name in ("inner_lrs.head__weight", "inner_lrs.features__4__weight", "norm_weights.features__1__weight"):
        p = algo.get_parameter(name).detach()
        assert not torch.allclose(p, initial[name])
        assert (p[0] - p[1]).abs().max() > 1e-6, name


def test_first_order_epochs_anneal_to_second_order() -> None:
    model, batch = _model(), _episodes()
    params = list(model.parameters())
    plus = MAMLPlusPlus(model, inner_lr=0.3, inner_steps=2, first_order_epochs=2, **OFF)
    _, first = _meta_grad(MAML(model, inner_lr=0.3, inner_steps=2, first_order=True), batch, params)
    _, second = _meta_grad(MAML(model, inner_lr=0.3, inner_steps=2), batch, params)
    assert _relative(first, second) > 1e-3
    for epoch, expected in ((0, first), (1, first), (2, second), (5, second)):
        plus.set_epoch(epoch)
        _, ours = _meta_grad(plus, batch, params)
        assert _relative(ours, expected) < 1e-12, epoch


def test_eval_steps_beyond_training_steps_reuse_the_last_step() -> None:
    algo = MAMLPlusPlus(_model(), inner_lr=0.3, inner_steps=2, eval_inner_steps=4)
    _randomise(algo)
    with torch.no_grad():
        for lr in algo.inner_lrs.values():
            lr.copy_(torch.tensor([0.05, 0.4]))
    sx, sy, qx, _ = _episodes()
    with torch.no_grad():
        predicted = algo.adapt_and_predict(sx, sy, qx)
        two_steps = algo.adapt_and_predict(sx, sy, qx, steps=2)
    reference = reference_query_logits(algo, sx, sy, qx, steps=4, create_graph=False)
    assert predicted.shape == (2, 6, 3) and not predicted.requires_grad
    assert torch.allclose(predicted, torch.stack([row[-1] for row in reference]).detach(), atol=1e-10)
    assert torch.allclose(two_steps, torch.stack([row[1] for row in reference]).detach(), atol=1e-10)
    assert not torch.allclose(predicted, two_steps, atol=1e-6)
