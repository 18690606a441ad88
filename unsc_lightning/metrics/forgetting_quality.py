"""Per-example epsilon forgetting score of the NeurIPS 2023 Machine Unlearning challenge.

Forgetting is measured against retraining from scratch: ``N`` models unlearned by the method under
test and ``N`` models retrained without the forget set each give one scalar attack statistic per
forget example (for instance :func:`~unsc_lightning.metrics.functional.logit_scaled_confidence`).
For each example, threshold attacks try to tell the two groups of ``N`` values apart; their false
positive and false negative rates give an empirical lower estimate of the example's ``epsilon`` in
``(epsilon, delta)``-unlearning. Small ``epsilon`` scores high. Reference: Triantafillou et al.,
"Are we making progress in unlearning? Findings from the first NeurIPS unlearning competition"
(arXiv 2406.09073) and the challenge's evaluation note.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError

_EPSILON_BIN_WIDTH = 0.5
# bound the (2N + 1) x examples work arrays to a few tens of MB
_MAX_CHUNK_ELEMENTS = 1 << 22


def _as_statistics(values: Any, name: str) -> Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values)
    tensor = tensor.detach().to(device="cpu", dtype=torch.float64)
    if tensor.ndim != 2 or tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(
            f"Expected `{name}` of shape (N_models, N_examples) with both sizes >= 1,"
            f" got {tuple(tensor.shape)}."
        )
    if bool(torch.isnan(tensor).any()):
        raise RuntimeError(f"`{name}` contains NaN; check the models' outputs.")
    return tensor


def _attack_epsilons(fpr: Tensor, fnr: Tensor, delta: float) -> Tensor:
    """Epsilon lower bound of each attack; ``-inf`` marks a discarded attack.

    ``epsilon = max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))``. An attack with
    exactly one zero rate is discarded (its infinite estimate rests on an empirical zero rate); both
    rates zero means perfect separation (``inf``); a log of a non-positive numerator is ignored,
    and if both are non-positive the attack is perfectly wrong, so its reverse separates (``inf``).
    """
    eps_fnr = torch.log(1 - delta - fpr) - torch.log(fnr)
    eps_fpr = torch.log(1 - delta - fnr) - torch.log(fpr)
    epsilon = torch.fmax(eps_fnr, eps_fpr)  # fmax skips NaN from log of a negative number
    epsilon = torch.where(torch.isnan(epsilon), math.inf, epsilon)
    epsilon = torch.where((fpr == 0) & (fnr == 0), math.inf, epsilon)
    return torch.where((fpr == 0) ^ (fnr == 0), -math.inf, epsilon)


def _chunk_epsilon(unlearned: Tensor, retrained: Tensor, delta: float) -> Tensor:
    """Per-example epsilon for a chunk of examples (columns)."""
    n_unlearned, n_retrained = unlearned.shape[0], retrained.shape[0]
    pooled = torch.cat([unlearned, retrained])
    is_unlearned = torch.zeros_like(pooled, dtype=torch.long)
    is_unlearned[:n_unlearned] = 1
    sorted_values, order = pooled.sort(dim=0)
    # cut k puts the k lowest values below the threshold
    unlearned_below = F.pad(is_unlearned.gather(0, order).cumsum(0), (0, 0, 1, 0))
    cut = torch.arange(pooled.shape[0] + 1, dtype=torch.long).unsqueeze(1)
    retrained_below = (cut - unlearned_below).double()
    unlearned_below = unlearned_below.double()
    valid = torch.ones_like(unlearned_below, dtype=torch.bool)
    valid[1:-1] = sorted_values[1:] > sorted_values[:-1]  # never split tied values
    # attack "unlearned iff value > threshold" and its reverse "unlearned iff value <= threshold"
    fnr_above = unlearned_below / n_unlearned
    fpr_above = (n_retrained - retrained_below) / n_retrained
    fnr_below = (n_unlearned - unlearned_below) / n_unlearned
    fpr_below = retrained_below / n_retrained
    epsilon = torch.maximum(
        _attack_epsilons(fpr_above, fnr_above, delta),
        _attack_epsilons(fpr_below, fnr_below, delta),
    )
    epsilon = torch.where(valid, epsilon, -math.inf)
    return epsilon.amax(dim=0).clamp(min=0.0)


def per_example_epsilon(
    unlearned_outputs: Any, retrained_outputs: Any, delta: float = 1e-5
) -> Tensor:
    """Empirical epsilon of every forget example (see :func:`forgetting_quality`).

    Args:
        unlearned_outputs: array of shape ``(N_unlearned_models, N_examples)``.
        retrained_outputs: array of shape ``(N_retrained_models, N_examples)``.
        delta: the ``delta`` of ``(epsilon, delta)``-unlearning, in ``(0, 1)``.

    Returns:
        Float64 tensor of shape ``(N_examples,)`` with values in ``[0, inf]``.

    Raises:
        UnlearningConfigError: if ``delta`` is outside ``(0, 1)``.
        ValueError: if the arrays are not 2-D with the same number of examples.
        RuntimeError: if an array contains NaN.

    Example:
        >>> import torch
        >>> same = torch.tensor([[0.0], [1.0], [2.0]])
        >>> per_example_epsilon(same, same)
        tensor([0.], dtype=torch.float64)
    """
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise UnlearningConfigError(f"Expected `delta` in (0, 1), got {delta!r}.")
    unlearned = _as_statistics(unlearned_outputs, "unlearned_outputs")
    retrained = _as_statistics(retrained_outputs, "retrained_outputs")
    if unlearned.shape[1] != retrained.shape[1]:
        raise ValueError(
            "Expected `unlearned_outputs` and `retrained_outputs` to have the same number of"
            f" examples (columns), got {unlearned.shape[1]} and {retrained.shape[1]}."
        )
    n_cuts = unlearned.shape[0] + retrained.shape[0] + 1
    chunk = max(1, _MAX_CHUNK_ELEMENTS // n_cuts)
    return torch.cat(
        [
            _chunk_epsilon(
                unlearned[:, start : start + chunk], retrained[:, start : start + chunk], delta
            )
            for start in range(0, unlearned.shape[1], chunk)
        ]
    )


def _check_ratio(value: float, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a finite number >= 0 (unlearned accuracy / retrained"
            f" accuracy), got {value!r}."
        )
    return min(float(value), 1.0)


def forgetting_quality(
    unlearned_outputs: Any,
    retrained_outputs: Any,
    retain_acc_ratio: float = 1.0,
    test_acc_ratio: float = 1.0,
    delta: float = 1e-5,
) -> Tensor:
    """Forgetting score of the NeurIPS 2023 Machine Unlearning challenge, in ``[0, 1]``.

    For each forget example, every single-threshold attack on the statistic (both directions, all
    thresholds between distinct pooled values) yields a false positive rate ``FPR`` (retrained
    called unlearned) and false negative rate ``FNR``, and

    ``epsilon = max over attacks of max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR))``

    (at least 0; attacks with exactly one zero rate are discarded, both zero means ``inf``). The
    example scores ``2 ** -i`` where ``i = floor(epsilon / 0.5)`` is its bin (bin 0 -> 1, bin 1 ->
    1/2, ...; ``inf`` -> 0). The mean over examples is multiplied by the retain and test accuracy
    ratios (unlearned / retrained), each capped at 1 so that beating the retrained model's accuracy
    cannot make up for poor forgetting.

    The attacks are fitted and scored on the same ``N`` values, so small ``N`` inflates ``epsilon``
    (with ``N`` models the rates move in steps of ``1/N``). Scores are only comparable at a fixed
    number of models ``N``; the challenge used hundreds.

    Args:
        unlearned_outputs: array of shape ``(N, N_examples)``: the attack statistic (e.g. logit-
            scaled confidence) of each forget example under each of ``N`` unlearned models.
        retrained_outputs: array of shape ``(N, N_examples)`` for ``N`` models retrained from
            scratch without the forget set (the group sizes may differ).
        retain_acc_ratio: unlearned / retrained accuracy on retained data; capped at 1.
        test_acc_ratio: unlearned / retrained accuracy on test data; capped at 1.
        delta: the ``delta`` of ``(epsilon, delta)``-unlearning, in ``(0, 1)``.

    Returns:
        A 0-dim tensor in ``[0, 1]``; higher is better.

    Raises:
        UnlearningConfigError: if ``delta`` or an accuracy ratio is invalid.
        ValueError: if the arrays are not 2-D with the same number of examples.
        RuntimeError: if an array contains NaN.

    Example:
        >>> import torch
        >>> retrained = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
        >>> forgetting_quality(retrained, retrained, retain_acc_ratio=0.9)
        tensor(0.9000)
        >>> forgetting_quality(retrained + 10.0, retrained)
        tensor(0.)
    """
    retain_factor = _check_ratio(retain_acc_ratio, "retain_acc_ratio")
    test_factor = _check_ratio(test_acc_ratio, "test_acc_ratio")
    epsilon = per_example_epsilon(unlearned_outputs, retrained_outputs, delta)
    bins = torch.floor(epsilon / _EPSILON_BIN_WIDTH)
    example_scores = torch.exp2(-bins)  # inf epsilon -> 0
    score = example_scores.mean() * retain_factor * test_factor
    return score.to(torch.get_default_dtype())
