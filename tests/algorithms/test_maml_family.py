"""The MAML family's one inner loop (``MAML.trajectory``): evaluation, the adaptation curve and ``diagnose``'s
predictor walk the same steps, for MAML and each variant that overrides its hooks; MAML through the plug-in
``FewShotModule`` equals the plain sequential reference of ``test_maml.py``."""

from __future__ import annotations

import pytest
import torch

from medmeta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD, ProtoMAML
from medmeta.networks import Conv4
from tests.algorithms.episodes import random_episodes
from tests.algorithms.test_maml import reference_outer_loss
from tests.algorithms.test_maml_pp import _randomise
from tests.conftest import module_for

FAMILY = [MAML, MetaSGD, ANIL, MAMLPlusPlus, ProtoMAML]


def _learner(cls: type[MAML]) -> MAML:
    """A float64 learner on a small Conv4 whose learned rates and per-step norm weights differ (MAML++, Meta-SGD)."""
    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm="batch").double()
    learner = cls(model, 3, inner_lr=0.3, inner_steps=2, eval_inner_steps=3)
    if isinstance(learner, MAMLPlusPlus):
        _randomise(learner)
    elif isinstance(learner, MetaSGD):
        with torch.no_grad():
            for lr in learner.inner_lrs.values():
                lr.uniform_(0.05, 0.4)
    return learner


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("steps", [None, 1, 4])  # eval_inner_steps, fewer, and more than in training
def test_evaluation_curve_and_predictor_walk_the_same_inner_loop(cls: type[MAML], steps: int | None) -> None:
    learner = _learner(cls)
    sx, sy, qx, qy = random_episodes(tasks=2, side=8)
    last = learner.adapt_and_predict(sx, sy, qx, steps=steps)
    curve = learner.adapt_and_predict_every_step(sx, sy, qx, steps=steps)
    assert curve.shape == (1 + (learner.eval_inner_steps if steps is None else steps), *last.shape)
    assert torch.equal(last, curve[-1])
    assert not torch.equal(curve[0], curve[-1])  # the steps adapt something
    for task in range(2):
        predictor = learner.predictor(sx[task], sy[task], steps=steps)
        assert predictor.backbone_calls == 1
        torch.testing.assert_close(predictor.forward(qx[task]), last[task], rtol=0.0, atol=0.0)


def test_maml_through_the_module_equals_the_sequential_reference_with_batch_norm() -> None:
    """``FewShotModule(algorithm=maml spec)``'s meta-loss and meta-gradient: those of plain sequential autograd."""
    torch.manual_seed(0)
    module = module_for("maml", n_way=3, image_size=8, hidden_channels=4, norm="batch", inner_lr=0.3, inner_steps=2)
    module = module.double()
    sx, sy, qx, qy = random_episodes(tasks=3, side=8)
    loss, logits = module.algorithm.meta_loss({"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy})
    reference = reference_outer_loss(module.model, sx, sy, qx, qy, lr=0.3, steps=2)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0.0)
    assert logits.shape == (3, 6, 3)
    params = list(module.model.parameters())
    ours, theirs = torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)
    for name, a, b in zip([n for n, _ in module.model.named_parameters()], ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12, msg=name)


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_evaluation_flips_adapt_on_the_support_flips_and_average_the_query_flips(cls: type[MAML]) -> None:
    """``support_augment`` and ``query_augment`` change evaluation only: by hand, the same; training, untouched."""
    from medmeta.flips import flipped

    plain, augmented = _learner(cls), _learner(cls)
    augmented.support_augment = augmented.query_augment = True
    sx, sy, qx, qy = random_episodes(tasks=2, side=8)
    torch.testing.assert_close(augmented.outer_loss_and_logits(sx, sy, qx, qy)[0], plain.outer_loss_and_logits(sx, sy, qx, qy)[0],
                               rtol=0.0, atol=0.0)  # fmt: skip
    got = augmented.adapt_and_predict(sx, sy, qx)
    support = [flipped(sx[t], sy[t]) for t in range(2)]
    fx, fy = torch.stack([s[0] for s in support]), torch.stack([s[1] for s in support])
    views = [qx, qx.flip(-2), qx.flip(-1), qx.flip([-2, -1])]
    by_hand = torch.stack([plain.adapt_and_predict(fx, fy, view).softmax(-1) for view in views]).mean(0)
    torch.testing.assert_close(got.softmax(-1), by_hand)
    torch.testing.assert_close(augmented.adapt_and_predict(sx, sy, qx.flip(-1)), got)  # a mirror image, the same prediction
    predictor = augmented.predictor(sx[0], sy[0])
    assert predictor.backbone_calls == 4
    torch.testing.assert_close(predictor.forward(qx[0]), got[0])
    assert "flips" in augmented.adaptation_text() and augmented.report_settings()["query_augment"] is True


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.__name__)
def test_the_curve_at_some_steps_is_those_rows_of_the_full_curve(cls: type[MAML]) -> None:
    learner = _learner(cls)
    sx, sy, qx, _ = random_episodes(tasks=2, side=8)
    full = learner.adapt_and_predict_every_step(sx, sy, qx, steps=6)
    some = learner.adapt_and_predict_every_step(sx, sy, qx, steps=6, at_steps=[0, 3, 5, 6])
    assert torch.equal(some, full[[0, 3, 5, 6]])
    assert learner.adaptation_steps() == learner.eval_inner_steps
    for bad in ([0, 3], [3, 3, 6], [-1, 6], []):  # must end at the steps, ascend strictly, start at >= 0
        with pytest.raises(ValueError, match="at_steps must ascend"):
            learner.adapt_and_predict_every_step(sx, sy, qx, steps=6, at_steps=bad)
