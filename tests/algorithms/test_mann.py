"""MANN: per-episode memory reset, no query-label leakage, shapes, learnability, determinism."""

from __future__ import annotations

import pytest
import torch

from medmeta.algorithms.mann import MANN
from medmeta.networks import Conv4

N_WAY, K, Q, SIDE = 3, 2, 2, 8


def _mann(controller: str = "lstm", **kwargs: object) -> MANN:
    torch.manual_seed(0)
    encoder = Conv4(in_channels=1, n_way=N_WAY, hidden_channels=4, image_size=SIDE)
    return MANN(
        encoder, n_way=N_WAY, controller_size=16, memory_slots=8, memory_width=8, read_heads=2,
        controller=controller, **kwargs,
    )


def _episodes(tasks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, N_WAY * K, 1, SIDE, SIDE, generator=g)
    qx = torch.randn(tasks, N_WAY * Q, 1, SIDE, SIDE, generator=g)
    sy = torch.stack([torch.randperm(N_WAY, generator=g).repeat_interleave(K) for _ in range(tasks)])
    qy = torch.stack([torch.randperm(N_WAY, generator=g).repeat_interleave(Q) for _ in range(tasks)])
    return sx, sy, qx, qy


def _pattern_episode():
    """One 3-way episode whose classes are fixed, distinct 8x8 patterns (same image for every example)."""
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(N_WAY, 1, SIDE, SIDE, generator=g)
    sy = torch.arange(N_WAY).repeat(K)
    qy = torch.arange(N_WAY).repeat_interleave(Q)
    return patterns[sy][None], sy[None], patterns[qy][None], qy[None]


@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_memory_resets_between_and_within_calls(controller: str) -> None:
    mann = _mann(controller)
    a, b = _episodes(1, seed=1), _episodes(1, seed=2)
    alone = mann.adapt_and_predict(*b[:3])
    mann.adapt_and_predict(*a[:3])  # a previous call must leave nothing behind
    after = mann.adapt_and_predict(*b[:3])
    both = [torch.cat([x, y]) for x, y in zip(a, b)]
    batched = mann.adapt_and_predict(*both[:3])
    flipped = mann.adapt_and_predict(*[torch.cat([y, x]) for x, y in zip(a, b)][:3])
    assert torch.equal(alone, after)
    torch.testing.assert_close(batched[1:], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flipped[:1], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # the two tasks really differ


@pytest.mark.parametrize(("label_timing", "support_loss"), [("current", False), ("previous", False), ("previous", True)])
def test_query_labels_do_not_change_query_logits(label_timing: str, support_loss: bool) -> None:
    mann = _mann(label_timing=label_timing, support_loss=support_loss)
    sx, sy, qx, qy = _episodes(2)
    _, logits = mann.outer_loss_and_logits(sx, sy, qx, qy)
    _, relabelled = mann.outer_loss_and_logits(sx, sy, qx, (qy + 1) % N_WAY)
    assert torch.equal(logits, relabelled)
    # ... while the support labels are really used.
    assert not torch.equal(mann.adapt_and_predict(sx, (sy + 1) % N_WAY, qx), logits.detach())


@pytest.mark.parametrize("label_timing", ["current", "previous"])
def test_a_support_label_is_fed_with_its_image_or_one_step_late(label_timing: str) -> None:
    """Changing the label of the last support example changes that step's own prediction only when
    labels are ``current``; one step late (the paper's protocol) a step never sees its own label."""
    mann = _mann(label_timing=label_timing, shuffle_seed=None)
    sx, sy, qx, _ = _episodes(1)
    relabelled = sy.clone()
    relabelled[0, -1] = (sy[0, -1] + 1) % N_WAY
    with torch.no_grad():
        _, support, _ = mann._sequence_logits(sx, sy, qx)
        _, support_relabelled, _ = mann._sequence_logits(sx, relabelled, qx)
    assert torch.equal(support[:, :-1], support_relabelled[:, :-1])  # earlier steps cannot see a later label
    assert torch.equal(support[:, -1], support_relabelled[:, -1]) == (label_timing == "previous")


def test_support_loss_needs_late_labels() -> None:
    with pytest.raises(ValueError, match="support_loss needs label_timing='previous'"):
        _mann(support_loss=True, label_timing="current")
    with pytest.raises(ValueError, match="label_timing must be"):
        _mann(label_timing="next")


def test_shapes_and_determinism() -> None:
    mann = _mann()
    sx, sy, qx, qy = _episodes(3)
    loss, logits = mann.outer_loss_and_logits(sx, sy, qx, qy)
    assert logits.shape == (3, N_WAY * Q, N_WAY) and loss.dim() == 0
    predicted = mann.adapt_and_predict(sx, sy, qx, steps=7)
    assert predicted.shape == (3, N_WAY * Q, N_WAY) and not predicted.requires_grad
    assert torch.equal(predicted, mann.adapt_and_predict(sx, sy, qx))
    assert torch.equal(predicted, logits.detach())
    with torch.inference_mode():
        assert torch.equal(predicted, mann.adapt_and_predict(sx, sy, qx))


def test_support_order_is_shuffled_deterministically_without_global_rng() -> None:
    mann = _mann()
    sx, sy, _, _ = _episodes(2)
    state = torch.random.get_rng_state()
    order = mann._order(sx, sy)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(order, mann._order(sx, sy))
    assert torch.equal(order[1:], mann._order(sx[1:], sy[1:]))  # independent of the task's position
    assert torch.equal(order.sort(-1).values, torch.arange(N_WAY * K).expand(2, -1))
    assert torch.equal(_mann(shuffle_seed=None)._order(sx, sy), torch.arange(N_WAY * K).expand(2, -1))


@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_learns_a_fixed_easy_episode(controller: str) -> None:
    mann = _mann(controller)
    sx, sy, qx, qy = _pattern_episode()
    loss = mann.outer_loss(sx, sy, qx, qy)
    loss.backward()
    for module in (mann.model.features, mann.controller, mann.key, mann.alpha):
        assert all(p.grad is not None for p in module.parameters())
    assert any(p.grad.abs().sum() > 0 for p in mann.model.features.parameters())
    first = loss.item()
    optimiser = torch.optim.Adam(mann.parameters(), lr=1e-2)
    for _ in range(40):
        optimiser.zero_grad()
        loss = mann.outer_loss(sx, sy, qx, qy)
        loss.backward()
        optimiser.step()
    logits = mann.adapt_and_predict(sx, sy, qx)
    assert torch.equal(logits.argmax(-1), qy)
    assert mann.outer_loss(sx, sy, qx, qy).item() < 0.3 * first


@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_each_query_is_independent_of_the_others_and_their_order(controller: str) -> None:
    """Queries arrive sorted by class; if one query could see another, their order would leak labels."""
    torch.manual_seed(0)
    mann = _mann(controller)
    sx, sy, qx, _ = _episodes(1)
    with torch.no_grad():
        logits = mann.adapt_and_predict(sx, sy, qx)
        flipped = mann.adapt_and_predict(sx, sy, qx.flip(1))
    # (batch norm sees the same set of images either way, so only the order changes)
    torch.testing.assert_close(flipped, logits.flip(1), rtol=1e-5, atol=1e-6)
