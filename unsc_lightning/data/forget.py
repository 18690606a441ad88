"""Forget specifications: what to forget, as plain data usable from Python and YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError

ForgetKind = Literal["class", "random"]


@dataclass
class ForgetSpec:
    """Which training samples a deletion request covers.

    Args:
        kind: ``"class"`` forgets every sample of ``classes`` (train and test); ``"random"``
            forgets a seeded random ``fraction`` of the training set, whose classes remain.
        classes: forgotten class ids for ``kind="class"``.
        fraction: share of the (non-validation) training set forgotten for ``kind="random"``.
        seed: seed of the random selection.

    Example:
        >>> ForgetSpec(kind="class", classes=[3]).forgotten_classes
        [3]
    """

    kind: ForgetKind = "class"
    classes: list[int] = field(default_factory=list)
    fraction: float = 0.1
    seed: int = 0

    @property
    def forgotten_classes(self) -> list[int]:
        """Classes whose every sample is forgotten (empty for sample-level forgetting)."""
        return sorted(set(self.classes)) if self.kind == "class" else []

    def validate(self, num_classes: int) -> None:
        """Raise :class:`UnlearningConfigError` when the spec does not fit ``num_classes``."""
        if self.kind not in ("class", "random"):
            raise UnlearningConfigError(
                f"Expected `kind` to be one of 'class', 'random', got {self.kind!r}."
            )
        if self.kind == "class":
            validate_forget_classes(self.classes, num_classes)
        elif not 0.0 < self.fraction < 1.0:
            raise UnlearningConfigError(
                f"Expected `fraction` in (0, 1) for random-sample forgetting, got {self.fraction}."
            )

    def train_mask(self, targets: Tensor, candidates: Tensor) -> Tensor:
        """Boolean mask over ``targets`` of forgotten training samples among ``candidates``."""
        mask = torch.zeros_like(targets, dtype=torch.bool)
        if self.kind == "class":
            mask[candidates] = torch.isin(targets[candidates], torch.tensor(self.classes))
            return mask
        generator = torch.Generator().manual_seed(self.seed)
        count = max(1, round(self.fraction * candidates.numel()))
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
        mask[chosen] = True
        return mask

    def test_mask(self, targets: Tensor) -> Tensor:
        """Boolean mask of held-out samples that belong to what is forgotten (class-wise only)."""
        if self.kind == "class":
            return torch.isin(targets, torch.tensor(self.classes))
        return torch.zeros_like(targets, dtype=torch.bool)


def validate_forget_classes(classes: list[int] | None, num_classes: int) -> list[int]:
    """Check forgotten class ids: non-empty, unique, in range, and not every class.

    Raises:
        UnlearningConfigError: naming `forget_classes` and the value received.
    """
    if classes is None or len(classes) == 0:
        raise UnlearningConfigError(
            f"Expected `forget_classes` to name at least one class, got {classes!r}; "
            "pass e.g. `forget_classes=[3]` (or use `ForgetSpec(kind='random')` for sample-level forgetting)."
        )
    values = [int(k) for k in classes]
    if len(set(values)) != len(values):
        raise UnlearningConfigError(
            f"Expected `forget_classes` without duplicates, got {list(classes)}."
        )
    outside = [k for k in values if not 0 <= k < num_classes]
    if outside:
        raise UnlearningConfigError(
            f"Expected `forget_classes` in [0, {num_classes - 1}] for `num_classes={num_classes}`, "
            f"got {list(classes)} ({outside} out of range)."
        )
    if len(values) == num_classes:
        raise UnlearningConfigError(
            f"`forget_classes={list(classes)}` names every one of the {num_classes} classes; at least "
            "one class must remain for the null space and the pseudo-labels."
        )
    return sorted(values)
