"""Evaluation metrics against values worked out by hand on two tiny 2-way episodes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medmeta.evaluation.metrics import (
    bootstrap_ci95,
    confusion_over_classes,
    mean_and_ci95,
    per_class_sensitivity_specificity,
    per_episode_metrics,
    pooled_ece,
    reliability_bins,
    summarise,
)

# Two 2-way episodes, 4 queries each; the table lists p(local class 0). Confidences avoid the 1/15 bin edges.
#   episode 0, classes (benign, malignant)      episode 1, classes (malignant, cyst)
#   p0    label pred conf  correct              p0    label pred conf  correct
#   0.90  0     0    0.90  yes                  0.70  0     0    0.70  yes
#   0.75  0     0    0.75  yes                  0.45  0     1    0.55  no
#   0.30  1     1    0.70  yes                  0.85  0     0    0.85  yes
#   0.65  1     0    0.65  no                   0.55  1     0    0.55  no
P0 = torch.tensor([[0.90, 0.75, 0.30, 0.65], [0.70, 0.45, 0.85, 0.55]])
PROBS = torch.stack([P0, 1 - P0], dim=-1)
LABELS = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
CLASSES = [("benign", "malignant"), ("malignant", "cyst")]


def test_mean_and_ci95_by_hand() -> None:
    mean, ci = mean_and_ci95(torch.tensor([0.75, 0.5]))
    # sd (n-1) = sqrt(2 * 0.125^2 / 1) = 0.125 * sqrt(2); ci = 1.96 * sd / sqrt(2) = 1.96 * 0.125
    assert mean == pytest.approx(0.625)
    assert ci == pytest.approx(0.245)
    assert mean_and_ci95(torch.tensor([0.4])) == (pytest.approx(0.4), 0.0)
    assert all(math.isnan(v) for v in mean_and_ci95(torch.tensor([])))


def test_accuracy_and_normal_ci_by_hand() -> None:
    metrics = per_episode_metrics(PROBS, LABELS)
    assert metrics["accuracy"].tolist() == pytest.approx([3 / 4, 2 / 4])
    summary = summarise(PROBS, LABELS, CLASSES, resamples=200)
    assert summary["accuracy"] == pytest.approx(0.625)
    assert summary["accuracy_ci95"] == pytest.approx(0.245)


def test_balanced_accuracy_on_imbalanced_episode() -> None:
    balanced = per_episode_metrics(PROBS, LABELS)["balanced_accuracy"]
    # episode 0: recalls 2/2 and 1/2; episode 1 (3 vs 1 queries): recalls 2/3 and 0/1, while accuracy is 1/2
    assert balanced.tolist() == pytest.approx([(1 + 1 / 2) / 2, (2 / 3 + 0) / 2])


def test_balanced_accuracy_ignores_class_without_queries() -> None:
    # 3-way episode, class 2 has no queries but is predicted once: recalls 1/2 and 2/2 -> 0.75
    # (torchmetrics' macro recall would count class 2 as recall 0 and give 0.5)
    probs = torch.tensor([[[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]]])
    labels = torch.tensor([[0, 0, 1, 1]])
    assert per_episode_metrics(probs, labels)["balanced_accuracy"].tolist() == pytest.approx([0.75])


def test_macro_auroc_by_hand() -> None:
    auroc = per_episode_metrics(PROBS, LABELS)["macro_auroc"]
    # episode 0: positives {.90,.75} all above negatives {.30,.65} -> 1.0 (though one query is misclassified);
    # episode 1: positives {.70,.45,.85} vs negative {.55}: 2 of 3 pairs ordered -> 2/3 (2-way: both classes equal)
    assert auroc.tolist() == pytest.approx([1.0, 2 / 3])
    # one swapped pair out of 4: positives {.9,.4}, negatives {.5,.2}
    p0 = torch.tensor([[0.9, 0.4, 0.5, 0.2]])
    swapped = per_episode_metrics(torch.stack([p0, 1 - p0], -1), torch.tensor([[0, 0, 1, 1]]))["macro_auroc"]
    assert swapped.tolist() == pytest.approx([0.75])


def test_macro_auroc_skips_undefined_classes() -> None:
    # class 2 never occurs: averaged over classes 0 and 1 only (both perfectly ranked) -> 1.0
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.5, 0.2]]])
    assert per_episode_metrics(probs, torch.tensor([[0, 0, 1, 1]]))["macro_auroc"].tolist() == pytest.approx([1.0])
    # a single class among the queries: AUROC undefined for every class -> NaN
    assert math.isnan(per_episode_metrics(probs, torch.tensor([[0, 0, 0, 0]]))["macro_auroc"][0])


def test_ece_by_hand() -> None:
    ece = per_episode_metrics(PROBS, LABELS)["ece"]
    # episode 0: four singleton bins: (|1-.90| + |1-.75| + |1-.70| + |0-.65|) / 4 = 1.30 / 4
    # episode 1: bins {.70}, {.85}, {.55 wrong, .55 wrong}: (|1-.70| + |1-.85| + 2 * |0-.55|) / 4 = 1.55 / 4
    assert ece.tolist() == pytest.approx([1.30 / 4, 1.55 / 4], abs=1e-6)


def test_pooled_ece_by_hand() -> None:
    # all 8 queries in 15 bins: {.90}, {.75}, {.70, .70 both right}, {.65 wrong}, {.55, .55 both wrong}, {.85}
    # (.10 + .25 + |2 - 1.40| + .65 + |0 - 1.10| + .15) / 8 = 2.85 / 8, not the mean of the two episodes' ECEs
    ece, ci = pooled_ece(PROBS, LABELS, resamples=500)
    assert ece == pytest.approx(2.85 / 8)
    # bootstrap over the 2 episodes: each episode twice gives that episode's own ECE (1.30/4 and 1.55/4),
    # each with probability 1/4, so those are the 2.5% and 97.5% quantiles
    assert ci == pytest.approx((1.55 / 4 - 1.30 / 4) / 2)
    bins = reliability_bins(PROBS, LABELS)  # the reliability diagram's bins have exactly this ECE
    gaps = [n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n]
    assert sum(gaps) / sum(bins["count"]) == pytest.approx(ece)
    assert pooled_ece(PROBS, LABELS, resamples=0)[0] == ece


def test_pooled_ece_of_a_calibrated_model_is_near_zero_where_the_per_episode_mean_is_not() -> None:
    """600 5-way episodes of 75 queries, each right with exactly its confidence: the pooled ECE is near 0."""
    g = torch.Generator().manual_seed(0)
    episodes, queries, n_way = 600, 75, 5
    confidence = 0.4 + 0.6 * torch.rand(episodes, queries, generator=g)
    predicted = torch.randint(n_way, (episodes, queries), generator=g)
    right = torch.rand(episodes, queries, generator=g) < confidence
    wrong_label = (predicted + torch.randint(1, n_way, (episodes, queries), generator=g)) % n_way
    labels = torch.where(right, predicted, wrong_label)
    probs = ((1 - confidence) / (n_way - 1))[..., None].expand(episodes, queries, n_way).clone()
    probs.scatter_(-1, predicted[..., None], confidence[..., None])
    ece, ci = pooled_ece(probs, labels)
    assert ece < 0.02 and 0 < ci < 0.02
    assert per_episode_metrics(probs, labels)["ece"].mean() > 0.1  # why the summary pools: 75 queries in 15 bins


def test_sensitivity_specificity_pooled_over_episodes() -> None:
    per_class = per_class_sensitivity_specificity(PROBS, LABELS, CLASSES, resamples=500)
    assert sorted(per_class) == ["benign", "cyst", "malignant"]
    malignant = per_class["malignant"]
    # episode 0 (local 1): TP 1, FN 1, TN 2, FP 0; episode 1 (local 0): TP 2, FN 1, TN 0, FP 1
    assert malignant["episodes"] == 2
    assert malignant["sensitivity"] == pytest.approx(3 / 5)
    assert malignant["specificity"] == pytest.approx(2 / 3)
    # bootstrap over the 2 episodes: resampled pooled ratios are episode0-only, mixed or episode1-only, each
    # extreme with probability 1/4, so the 2.5% and 97.5% quantiles are the two single-episode ratios
    assert malignant["sensitivity_ci95"] == pytest.approx((2 / 3 - 1 / 2) / 2)
    assert malignant["specificity_ci95"] == pytest.approx((1 - 0) / 2)
    benign, cyst = per_class["benign"], per_class["cyst"]
    assert (benign["sensitivity"], benign["specificity"], benign["episodes"]) == (1.0, pytest.approx(1 / 2), 1)
    assert (cyst["sensitivity"], cyst["specificity"], cyst["episodes"]) == (0.0, pytest.approx(2 / 3), 1)
    assert benign["sensitivity_ci95"] == 0.0 and cyst["specificity_ci95"] == 0.0  # a single episode


def test_confusion_over_classes_by_hand() -> None:
    names, counts = confusion_over_classes(PROBS, LABELS, CLASSES)
    assert names == ["benign", "cyst", "malignant"]
    # rows true, columns predicted: benign 2->benign; cyst 1->malignant; malignant 3->malignant, 1->benign, 1->cyst
    assert counts.tolist() == [[2, 0, 0], [0, 0, 1], [1, 1, 3]]


def test_bootstrap_by_hand_and_deterministic() -> None:
    # resample means of {0, 1} are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> 2.5%/97.5% quantiles 0 and 1
    assert bootstrap_ci95(torch.tensor([0.0, 1.0])) == (0.5, pytest.approx(0.5))
    values = torch.rand(30, generator=torch.Generator().manual_seed(1))
    first = bootstrap_ci95(values, resamples=300, seed=7)
    assert first == bootstrap_ci95(values, resamples=300, seed=7)
    assert 0 < first[1] < 0.5
    assert bootstrap_ci95(torch.full((10,), 0.8)) == (pytest.approx(0.8), 0.0)


def test_bootstrap_drops_nan() -> None:
    assert bootstrap_ci95(torch.tensor([0.5, float("nan"), 0.5])) == (0.5, 0.0)
    with_nan = bootstrap_ci95(torch.tensor([0.0, float("nan"), 1.0]), seed=3)
    assert with_nan == bootstrap_ci95(torch.tensor([0.0, 1.0]), seed=3)
    assert all(math.isnan(v) for v in bootstrap_ci95(torch.tensor([float("nan"), float("nan")])))


def test_summarise_is_json_ready() -> None:
    summary = summarise(PROBS, LABELS, CLASSES, resamples=400, seed=0)
    assert summary["balanced_accuracy"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert summary["balanced_accuracy_ci95"] == pytest.approx((0.75 - 1 / 3) / 2)
    assert summary["macro_auroc"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["ece"] == pytest.approx(2.85 / 8)  # over all 8 queries pooled, as test_pooled_ece_by_hand
    for key in ("accuracy", "accuracy_ci95", "balanced_accuracy", "macro_auroc_ci95", "ece", "ece_ci95"):
        assert type(summary[key]) is float
    assert summary["per_class"]["malignant"]["sensitivity"] == pytest.approx(3 / 5)
    assert "normal" in summary["ci_method"] and "bootstrap" in summary["ci_method"] and "400" in summary["ci_method"]
    assert json.loads(json.dumps(summary))["per_class"]["cyst"]["episodes"] == 1


def test_reliability_bins_by_hand() -> None:
    bins = reliability_bins(PROBS, LABELS, n_bins=5)
    assert bins["edges"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # [0.4, 0.6): .55 .55 (both wrong); [0.6, 0.8): .75 .70 .65 .70 (3 right); [0.8, 1]: .90 .85 (both right)
    assert bins["count"] == [0, 0, 2, 4, 2]
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.70, 0.875])
    assert bins["accuracy"][2:] == pytest.approx([0.0, 0.75, 1.0])
    assert all(math.isnan(bins[key][i]) for key in ("confidence", "accuracy") for i in (0, 1))
    # confidence exactly 1.0 falls in the last bin
    certain = reliability_bins(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[0]]), n_bins=5)
    assert certain["count"] == [0, 0, 0, 0, 1]
