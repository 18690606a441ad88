"""Functional core of :class:`~unsc_lightning.metrics.ClassSubsetAccuracy`.

Accuracy on a subset of classes (the remaining classes, or the forgotten ones) is reduced from two
per-class counters, ``correct`` and ``total``. Both are sums over samples, so they merge exactly
across batches and across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError

AccuracyAverage = Literal["macro", "micro"]
_AVERAGES = ("macro", "micro")


def _class_subset_accuracy_arg_validation(
    num_classes: int, classes: Sequence[int] | None, average: str
) -> None:
    """Raise :class:`UnlearningConfigError` for an invalid ``num_classes``, ``classes`` or ``average``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UnlearningConfigError(
            f"Expected `num_classes` to be a positive integer, got {num_classes!r}."
        )
    if average not in _AVERAGES:
        raise UnlearningConfigError(
            f"Expected `average` to be one of {_AVERAGES}, got {average!r}."
        )
    if classes is None:
        return
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise UnlearningConfigError(
            f"Expected `classes` to be a list of class indices or None (all classes), got {classes!r}."
        )
    if len(classes) == 0:
        raise UnlearningConfigError(
            "Expected `classes` to name at least one class, got an empty list;"
            " pass None to average over all classes."
        )
    bad: list[object] = [c for c in classes if isinstance(c, bool) or not isinstance(c, int)]
    bad += [c for c in classes if isinstance(c, int) and not 0 <= c < num_classes]
    if bad:
        raise UnlearningConfigError(
            f"Expected every entry of `classes` to be an integer in [0, {num_classes}),"
            f" got {list(classes)!r} (invalid: {bad!r})."
        )
    if len(set(classes)) != len(classes):
        raise UnlearningConfigError(
            f"Expected `classes` without duplicates, got {list(classes)!r}."
        )


def _class_subset_accuracy_update(
    preds: Tensor, target: Tensor, num_classes: int, validate_args: bool = True
) -> tuple[Tensor, Tensor]:
    """Count correct predictions and samples per target class.

    Args:
        preds: logits or probabilities of shape ``(N, C)``, or predicted class indices of shape
            ``(N,)``.
        target: true class indices of shape ``(N,)``.
        num_classes: number of classes ``C``.
        validate_args: check that target indices lie in ``[0, C)`` (costs one device sync).

    Returns:
        ``(correct, total)``, two int64 tensors of shape ``(C,)``.

    Raises:
        ValueError: if the shapes of ``preds`` and ``target`` do not match.
        RuntimeError: if ``validate_args`` and a target index lies outside ``[0, C)``.
    """
    if preds.ndim == 2:
        if preds.shape[1] != num_classes:
            raise ValueError(
                f"Expected `preds` of shape (N, {num_classes}) or (N,), got {tuple(preds.shape)}."
            )
        preds = preds.argmax(dim=1)
    elif preds.ndim != 1:
        raise ValueError(
            f"Expected `preds` of shape (N, {num_classes}) or (N,), got {tuple(preds.shape)}."
        )
    if target.ndim != 1 or target.shape[0] != preds.shape[0]:
        raise ValueError(
            f"Expected `target` of shape ({preds.shape[0]},) to match `preds`,"
            f" got {tuple(target.shape)}."
        )
    target = target.long()
    if validate_args and target.numel() > 0:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise RuntimeError(
                f"Expected target class indices in [0, {num_classes}), found values in"
                f" [{low}, {high}]; check `num_classes` and the dataset labels."
            )
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[preds.long() == target], minlength=num_classes)
    return correct, total


def _per_class_accuracy_compute(correct: Tensor, total: Tensor) -> Tensor:
    """Accuracy of each class as a fraction; NaN for classes without samples."""
    dtype = torch.get_default_dtype()
    accuracy = correct.to(dtype) / total.clamp(min=1).to(dtype)
    return torch.where(total > 0, accuracy, torch.full_like(accuracy, float("nan")))


def _class_subset_accuracy_compute(
    correct: Tensor,
    total: Tensor,
    classes: Sequence[int] | None = None,
    average: AccuracyAverage = "macro",
) -> Tensor:
    """Reduce per-class counters to the accuracy over ``classes``.

    ``macro`` averages per-class accuracies over the selected classes that have at least one sample
    (a class without samples is left out, not counted as zero); ``micro`` divides correct by total
    samples over the selected classes. Returns a 0-dim NaN tensor when no selected class has samples.
    """
    if classes is not None:
        index = torch.as_tensor(list(classes), dtype=torch.long, device=correct.device)
        correct, total = correct[index], total[index]
    dtype = torch.get_default_dtype()
    if average == "micro":
        n_samples = total.sum()
        if n_samples == 0:
            return torch.tensor(float("nan"), dtype=dtype, device=correct.device)
        return correct.sum().to(dtype) / n_samples.to(dtype)
    present = total > 0
    if not bool(present.any()):
        return torch.tensor(float("nan"), dtype=dtype, device=correct.device)
    return (correct[present].to(dtype) / total[present].to(dtype)).mean()


def class_subset_accuracy(
    preds: Tensor,
    target: Tensor,
    num_classes: int,
    classes: Sequence[int] | None = None,
    average: AccuracyAverage = "macro",
) -> Tensor:
    """Accuracy over a subset of classes, as a fraction in ``[0, 1]``.

    Args:
        preds: logits of shape ``(N, C)`` or predicted class indices of shape ``(N,)``.
        target: true class indices of shape ``(N,)``.
        num_classes: number of classes ``C``.
        classes: class indices to average over; ``None`` means all classes.
        average: ``"macro"`` (mean of per-class accuracies over selected classes that have samples,
            as the UNSC paper reports ``Acc_r`` / ``Acc_f``) or ``"micro"`` (correct / total over
            samples whose target is a selected class).

    Returns:
        A 0-dim tensor; NaN when no sample belongs to a selected class.

    Raises:
        UnlearningConfigError: if ``num_classes``, ``classes`` or ``average`` is invalid.

    Example:
        >>> import torch
        >>> preds = torch.tensor([0, 1, 1, 2])
        >>> target = torch.tensor([0, 1, 2, 2])
        >>> class_subset_accuracy(preds, target, num_classes=3, classes=[1, 2])
        tensor(0.7500)
    """
    _class_subset_accuracy_arg_validation(num_classes, classes, average)
    correct, total = _class_subset_accuracy_update(preds, target, num_classes)
    return _class_subset_accuracy_compute(correct, total, classes, average)
