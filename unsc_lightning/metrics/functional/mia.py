"""Functional core of the membership-inference (MIA) metrics.

Per-sample attack features (:func:`mia_features`), the MIA-efficacy of SalUn / "model sparsity"
unlearning / UNSC (:func:`mia_efficacy`) and the forget-vs-test AUROC
(:func:`forget_vs_test_auroc`). Everything here is a function of the *multiset* of per-sample
features of each split, so results do not depend on batch order or on how data was sharded across
processes.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError

MIAFeature = Literal["confidence", "entropy", "modified_entropy", "loss"]
MIAAttacker = Literal["svc", "threshold"]
MIA_FEATURES: tuple[str, ...] = ("confidence", "entropy", "modified_entropy", "loss")
MIA_ATTACKERS: tuple[str, ...] = ("svc", "threshold")
#: Split names in the order of their integer codes: 0 = retain, 1 = test, 2 = forget.
MIA_SPLITS: tuple[str, ...] = ("retain", "test", "forget")

# Features where a *higher* value means "looks like a training member"; for the others
# (entropy, modified entropy, loss) members have lower values.
_HIGHER_MEANS_MEMBER = frozenset({"confidence"})


def _mia_arg_validation(attacker: str, feature: str, seed: int) -> None:
    if attacker not in MIA_ATTACKERS:
        raise UnlearningConfigError(
            f"Expected `attacker` to be one of {MIA_ATTACKERS}, got {attacker!r}."
        )
    _feature_validation(feature)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UnlearningConfigError(f"Expected `seed` to be a non-negative integer, got {seed!r}.")


def _feature_validation(feature: str) -> None:
    if feature not in MIA_FEATURES:
        raise UnlearningConfigError(
            f"Expected `feature` to be one of {MIA_FEATURES}, got {feature!r}."
        )


def _parse_split(split: str | int | Tensor, allowed: tuple[str, ...]) -> str:
    """Map a split name or integer code (0 retain, 1 test, 2 forget) to its name."""
    if isinstance(split, Tensor) and split.numel() == 1 and not split.is_floating_point():
        split = int(split)  # a code collated by a DataLoader
    name = split
    if isinstance(split, int) and not isinstance(split, bool) and 0 <= split < len(MIA_SPLITS):
        name = MIA_SPLITS[split]
    if name not in allowed:
        codes = ", ".join(f"{MIA_SPLITS.index(s)} = {s!r}" for s in allowed)
        raise ValueError(
            f"Expected `split` to be one of {allowed} (or codes {codes}), got {split!r}."
        )
    return str(name)


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps confidences of over-confident models distinct from 1.0; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_logits_targets(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape (N, C), got {tuple(logits.shape)}.")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"Expected `targets` of shape ({logits.shape[0]},) to match `logits`,"
            f" got {tuple(targets.shape)}."
        )


def _log_one_minus_softmax(logits: Tensor, log_probs: Tensor) -> Tensor:
    """``log(1 - p_i)`` for every class, accurate even when ``p_i`` rounds to 1.

    Only the top class can have ``p_i > 1/2``; for it ``log(1 - p_i)`` is the log-sum-exp of the
    other logits minus the log-partition, computed exactly. For the others ``log1p(-p_i)`` is
    accurate. The result is clamped to ``log(tiny)`` so that ``p_i * log(1 - p_i)`` stays finite.
    """
    log_one_minus = torch.log1p(-log_probs.exp())
    top = logits.argmax(dim=1, keepdim=True)
    others = logits.scatter(1, top, float("-inf"))
    log_rest_of_top = torch.logsumexp(others, dim=1, keepdim=True) - torch.logsumexp(
        logits, dim=1, keepdim=True
    )
    log_one_minus = log_one_minus.scatter(1, top, log_rest_of_top)
    return log_one_minus.clamp(min=math.log(torch.finfo(logits.dtype).tiny))


def mia_features(logits: Tensor, targets: Tensor, feature: MIAFeature = "confidence") -> Tensor:
    """Per-sample membership-inference feature computed from logits.

    Args:
        logits: unnormalised scores of shape ``(N, C)``.
        targets: true class indices of shape ``(N,)``.
        feature: which feature to compute, with ``p = softmax(logits)`` and ``y`` the true class:

            - ``"confidence"``: ``p_y``.
            - ``"entropy"``: Shannon entropy ``-sum_i p_i log p_i`` (nats).
            - ``"modified_entropy"``: ``-(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``
              (Song & Mittal, "Systematic evaluation of privacy risks of machine learning models",
              USENIX Security 2021); ``log(1 - p_i)`` is evaluated exactly from the logits and
              clamped to ``log(tiny)``, so confidently wrong predictions stay finite.
            - ``"loss"``: cross-entropy ``-log p_y``.

    Returns:
        Tensor of shape ``(N,)`` in float64 (float32 on MPS).

    Raises:
        UnlearningConfigError: if ``feature`` is unknown.
        ValueError: if the shapes of ``logits`` and ``targets`` do not match.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> mia_features(logits, torch.tensor([0, 1]), "confidence").float()
        tensor([0.8808, 0.5000])
    """
    _feature_validation(feature)
    _check_logits_targets(logits, targets)
    logits = logits.to(_work_dtype(logits.device))
    log_probs = F.log_softmax(logits, dim=1)
    index = targets.long().unsqueeze(1)
    log_p_true = log_probs.gather(1, index).squeeze(1)
    if feature == "confidence":
        return log_p_true.exp()
    if feature == "loss":
        return -log_p_true
    probs = log_probs.exp()
    if feature == "entropy":
        plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
        return -plogp.sum(dim=1)
    # modified entropy (Song & Mittal 2021, Eq. for Mentr): the true class weighs its *miss*
    # probability by log p_y, every other class its probability by log(1 - p_i).
    log_one_minus = _log_one_minus_softmax(logits, log_probs)
    is_true = torch.zeros_like(probs, dtype=torch.bool).scatter(1, index, True)
    true_term = -torch.expm1(log_p_true) * -log_p_true
    other_terms = torch.where(is_true, torch.zeros_like(probs), probs * -log_one_minus)
    return true_term + other_terms.sum(dim=1)


def logit_scaled_confidence(logits: Tensor, targets: Tensor) -> Tensor:
    """Logit of the true-class confidence, ``log(p_y / (1 - p_y))``, computed exactly.

    Equals ``z_y - logsumexp_{i != y} z_i``; this is the per-example statistic commonly fed to
    :func:`~unsc_lightning.metrics.forgetting_quality`.

    Args:
        logits: unnormalised scores of shape ``(N, C)``.
        targets: true class indices of shape ``(N,)``.

    Returns:
        Tensor of shape ``(N,)`` in float64 (float32 on MPS).

    Example:
        >>> import torch
        >>> logit_scaled_confidence(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).float()
        tensor([2.])
    """
    _check_logits_targets(logits, targets)
    logits = logits.to(_work_dtype(logits.device))
    index = targets.long().unsqueeze(1)
    others = logits.scatter(1, index, float("-inf"))
    return logits.gather(1, index).squeeze(1) - torch.logsumexp(others, dim=1)


def _balanced_subsample(members: Tensor, non_members: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Sort both groups, then subsample the larger one to the size of the smaller.

    Sorting first gives a canonical order, so the subsample depends only on the multiset of values
    (not on batch order or on the number of processes). The kept positions are
    ``sort(randperm(n_larger, generator=torch.Generator().manual_seed(seed))[:n_smaller])``.
    """
    members, non_members = members.sort().values, non_members.sort().values
    n_keep = min(members.numel(), non_members.numel())
    generator = torch.Generator().manual_seed(seed)

    def keep(values: Tensor) -> Tensor:
        if values.numel() == n_keep:
            return values
        index = torch.randperm(values.numel(), generator=generator)[:n_keep].sort().values
        return values[index.to(values.device)]

    return keep(members), keep(non_members)


def _svc_nonmember_rate(members: Tensor, non_members: Tensor, forget: Tensor, seed: int) -> float:
    """Fraction of forget samples that an RBF SVC (C=3, gamma="auto") calls non-members."""
    from sklearn.svm import SVC  # imported lazily: only the SVC attacker needs scikit-learn

    members, non_members = _balanced_subsample(members, non_members, seed)
    for name, values in (("retain", members), ("test", non_members), ("forget", forget)):
        if not bool(torch.isfinite(values).all()):
            raise RuntimeError(
                f"The SVC attacker got non-finite features in the {name} split; use"
                " `attacker='threshold'` or a bounded feature such as 'confidence'."
            )
    x = torch.cat([members, non_members]).detach().cpu().double().numpy().reshape(-1, 1)
    y = np.concatenate([np.ones(members.numel()), np.zeros(non_members.numel())])
    attacker = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    predicted_member = attacker.predict(forget.detach().cpu().double().numpy().reshape(-1, 1))
    return float(1.0 - predicted_member.mean())


def _best_threshold(member_scores: Tensor, non_member_scores: Tensor) -> Tensor:
    """Threshold ``t`` of the attack "member iff score > t" with the best balanced accuracy.

    Candidates are ``-inf``, ``+inf`` and the midpoints between consecutive *distinct* sorted
    scores, so a tie is never split. Balanced accuracy is compared in exact integer arithmetic
    (``TP * n_non + TN * n_mem``); among equally good thresholds the smallest wins, i.e. the
    attacker that calls more samples members (the lower, more conservative efficacy).
    """
    n_mem, n_non = member_scores.numel(), non_member_scores.numel()
    scores = torch.cat([member_scores, non_member_scores])
    is_member = torch.cat(
        [
            torch.ones(n_mem, dtype=torch.long, device=scores.device),
            torch.zeros(n_non, dtype=torch.long, device=scores.device),
        ]
    )
    sorted_scores, order = scores.sort()
    # cut k: the k lowest scores are called non-members, the rest members
    members_below = F.pad(is_member[order].cumsum(0), (1, 0))
    non_members_below = torch.arange(scores.numel() + 1, device=scores.device) - members_below
    balanced_hits = (n_mem - members_below) * n_non + non_members_below * n_mem
    valid = torch.ones_like(balanced_hits, dtype=torch.bool)
    valid[1:-1] = sorted_scores[1:] > sorted_scores[:-1]
    cut = int(torch.where(valid, balanced_hits, -1).argmax())  # first maximum = smallest t
    if cut == 0:
        return scores.new_tensor(float("-inf"))
    if cut == scores.numel():
        return scores.new_tensor(float("inf"))
    below, above = sorted_scores[cut - 1], sorted_scores[cut]
    midpoint = below + (above - below) / 2
    # adjacent floats: the midpoint may round up to `above`, which would call it a non-member
    return torch.where(midpoint < above, midpoint, below)


def _threshold_nonmember_rate(
    members: Tensor, non_members: Tensor, forget: Tensor, feature: str
) -> float:
    """Fraction of forget samples called non-members by the best single-threshold attack."""
    sign = 1.0 if feature in _HIGHER_MEANS_MEMBER else -1.0
    threshold = _best_threshold(sign * members, sign * non_members)
    return float((sign * forget <= threshold).double().mean())


def _mia_efficacy_compute(
    retain: Tensor,
    test: Tensor,
    forget: Tensor,
    attacker: MIAAttacker = "svc",
    feature: MIAFeature = "confidence",
    seed: int = 0,
) -> Tensor:
    """MIA-efficacy from per-sample features of the three splits (see :func:`mia_efficacy`)."""
    for name, values in (("retain", retain), ("test", test), ("forget", forget)):
        if values.numel() == 0:
            raise RuntimeError(
                f"MIA-efficacy needs samples from every split, but the {name} split is empty;"
                f" call `update(logits, targets, split='{name}')` with {name} data before compute."
            )
        if bool(torch.isnan(values).any()):
            raise RuntimeError(f"The {name} split has NaN features; check the model's logits.")
    if attacker == "svc":
        rate = _svc_nonmember_rate(retain, test, forget, seed)
    else:
        rate = _threshold_nonmember_rate(retain, test, forget, feature)
    return torch.tensor(rate, dtype=torch.get_default_dtype(), device=forget.device)


def mia_efficacy(
    retain_features: Tensor,
    test_features: Tensor,
    forget_features: Tensor,
    attacker: MIAAttacker = "svc",
    feature: MIAFeature = "confidence",
    seed: int = 0,
) -> Tensor:
    """MIA-efficacy: fraction of forget samples a membership attacker calls non-members.

    The attacker is trained on remaining *training* samples (members) versus held-out test samples
    (non-members), then applied to the forget samples. Higher means more forgetting; compare with
    the retrained model's value (about 1.0 for class-wise forgetting).

    Args:
        retain_features: features (from :func:`mia_features`) of remaining training samples.
        test_features: features of held-out test samples; for class-wise forgetting remove the
            forgotten classes first.
        forget_features: features of the samples to forget.
        attacker: ``"svc"`` (RBF ``sklearn.svm.SVC(C=3, gamma="auto")`` on the 1-D feature, members
            balanced 1:1 with non-members by a seeded subsample of the larger group, as in SalUn
            and UNSC) or ``"threshold"`` (best single threshold by balanced accuracy on all samples,
            pure torch, ties never split). The two give different numbers: report which one.
        feature: the feature the inputs hold; tells the threshold attacker whether members have
            higher (``confidence``) or lower (the others) values.
        seed: seed of the balancing subsample (SVC only).

    Returns:
        A 0-dim tensor in ``[0, 1]``.

    Raises:
        UnlearningConfigError: if ``attacker``, ``feature`` or ``seed`` is invalid.
        RuntimeError: if a split is empty or holds NaN features.

    Example:
        >>> import torch
        >>> retain = torch.tensor([0.99, 0.98, 0.97, 0.96])
        >>> test = torch.tensor([0.60, 0.55, 0.70, 0.50])
        >>> forget = torch.tensor([0.52, 0.99])
        >>> mia_efficacy(retain, test, forget, attacker="threshold")
        tensor(0.5000)
    """
    _mia_arg_validation(attacker, feature, seed)
    return _mia_efficacy_compute(
        retain_features.flatten(),
        test_features.flatten(),
        forget_features.flatten(),
        attacker,
        feature,
        seed,
    )


def _binary_auroc(positive_scores: Tensor, negative_scores: Tensor) -> Tensor:
    """Exact AUROC via the Mann-Whitney U statistic with mid-ranks (ties count one half).

    Equals ``sklearn.metrics.roc_auc_score`` including ties, and depends only on the two multisets.
    """
    n_pos, n_neg = positive_scores.numel(), negative_scores.numel()
    scores = torch.cat([positive_scores, negative_scores]).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    mid_rank = last_rank - (counts.double() - 1) / 2
    rank_sum = mid_rank[inverse[:n_pos]].sum()
    u_statistic = rank_sum - n_pos * (n_pos + 1) / 2
    return (u_statistic / (n_pos * n_neg)).to(torch.get_default_dtype())


def _forget_vs_test_auroc_compute(forget_scores: Tensor, test_scores: Tensor) -> Tensor:
    for name, values in (("forget", forget_scores), ("test", test_scores)):
        if values.numel() == 0:
            raise RuntimeError(
                f"Forget-vs-test AUROC needs both splits, but the {name} split is empty;"
                f" call `update(logits, targets, split='{name}')` before compute."
            )
    return _binary_auroc(forget_scores, test_scores)


def forget_vs_test_auroc(
    forget_logits: Tensor, forget_targets: Tensor, test_logits: Tensor, test_targets: Tensor
) -> Tensor:
    """AUROC of the attack score ``-cross_entropy`` separating forget (positive) from test samples.

    0.5 means forget samples are indistinguishable from unseen test samples by their loss; above
    0.5 they still look like training data. Compare with the retrained model's value.

    Args:
        forget_logits: logits ``(N_f, C)`` on the forget samples.
        forget_targets: their labels ``(N_f,)``.
        test_logits: logits ``(N_t, C)`` on held-out test samples.
        test_targets: their labels ``(N_t,)``.

    Returns:
        A 0-dim tensor in ``[0, 1]``.

    Raises:
        RuntimeError: if either split is empty.

    Example:
        >>> import torch
        >>> forget = torch.tensor([[4.0, 0.0], [3.0, 0.0]])
        >>> test = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
        >>> forget_vs_test_auroc(forget, torch.tensor([0, 0]), test, torch.tensor([0, 0]))
        tensor(0.8750)
    """
    forget_scores = -mia_features(forget_logits, forget_targets, "loss")
    test_scores = -mia_features(test_logits, test_targets, "loss")
    return _forget_vs_test_auroc_compute(forget_scores, test_scores)
