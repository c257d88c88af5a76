"""MANN: per-episode memory reset, no query-label leakage, shapes, learnability, the LRUA write rule, determinism."""

from __future__ import annotations

import math

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


def _permuted_label_episodes():
    """Three 3-way episodes with the same three fixed 8x8 patterns as classes, the same images in the same order,
    and the labels cyclically shifted: each pattern has each label once, the binding exists only in the support
    labels, so a model that ignores them gets exactly a third of the queries right."""
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(N_WAY, 1, SIDE, SIDE, generator=g)
    perms = torch.stack([torch.arange(N_WAY).roll(shift) for shift in range(N_WAY)])  # [3, N]: label of pattern c in episode t
    s_class, q_class = torch.arange(N_WAY).repeat(K), torch.arange(N_WAY).repeat_interleave(Q)
    sx = patterns[s_class].expand(len(perms), -1, -1, -1, -1).contiguous()
    qx = patterns[q_class].expand(len(perms), -1, -1, -1, -1).contiguous()
    return sx, perms[:, s_class], qx, perms[:, q_class]


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
def test_learns_episodes_whose_labels_only_the_support_set_gives(controller: str) -> None:
    """Every query is right under all three labellings: the support labels are bound to the images and read
    back for the queries (through the memory alone with the feed-forward controller). The support order is kept
    (``shuffle_seed=None``): a shuffle seeded by the labels would let the order itself tell the episodes apart."""
    mann = _mann(controller, shuffle_seed=None)
    sx, sy, qx, qy = _permuted_label_episodes()
    loss = mann.outer_loss(sx, sy, qx, qy)
    loss.backward()
    for module in (mann.model.features, mann.controller, mann.key, mann.alpha):
        assert all(p.grad is not None for p in module.parameters())
    assert any(p.grad.abs().sum() > 0 for p in mann.model.features.parameters())
    first = loss.item()
    optimiser = torch.optim.Adam(mann.parameters(), lr=1e-2)
    for _ in range(80):  # 40-60 steps reach every query from some initialisations only
        optimiser.zero_grad()
        loss = mann.outer_loss(sx, sy, qx, qy)
        loss.backward()
        optimiser.step()
    logits = mann.adapt_and_predict(sx, sy, qx)
    assert torch.equal(logits.argmax(-1), qy)
    assert mann.outer_loss(sx, sy, qx, qy).item() < 0.3 * first


def _lrua(read_heads: int) -> MANN:
    """A feed-forward MANN in float64 whose step is worked out by hand: 4 slots of width 2, gamma 0.5, uniform reads
    (key strength 0: each head reads 1/4 of every slot). The label input ``v`` is a control vector: the controller's
    hidden state is ``relu(v)``, head ``h``'s key is ``tanh(v[2h:2h+2])``, and the write gate is
    ``sigmoid(-1e4 + 2e4 v[-1])``: exactly 0 (write to the least-used slots only) or 1 (write where the last step read)."""
    encoder = Conv4(in_channels=1, n_way=2 * read_heads + 1, hidden_channels=4, image_size=SIDE)
    mann = MANN(encoder, n_way=2 * read_heads + 1, controller_size=2 * read_heads + 1, memory_slots=4, memory_width=2,
                read_heads=read_heads, gamma=0.5, controller="feedforward", shuffle_seed=None, key_strength=0.0).double()  # fmt: skip
    n, f = 2 * read_heads + 1, encoder.feature_dim
    with torch.no_grad():
        for layer in (mann.controller[0], mann.key, mann.alpha):
            layer.weight.zero_()
            layer.bias.zero_()
        mann.controller[0].weight[:, f : f + n] = torch.eye(n)
        mann.key.weight[:, : 2 * read_heads] = torch.eye(2 * read_heads)
        mann.alpha.weight[:, -1] = 2e4
        mann.alpha.bias.fill_(-1e4)
    return mann


def test_lrua_writes_the_least_used_slot_and_decays_usage_on_a_hand_worked_sequence() -> None:
    mann = _lrua(read_heads=1)
    state = mann._initial_state(1, torch.zeros(1, dtype=torch.float64))
    features = torch.randn(1, mann.model.feature_dim, dtype=torch.float64)
    # (a, b, gate): key (tanh a, tanh b)
    controls = [(0.1, 0.2, 0), (0.3, 0.4, 0), (0.5, 0.6, 0), (0.7, 0.8, 0), (0.9, 1.0, 0), (1.1, 1.2, 1), (1.3, 1.4, 0), (1.5, 1.6, 0)]
    k = [[math.tanh(a), math.tanh(b)] for a, b, _ in controls]
    z = [0.0, 0.0]
    # usage_t = 0.5 usage_{t-1} + write weights + read weights (1/4 each); the write goes to the slot least used
    # before the step (ties: lowest index), which is zeroed first: slots 0, 1, 2, 3, then slot 0 again (its usage
    # 0.59375 is the lowest), overwritten. Step 6 writes 1/4 of its key everywhere (gate 1: the last step's uniform
    # read) and still zeroes the least-used slot 1 first; step 7 fills slot 1, step 8 slot 2.
    expected = [
        ([1.25, 0.25, 0.25, 0.25], [k[0], z, z, z]),
        ([0.875, 1.375, 0.375, 0.375], [k[0], k[1], z, z]),
        ([0.6875, 0.9375, 1.4375, 0.4375], [k[0], k[1], k[2], z]),
        ([0.59375, 0.71875, 0.96875, 1.46875], [k[0], k[1], k[2], k[3]]),
        ([1.546875, 0.609375, 0.734375, 0.984375], [k[4], k[1], k[2], k[3]]),
        ([1.2734375, 0.8046875, 0.8671875, 0.9921875], [[k[4][i] + k[5][i] / 4 for i in (0, 1)], [k[5][0] / 4, k[5][1] / 4],
                                                        [k[2][i] + k[5][i] / 4 for i in (0, 1)], [k[3][i] + k[5][i] / 4 for i in (0, 1)]]),
        ([0.88671875, 1.65234375, 0.68359375, 0.74609375], None),
        ([0.69335938, 1.07617188, 1.59179688, 0.62304688], None),
    ]  # fmt: skip
    expected[6] = (expected[6][0], [expected[5][1][0], k[6], *expected[5][1][2:]])
    expected[7] = (expected[7][0], [expected[5][1][0], k[6], k[7], expected[5][1][3]])
    with torch.no_grad():
        for step, ((a, b, gate), (usage, memory)) in enumerate(zip(controls, expected, strict=True), start=1):
            _, state = mann._step(state, features, torch.tensor([[a, b, gate]], dtype=torch.float64))
            torch.testing.assert_close(state["memory"][0], torch.tensor(memory, dtype=torch.float64), msg=f"memory, step {step}")
            torch.testing.assert_close(state["usage"][0], torch.tensor(usage, dtype=torch.float64), atol=1e-8, rtol=0,
                                       msg=f"usage, step {step}")  # fmt: skip
            torch.testing.assert_close(state["read_w"], torch.full((1, 1, 4), 0.25, dtype=torch.float64))


def test_lrua_head_i_writes_the_i_th_least_used_slot() -> None:
    mann = _lrua(read_heads=2)
    state = mann._initial_state(1, torch.zeros(1, dtype=torch.float64))
    features = torch.randn(1, mann.model.feature_dim, dtype=torch.float64)
    k0, k1 = [math.tanh(0.1), math.tanh(0.2)], [math.tanh(0.3), math.tanh(0.4)]
    control = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        _, state = mann._step(state, features, control)  # each head reads 1/4 of every slot: 1/2 per slot
        torch.testing.assert_close(state["usage"][0], torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64))
        torch.testing.assert_close(state["memory"][0], torch.tensor([k0, k1, [0, 0], [0, 0]], dtype=torch.float64))
        _, state = mann._step(state, features, control)
        torch.testing.assert_close(state["usage"][0], torch.tensor([1.25, 1.25, 1.75, 1.75], dtype=torch.float64))
        torch.testing.assert_close(state["memory"][0], torch.tensor([k0, k1, k0, k1], dtype=torch.float64))


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
