"""Pure functions behind the recovery metrics (relearning time, linear-probe accuracy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError


def steps_to_reach(accuracies: Sequence[float] | Tensor, target: float) -> int | None:
    """Index of the first entry of ``accuracies`` that reaches ``target`` (``None`` if none does).

    ``accuracies[0]`` is the accuracy before any fine-tuning step, ``accuracies[s]`` after ``s``
    steps, so the result is the number of steps needed (``0``: recovered without training).

    Example:
        >>> steps_to_reach([0.0, 0.1, 0.6, 0.9], target=0.5)
        2
    """
    values = torch.as_tensor(accuracies, dtype=torch.float64).reshape(-1)
    reached = torch.nonzero(values >= target)
    return None if reached.numel() == 0 else int(reached[0])


def select_per_class(
    targets: Tensor, classes: Sequence[int], per_class: int, seed: int = 0
) -> Tensor:
    """Indices of ``per_class`` samples of each class in ``classes`` (fewer when a class has fewer),
    drawn without replacement with a seeded generator, in ascending order.

    Example:
        >>> select_per_class(torch.tensor([0, 1, 0, 1, 0]), [0], per_class=2, seed=0).tolist()
        [0, 4]
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise UnlearningConfigError(f"Expected `per_class` >= 0 (an integer), got {per_class!r}.")
    generator = torch.Generator().manual_seed(seed)
    targets = targets.reshape(-1).cpu()
    chosen = []
    for k in classes:
        members = torch.nonzero(targets == int(k)).reshape(-1)
        order = torch.randperm(members.numel(), generator=generator)
        chosen.append(members[order[:per_class]])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def class_mean_accuracy(logits: Tensor, targets: Tensor, classes: Sequence[int]) -> float:
    """Mean over ``classes`` (those with samples) of each class's accuracy (the paper's Acc_f).

    Returns ``nan`` when no sample belongs to ``classes``.
    """
    predictions = logits.argmax(dim=1)
    per_class = [
        (predictions[targets == k] == k).double().mean()
        for k in classes
        if bool((targets == k).any())
    ]
    return float(torch.stack(per_class).mean()) if per_class else float("nan")
