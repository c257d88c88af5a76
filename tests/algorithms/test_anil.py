"""ANIL against a sequential autograd reference that adapts only the head."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmeta.algorithms.anil import ANIL
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes


def reference_meta_gradient(model: Conv4, sx, sy, qx, qy, *, lr: float, steps: int) -> list[torch.Tensor]:
    """Sequential second-order ANIL with torch.autograd.grad(create_graph=True), for ALL weights.

    The body runs again at every inner step (no feature caching) and the head is a plain F.linear.
    """
    theta = list(model.parameters())
    total = 0.0
    for t in range(sx.shape[0]):
        w, b = model.head.weight, model.head.bias
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(model.features(sx[t]), w, b), sy[t])
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
            w, b = w - lr * gw, b - lr * gb
        total = total + F.cross_entropy(F.linear(model.features(qx[t]), w, b), qy[t])
    return list(torch.autograd.grad(total / sx.shape[0], theta))


_episodes = partial(random_episodes, tasks=2, q=2, side=12)


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def _model(seed: int = 0, channels: int = 8) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(in_channels=1, n_way=3, hidden_channels=channels, image_size=12, norm="batch").double()


def _grads(algo: ANIL, sx, sy, qx, qy) -> list[torch.Tensor]:
    algo.zero_grad()
    algo.outer_loss(sx, sy, qx, qy).backward()
    return [p.grad.clone() for p in algo.model.parameters()]


def test_meta_gradient_for_all_weights_matches_sequential_reference() -> None:
    model = _model()
    sx, sy, qx, qy = _episodes()
    reference = reference_meta_gradient(model, sx, sy, qx, qy, lr=0.5, steps=2)
    ours = _grads(ANIL(model, inner_lr=0.5, inner_steps=2), sx, sy, qx, qy)
    assert _relative(ours, reference) < 1e-5
    body = [g for (name, _), g in zip(model.named_parameters(), ours) if name.startswith("features.0.weight")]
    assert body[0].norm() > 1e-6  # the body is meta-learned through the outer loss

    first_order = _grads(ANIL(model, inner_lr=0.5, inner_steps=2, first_order=True), sx, sy, qx, qy)
    assert _relative(first_order, reference) > 1e-3


def test_adaptation_changes_only_the_head() -> None:
    model = _model(channels=4)
    sx, sy, _, _ = _episodes()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapted = ANIL(model, inner_lr=0.5, inner_steps=2).adapt(sx[0], sy[0])
    assert set(adapted) == {"head.weight", "head.bias"}
    assert all(not torch.allclose(adapted[name], before[name]) for name in adapted)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_query_labels_do_not_leak_into_logits() -> None:
    algo = ANIL(_model(channels=4), inner_lr=0.5, inner_steps=2)
    sx, sy, qx, qy = _episodes()
    _, logits = algo.outer_loss_and_logits(sx, sy, qx, qy)
    _, logits_other = algo.outer_loss_and_logits(sx, sy, qx, (qy + 1) % 3)
    with torch.no_grad():
        predicted = algo.adapt_and_predict(sx, sy, qx)
    assert torch.equal(logits, logits_other)
    assert torch.allclose(predicted, logits.detach(), atol=1e-10)


def test_permuting_classes_with_the_head_rows_permutes_the_logits() -> None:
    algo = ANIL(_model(channels=4), inner_lr=0.5, inner_steps=2)
    sx, sy, qx, _ = _episodes()
    perm = torch.tensor([2, 0, 1])  # class c becomes class perm[c]
    with torch.no_grad():
        before = algo.adapt_and_predict(sx, sy, qx)
        for tensor in (algo.model.head.weight, algo.model.head.bias):
            permuted = torch.empty_like(tensor)
            permuted[perm] = tensor
            tensor.copy_(permuted)
        after = algo.adapt_and_predict(sx, perm[sy], qx)
    assert torch.allclose(after[..., perm], before, atol=1e-10)


def test_requires_features_and_head() -> None:
    with pytest.raises(ValueError, match="submodule"):
        ANIL(nn.Sequential(nn.Linear(2, 2)))
