"""Metrics for unlearning: class-subset accuracy, membership inference, forgetting quality,
recovery (relearning time, linear probe), U-LiRA.

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
    select_per_class,
    steps_to_reach,
)
from unsc_lightning.metrics.mia import ForgetVsTestAUROC, MIAEfficacy
from unsc_lightning.metrics.recovery import (
    ProbeResult,
    RelearningResult,
    extract_features,
    find_feature_layer,
    linear_probe_accuracy,
    relearning_time,
)
from unsc_lightning.metrics.ulira import ULiRAResult, ulira

__all__ = [
    "ClassSubsetAccuracy",
    "ForgetVsTestAUROC",
    "MIAEfficacy",
    "NullSpaceDrift",
    "ProbeResult",
    "RelearningResult",
    "ULiRAResult",
    "class_subset_accuracy",
    "extract_features",
    "find_feature_layer",
    "forget_vs_test_auroc",
    "forgetting_quality",
    "linear_probe_accuracy",
    "logit_scaled_confidence",
    "mia_efficacy",
    "mia_features",
    "per_example_epsilon",
    "relearning_time",
    "select_per_class",
    "steps_to_reach",
    "ulira",
]
