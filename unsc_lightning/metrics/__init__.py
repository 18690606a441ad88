"""Metrics for unlearning: class-subset accuracy, membership inference, forgetting quality.

Metric classes follow torchmetrics: the computation lives in pure functions in
:mod:`unsc_lightning.metrics.functional`; the classes only declare states and call them.
"""

from unsc_lightning.metrics.accuracy import ClassSubsetAccuracy
from unsc_lightning.metrics.drift import NullSpaceDrift
from unsc_lightning.metrics.forgetting_quality import forgetting_quality, per_example_epsilon
from unsc_lightning.metrics.functional import (
    class_subset_accuracy,
    forget_vs_test_auroc,
    logit_scaled_confidence,
    mia_efficacy,
    mia_features,
)
from unsc_lightning.metrics.mia import ForgetVsTestAUROC, MIAEfficacy

__all__ = [
    "ClassSubsetAccuracy",
    "ForgetVsTestAUROC",
    "MIAEfficacy",
    "NullSpaceDrift",
    "class_subset_accuracy",
    "forget_vs_test_auroc",
    "forgetting_quality",
    "logit_scaled_confidence",
    "mia_efficacy",
    "mia_features",
    "per_example_epsilon",
]
