"""Logistic regression on L2-normalised features: the optimum it reaches, scale invariance, a frozen backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medmeta.algorithms import SHORT_NAMES, LogisticRegressionProbe
from medmeta.algorithms.linear_probe import fit_logistic_regression
from medmeta.networks import Conv4


class ScaledFlat(nn.Module):
    """Backbone whose features are the flattened input times ``scale`` (``feature_dim`` for the probe)."""

    def __init__(self, scale: float = 1.0, dim: int = 6) -> None:
        super().__init__()
        self.scale, self.feature_dim = scale, dim
        self.features = nn.Sequential(nn.Flatten())
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_fit_reaches_the_penalised_optimum() -> None:
    """At the returned weights the gradient of sum(cross-entropy) + |W|^2 / 2C vanishes (bias unpenalised)."""
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.arange(3).repeat(4)
    weight, bias = fit_logistic_regression(features, labels, 3, penalty_c=0.7)
    weight.requires_grad_(True), bias.requires_grad_(True)
    objective = F.cross_entropy(features @ weight + bias, labels, reduction="sum") + weight.pow(2).sum() / 1.4
    grad_w, grad_b = torch.autograd.grad(objective, (weight, bias))
    assert grad_w.abs().max() < 1e-5 and grad_b.abs().max() < 1e-5
    weaker, _ = fit_logistic_regression(features, labels, 3, penalty_c=0.01)
    assert weaker.norm() < weight.norm()  # a stronger penalty shrinks the weights


def test_predictions_ignore_the_feature_scale_and_the_backbone_is_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.randn(2, 6, 1, 2, 3, generator=g), torch.randn(2, 9, 1, 2, 3, generator=g)
    sy = torch.arange(3).repeat_interleave(2).expand(2, -1).clone()
    probe = LogisticRegressionProbe(ScaledFlat(), pretrain_classes=4)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    logits = probe.adapt_and_predict(sx, sy, qx)
    assert logits.shape == (2, 9, 3) and logits.dtype == torch.float32
    assert torch.allclose(logits, probe.adapt_and_predict(5.0 * sx, sy, 3.0 * qx), atol=1e-5)  # unit-length features
    assert all(torch.equal(before[k], v) for k, v in probe.state_dict().items())
    assert torch.equal(probe.adapt_and_predict(sx, sy, sx).argmax(-1), sy)  # separates its own 6-D support set


def test_it_is_a_registered_learner_that_pretrains_like_finetune() -> None:
    assert SHORT_NAMES["logreg"] is LogisticRegressionProbe
    settings = LogisticRegressionProbe.settings()
    assert settings["penalty_c"].default == 1.0 and "pretrain_classes" in settings  # FineTune's settings pass through
    probe = LogisticRegressionProbe(Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8), pretrain_classes=8)
    assert "logistic regression" in probe.adaptation_text()
    with pytest.raises(ValueError, match="penalty_c"):
        LogisticRegressionProbe(ScaledFlat(), penalty_c=0.0)


def test_support_augmentation_fits_on_the_flips_and_ignored_settings_are_refused() -> None:
    g = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(1, 6, 1, 2, 3, generator=g), torch.randn(1, 9, 1, 2, 3, generator=g)
    sy = torch.arange(3).repeat_interleave(2)[None]
    plain = LogisticRegressionProbe(ScaledFlat(), pretrain_classes=4)
    augmented = LogisticRegressionProbe(ScaledFlat(), pretrain_classes=4, support_augment=True)
    assert not torch.allclose(plain.adapt_and_predict(sx, sy, qx), augmented.adapt_and_predict(sx, sy, qx))
    assert "flips" in augmented.adaptation_text()
    for wrong in ({"finetune_scope": "last_block"}, {"query_entropy_weight": 1.0}):
        with pytest.raises(ValueError, match="logistic regression fits a probe"):
            LogisticRegressionProbe(Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8), **wrong)


@pytest.mark.parametrize("setting", [{"finetune_steps": 1}, {"finetune_lr": 1e3}, {"finetune_optimizer": "adam"}])
def test_gradient_descent_settings_are_refused_not_ignored(setting: dict[str, object]) -> None:
    """The probe is fitted to convergence: a step count, rate or optimiser given to it would silently change nothing."""
    with pytest.raises(ValueError, match=f"so {next(iter(setting))} would have no effect"):
        LogisticRegressionProbe(ScaledFlat(), pretrain_classes=4, **setting)
    assert next(iter(setting)) not in LogisticRegressionProbe.settings()  # nor offered by the CLI's learner settings


@pytest.mark.parametrize("learner", ["finetune", "logreg"])
def test_the_export_fixes_batch_norm_on_the_images_the_head_was_fitted_on(learner: str) -> None:
    """With ``support_augment`` the head is fitted on the support set and its flips: the exported network's batch
    norm (transductive mode: fixed to the statistics of those images) must see the same features."""
    from medmeta.algorithms import FineTune
    from medmeta.flips import flipped

    torch.manual_seed(0)
    model = Conv4(in_channels=1, n_way=3, hidden_channels=4, image_size=8, norm="batch")
    cls = LogisticRegressionProbe if learner == "logreg" else FineTune
    algo = cls(model, pretrain_classes=4, support_augment=True, **({} if learner == "logreg" else {"finetune_steps": 3}))
    g = torch.Generator().manual_seed(4)
    sx, sy = torch.rand(6, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(2)
    fitted_on = flipped(sx, sy)[0]
    network = algo.adapted_network(sx, sy).eval()
    with torch.no_grad():
        torch.testing.assert_close(network.embed(fitted_on), algo._embed(fitted_on, {}), rtol=1e-5, atol=1e-5)
