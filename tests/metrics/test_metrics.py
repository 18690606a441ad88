"""Metrics against NumPy / scikit-learn references, invariances and misconfiguration errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics import (
    ClassSubsetAccuracy,
    ForgetVsTestAUROC,
    MIAEfficacy,
    class_subset_accuracy,
    forget_vs_test_auroc,
    forgetting_quality,
    logit_scaled_confidence,
    mia_efficacy,
    mia_features,
    per_example_epsilon,
)

# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------


def np_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def np_feature(logits: np.ndarray, targets: np.ndarray, feature: str) -> np.ndarray:
    p = np_softmax(logits)
    rows = np.arange(len(targets))
    p_y = p[rows, targets]
    if feature == "confidence":
        return p_y
    if feature == "loss":
        return -np.log(p_y)
    if feature == "entropy":
        return -(p * np.log(p)).sum(axis=1)
    if feature == "modified_entropy":
        out = -(1 - p_y) * np.log(p_y)
        for i in range(p.shape[1]):
            other = targets != i
            out = out - np.where(other, p[:, i] * np.log(1 - p[:, i]), 0.0)
        return out
    raise AssertionError(feature)


def np_class_subset_accuracy(preds, target, num_classes, classes, average):
    selected = range(num_classes) if classes is None else classes
    if average == "micro":
        mask = np.isin(target, list(selected))
        return float("nan") if mask.sum() == 0 else float((preds[mask] == target[mask]).mean())
    accs = [(preds[target == c] == c).mean() for c in selected if (target == c).sum() > 0]
    return float("nan") if not accs else float(np.mean(accs))


def np_best_threshold_efficacy(member, non_member, forget):
    """Brute force: try every threshold, keep the first best balanced accuracy (member iff s > t)."""
    values = np.unique(np.concatenate([member, non_member]))
    candidates = [-np.inf, *((values[:-1] + values[1:]) / 2), np.inf]
    best_t, best_hits = None, -1
    for t in candidates:  # ascending, strict '>' keeps the smallest of equal thresholds
        hits = (member > t).sum() * len(non_member) + (non_member <= t).sum() * len(member)
        if hits > best_hits:
            best_t, best_hits = t, hits
    return float((forget <= best_t).mean())


def np_sorted_balanced(members, non_members, seed):
    """The documented balancing rule: sort, then keep sorted randperm positions of the larger."""
    members, non_members = np.sort(members), np.sort(non_members)
    n = min(len(members), len(non_members))
    generator = torch.Generator().manual_seed(seed)
    if len(members) > n:
        members = members[np.sort(torch.randperm(len(members), generator=generator)[:n].numpy())]
    if len(non_members) > n:
        idx = torch.randperm(len(non_members), generator=generator)[:n].numpy()
        non_members = non_members[np.sort(idx)]
    return members, non_members


def sklearn_svc_efficacy(members, non_members, forget):
    x = np.concatenate([members, non_members]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(1 - clf.predict(forget.reshape(-1, 1)).mean())


def np_epsilon(unlearned, retrained, delta):
    """Brute-force per-example epsilon of the challenge for one example."""
    values = np.unique(np.concatenate([unlearned, retrained]))
    thresholds = [-np.inf, *((values[:-1] + values[1:]) / 2), np.inf]
    best = 0.0
    for t in thresholds:
        for above in (True, False):
            pred_u = (lambda v, t=t: v > t) if above else (lambda v, t=t: v <= t)
            fnr = 1 - pred_u(unlearned).mean()
            fpr = pred_u(retrained).mean()
            if fpr == 0 and fnr == 0:
                return math.inf
            if fpr == 0 or fnr == 0:
                continue
            candidates = []
            if 1 - delta - fpr > 0:
                candidates.append(math.log((1 - delta - fpr) / fnr))
            if 1 - delta - fnr > 0:
                candidates.append(math.log((1 - delta - fnr) / fpr))
            best = max(best, *candidates) if candidates else math.inf
    return best


def confidence_logits(confidences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits whose true-class (class 0) softmax probability is `confidences`."""
    c = torch.as_tensor(confidences, dtype=torch.float64)
    return torch.stack([torch.log(c), torch.log1p(-c)], dim=1), torch.zeros(
        len(c), dtype=torch.long
    )


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# ClassSubsetAccuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", ["macro", "micro"])
@pytest.mark.parametrize("classes", [None, [0, 2, 4], [1, 3, 5], [4]])
def test_class_subset_accuracy_matches_numpy(generator, classes, average):
    num_classes, n = 6, 300
    target = torch.randint(0, num_classes, (n,), generator=generator)
    target[target == 4] = 3  # class 4 has no samples: must not count as zero
    logits = torch.randn(n, num_classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(
        target, num_classes
    )
    expected = np_class_subset_accuracy(
        logits.argmax(1).numpy(), target.numpy(), num_classes, classes, average
    )

    one_shot = ClassSubsetAccuracy(num_classes, classes=classes, average=average)
    one_shot.update(logits, target)
    batched = ClassSubsetAccuracy(num_classes, classes=classes, average=average)
    for start, stop in [(0, 7), (7, 150), (150, 151), (151, 300)]:
        batched.update(logits[start:stop], target[start:stop])

    for value in (one_shot.compute(), batched.compute()):
        if math.isnan(expected):
            assert torch.isnan(value)
        else:
            assert value.item() == pytest.approx(expected, abs=1e-6)
    functional = class_subset_accuracy(logits, target, num_classes, classes, average)
    torch.testing.assert_close(functional, one_shot.compute(), equal_nan=True, rtol=0, atol=0)


def test_class_subset_accuracy_absent_classes_and_per_class():
    metric = ClassSubsetAccuracy(num_classes=4, classes=[1, 2, 3])
    # class 1: 1 of 2 right, class 2: absent, class 3: 2 of 2 right; class 0 not selected
    preds = torch.tensor([1, 0, 3, 3, 2])
    target = torch.tensor([1, 1, 3, 3, 0])
    metric.update(preds, target)  # class indices, not logits
    assert metric.compute().item() == pytest.approx(0.75)  # not (0.5 + 0 + 1) / 3
    per_class = metric.per_class()
    assert per_class[0] == 0 and per_class[1] == 0.5 and per_class[3] == 1
    assert torch.isnan(per_class[2])

    micro = ClassSubsetAccuracy(num_classes=4, classes=[1, 2, 3], average="micro")
    micro.update(preds, target)
    assert micro.compute().item() == pytest.approx(3 / 4)


def test_class_subset_accuracy_nan_without_samples_and_logits_equal_labels(generator):
    metric = ClassSubsetAccuracy(num_classes=3, classes=[2])
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert torch.isnan(metric.compute())

    logits = torch.randn(50, 3, generator=generator)
    target = torch.randint(0, 3, (50,), generator=generator)
    from_logits, from_labels = ClassSubsetAccuracy(3), ClassSubsetAccuracy(3)
    from_logits.update(logits, target)
    from_labels.update(logits.argmax(1), target)
    assert torch.equal(from_logits.correct, from_labels.correct)
    assert torch.equal(from_logits.total, from_labels.total)


def test_class_subset_accuracy_rejects_bad_inputs():
    metric = ClassSubsetAccuracy(num_classes=3)
    with pytest.raises(ValueError, match=r"Expected `preds` of shape \(N, 3\)"):
        metric.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected `target` of shape"):
        metric.update(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"target class indices in \[0, 3\)"):
        metric.update(torch.randn(2, 3), torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------------------
# MIA features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature", ["confidence", "entropy", "modified_entropy", "loss"])
def test_mia_features_match_numpy(generator, feature):
    logits = 4 * torch.randn(64, 7, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 7, (64,), generator=generator)
    expected = np_feature(logits.numpy(), targets.numpy(), feature)
    actual = mia_features(logits, targets, feature)
    assert actual.dtype == torch.float64
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-10, atol=1e-12)
    # float32 logits give the same values up to float32 rounding of the logits
    np.testing.assert_allclose(
        mia_features(logits.float(), targets, feature).numpy(), expected, rtol=1e-4, atol=1e-5
    )


def test_modified_entropy_hand_computed():
    # Song & Mittal (2021): Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    p = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]], dtype=torch.float64)
    values = mia_features(p.log(), torch.tensor([0, 1]), "modified_entropy")
    by_hand_y0 = -0.3 * math.log(0.7) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    by_hand_y1 = -0.8 * math.log(0.2) - 0.7 * math.log(0.3) - 0.1 * math.log(0.9)
    assert values[0].item() == pytest.approx(by_hand_y0, rel=1e-12)
    assert values[1].item() == pytest.approx(by_hand_y1, rel=1e-12)
    # confidently wrong: p_0 rounds to 1 but log(1 - p_0) = log(2 e^-100) must stay exact
    extreme = mia_features(torch.tensor([[100.0, 0.0, 0.0]]), torch.tensor([1]), "modified_entropy")
    assert torch.isfinite(extreme).all()
    assert extreme.item() == pytest.approx(200 - math.log(2), rel=1e-9)


def test_logit_scaled_confidence_matches_numpy(generator):
    logits = 3 * torch.randn(40, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5, (40,), generator=generator)
    p_y = np_feature(logits.numpy(), targets.numpy(), "confidence")
    np.testing.assert_allclose(
        logit_scaled_confidence(logits, targets).numpy(), np.log(p_y / (1 - p_y)), rtol=1e-9
    )


# ---------------------------------------------------------------------------------------------
# MIA-efficacy
# ---------------------------------------------------------------------------------------------


def synthetic_confidences(rng: np.random.Generator, n_retain=120, n_test=80, n_forget=50):
    retain = rng.beta(8, 1, n_retain)  # members: confident
    test = rng.beta(3, 2, n_test)  # non-members: less so
    forget = rng.beta(4, 2, n_forget)
    return retain, test, forget


def test_svc_efficacy_matches_sklearn_balanced():
    rng = np.random.default_rng(0)
    retain, test, forget = synthetic_confidences(rng, 90, 90, 60)
    expected = sklearn_svc_efficacy(retain, test, forget)  # unsorted, as SalUn feeds it
    actual = mia_efficacy(*(torch.from_numpy(a) for a in (retain, test, forget)), attacker="svc")
    assert actual.item() == pytest.approx(expected, abs=1e-7)
    assert 0 < expected < 1


@pytest.mark.parametrize("seed", [0, 7])
def test_svc_efficacy_matches_sklearn_with_balancing(seed):
    rng = np.random.default_rng(1)
    retain, test, forget = synthetic_confidences(rng, 150, 70, 60)
    expected = sklearn_svc_efficacy(*np_sorted_balanced(retain, test, seed), forget)
    actual = mia_efficacy(
        *(torch.from_numpy(a) for a in (retain, test, forget)), attacker="svc", seed=seed
    )
    assert actual.item() == pytest.approx(expected, abs=1e-7)

    # the Metric class stores float32 features of the logits and gives the same as the function
    metric = MIAEfficacy(attacker="svc", seed=seed)
    for split, values in (("retain", retain), ("test", test), ("forget", forget)):
        metric.update(*confidence_logits(values), split)
    stored = [np.asarray(v, dtype=np.float32).astype(np.float64) for v in (retain, test, forget)]
    expected32 = sklearn_svc_efficacy(*np_sorted_balanced(stored[0], stored[1], seed), stored[2])
    assert metric.compute().item() == pytest.approx(expected32, abs=1e-7)


@pytest.mark.parametrize("feature", ["confidence", "loss"])
def test_threshold_efficacy_matches_brute_force_with_ties(feature):
    rng = np.random.default_rng(2)
    # few distinct values: many ties inside and across splits, forget values on the grid
    retain = np.round(rng.beta(6, 2, 200), 1)
    test = np.round(rng.beta(3, 3, 150), 1)
    forget = np.round(rng.beta(4, 3, 70), 1)
    if feature == "loss":  # members have *lower* loss: brute force on the negated loss
        retain, test, forget = -np.log(retain + 0.05), -np.log(test + 0.05), -np.log(forget + 0.05)
        expected = np_best_threshold_efficacy(-retain, -test, -forget)
    else:
        expected = np_best_threshold_efficacy(retain, test, forget)
    actual = mia_efficacy(
        *(torch.from_numpy(a) for a in (retain, test, forget)),
        attacker="threshold",
        feature=feature,
    )
    assert actual.item() == pytest.approx(expected, abs=1e-6)  # a fraction of 70 samples


def test_threshold_efficacy_tie_goes_to_smallest_threshold():
    # thresholds 0.5 and 2.5 both give balanced accuracy 3/4; the smaller calls fewer non-members
    member, non_member = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    forget = torch.tensor([1.5])
    assert mia_efficacy(member, non_member, forget, attacker="threshold").item() == 0.0


@pytest.mark.parametrize("attacker", ["svc", "threshold"])
def test_mia_efficacy_invariant_to_order_and_batching(generator, attacker):
    logits = 3 * torch.randn(240, 5, generator=generator)
    targets = torch.randint(0, 5, (240,), generator=generator)
    logits[:100] += 6 * torch.nn.functional.one_hot(targets[:100], 5)  # retain: confident
    splits = ["retain"] * 100 + ["test"] * 80 + ["forget"] * 60

    def run(order: torch.Tensor, batch: int) -> torch.Tensor:
        metric = MIAEfficacy(attacker=attacker, feature="entropy")
        for split in ("retain", "test", "forget"):
            idx = torch.tensor([i for i in order.tolist() if splits[i] == split])
            for chunk in idx.split(batch):
                metric.update(logits[chunk], targets[chunk], split)
        return metric.compute()

    reference = run(torch.arange(240), 240)
    for seed, batch in [(1, 7), (2, 33), (3, 1)]:
        perm = torch.randperm(240, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(perm, batch), reference)


def over_confident_vs_forgotten(generator):
    """Retain/test logits plus two forget sets: still memorised vs genuinely forgotten."""
    n, c = 150, 10

    def logits_with_margin(margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.randint(0, c, (n,), generator=generator)
        logits = torch.randn(n, c, generator=generator)
        return logits + margin * torch.nn.functional.one_hot(targets, c), targets

    return {
        "retain": logits_with_margin(8.0),
        "test": logits_with_margin(2.0),
        "memorised": logits_with_margin(8.0),
        "forgotten": logits_with_margin(0.5),
    }


@pytest.mark.parametrize("attacker", ["svc", "threshold"])
def test_over_confident_model_ranks_below_forgotten_one(generator, attacker):
    data = over_confident_vs_forgotten(generator)
    scores = {}
    for forget in ("memorised", "forgotten"):
        metric = MIAEfficacy(attacker=attacker)
        metric.update(*data["retain"], "retain")
        metric.update(*data["test"], split=1)
        metric.update(*data[forget], split=2)
        scores[forget] = metric.compute().item()
    assert scores["memorised"] < 0.2 < 0.8 < scores["forgotten"]

    auroc = {}
    for forget in ("memorised", "forgotten"):
        metric = ForgetVsTestAUROC()
        metric.update(*data["test"], "test")
        metric.update(*data[forget], "forget")
        auroc[forget] = metric.compute().item()
    assert auroc["memorised"] > 0.9 and auroc["forgotten"] < 0.5


def test_mia_efficacy_name_repr_and_empty_split_errors():
    svc, threshold = MIAEfficacy(), MIAEfficacy(attacker="threshold", feature="loss", seed=3)
    assert svc.name == "mia_efficacy_svc" and threshold.name == "mia_efficacy_threshold"
    assert "attacker='svc'" in repr(svc)
    assert repr(threshold) == "MIAEfficacy(attacker='threshold', feature='loss', seed=3)"

    logits, targets = confidence_logits(np.array([0.9, 0.8]))
    threshold.update(logits, targets, "retain")
    threshold.update(logits, targets, "forget")
    with pytest.raises(RuntimeError, match="the test split is empty"):
        threshold.compute()
    threshold.reset()
    threshold.update(logits, targets, "test")
    with pytest.raises(RuntimeError, match="the retain split is empty"):
        threshold.compute()
    with pytest.raises(ValueError, match=r"Expected `split` to be one of .*got 'train'"):
        threshold.update(logits, targets, "train")
    with pytest.raises(ValueError, match="got 3"):
        threshold.update(logits, targets, 3)
    auroc = ForgetVsTestAUROC()
    with pytest.raises(ValueError, match="got 'retain'"):
        auroc.update(logits, targets, "retain")
    auroc.update(logits, targets, "test")
    with pytest.raises(RuntimeError, match="the forget split is empty"):
        auroc.compute()


def test_calling_the_mia_metrics_accumulates_without_a_batch_value():
    logits, targets = confidence_logits(np.array([0.95, 0.9, 0.6, 0.55]))
    called, updated = MIAEfficacy(attacker="threshold"), MIAEfficacy(attacker="threshold")
    for metric_split in (0, torch.tensor(1), "forget"):  # forward on a single split must not fail
        assert called(logits, targets, metric_split) is None
        updated.update(logits, targets, metric_split)
    assert torch.equal(called.compute(), updated.compute())
    auroc = ForgetVsTestAUROC()
    assert auroc(logits, targets, "test") is None
    assert auroc(logits[:2], targets[:2], torch.tensor(2)) is None
    assert auroc.compute().item() == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# Forget-vs-test AUROC
# ---------------------------------------------------------------------------------------------


def test_forget_vs_test_auroc_matches_sklearn_with_ties(generator):
    # both splits draw (logits, target) rows from a pool of 12: exact ties within and across splits
    pool_logits = 2 * torch.randn(12, 3, generator=generator, dtype=torch.float64)
    pool_targets = torch.randint(0, 3, (12,), generator=generator)
    forget_rows = torch.randint(0, 12, (90,), generator=generator)
    test_rows = torch.randint(0, 12, (70,), generator=generator)
    forget_logits, forget_targets = pool_logits[forget_rows], pool_targets[forget_rows]
    test_logits, test_targets = pool_logits[test_rows], pool_targets[test_rows]
    scores = np.concatenate(
        [
            -np_feature(forget_logits.numpy(), forget_targets.numpy(), "loss"),
            -np_feature(test_logits.numpy(), test_targets.numpy(), "loss"),
        ]
    )
    labels = np.r_[np.ones(90), np.zeros(70)]
    expected = roc_auc_score(labels, scores)
    assert len(np.unique(scores)) <= 12  # the test really has ties

    functional = forget_vs_test_auroc(forget_logits, forget_targets, test_logits, test_targets)
    assert functional.item() == pytest.approx(expected, abs=1e-7)
    metric = ForgetVsTestAUROC()
    for start in range(0, 90, 25):
        metric.update(forget_logits[start : start + 25], forget_targets[start : start + 25], 2)
    metric.update(test_logits, test_targets, "test")
    assert metric.compute().item() == pytest.approx(expected, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# Forgetting quality (NeurIPS 2023 unlearning challenge)
# ---------------------------------------------------------------------------------------------


def test_per_example_epsilon_matches_brute_force():
    rng = np.random.default_rng(3)
    unlearned = np.round(rng.normal(0.0, 1.0, (12, 25)), 1)  # ties within and across groups
    retrained = np.round(rng.normal(0.7, 1.0, (10, 25)), 1)
    unlearned[:, 0] = retrained[:, 0].mean() + 10  # perfectly separated example -> inf
    expected = [np_epsilon(unlearned[:, j], retrained[:, j], 1e-5) for j in range(25)]
    actual = per_example_epsilon(unlearned, retrained, delta=1e-5)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-12)
    assert math.isinf(actual[0])


def test_forgetting_quality_orders_and_scales():
    g = torch.Generator().manual_seed(0)
    retrained = torch.randn(32, 200, generator=g)
    same_distribution = torch.randn(32, 200, generator=g)

    assert forgetting_quality(retrained, retrained).item() == 1.0  # identical outputs: bin 0
    close = forgetting_quality(same_distribution, retrained).item()
    shifted = forgetting_quality(same_distribution + 2.0, retrained).item()
    separated = forgetting_quality(same_distribution + 50.0, retrained).item()
    assert close > 0.15 and close > 5 * shifted and separated == 0.0

    scaled = forgetting_quality(
        same_distribution, retrained, retain_acc_ratio=0.5, test_acc_ratio=0.8
    )
    assert scaled.item() == pytest.approx(0.4 * close, rel=1e-6)
    capped = forgetting_quality(
        same_distribution, retrained, retain_acc_ratio=1.3, test_acc_ratio=2
    )
    assert capped.item() == pytest.approx(close, rel=1e-6)


def test_forgetting_quality_hand_computed_bins():
    # column 0: U = {0,0,0,1}, R = {0,1,1,1}; attack "unlearned iff v <= 0.5" has FNR = FPR = 1/4,
    # epsilon = log((1 - delta - 1/4) / (1/4)) ~ log 3 = 1.10 -> bin 2 -> 1/4.
    # column 1: U = {0,0,1,1}, same R; FNR = 1/2, FPR = 1/4, epsilon = log((1/2 - delta) / (1/4))
    # ~ log 2 = 0.69 -> bin 1 -> 1/2. Mean 3/8.
    unlearned = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    retrained = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    delta = 1e-5
    epsilon = per_example_epsilon(unlearned, retrained, delta=delta)
    expected = [math.log((0.75 - delta) / 0.25), math.log((0.5 - delta) / 0.25)]
    np.testing.assert_allclose(epsilon.numpy(), expected, rtol=1e-12)
    assert forgetting_quality(unlearned, retrained, delta=delta).item() == pytest.approx(3 / 8)


# ---------------------------------------------------------------------------------------------
# Misconfiguration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: ClassSubsetAccuracy(num_classes=0),
            r"Expected `num_classes` to be a positive integer, got 0",
        ),
        (
            lambda: ClassSubsetAccuracy(3, classes=[0, 3]),
            r"`classes` to be an integer in \[0, 3\).*invalid: \[3\]",
        ),
        (
            lambda: ClassSubsetAccuracy(3, classes=[1, 1]),
            r"`classes` without duplicates, got \[1, 1\]",
        ),
        (lambda: ClassSubsetAccuracy(3, classes=[]), r"pass None to average over all classes"),
        (
            lambda: ClassSubsetAccuracy(3, classes="0"),  # type: ignore[arg-type]
            r"Expected `classes` to be a list",
        ),
        (
            lambda: ClassSubsetAccuracy(3, average="weighted"),  # type: ignore[arg-type]
            r"Expected `average` to be one of .*'weighted'",
        ),
        (
            lambda: MIAEfficacy(attacker="logreg"),  # type: ignore[arg-type]
            r"Expected `attacker` to be one of .*got 'logreg'",
        ),
        (
            lambda: MIAEfficacy(feature="margin"),  # type: ignore[arg-type]
            r"Expected `feature` to be one of .*got 'margin'",
        ),
        (lambda: MIAEfficacy(seed=-1), r"Expected `seed` to be a non-negative integer, got -1"),
        (
            lambda: mia_features(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), "gap"),  # type: ignore[arg-type]
            r"`feature`",
        ),
        (
            lambda: forgetting_quality(torch.zeros(2, 3), torch.zeros(2, 3), delta=0.0),
            r"Expected `delta` in \(0, 1\), got 0.0",
        ),
        (
            lambda: forgetting_quality(torch.zeros(2, 3), torch.zeros(2, 3), delta=1.5),
            r"Expected `delta` in \(0, 1\), got 1.5",
        ),
        (
            lambda: forgetting_quality(torch.zeros(2, 3), torch.zeros(2, 3), retain_acc_ratio=-0.1),
            r"`retain_acc_ratio` to be a finite number >= 0.*got -0.1",
        ),
        (
            lambda: forgetting_quality(
                torch.zeros(2, 3), torch.zeros(2, 3), test_acc_ratio=float("nan")
            ),
            r"`test_acc_ratio`.*got nan",
        ),
    ],
)
def test_misconfiguration_errors(build, match):
    with pytest.raises(UnlearningConfigError, match=match) as info:
        build()
    assert isinstance(info.value, ValueError)


def test_forgetting_quality_data_errors():
    with pytest.raises(ValueError, match="same number of examples"):
        forgetting_quality(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"shape \(N_models, N_examples\)"):
        forgetting_quality(torch.zeros(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="contains NaN"):
        forgetting_quality(torch.full((2, 2), float("nan")), torch.zeros(2, 2))
