"""Pseudo-label rules: which class each forget sample is trained toward.

UNSC's decision-space calibration (Chen et al., IJCAI 2024, Sec. 4.2) relabels every forget
sample with the class the *original* model ranks highest among the classes that remain; when the
sample's own class remains (sample-level or sub-class forgetting), with the best class other than
its own label.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

PseudoLabelRule = Literal["unsc", "random"]


def _allowed(num_classes: int, forget_classes: list[int], labels: Tensor) -> Tensor:
    allowed = torch.ones(labels.numel(), num_classes, dtype=torch.bool, device=labels.device)
    if forget_classes:
        allowed[:, forget_classes] = False
    rows = torch.arange(labels.numel(), device=labels.device)
    allowed[rows, labels] = False  # never the sample's own label (a no-op when it is forgotten)
    return allowed


def unsc_pseudo_labels(
    original_logits: Tensor, labels: Tensor, forget_classes: list[int]
) -> Tensor:
    """Argmax of the original model's logits over remaining classes other than the own label.

    Args:
        original_logits: ``(N, C)`` logits of the frozen original model.
        labels: ``(N,)`` true labels of the forget samples.
        forget_classes: forgotten class ids (empty for sample-level forgetting).

    Returns:
        ``(N,)`` long tensor of pseudo-labels.
    """
    allowed = _allowed(original_logits.shape[1], forget_classes, labels)
    masked = original_logits.detach().masked_fill(~allowed, float("-inf"))
    return masked.argmax(dim=1)


def random_pseudo_labels(
    num_classes: int,
    labels: Tensor,
    forget_classes: list[int],
    generator: torch.Generator | None = None,
) -> Tensor:
    """A uniformly random remaining class other than the own label (the paper's ablation)."""
    allowed = _allowed(num_classes, forget_classes, labels).float()
    return torch.multinomial(allowed.cpu(), 1, generator=generator).flatten().to(labels.device)
