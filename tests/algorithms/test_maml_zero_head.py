"""MAML's ``zero_head`` (the zeroing trick) against a plain sequential autograd reference on a batch-norm Conv-4."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta.algorithms import ANIL, MAML, MetaSGD, ProtoMAML
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
    model = Conv4(in_channels=1, n_way=3, hidden_channels=6, image_size=12, norm="batch").double()
    with torch.no_grad():  # a meta-learned head far from zero, so that zeroing it changes everything
        model.head.weight.normal_(0.0, 1.0)
        model.head.bias.normal_(0.0, 1.0)
    return model


def reference_outer_loss(model: Conv4, sx, sy, qx, qy, *, lr: float, steps: int, body: bool = True) -> torch.Tensor:
    """Sequential second-order MAML with torch.autograd.grad(create_graph=True), the head starting at zero on every task.

    ``body=False`` adapts the head only (ANIL), the body's features then being those at θ.
    """
    names = [n for n, _ in model.named_parameters() if n.startswith(BODY)]
    theta = [p for n, p in model.named_parameters() if n.startswith(BODY)]
    n_classes = model.head.out_features

    def features(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        return functional_call(model.features, {n.removeprefix(BODY): w for n, w in zip(names, weights)}, (x,))

    total = 0.0
    for t in range(sx.shape[0]):
        weights = list(theta)
        w = torch.zeros(n_classes, model.head.in_features, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(features(sx[t], weights), w, b), sy[t])
            if body:
                *g_body, g_w, g_b = torch.autograd.grad(loss, [*weights, w, b], create_graph=True)
                weights = [p - lr * g for p, g in zip(weights, g_body)]
            else:
                g_w, g_b = torch.autograd.grad(loss, [w, b], create_graph=True)
            w, b = w - lr * g_w, b - lr * g_b
        total = total + F.cross_entropy(F.linear(features(qx[t], weights), w, b), qy[t])
    return total / sx.shape[0]


@pytest.mark.parametrize(("steps", "how"), [(1, "loop"), (3, "loop"), (3, "vmap"), (3, "checkpointed")])
def test_meta_loss_and_gradient_match_the_sequential_reference(steps: int, how: str) -> None:
    model = _model()
    sx, sy, qx, qy = random_episodes(tasks=2, side=12)
    options = {"task_parallel": "vmap" if how == "vmap" else "loop", "checkpoint_inner_steps": how == "checkpointed"}
    learner = MAML(model, 3, inner_lr=0.5, inner_steps=steps, zero_head=True, **options)
    ours = learner.outer_loss(sx, sy, qx, qy)
    reference = reference_outer_loss(model, sx, sy, qx, qy, lr=0.5, steps=steps)
    expected = assert_matches_reference(ours, reference, model)
    plain = MAML(model, 3, inner_lr=0.5, inner_steps=steps).outer_loss(sx, sy, qx, qy)
    assert (plain - ours).abs() > 1e-3  # the meta-learned head would have given another loss
    if steps > 1:  # the second-order terms matter (after one step from a zero head the body has not moved)
        first = MAML(model, 3, inner_lr=0.5, inner_steps=steps, zero_head=True, first_order=True).outer_loss(sx, sy, qx, qy)
        diff = [a - b for a, b in zip(body_grads(first, model), expected)]
        assert torch.cat([d.flatten() for d in diff]).norm() > 1e-6


def test_anil_with_a_zero_head_matches_the_reference() -> None:
    model = _model(1)
    sx, sy, qx, qy = random_episodes(tasks=2, side=12)
    ours = ANIL(model, 3, inner_lr=0.5, inner_steps=2, zero_head=True, task_parallel="loop").outer_loss(sx, sy, qx, qy)
    reference = reference_outer_loss(model, sx, sy, qx, qy, lr=0.5, steps=2, body=False)
    assert_matches_reference(ours, reference, model)


def test_the_first_step_fits_the_head_alone_along_the_class_means() -> None:
    """From a zero head the body's support gradient vanishes; the head moves to lr (onehot - 1/N)ᵀ features / (N K)."""
    model = _model()
    sx, sy, _, _ = random_episodes(tasks=1, side=12)
    learner = MAML(model, 3, inner_lr=0.5, zero_head=True)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    adapted = learner.adapt(sx[0], sy[0], steps=1, first_order=True, params=theta)
    for name, p in theta.items():
        if name.startswith(BODY):
            torch.testing.assert_close(adapted[name], p, rtol=0.0, atol=0.0)
    with torch.no_grad():
        feats = model.features(sx[0])
    target = F.one_hot(sy[0], 3).double() - 1 / 3
    torch.testing.assert_close(adapted["head.weight"], 0.5 * target.T @ feats / len(sy[0]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapted["head.bias"], 0.5 * target.mean(0), rtol=1e-10, atol=1e-12)


def test_at_zero_steps_every_class_scores_alike_so_zero_steps_are_refused() -> None:
    """Step 0 of the adaptation curve scores every class alike; a model evaluated there (or trained with no inner
    step, whose meta-gradient is then zero) would report chance accuracy as a result, so it is refused."""
    model = _model()
    sx, sy, qx, _ = random_episodes(tasks=2, side=12)
    learner = MAML(model, 3, inner_lr=0.5, inner_steps=1, zero_head=True)
    curve = learner.adapt_and_predict_every_step(sx, sy, qx, steps=1)
    torch.testing.assert_close(curve[0], torch.zeros_like(curve[0]), rtol=0.0, atol=0.0)
    assert curve[1].abs().max() > 1e-3
    for cls, settings in ((MAML, {"inner_steps": 0}), (MAML, {"eval_inner_steps": 0}), (ANIL, {"eval_inner_steps": 0}),
                          (MetaSGD, {"inner_steps": 0, "eval_inner_steps": 2})):  # fmt: skip
        with pytest.raises(ValueError, match="zero_head starts every task from a zero head: inner_steps and eval_inner"):
            cls(model, 3, zero_head=True, **settings)
    for call in (lambda: learner.adapt_and_predict(sx, sy, qx, steps=0),
                 lambda: learner.adapt_and_predict_every_step(sx, sy, qx, steps=0),
                 lambda: learner.predictor(sx[0], sy[0], steps=0),
                 lambda: learner.adapted_network(sx[0], sy[0], steps=0)):
        with pytest.raises(ValueError, match="adapt with at least 1 step, got 0"):
            call()
    plain = MAML(model, 3, eval_inner_steps=0).adapt_and_predict(sx, sy, qx)  # without zero_head: the meta-learned head
    assert plain.abs().max() > 1e-3


def test_the_module_meta_gradient_is_the_reference_and_leaves_the_meta_learned_head_unused() -> None:
    torch.manual_seed(0)
    module = module_for("maml", n_way=3, image_size=12, hidden_channels=4, norm="batch", inner_lr=0.3, inner_steps=2,
                        zero_head=True).double()  # fmt: skip
    sx, sy, qx, qy = random_episodes(tasks=3, side=12)
    loss, _ = module.algorithm.meta_loss({"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy})
    loss.backward()
    reference = reference_outer_loss(module.model, sx, sy, qx, qy, lr=0.3, steps=2)
    assert_body_grads_are_the_reference_and_head_unused(module.model, reference)
    assert module.algorithm.adaptation_text(20) == "zero head, then 20 inner steps"


def test_refusals() -> None:
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 3)

    with pytest.raises(ValueError, match="zero_head needs a backbone with a linear `head`; NoHead"):
        MAML(NoHead(), 3, zero_head=True)
    with pytest.raises(ValueError, match="zero_head does not apply"):
        ProtoMAML(_model(), 3, zero_head=True)
