"""Forget specifications: what to forget, as plain data usable from Python and YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from unsc_lightning.arguments import class_list, integer, validate_forget_classes
from unsc_lightning.errors import UnlearningConfigError

ForgetKind = Literal["class", "subclass", "random"]
FORGET_KINDS: tuple[str, ...] = ("class", "subclass", "random")


@dataclass
class ForgetSpec:
    """Which training samples a deletion request covers.

    Three scenarios, all plain data (LightningCLI / YAML can build them):

    - ``kind="class"``: every sample of ``classes`` (training and test); the classes disappear.
    - ``kind="subclass"``: every sample of the fine classes ``subclasses`` inside a data set whose
      model learns *coarse* labels (``DatasetBundle.fine_targets`` holds the fine ones). The
      coarse class of a forgotten sub-class remains, so :attr:`forgotten_classes` is empty and the
      UNSC pseudo-label is the best class other than the sample's own label. Held-out test samples
      of the sub-classes form the forget evaluation split.
    - ``kind="random"``: a seeded random ``fraction`` of the (non-validation) training set; the
      classes remain and the forget evaluation split is the forgotten samples themselves.

    Args:
        kind: ``"class"``, ``"subclass"`` or ``"random"``.
        classes: forgotten class ids for ``kind="class"``.
        subclasses: forgotten fine class ids for ``kind="subclass"``.
        fraction: share of the (non-validation) training set forgotten for ``kind="random"``.
        seed: seed of the random selection.

    Example:
        >>> ForgetSpec(kind="class", classes=[3]).forgotten_classes
        [3]
        >>> ForgetSpec(kind="subclass", subclasses=[3]).forgotten_classes
        []
    """

    kind: ForgetKind = "class"
    classes: list[int] = field(default_factory=list)
    fraction: float = 0.1
    seed: int = 0
    subclasses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # types at once (a string `classes="12"` is not `[1, 2]`); ranges in `validate`
        if self.kind not in FORGET_KINDS:
            raise UnlearningConfigError(
                f"Expected `kind` to be one of 'class', 'subclass', 'random', got {self.kind!r}."
            )
        self.classes = class_list("classes", self.classes)
        self.subclasses = class_list("subclasses", self.subclasses)
        integer("seed", self.seed, 0)
        if isinstance(self.fraction, (bool, str)) or not isinstance(self.fraction, (int, float)):
            raise UnlearningConfigError(
                f"Expected `fraction` in (0, 1) for random-sample forgetting, got {self.fraction!r}."
            )

    @property
    def forgotten_classes(self) -> list[int]:
        """Classes whose every sample is forgotten (empty for sub-class and sample forgetting)."""
        return sorted(set(self.classes)) if self.kind == "class" else []

    @property
    def held_out_forget(self) -> bool:
        """Whether held-out samples belong to the forgotten data (class and sub-class kinds)."""
        return self.kind in ("class", "subclass")

    def validate(self, num_classes: int, fine_targets: tuple[Tensor, Tensor] | None = None) -> None:
        """Raise :class:`UnlearningConfigError` when the spec does not fit the data.

        Args:
            num_classes: number of classes the model predicts.
            fine_targets: ``(train, test)`` fine labels of a coarse-labelled data set; required
                for ``kind="subclass"``.
        """
        if self.kind not in FORGET_KINDS:
            raise UnlearningConfigError(
                f"Expected `kind` to be one of 'class', 'subclass', 'random', got {self.kind!r}."
            )
        integer("seed", self.seed, 0)
        if self.kind == "class":
            validate_forget_classes(self.classes, num_classes)
        elif self.kind == "subclass":
            _validate_subclasses(self.subclasses, fine_targets)
        elif isinstance(self.fraction, (bool, str)) or not 0.0 < self.fraction < 1.0:
            raise UnlearningConfigError(
                f"Expected `fraction` in (0, 1) for random-sample forgetting, got {self.fraction!r}."
            )

    def selection_targets(
        self,
        train_targets: Tensor,
        test_targets: Tensor,
        fine_targets: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The labels the spec selects by: fine labels for ``"subclass"``, else the model's labels."""
        if self.kind != "subclass":
            return train_targets, test_targets
        if fine_targets is None:
            raise UnlearningConfigError(_NO_FINE_LABELS)
        return fine_targets[0].long().reshape(-1), fine_targets[1].long().reshape(-1)

    def train_mask(self, targets: Tensor, candidates: Tensor) -> Tensor:
        """Boolean mask over ``targets`` of forgotten training samples among ``candidates``.

        ``targets`` are the labels returned by :meth:`selection_targets` (fine labels for
        ``kind="subclass"``).
        """
        mask = torch.zeros_like(targets, dtype=torch.bool)
        if self.kind in ("class", "subclass"):
            mask[candidates] = torch.isin(targets[candidates], self._selected())
            return mask
        generator = torch.Generator().manual_seed(self.seed)
        count = max(1, round(self.fraction * candidates.numel()))
        chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
        mask[chosen] = True
        return mask

    def test_mask(self, targets: Tensor) -> Tensor:
        """Boolean mask of held-out samples that belong to what is forgotten (not for random)."""
        if self.kind in ("class", "subclass"):
            return torch.isin(targets, self._selected())
        return torch.zeros_like(targets, dtype=torch.bool)

    def _selected(self) -> Tensor:
        return torch.tensor(
            self.classes if self.kind == "class" else self.subclasses, dtype=torch.long
        )


_NO_FINE_LABELS = (
    "`ForgetSpec(kind='subclass')` needs a data set with coarse labels and their fine labels "
    "(`DatasetBundle.fine_targets`); the embedded MNIST-1D and digits data modules provide them "
    "(`coarse_labels=True`, the default for a sub-class spec)."
)


def _validate_subclasses(subclasses: list[int], fine_targets: tuple[Tensor, Tensor] | None) -> None:
    subclasses = class_list("subclasses", subclasses)
    if not subclasses:
        raise UnlearningConfigError(
            f"Expected `subclasses` to name at least one fine class for `kind='subclass'`, got {subclasses!r}."
        )
    values = list(subclasses)
    if len(set(values)) != len(values):
        raise UnlearningConfigError(
            f"Expected `subclasses` without duplicates, got {list(subclasses)}."
        )
    if fine_targets is None:
        raise UnlearningConfigError(_NO_FINE_LABELS)
    num_fine = int(torch.cat([t.reshape(-1) for t in fine_targets]).max()) + 1
    outside = [k for k in values if not 0 <= k < num_fine]
    if outside:
        raise UnlearningConfigError(
            f"Expected `subclasses` in [0, {num_fine - 1}], got {list(subclasses)} ({outside} out of range)."
        )
