"""Accuracy restricted to a subset of classes (remaining or forgotten)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from unsc_lightning.metrics.functional.accuracy import (
    AccuracyAverage,
    _class_subset_accuracy_arg_validation,
    _class_subset_accuracy_compute,
    _class_subset_accuracy_update,
    _per_class_accuracy_compute,
)


class ClassSubsetAccuracy(Metric):
    """Accuracy over a subset of classes, as a fraction in ``[0, 1]``.

    The UNSC paper reports ``Acc_r`` and ``Acc_f`` as the *macro* average of per-class test
    accuracies over the remaining and the forgotten classes; use one instance per subset.
    Classes without any sample are left out of the macro average (they do not count as zero).
    The states are per-class counters summed across processes, so DDP results are exact.

    Args:
        num_classes: number of classes ``C`` of the classifier.
        classes: class indices to average over; ``None`` means all classes.
        average: ``"macro"`` (mean of per-class accuracies) or ``"micro"`` (correct / total over
            samples whose target is a selected class).
        validate_args: check target indices lie in ``[0, C)`` on every update (one device sync).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        UnlearningConfigError: if ``num_classes``, ``classes`` or ``average`` is invalid.

    :meth:`compute` returns a 0-dim NaN tensor when no selected class has a sample yet, so an
    empty forgotten-class split shows up as NaN rather than as a misleading 0 or 1.

    Example:
        >>> import torch
        >>> metric = ClassSubsetAccuracy(num_classes=3, classes=[1, 2])
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
        >>> metric.update(logits, torch.tensor([0, 1, 2]))
        >>> metric.compute()
        tensor(0.5000)
        >>> metric.per_class()
        tensor([1., 1., 0.])
    """

    is_differentiable = False
    # used for remaining classes (higher is better) and forgotten ones (lower is better)
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    correct: Tensor
    total: Tensor

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[int] | None = None,
        average: AccuracyAverage = "macro",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _class_subset_accuracy_arg_validation(num_classes, classes, average)
        self.num_classes = num_classes
        self.classes = None if classes is None else list(classes)
        self.average = average
        self.validate_args = validate_args
        zeros = torch.zeros(num_classes, dtype=torch.long)
        self.add_state("correct", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch of logits ``(N, C)`` or predicted classes ``(N,)`` with targets ``(N,)``."""
        correct, total = _class_subset_accuracy_update(
            preds, target, self.num_classes, self.validate_args
        )
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Macro or micro accuracy over the selected classes; NaN if none has samples."""
        return _class_subset_accuracy_compute(self.correct, self.total, self.classes, self.average)

    def per_class(self) -> Tensor:
        """Accuracy of every class (all ``C``, not only the selected ones); NaN where no samples.

        Synchronises across processes like :meth:`compute`.
        """
        with self.sync_context(
            dist_sync_fn=self.dist_sync_fn,
            should_sync=self._to_sync and not self._is_synced,
            should_unsync=self._should_unsync,
        ):
            return _per_class_accuracy_compute(self.correct, self.total)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, classes={self.classes}, average={self.average!r}"
