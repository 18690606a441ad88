"""Which projection fits the optimizer, and warnings where a choice is not exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

ActiveMode = Literal["gradient", "update"]


def plain_sgd(optimizer: Any) -> bool:
    """SGD (momentum allowed) without weight decay: linear in the gradients."""
    return type(optimizer) is torch.optim.SGD and all(
        g.get("weight_decay", 0) == 0 for g in optimizer.param_groups
    )


def gradient_exact(optimizer: Any) -> bool:
    """Whether projecting gradients keeps this optimizer's steps in the null space."""
    return plain_sgd(optimizer) or type(optimizer).__name__ == "LBFGS"


def choose_mode(
    mode: str, optimizers: Sequence[Any], project_every: int | None = None
) -> ActiveMode:
    """``"auto"``: gradient projection for plain SGD without weight decay, else update
    projection (and an info line saying which); always update projection with
    ``project_every`` (amortised: the weights are projected every ``K`` steps)."""
    if project_every is not None or mode == "update":
        return "update"
    if mode == "gradient":
        return "gradient"
    chosen: ActiveMode = "gradient" if all(plain_sgd(opt) for opt in optimizers) else "update"
    names = ", ".join(type(o).__name__ for o in optimizers) or "none"
    rank_zero_info(
        f"NullSpaceCalibration: mode='auto' chose {chosen!r} projection for optimizers [{names}]."
    )
    return chosen


def gradient_mode_warnings(
    optimizers: Sequence[Any], clip_value: float | None, clip_algorithm: str | None
) -> list[str]:
    """What makes ``mode="gradient"`` inexact in this fit (empty when it is exact)."""
    messages = []
    # clipping runs after the projection: a norm clip only rescales the projected gradient,
    # an element-wise clip moves it out of the null space
    if clip_value and clip_algorithm == "value":
        messages.append(
            "NullSpaceCalibration: `gradient_clip_algorithm='value'` clips projected gradients "
            "element-wise, which moves them out of the null space, so remaining outputs can change. "
            "Use `mode='update'` (projects each step's weight change after clipping) or clip by "
            "norm (`gradient_clip_algorithm='norm'`)."
        )
    unexact = [type(o).__name__ for o in optimizers if not gradient_exact(o)]
    if unexact:
        messages.append(
            f"NullSpaceCalibration: `mode='gradient'` is not exact for {unexact} (adaptive "
            "steps or weight decay move the update out of the null space), so remaining outputs "
            "can change. Use `mode='update'` or `mode='auto'`."
        )
    return messages
