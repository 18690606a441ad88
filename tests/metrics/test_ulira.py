"""U-LiRA and per-example epsilon against NumPy / SciPy references on synthetic statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from unsc_lightning import UnlearningConfigError
from unsc_lightning.metrics import forgetting_quality, per_example_epsilon, ulira


def _reference_ulira(unlearned: np.ndarray, retrained: np.ndarray, min_std: float = 1e-3):
    """Leave-one-pair-out Gaussian fits with numpy's std and scipy's normal log-density."""

    def log_ratio(x: float, inside: np.ndarray, outside: np.ndarray) -> float:
        s_in = max(np.std(inside, ddof=1), min_std)
        s_out = max(np.std(outside, ddof=1), min_std)
        return stats.norm.logpdf(x, inside.mean(), s_in) - stats.norm.logpdf(
            x, outside.mean(), s_out
        )

    ratio_u = np.zeros_like(unlearned)
    ratio_r = np.zeros_like(retrained)
    for e in range(unlearned.shape[1]):
        for m in range(unlearned.shape[0]):
            inside = np.delete(unlearned[:, e], m)
            outside = np.delete(retrained[:, e], m)
            ratio_u[m, e] = log_ratio(unlearned[m, e], inside, outside)
            ratio_r[m, e] = log_ratio(retrained[m, e], inside, outside)
    accuracy = ((ratio_u > 0).mean(0) + (ratio_r <= 0).mean(0)) / 2
    return ratio_u, ratio_r, accuracy


@pytest.mark.parametrize(("n_unlearned", "n_retrained", "shift"), [(5, 5, 0.0), (7, 7, 1.5)])
def test_ulira_matches_scipy_reference(n_unlearned: int, n_retrained: int, shift: float) -> None:
    rng = np.random.default_rng(0)
    unlearned = rng.normal(shift, 1.0, size=(n_unlearned, 6))
    retrained = rng.normal(0.0, 2.0, size=(n_retrained, 6))
    result = ulira(unlearned, retrained)
    ratio_u, ratio_r, accuracy = _reference_ulira(unlearned, retrained)
    np.testing.assert_allclose(result.unlearned_log_ratio.numpy(), ratio_u, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.retrained_log_ratio.numpy(), ratio_r, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.per_example_accuracy.numpy(), accuracy)
    assert result.accuracy == pytest.approx(float(accuracy.mean()))


def test_ulira_chance_when_groups_agree_and_perfect_when_apart() -> None:
    rng = np.random.default_rng(1)
    for n in (4, 16, 200):  # equal-size fits: no pull towards either group, even with few models
        accuracies = [
            ulira(rng.normal(size=(n, 50)), rng.normal(size=(n, 50))).accuracy for _ in range(20)
        ]
        assert abs(np.mean(accuracies) - 0.5) < 0.05, n
    apart = ulira(rng.normal(8.0, 1.0, (10, 3)), rng.normal(0.0, 1.0, (10, 3)))
    assert apart.accuracy > 0.95


def test_ulira_floors_constant_columns() -> None:
    result = ulira(np.ones((3, 2)), np.zeros((3, 2)), min_std=0.5)
    assert torch.isfinite(result.unlearned_log_ratio).all() and result.accuracy == 1.0


@pytest.mark.parametrize(
    ("unlearned", "retrained", "kwargs", "error", "match"),
    [
        (np.zeros((2, 3)), np.zeros((2, 3)), {}, ValueError, "at least 3 models.*got 2"),
        (np.zeros((3, 3)), np.zeros((3, 2)), {}, ValueError, "same shape"),
        (np.zeros((4, 3)), np.zeros((3, 3)), {}, ValueError, "paired by row"),
        (np.zeros((3, 3)), np.zeros((3, 3)), {"min_std": 0.0}, UnlearningConfigError, "`min_std`"),
    ],
)
def test_ulira_errors(unlearned, retrained, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ulira(unlearned, retrained, **kwargs)


def _reference_epsilon(unlearned: np.ndarray, retrained: np.ndarray, delta: float) -> np.ndarray:
    """Every threshold between distinct pooled values, both directions, as the challenge's note."""
    out = []
    for e in range(unlearned.shape[1]):
        u, r = unlearned[:, e], retrained[:, e]
        values = np.unique(np.concatenate([u, r]))
        thresholds = np.concatenate([[values[0] - 1], values])
        best = 0.0
        for t in thresholds:
            for fnr, fpr in (
                ((u <= t).mean(), (r > t).mean()),  # "unlearned iff value > t"
                ((u > t).mean(), (r <= t).mean()),  # the reverse
            ):
                if (fpr == 0) != (fnr == 0):
                    continue
                if fpr == 0 and fnr == 0:
                    best = math.inf
                    continue
                candidates = []
                for a, b in ((1 - delta - fpr, fnr), (1 - delta - fnr, fpr)):
                    if a > 0:
                        candidates.append(math.log(a / b))
                if not candidates:
                    best = math.inf
                    continue
                best = max(best, *candidates)
        out.append(best)
    return np.array(out)


@pytest.mark.parametrize("shift", [0.0, 0.7, 3.0])
def test_per_example_epsilon_matches_numpy_reference(shift: float) -> None:
    rng = np.random.default_rng(2)
    unlearned = rng.normal(shift, 1.0, size=(8, 10)).round(1)  # ties included
    retrained = rng.normal(0.0, 1.0, size=(8, 10)).round(1)
    got = per_example_epsilon(unlearned, retrained, delta=0.01).numpy()
    np.testing.assert_allclose(got, _reference_epsilon(unlearned, retrained, 0.01), rtol=1e-12)
    # and the challenge's score from it: bins of width 0.5, 2^-bin, mean
    score = float(forgetting_quality(unlearned, retrained, delta=0.01))
    expected = np.mean(2.0 ** -np.floor(_reference_epsilon(unlearned, retrained, 0.01) / 0.5))
    assert score == pytest.approx(expected, rel=1e-6)
