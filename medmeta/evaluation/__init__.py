"""Evaluation of test episodes: metrics with 95% confidence intervals, and figures (PNG)."""

from medmeta.evaluation.metrics import (
    bootstrap_ci95,
    confusion_over_classes,
    mean_and_ci95,
    per_class_sensitivity_specificity,
    per_episode_metrics,
    reliability_bins,
    summarise,
)

__all__ = [
    "bootstrap_ci95",
    "confusion_over_classes",
    "mean_and_ci95",
    "per_class_sensitivity_specificity",
    "per_episode_metrics",
    "reliability_bins",
    "summarise",
]
