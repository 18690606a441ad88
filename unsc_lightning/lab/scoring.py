"""Scoring: what every experiment reports for a model (accuracy, MIA-efficacy, divergence)."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from unsc_lightning.data import UnlearningDataModule
from unsc_lightning.evaluation import ForgetEvaluation
from unsc_lightning.metrics import MIAEfficacy, linear_probe_accuracy, relearning_time

#: Metrics averaged into the gap to the retrained model.
GAP_METRICS = ("acc_r", "acc_f", "mia_efficacy")


def gap_to_retrain(scores: dict[str, Any], retrain: dict[str, Any]) -> float | None:
    """Mean absolute difference to the retrained model over :data:`GAP_METRICS` (the headline)."""
    gaps = [
        abs(scores[m] - retrain[m])
        for m in GAP_METRICS
        if scores[m] is not None and retrain[m] is not None
    ]
    return statistics.fmean(gaps) if gaps else None


#: The membership attacks the bench reports: key -> (variant, direction).
MIA_VARIANTS: dict[str, tuple[str, str]] = {
    "mia_efficacy": ("SVC (RBF, C=3), true-class confidence", "closer to retrain"),
    "mia_threshold": ("best threshold, true-class confidence", "closer to retrain"),
}


def score(
    model: nn.Module,
    dm: UnlearningDataModule,
    seconds: float,
    *,
    mia_seed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """Every number the ``demo`` and the ``bench`` report for one model, in percent.

    Args:
        model: the model to score.
        dm: the data module whose test and training splits are scored.
        seconds: wall time that produced the model (recorded as is).
        mia_seed: seed of the MIA attacker's data balancing.
        **extra: more fields of the result (e.g. ``cached=True``).

    Returns:
        ``acc_r``, ``acc_f`` (see :func:`evaluate`), ``acc_r_min`` / ``acc_r_max`` (worst and
        best remaining class), ``mia_efficacy`` (SVC attacker) and ``mia_threshold``
        (best-threshold attacker; see :func:`mia_efficacy_of`; ``None`` for a model whose
        weights or logits are not finite: it has no confidence to attack), ``seconds``,
        ``per_class``, ``diverged`` and ``extra``.
    """
    accuracy = evaluate(model, dm)
    state = model.state_dict().values()
    diverged = not all(torch.isfinite(t).all() for t in state if t.is_floating_point())
    mia = mia_threshold = None
    if not diverged:
        try:
            mia = mia_efficacy_of(model, dm, attacker="svc", seed=mia_seed)
            mia_threshold = mia_efficacy_of(model, dm, attacker="threshold", seed=mia_seed)
        except RuntimeError:  # NaN confidences: the logits overflowed
            diverged = True
    forgotten = set(dm.forget_classes)
    remaining = [v for k, v in enumerate(accuracy["per_class"]) if k not in forgotten]
    present = [v for v in remaining if v is not None]
    return {
        "acc_r": accuracy["acc_r"],
        "acc_f": accuracy["acc_f"],
        # the spread behind the macro mean: the worst and best remaining class
        "acc_r_min": min(present) if present else None,
        "acc_r_max": max(present) if present else None,
        "mia_efficacy": mia,
        "mia_threshold": mia_threshold,
        "seconds": seconds,
        "per_class": accuracy["per_class"],
        "diverged": diverged,
        **extra,
    }


@torch.no_grad()
def evaluate(model: nn.Module, dm: UnlearningDataModule) -> dict[str, Any]:
    """Test-set accuracy in percent: ``acc_r`` / ``acc_f`` (macro over classes) and per class.

    Uses the same :class:`~unsc_lightning.evaluation.ForgetEvaluation` as the modules' test step, on
    the DataModule's ``retain`` and ``forget`` test loaders.
    """
    evaluation = ForgetEvaluation(dm.num_classes, dm.forget_classes)
    model.eval()
    for name, loader in zip(("retain", "forget"), dm.test_dataloader()[:2]):
        for inputs, targets in loader:
            evaluation.update(name, model(inputs), targets)
    results = evaluation.compute("test")
    nan = torch.tensor(float("nan"))
    values = evaluation.per_class.per_class()
    return {
        "acc_r": 100 * float(results.get("test/retain_acc", nan)),
        "acc_f": 100 * float(results.get("test/forget_acc", nan)),
        "per_class": [None if torch.isnan(v) else 100 * float(v) for v in values],
    }


@torch.no_grad()
def mia_efficacy_of(
    model: nn.Module, dm: UnlearningDataModule, attacker: str = "svc", seed: int = 0
) -> float:
    """MIA-efficacy in percent (REFERENCE.md protocol).

    Members are the remaining training samples, non-members the test samples of the remaining
    classes (forgotten classes removed), the attack is applied to the forgotten training samples.
    """
    metric = MIAEfficacy(attacker=attacker, seed=seed)  # type: ignore[arg-type]
    model.eval()
    loaders = {
        "retain": dm.retain_dataloader(),
        "test": dm.test_dataloader()[0],
        "forget": dm.forget_dataloader(),
    }
    for split, loader in loaders.items():
        for inputs, targets in loader:
            metric.update(model(inputs), targets, split)
    return 100 * float(metric.compute())


def _tensors(loaders: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = zip(*[(batch[0], batch[1]) for loader in loaders for batch in loader])
    return torch.cat(inputs), torch.cat(targets)


def recovery(
    model: nn.Module, dm: UnlearningDataModule, original_acc_f: float, seed: int = 0
) -> dict[str, Any]:
    """Does the forgotten class come back? Relearning steps and linear-probe accuracy.

    ``relearn_steps``: :func:`~unsc_lightning.metrics.relearning_time` (10 forgotten + 10
    remaining training samples per class, SGD lr 0.01 momentum 0.9) until the forgotten-class
    test accuracy reaches half of ``original_acc_f`` (percent); ``None``: not within 100 steps.
    ``probe_acc_f``: forgotten-class test accuracy (percent) of
    :func:`~unsc_lightning.metrics.linear_probe_accuracy` on remaining + forgotten training data.
    Class-wise forgetting only (empty dict otherwise).
    """
    if not dm.forget_classes:
        return {}
    train_x, train_y = _tensors([dm.retain_dataloader(), dm.forget_dataloader()])
    test_x, test_y = _tensors(list(dm.test_dataloader()[:2]))
    relearn = relearning_time(
        model, train_x, train_y, test_x, test_y, dm.forget_classes, original_acc_f / 100, seed=seed
    )
    probe = linear_probe_accuracy(model, train_x, train_y, test_x, test_y, dm.forget_classes)
    return {"relearn_steps": relearn.steps, "probe_acc_f": 100 * probe.forget_acc}
