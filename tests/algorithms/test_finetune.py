"""Fine-tune baseline: pre-training logits, a frozen backbone at adaptation, clear errors."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmeta.algorithms import FineTune
from medmeta.networks import Conv4


def _episode(tasks: int = 2, n_way: int = 3, k: int = 2, q: int = 2, side: int = 8):
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(tasks, n_way * k, 1, side, side, generator=g)
    qx = torch.randn(tasks, n_way * q, 1, side, side, generator=g)
    sy = torch.arange(n_way).repeat_interleave(k).expand(tasks, -1).clone()
    qy = torch.arange(n_way).repeat_interleave(q).expand(tasks, -1).clone()
    class_ids = torch.tensor([[4, 0, 7], [2, 5, 1]])[:tasks]  # episode label -> meta-train class
    return sx, sy, qx, qy, torch.gather(class_ids, 1, sy), torch.gather(class_ids, 1, qy)


def _finetune(norm: str = "batch", **kwargs: object) -> FineTune:
    torch.manual_seed(0)
    return FineTune(Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm=norm), pretrain_classes=8, **kwargs)


def test_pretraining_loss_and_query_logits_follow_the_class_ids() -> None:
    algo = _finetune()
    sx, sy, qx, qy, sc, qc = _episode()
    loss, logits = algo.meta_loss({"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy, "support_class": sc, "query_class": qc})
    images = torch.cat([sx, qx], dim=1).flatten(0, 1)
    full = algo.pretrain_head(algo.model.features(images))
    assert torch.allclose(loss, F.cross_entropy(full, torch.cat([sc, qc], dim=1).flatten()))
    query_full = full.view(2, -1, 8)[:, 6:]
    assert torch.allclose(logits[0], query_full[0][:, [4, 0, 7]]) and torch.allclose(logits[1], query_full[1][:, [2, 5, 1]])
    loss.backward()
    assert algo.model.head.weight.grad is None and algo.pretrain_head.weight.grad is not None


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 2.0), ("adam", 0.05)])
def test_adaptation_fits_a_new_head_and_leaves_the_backbone_alone(optimizer: str, lr: float) -> None:
    algo = _finetune(finetune_steps=200, finetune_lr=lr, finetune_optimizer=optimizer)
    sx, sy, _, _, _, _ = _episode()
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    with torch.no_grad():
        support_logits = algo.adapt_and_predict(sx, sy, sx)
    assert support_logits.shape == (2, 6, 3)
    assert (support_logits.argmax(-1) == sy).all()  # the new head separates its own support set
    assert all(torch.equal(before[k], v) for k, v in algo.state_dict().items())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_head_is_fitted_by_the_chosen_optimiser_on_the_frozen_features(optimizer: str) -> None:
    """The query logits equal a zero-initialised head fitted by hand with that optimiser on the same features."""
    from medmeta.networks.norm import query_statistics

    algo = _finetune(finetune_steps=5, finetune_lr=0.3, finetune_optimizer=optimizer)
    sx, sy, qx, _, _, _ = _episode(tasks=1)
    with torch.no_grad():
        support = algo.model.features(sx[0]).flatten(1)
        with query_statistics(algo.model, 0):
            query = algo.model.features(qx[0]).flatten(1)
    weight, bias = torch.zeros(3, support.shape[1], requires_grad=True), torch.zeros(3, requires_grad=True)
    optimiser = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]([weight, bias], lr=0.3)
    for _ in range(5):
        optimiser.zero_grad()
        F.cross_entropy(support @ weight.T + bias, sy[0]).backward()
        optimiser.step()
    expected = (query @ weight.T + bias).detach()
    assert torch.allclose(algo.adapt_and_predict(sx, sy, qx)[0], expected, atol=1e-5)
    other = _finetune(finetune_steps=5, finetune_lr=0.3, finetune_optimizer={"sgd": "adam", "adam": "sgd"}[optimizer])
    assert not torch.allclose(other.adapt_and_predict(sx, sy, qx)[0], expected, atol=1e-3)  # the setting matters
    assert ("gradient-descent" if optimizer == "sgd" else "Adam") in algo.adaptation_text()


def test_an_unknown_optimiser_is_refused() -> None:
    with pytest.raises(ValueError, match="finetune_optimizer must be 'sgd' or 'adam'"):
        _finetune(finetune_optimizer="lbfgs")


def test_too_many_classes_for_the_pretraining_head_is_a_clear_error() -> None:
    algo = _finetune()
    sx, sy, qx, qy, sc, qc = _episode()
    with pytest.raises(ValueError, match="pretrain_classes=8"):
        algo.pretraining_loss_and_logits(sx, sy, qx, qy, sc + 8, qc)


def test_flipped_adds_every_flip_with_its_label() -> None:
    from medmeta.flips import flipped

    images, labels = torch.arange(2 * 1 * 2 * 3, dtype=torch.float).view(2, 1, 2, 3), torch.tensor([0, 1])
    views, view_labels = flipped(images, labels)
    assert views.shape == (8, 1, 2, 3) and view_labels.tolist() == [0, 1] * 4
    expected = [images, images.flip(2), images.flip(3), images.flip([2, 3])]
    assert all(torch.equal(views[2 * i : 2 * i + 2], e) for i, e in enumerate(expected))
    volumes, _ = flipped(torch.randn(1, 1, 2, 2, 2), torch.tensor([0]))
    assert volumes.shape[0] == 8  # every non-empty set of the three axes, plus the original


def test_support_augmentation_changes_the_head_and_not_the_backbone() -> None:
    sx, sy, qx, _, _, _ = _episode()
    plain, augmented = _finetune(), _finetune(support_augment=True)
    before = {k: v.clone() for k, v in augmented.state_dict().items()}
    with torch.no_grad():
        a, b = plain.adapt_and_predict(sx, sy, qx), augmented.adapt_and_predict(sx, sy, qx)
    assert a.shape == b.shape == (2, 6, 3) and not torch.allclose(a, b)
    assert all(torch.equal(before[k], v) for k, v in augmented.state_dict().items())
    assert "flips" in augmented.adaptation_text()


def test_query_entropy_makes_adaptation_transductive_and_only_then() -> None:
    """Without it a query's prediction ignores the other queries; with it, it does not (and the text says so)."""
    sx, sy, qx, _, _, _ = _episode(q=4)
    other_queries = qx.clone()
    other_queries[:, 1:] = torch.randn_like(other_queries[:, 1:])
    for weight, depends in ((0.0, False), (1.0, True)):
        algo = _finetune(norm="group", query_entropy_weight=weight)  # per-image norm: only the entropy couples queries
        with torch.no_grad():
            first, second = algo.adapt_and_predict(sx, sy, qx)[:, 0], algo.adapt_and_predict(sx, sy, other_queries)[:, 0]
        assert torch.allclose(first, second, atol=1e-6) is not depends
    assert "transductive" in _finetune(query_entropy_weight=0.5).adaptation_text()
    with pytest.raises(ValueError, match="query_entropy_weight"):
        _finetune(query_entropy_weight=-1.0)


def test_query_augment_averages_the_probabilities_of_every_flip_and_is_flip_invariant() -> None:
    sx, sy, qx, _, _, _ = _episode(side=16)
    plain, averaged = _finetune(norm="group"), _finetune(norm="group", query_augment=True)
    with torch.no_grad():
        got = averaged.adapt_and_predict(sx, sy, qx)
        views = [qx, qx.flip(-2), qx.flip(-1), qx.flip([-2, -1])]
        by_hand = torch.stack([plain.adapt_and_predict(sx, sy, v).softmax(-1) for v in views]).mean(0)
        flipped_queries = averaged.adapt_and_predict(sx, sy, qx.flip(-1))
    torch.testing.assert_close(got.softmax(-1), by_hand)
    torch.testing.assert_close(flipped_queries, got)  # a query and its mirror image get the same prediction
    assert "each query predicted from its flips" in averaged.adaptation_text()


@pytest.mark.parametrize("scope", ["head", "last_block"])
def test_feature_levels_all_fits_the_head_on_every_stage_and_freezes_the_rest(scope: str) -> None:
    sx, sy, qx, _, _, _ = _episode(side=16)
    algo = _finetune(feature_levels="all", finetune_scope=scope, finetune_steps=3)
    before = {k: v.clone() for k, v in algo.state_dict().items()}
    head, _ = algo._fit(sx[0], sy[0], None, 3)
    assert head.in_features == 3 * 2 * 4 + algo.model.feature_dim  # three stages (mean, std of 4 channels) + final
    with torch.no_grad():
        logits = algo.adapt_and_predict(sx, sy, qx)
    assert logits.shape == (2, 6, 3) and torch.isfinite(logits).all()
    assert all(torch.equal(before[k], v) for k, v in algo.state_dict().items())
    assert all(p.grad is None for p in algo.parameters())  # adaptation leaves no gradients on the frozen weights
    assert "every stage" in algo.adaptation_text() and algo.report_settings()["feature_levels"] == "all"


def test_feature_levels_is_checked() -> None:
    with pytest.raises(ValueError, match="feature_levels must be one of"):
        _finetune(feature_levels="every")


def test_flip_averaged_log_probabilities_stay_finite_when_every_view_is_certain() -> None:
    """A class every flip rules out gets a very negative logit, never -inf (a validation loss stays finite)."""
    from medmeta.flips import flip_averaged

    averaged = flip_averaged(lambda x: torch.tensor([[1e4, -1e4]]).expand(x.shape[0], 2), torch.rand(3, 1, 4, 4))
    assert torch.isfinite(averaged).all() and torch.allclose(averaged.softmax(-1), torch.tensor([[1.0, 0.0]]).expand(3, 2))
    assert torch.isfinite(F.cross_entropy(averaged, torch.tensor([1, 1, 1])))


class BlockNet(nn.Module):
    """``features`` holds ``self.block`` too: its parameters are ``features.1.*`` within ``features`` but ``block.*`` in
    the model's de-duplicated ``named_parameters()``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes, self.feature_dim = prefixes, 4
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.features = nn.Sequential(self.stem, self.block, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def last_block_prefixes(self) -> tuple[str, ...]:
        return self.prefixes


@pytest.mark.parametrize("prefixes", [("features.9.",), ("block.",), ("features.1.", "block.")])
def test_a_last_block_naming_no_parameter_of_features_is_refused_when_built(prefixes: tuple[str, ...]) -> None:
    """A typo, or a name outside ``features``, would fit the head only (or fail at the first episode)."""
    with pytest.raises(ValueError, match=re.escape(f"last_block_prefixes() = {prefixes!r} must name parameters of")):
        FineTune(BlockNet(prefixes), pretrain_classes=4, finetune_scope="last_block")


@pytest.mark.parametrize("model", ["conv4", "block"])
def test_last_block_tunes_the_block_its_prefixes_name(model: str) -> None:
    """The block is tuned (predictions differ from head-only), also when the model lists it under another name."""
    sx, sy, qx, _, _, _ = _episode(tasks=1)

    def predict(scope: str) -> torch.Tensor:
        torch.manual_seed(0)
        conv4 = model == "conv4"
        backbone = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8) if conv4 else BlockNet(("features.1.",))
        algo = FineTune(backbone, pretrain_classes=4, finetune_scope=scope, finetune_steps=10, finetune_lr=0.5)
        return algo.adapt_and_predict(sx, sy, qx)

    assert (predict("last_block") - predict("head")).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [0, -3])
def test_fewer_than_one_step_is_refused_the_zero_head_would_score_every_class_alike(steps: int) -> None:
    with pytest.raises(ValueError, match=f"finetune_steps must be at least 1.*got {steps}"):
        _finetune(finetune_steps=steps)
    algo = _finetune(finetune_steps=2)
    sx, sy, qx, _, _, _ = _episode(tasks=1)
    with pytest.raises(ValueError, match=f"steps must be at least 1.*got {steps}"):
        algo.adapt_and_predict(sx, sy, qx, steps=steps)
    with pytest.raises(ValueError, match=f"steps must be at least 1.*got {steps}"):
        algo.adapted_network(sx[0], sy[0], steps=steps)
