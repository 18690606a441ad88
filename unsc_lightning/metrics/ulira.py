"""U-LiRA: per-example likelihood-ratio membership test for unlearning (Hayes et al., SaTML 2025).

"Inexact unlearning needs more careful evaluations to avoid a false sense of privacy": for each
forget example, fit one Gaussian to its attack statistic (e.g. logit-scaled confidence) under
models that *unlearned* it and one under models *retrained* without it (the "out" population),
then call a target model "unlearned" when the likelihood ratio favours the first. An unlearning
method that is indistinguishable from retraining leaves the test at chance (50 % balanced
accuracy); the population MIAs used in most papers can report success where this test does not.

Here the models come in pairs (row ``i`` of both groups: one training seed, unlearned and
retrained) and each pair is the target once (leave-one-pair-out): both Gaussians are fitted on
the other ``N − 1`` pairs, so no model is scored by a fit that saw it and both fits rest on the
same number of models (a fit on fewer models is more overconfident; unequal fits would bias the
test towards the larger group). This needs at least 3 pairs (a variance from two values).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics.forgetting_quality import _as_statistics

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class ULiRAResult(NamedTuple):
    """What :func:`ulira` returns (float64 tensors)."""

    #: ``log N(s; μ_unlearned, σ²) − log N(s; μ_retrained, σ²)`` of every unlearned model's
    #: statistic, shape ``(N_unlearned, N_examples)``; > 0 is called "unlearned".
    unlearned_log_ratio: Tensor
    #: The same for every retrained model, shape ``(N_retrained, N_examples)``.
    retrained_log_ratio: Tensor
    #: Balanced accuracy of the test per example, ``(TPR + TNR) / 2``, shape ``(N_examples,)``.
    per_example_accuracy: Tensor
    #: Balanced accuracy over every (model, example) decision: 0.5 is chance, the ideal (with
    #: few models the leave-one-out fits are noisy and the value scatters around 0.5).
    accuracy: float


def _leave_one_out(values: Tensor, min_std: float) -> tuple[Tensor, Tensor]:
    """Mean and std (ddof 1) of each column without each row in turn: shape of ``values``."""
    n = values.shape[0]
    total, squares = values.sum(0), values.square().sum(0)
    mean = (total - values) / (n - 1)
    variance = (squares - values.square() - (n - 1) * mean.square()) / (n - 2)
    return mean, variance.clamp(min=0.0).sqrt().clamp(min=min_std)


def _log_normal(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return -0.5 * ((x - mean) / std).square() - std.log() - _LOG_SQRT_2PI


def ulira(unlearned_outputs: Any, retrained_outputs: Any, min_std: float = 1e-3) -> ULiRAResult:
    """U-LiRA's per-example likelihood-ratio test, each pair of models the target once.

    Args:
        unlearned_outputs: attack statistic per model and forget example, shape
            ``(N, N_examples)``, from models that unlearned the examples.
        retrained_outputs: shape ``(N, N_examples)``, from models retrained without them (the
            "out" population); row ``i`` pairs with row ``i`` of ``unlearned_outputs``.
        min_std: floor of each fitted standard deviation (identical values would give 0).

    Returns:
        :class:`ULiRAResult`.

    Raises:
        UnlearningConfigError: for ``min_std <= 0``.
        ValueError: for fewer than 3 pairs, or groups of different shapes.
        RuntimeError: if an array contains NaN.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> ulira(torch.randn(8, 5, generator=g) + 10, torch.randn(8, 5, generator=g)).accuracy
        1.0
    """
    if isinstance(min_std, bool) or not isinstance(min_std, (int, float)) or not min_std > 0:
        raise UnlearningConfigError(f"Expected `min_std` > 0, got {min_std!r}.")
    unlearned = _as_statistics(unlearned_outputs, "unlearned_outputs")
    retrained = _as_statistics(retrained_outputs, "retrained_outputs")
    if unlearned.shape != retrained.shape:
        raise ValueError(
            "Expected `unlearned_outputs` and `retrained_outputs` of the same shape (models are "
            f"paired by row), got {tuple(unlearned.shape)} and {tuple(retrained.shape)}."
        )
    if unlearned.shape[0] < 3:
        raise ValueError(
            "Expected at least 3 models (rows) per group for leave-one-out Gaussian fits, "
            f"got {unlearned.shape[0]}."
        )
    # row i: both Gaussians fitted without pair i, then both models of pair i tested
    mean_in, std_in = _leave_one_out(unlearned, min_std)
    mean_out, std_out = _leave_one_out(retrained, min_std)

    def log_ratio(values: Tensor) -> Tensor:
        return _log_normal(values, mean_in, std_in) - _log_normal(values, mean_out, std_out)

    unlearned_ratio, retrained_ratio = log_ratio(unlearned), log_ratio(retrained)
    true_positive = (unlearned_ratio > 0).double().mean(0)
    true_negative = (retrained_ratio <= 0).double().mean(0)
    per_example = (true_positive + true_negative) / 2
    return ULiRAResult(unlearned_ratio, retrained_ratio, per_example, float(per_example.mean()))
