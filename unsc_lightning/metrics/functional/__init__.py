"""Pure functions behind the metric classes; usable without ``torchmetrics.Metric`` state."""

from unsc_lightning.metrics.functional.accuracy import class_subset_accuracy
from unsc_lightning.metrics.functional.mia import (
    forget_vs_test_auroc,
    logit_scaled_confidence,
    mia_efficacy,
    mia_features,
)
from unsc_lightning.metrics.functional.recovery import (
    class_mean_accuracy,
    select_per_class,
    steps_to_reach,
)

__all__ = [
    "class_mean_accuracy",
    "class_subset_accuracy",
    "forget_vs_test_auroc",
    "logit_scaled_confidence",
    "mia_efficacy",
    "mia_features",
    "select_per_class",
    "steps_to_reach",
]
