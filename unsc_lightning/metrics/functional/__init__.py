"""Pure functions behind the metric classes; usable without ``torchmetrics.Metric`` state."""

from unsc_lightning.metrics.functional.accuracy import class_subset_accuracy
from unsc_lightning.metrics.functional.mia import (
    forget_vs_test_auroc,
    logit_scaled_confidence,
    mia_efficacy,
    mia_features,
)

__all__ = [
    "class_subset_accuracy",
    "forget_vs_test_auroc",
    "logit_scaled_confidence",
    "mia_efficacy",
    "mia_features",
]
