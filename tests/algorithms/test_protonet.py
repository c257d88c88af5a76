"""Prototypical networks: hand-computed logits, label symmetries, transductive batch norm, training."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmeta.algorithms.protonet import ProtoNet, class_prototypes
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes


class FlatIdentity(nn.Module):
    """Backbone whose embedding is the flattened input; the head is never used."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Identity()


_episodes = partial(random_episodes, tasks=2, q=2, side=8)


def _conv4(seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm="batch").double()


def _fixed_example():
    """One task, 2 classes, 2-D embeddings; support labels deliberately out of order."""
    sx = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 2.0], [0.0, 4.0]]).view(1, 4, 1, 1, 2)
    sy = torch.tensor([[0, 1, 0, 1]])  # prototypes (1, 1) and (2, 2)
    qx = torch.tensor([[1.0, 1.0], [3.0, 0.0]]).view(1, 2, 1, 1, 2)
    qy = torch.tensor([[0, 1]])
    return sx, sy, qx, qy


@pytest.mark.parametrize(
    ("distance", "temperature", "expected"),
    [
        # squared distances: (1,1)->[0, 2]; (3,0)->[4+1, 1+4]
        ("squared_euclidean", 0.5, [[0.0, -4.0], [-10.0, -10.0]]),
        # cosines: (1,1) is parallel to both prototypes; (3,0) has cos 1/sqrt(2) with both
        ("cosine", 1.0, [[0.0, 0.0], [2**-0.5 - 1, 2**-0.5 - 1]]),
    ],
)
def test_logits_match_hand_computation(distance: str, temperature: float, expected: list[list[float]]) -> None:
    algo = ProtoNet(FlatIdentity(), distance=distance, temperature=temperature)
    sx, sy, qx, qy = _fixed_example()
    loss, logits = algo.outer_loss_and_logits(sx, sy, qx, qy)
    expected_logits = torch.tensor([expected])
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(expected_logits[0], qy[0]), atol=1e-6)


def test_permuting_the_class_order_permutes_the_logit_columns() -> None:
    algo = ProtoNet(_conv4())
    sx, sy, qx, qy = _episodes()
    perm = torch.tensor([2, 0, 1])  # class c becomes class perm[c]
    with torch.no_grad():
        before = algo.adapt_and_predict(sx, sy, qx)
        after = algo.adapt_and_predict(sx, perm[sy], qx)
    assert torch.allclose(after[..., perm], before, atol=1e-12)
    loss_before, _ = algo.outer_loss_and_logits(sx, sy, qx, qy)
    loss_after, _ = algo.outer_loss_and_logits(sx, perm[sy], qx, perm[qy])
    assert torch.allclose(loss_before, loss_after, atol=1e-12)


def test_query_labels_do_not_leak_into_logits() -> None:
    algo = ProtoNet(_conv4())
    sx, sy, qx, qy = _episodes()
    _, logits = algo.outer_loss_and_logits(sx, sy, qx, qy)
    _, logits_other = algo.outer_loss_and_logits(sx, sy, qx, (qy + 1) % 3)
    with torch.no_grad():
        predicted = algo.adapt_and_predict(sx, sy, qx, steps=7)
    assert torch.equal(logits, logits_other)
    assert torch.equal(predicted, logits.detach())


def test_batch_norm_is_transductive_support_and_query_in_one_pass() -> None:
    """Documented choice: one forward pass over support + query per task, never across tasks."""
    model = _conv4()
    algo = ProtoNet(model)
    sx, sy, qx, _ = _episodes()
    with torch.no_grad():
        logits = algo.adapt_and_predict(sx, sy, qx)
        for t in range(sx.shape[0]):
            z = model.features(torch.cat([sx[t], qx[t]]))
            prototypes = torch.stack([z[:6][sy[t] == c].mean(0) for c in range(3)])
            expected = -((z[6:, None] - prototypes[None]) ** 2).sum(-1)
            assert torch.allclose(logits[t], expected, atol=1e-10)
        # another query image changes the other queries' logits (query batch statistics)
        qx_changed = qx.clone()
        qx_changed[:, -1] += 3.0
        changed = algo.adapt_and_predict(sx, sy, qx_changed)
    assert not torch.allclose(changed[:, :-1], logits[:, :-1])


def test_loss_is_differentiable_and_adam_reduces_it() -> None:
    algo = ProtoNet(_conv4(), distance="cosine", temperature=0.1)
    sx, sy, qx, qy = _episodes()
    optimiser = torch.optim.Adam(algo.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        optimiser.zero_grad()
        loss = algo.outer_loss(sx, sy, qx, qy)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert algo.model.features[0].weight.grad.norm() > 0
    assert algo.model.head.weight.grad is None  # the head is unused
    assert losses[-1] < losses[0]


def test_rejects_a_class_without_support_and_bad_settings() -> None:
    algo = ProtoNet(FlatIdentity())
    sx, sy, qx, qy = _fixed_example()
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        algo.outer_loss(sx, torch.tensor([[0, 2, 0, 2]]), qx, qy)
    with pytest.raises(ValueError, match="temperature"):
        ProtoNet(FlatIdentity(), temperature=0.0)
    with pytest.raises(ValueError, match="distance"):
        ProtoNet(FlatIdentity(), distance="manhattan")  # type: ignore[arg-type]


def test_a_learned_temperature_is_meta_learned_and_kept_in_the_state_dict() -> None:
    """Meta-Baseline's classifier: cosine logits divided by a temperature the outer loop learns."""
    algo = ProtoNet(_conv4(), distance="cosine", temperature=0.1, learn_temperature=True)
    assert algo.temperature.item() == pytest.approx(0.1) and "log_temperature" in algo.state_dict()
    sx, sy, qx, qy = _episodes()
    fixed = ProtoNet(_conv4(), distance="cosine", temperature=0.1)
    assert torch.allclose(algo.adapt_and_predict(sx, sy, qx), fixed.adapt_and_predict(sx, sy, qx))
    optimiser = torch.optim.Adam(algo.parameters(), lr=0.1)
    optimiser.zero_grad()
    algo.outer_loss(sx, sy, qx, qy).backward()
    assert algo.log_temperature.grad is not None and algo.log_temperature.grad.abs() > 0
    optimiser.step()
    assert algo.temperature.item() != pytest.approx(0.1)
    assert "learned temperature" in algo.adaptation_text()
    assert "log_temperature" not in fixed.state_dict()


def test_support_augmentation_builds_prototypes_from_the_flips_at_evaluation_only() -> None:
    """Prototypes of the support set and its flips: equal to hand-made prototypes over the flipped views."""
    from medmeta.flips import flipped

    algo = ProtoNet(FlatIdentity(), support_augment=True)
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(1, 4, 1, 2, 3, generator=g), torch.randn(1, 2, 1, 2, 3, generator=g)
    sy, qy = torch.tensor([[0, 1, 0, 1]]), torch.tensor([[0, 1]])
    views, labels = flipped(sx[0], sy[0])
    expected = -torch.cdist(qx[0].flatten(1), class_prototypes(views.flatten(1), labels)).pow(2)
    assert torch.allclose(algo.adapt_and_predict(sx, sy, qx)[0], expected)
    assert torch.allclose(algo.predictor(sx[0], sy[0]).forward(qx[0]), expected)
    plain = ProtoNet(FlatIdentity())
    assert torch.allclose(algo.outer_loss(sx, sy, qx, qy), plain.outer_loss(sx, sy, qx, qy))  # training is unchanged
    assert not torch.allclose(algo.adapt_and_predict(sx, sy, qx), plain.adapt_and_predict(sx, sy, qx))
    assert "flips" in algo.adaptation_text()
