"""``MetaLearner``: the contract a meta-learner must meet, the defaults of its optional hooks, its settings."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from medmeta.algorithms import MAML, MAMLPlusPlus, MetaLearner
from medmeta.algorithms.base import CURVE_POINTS, curve_steps
from medmeta.networks import Conv4


class Recording(MetaLearner):
    """A learner implementing only the required parts; it records what the default ``meta_loss`` passes on."""

    def __init__(self, model: nn.Module, n_way: int | None = None, *, scale: float = 1.0) -> None:
        super().__init__(model, n_way)
        self.scale = scale
        self.calls: list[tuple[Tensor, ...]] = []

    def outer_loss_and_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> tuple[Tensor, Tensor]:
        self.calls.append((support_x, support_y, query_x, query_y))
        logits = self.model(query_x.flatten(0, 1)).unflatten(0, query_x.shape[:2])
        return self.scale * logits.sum(), logits

    def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None) -> Tensor:
        return self.model(query_x.flatten(0, 1)).unflatten(0, query_x.shape[:2]).detach()


class Named(Recording):
    name = "named"


def _model() -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8)


def _batch() -> dict[str, Tensor]:
    return {
        "support_x": torch.randn(2, 3, 1, 8, 8), "support_y": torch.arange(3).repeat(2, 1),
        "query_x": torch.randn(2, 6, 1, 8, 8), "query_y": torch.arange(3).repeat_interleave(2).repeat(2, 1),
        "support_class": torch.zeros(2, 3, dtype=torch.long), "episode": torch.arange(2),
    }  # fmt: skip


def test_a_learner_without_adapt_and_predict_cannot_be_made() -> None:
    class TrainsOnly(MetaLearner):
        def outer_loss_and_logits(self, *episodes: Tensor) -> tuple[Tensor, Tensor]:
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="adapt_and_predict"):
        TrainsOnly(_model(), 3)  # type: ignore[abstract]


def test_without_a_training_loss_meta_loss_says_what_to_implement() -> None:
    class EvaluatesOnly(MetaLearner):
        def adapt_and_predict(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, *, steps: int | None = None) -> Tensor:
            return query_x

    with pytest.raises(NotImplementedError, match="EvaluatesOnly implements neither outer_loss_and_logits nor meta_loss"):
        EvaluatesOnly(_model(), 3).meta_loss(_batch())


def test_the_default_meta_loss_calls_outer_loss_and_logits_with_the_four_episode_tensors() -> None:
    learner = Recording(_model(), 3, scale=2.0)
    batch = _batch()
    loss, logits = learner.meta_loss(batch)
    (call,) = learner.calls
    for got, key in zip(call, ("support_x", "support_y", "query_x", "query_y"), strict=True):
        assert got is batch[key], key
    assert logits.shape == (2, 6, 3) and torch.equal(loss, 2.0 * logits.sum())


def test_default_hooks() -> None:
    learner = Recording(_model(), 3)
    batch = _batch()
    sx, sy, qx = batch["support_x"], batch["support_y"], batch["query_x"]
    assert learner.adapt_and_predict_every_step(sx, sy, qx) is None and learner.adaptation_steps() is None
    assert learner.predictor(sx[0], sy[0]) is None
    learner.set_epoch(3)  # a no-op
    assert learner.running_stat_slots() == 1 and learner.cuda_graph_safe() is False
    assert learner.report_settings() == {} and learner.adaptation_text() == "adaptation to the support set"
    assert learner.label() == "Recording" and Named(_model(), 3).label() == "named"
    assert learner.model is not None and learner.n_way == 3
    assert [name for name, _ in learner.named_parameters()] == [name for name, _ in _model().named_parameters(prefix="model")]


def test_the_default_resize_head_replaces_a_linear_head_with_a_zero_one() -> None:
    learner = Recording(_model(), 3)
    old = learner.model.head
    learner.resize_head(5)
    head = learner.model.head
    assert head is not old and isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (old.in_features, 5) and learner.n_way == 5
    assert not head.weight.any() and not head.bias.any()
    assert head.weight.dtype == old.weight.dtype and head.weight.device == old.weight.device
    assert learner.model(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    headless = Recording(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 3)
    with pytest.raises(ValueError, match="no linear `head` to resize to 4 classes"):
        headless.resize_head(4)


def test_settings_are_the_keyword_arguments_after_model_and_n_way() -> None:
    assert list(Recording.settings()) == ["scale"]
    maml = MAML.settings()
    maml_pp = MAMLPlusPlus.settings()
    assert "model" not in maml_pp and "n_way" not in maml_pp and "maml_options" not in maml_pp
    assert set(maml) <= set(maml_pp)  # MAML's, through **maml_options
    assert {"multi_step_loss", "learn_inner_lrs", "first_order_epochs"} <= set(maml_pp) - set(maml)
    assert maml_pp["inner_lr"].default == 0.4 and maml_pp["eval_inner_steps"].default is None


def test_settings_from_legacy_takes_the_keys_named_like_a_setting() -> None:
    assert Recording.settings_from_legacy({"scale": 3.0, "inner_lr": 0.1}) == {"scale": 3.0}


@pytest.mark.parametrize("total", [0, 1, 9, 10, 11, 12, 20, 37, 40, 41, 100, 1000])
def test_curve_steps_are_every_step_up_to_ten_then_eleven_evenly_spaced(total: int) -> None:
    steps = curve_steps(total)
    assert steps[0] == 0 and steps[-1] == total and steps == sorted(set(steps))
    if total + 1 <= CURVE_POINTS:
        assert steps == list(range(total + 1))
    else:
        assert len(steps) == CURVE_POINTS
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    assert curve_steps(40) == list(range(0, 41, 4)) and curve_steps(20, max_points=3) == [0, 10, 20]


@pytest.mark.parametrize(("total", "points"), [(-1, 11), (5, 1)])
def test_curve_steps_refuses_impossible_requests(total: int, points: int) -> None:
    with pytest.raises(ValueError, match="curve_steps needs"):
        curve_steps(total, points)
