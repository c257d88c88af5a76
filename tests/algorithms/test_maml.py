"""MAML against a plain sequential autograd reference and a hand-derived meta-update."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta.algorithms import MAML
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes


def reference_outer_loss(model: nn.Module, sx, sy, qx, qy, *, lr: float, steps: int) -> torch.Tensor:
    """Sequential second-order MAML's outer loss (mean over tasks), written with torch.autograd.grad(create_graph=True)."""
    names = [name for name, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    total = 0.0
    for t in range(sx.shape[0]):
        fast = list(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads)]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast)), (qx[t],)), qy[t])
    return total / sx.shape[0]


def reference_meta_gradient(model: nn.Module, sx, sy, qx, qy, *, lr: float, steps: int) -> list[torch.Tensor]:
    """The meta-gradient of :func:`reference_outer_loss` in ``model.parameters()``."""
    return list(torch.autograd.grad(reference_outer_loss(model, sx, sy, qx, qy, lr=lr, steps=steps), list(model.parameters())))


_episodes = partial(random_episodes, tasks=3, q=3, side=12)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_second_order_meta_gradient_matches_sequential_reference(norm: str) -> None:
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=12, norm=norm).double()
    sx, sy, qx, qy = _episodes()
    reference = reference_meta_gradient(model, sx, sy, qx, qy, lr=0.3, steps=2)

    algo = MAML(model, inner_lr=0.3, inner_steps=2)
    model.zero_grad()
    algo.outer_loss(sx, sy, qx, qy).backward()
    ours = [p.grad for p in model.parameters()]
    assert _relative(ours, reference) < 1e-5

    first = MAML(model, inner_lr=0.3, inner_steps=2, first_order=True)
    model.zero_grad()
    first.outer_loss(sx, sy, qx, qy).backward()
    assert _relative([p.grad for p in model.parameters()], reference) > 1e-3


def test_sum_reduction_is_tasks_times_mean() -> None:
    torch.manual_seed(1)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12).double()
    sx, sy, qx, qy = _episodes(tasks=2)
    mean = MAML(model, inner_lr=0.1, inner_steps=1).outer_loss(sx, sy, qx, qy)
    total = MAML(model, inner_lr=0.1, inner_steps=1, task_reduction="sum").outer_loss(sx, sy, qx, qy)
    assert torch.allclose(total, 2 * mean)


@pytest.mark.parametrize(
    ("first_order", "expected_w"),
    [
        # second order: dL_q/dw = 2 x_q (w' x_q - y_q) (1 - 2 α x_s²); tasks give -3.84 and -0.32
        (False, 1.0 + 0.01 * 4.16),
        # first order drops (1 - 2 α x_s²): -4.8 and -1.6
        (True, 1.0 + 0.01 * 6.4),
    ],
)
def test_one_meta_update_matches_hand_derivation(first_order: bool, expected_w: float) -> None:
    """Linear model y = w x, squared loss, one inner step, α = 0.1, β = 0.01, w = 1.

    Task 1: support (1, 3), query (2, 4): w' = 1 - 0.1 * 2 * 1 * (1 - 3) = 1.4.
    Task 2: support (2, 0), query (1, 1): w' = 1 - 0.1 * 2 * 2 * (2 - 0) = 0.2.
    """
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    algo = MAML(model, inner_lr=0.1, inner_steps=1, first_order=first_order, task_reduction="sum")
    algo.loss_fn = F.mse_loss
    sx = torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64)
    sy = torch.tensor([[[3.0]], [[0.0]]], dtype=torch.float64)
    qx = torch.tensor([[[2.0]], [[1.0]]], dtype=torch.float64)
    qy = torch.tensor([[[4.0]], [[1.0]]], dtype=torch.float64)

    adapted = [algo.adapt(sx[t], sy[t])["weight"].item() for t in range(2)]
    assert adapted == pytest.approx([1.4, 0.2])

    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    optimiser.zero_grad()
    algo.outer_loss(sx, sy, qx, qy).backward()
    optimiser.step()
    assert model.weight.item() == pytest.approx(expected_w, rel=1e-12)


def test_adapt_and_predict_works_under_no_grad_and_refuses_inference_mode() -> None:
    torch.manual_seed(2)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=12)
    sx, sy, qx, _ = (t.float() if t.is_floating_point() else t for t in _episodes(tasks=2))
    algo = MAML(model, inner_lr=0.5, inner_steps=0, eval_inner_steps=3)
    with torch.no_grad():
        adapted_logits = algo.adapt_and_predict(sx, sy, qx)
        unadapted = algo.adapt_and_predict(sx, sy, qx, steps=0)
    assert adapted_logits.shape == (2, 9, 3)
    assert not torch.allclose(adapted_logits, unadapted)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode: false"):
        algo.adapt_and_predict(sx, sy, qx)


def test_meta_gradient_through_every_stage_s_features_matches_the_reference_with_a_dead_channel() -> None:
    """A backbone with ``feature_levels="all"``: the inner loop adapts a head on each stage's mean and std.

    The first conv's first channel is zero, so after batch norm and ReLU it is constant over every
    image: its standard deviation is where a plain ``std`` gives a NaN second derivative.
    """
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=8, image_size=12, norm="batch", feature_levels="all").double()
    with torch.no_grad():
        model.features[0].weight[0] = 0.0
    sx, sy, qx, qy = _episodes()
    reference = reference_meta_gradient(model, sx, sy, qx, qy, lr=0.3, steps=2)
    assert all(torch.isfinite(g).all() for g in reference)
    model.zero_grad()
    MAML(model, inner_lr=0.3, inner_steps=2).outer_loss(sx, sy, qx, qy).backward()
    assert _relative([p.grad for p in model.parameters()], reference) < 1e-5
    assert model.head.weight.grad.shape == (3, 3 * 2 * 8 + 8)  # three stages' mean and std, then the last stage
