"""Proto-MAML against a plain sequential autograd reference on a batch-norm Conv-4, and its refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta.algorithms import ProtoMAML
from medmeta.networks import Conv4
from tests.algorithms.episodes import (
    BODY,
    assert_body_grads_are_the_reference_and_head_unused,
    assert_matches_reference,
    body_grads,
    random_episodes,
)
from tests.conftest import module_for


def _model(seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(in_channels=1, n_way=3, hidden_channels=6, image_size=12, norm="batch").double()


def reference_outer_loss(model: Conv4, sx, sy, qx, qy, *, lr: float, steps: int) -> torch.Tensor:
    """Sequential second-order Proto-MAML with torch.autograd.grad(create_graph=True), one task after another.

    The head starts as ``2 c_k`` and ``-‖c_k‖²`` from the support features at θ (prototypes by boolean
    masks); each inner step then differentiates the support loss in the body and head weights as
    separate variables: every step's forward uses fresh views of them, so the gradient in the body
    does not also run back through the prototypes (those paths belong to the meta-gradient only).
    """
    names = [n for n, _ in model.named_parameters() if n.startswith(BODY)]
    theta = [p for n, p in model.named_parameters() if n.startswith(BODY)]

    def features(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return functional_call(model.features, {n.removeprefix(BODY): w for n, w in zip(names, weights)}, (x,))

    total = 0.0
    for t in range(sx.shape[0]):
        support = features(sx[t], theta)
        prototypes = torch.stack([support[sy[t] == k].mean(0) for k in range(int(sy[t].max()) + 1)])
        weights, w, b = list(theta), 2 * prototypes, -(prototypes**2).sum(1)
        for _ in range(steps):
            weights, w, b = [p.view_as(p) for p in weights], w.view_as(w), b.view_as(b)
            loss = F.cross_entropy(F.linear(features(sx[t], weights), w, b), sy[t])
            *g_body, g_w, g_b = torch.autograd.grad(loss, [*weights, w, b], create_graph=True)
            weights = [p - lr * g for p, g in zip(weights, g_body)]
            w, b = w - lr * g_w, b - lr * g_b
        total = total + F.cross_entropy(F.linear(features(qx[t], weights), w, b), qy[t])
    return total / sx.shape[0]


@pytest.mark.parametrize(("steps", "how"), [(0, "loop"), (1, "loop"), (2, "loop"), (2, "vmap"), (2, "checkpointed")])
def test_meta_loss_and_gradient_match_the_sequential_reference(steps: int, how: str) -> None:
    model = _model()
    sx, sy, qx, qy = random_episodes(tasks=2, side=12)
    options = {"task_parallel": "vmap" if how == "vmap" else "loop", "checkpoint_inner_steps": how == "checkpointed"}
    learner = ProtoMAML(model, 3, inner_lr=0.5, inner_steps=steps, **options)
    ours = learner.outer_loss(sx, sy, qx, qy)
    reference = reference_outer_loss(model, sx, sy, qx, qy, lr=0.5, steps=steps)
    expected = assert_matches_reference(ours, reference, model)
    if steps:  # the second-order terms matter: first order is a different meta-gradient
        first = ProtoMAML(model, 3, inner_lr=0.5, inner_steps=steps, first_order=True).outer_loss(sx, sy, qx, qy)
        diff = [a - b for a, b in zip(body_grads(first, model), expected)]
        assert torch.cat([d.flatten() for d in diff]).norm() > 1e-6


def test_the_module_meta_gradient_leaves_the_meta_learned_head_unused() -> None:
    """Through ``FewShotModule``: the body gets the reference meta-gradient; ``model.head`` gets none."""
    torch.manual_seed(0)
    module = module_for("proto_maml", n_way=3, image_size=12, hidden_channels=4, norm="batch", inner_lr=0.3, inner_steps=2)
    module = module.double()
    sx, sy, qx, qy = random_episodes(tasks=3, side=12)
    loss, logits = module.algorithm.meta_loss({"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy})
    assert logits.shape == (3, 6, 3)
    loss.backward()
    reference = reference_outer_loss(module.model, sx, sy, qx, qy, lr=0.3, steps=2)
    assert_body_grads_are_the_reference_and_head_unused(module.model, reference)


def test_without_inner_steps_it_is_the_nearest_prototype_classifier() -> None:
    """Zero steps: softmax(2c·x - ‖c‖²) = softmax(-‖x - c‖²), whatever the meta-learned head holds."""
    model = _model()
    sx, sy, qx, _ = random_episodes(tasks=2, side=12)
    learner = ProtoMAML(model, 3, inner_lr=0.5, inner_steps=1, eval_inner_steps=0)
    ours = learner.adapt_and_predict(sx, sy, qx)
    with torch.no_grad():
        for t in range(2):
            support, query = model.features(sx[t]), model.features(qx[t])
            prototypes = torch.stack([support[sy[t] == k].mean(0) for k in range(3)])
            nearest = -torch.cdist(query, prototypes) ** 2
            torch.testing.assert_close(ours[t].softmax(-1), nearest.softmax(-1), rtol=1e-9, atol=1e-12)
        model.head.weight.normal_()
        model.head.bias.normal_()
    torch.testing.assert_close(learner.adapt_and_predict(sx, sy, qx), ours, rtol=0.0, atol=0.0)
    adapted = learner.adapt_and_predict(sx, sy, qx, steps=3)
    assert not torch.allclose(adapted, ours)  # the inner steps then adapt body and head


def test_a_support_set_without_every_class_is_refused() -> None:
    learner = ProtoMAML(_model(), 3, inner_steps=1)
    sx, sy, qx, qy = random_episodes(tasks=2, side=12)
    sy[1] = torch.tensor([0, 0, 1, 1, 1, 0])
    for call in (lambda: learner.outer_loss(sx, sy, qx, qy), lambda: learner.adapt_and_predict(sx, sy, qx)):
        with pytest.raises(ValueError, match=r"the support set of task 1 has no example of classes \[2\]"):
            call()
    with pytest.raises(ValueError, match=r"the support set has no example of classes \[2\]"):
        learner.predictor(sx[1], sy[1])
    sy[1] = torch.tensor([0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match=r"support labels must be in 0\.\.2"):
        learner.adapt_and_predict(sx, sy, qx)


def test_a_backbone_without_features_and_a_linear_head_is_refused() -> None:
    with pytest.raises(ValueError, match="`features` submodule and a linear `head`"):
        ProtoMAML(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 3)
