"""Gradient ascent (GA): maximise the loss of the forget data."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.arguments import number
from unsc_lightning.baselines.base import BaselineModule


class GradientAscent(BaselineModule):
    """GA: minimise ``−CE(f(x_f), y_f)`` on forget data (Thudi et al. 2022; Graves et al. 2021).

    The loss is unbounded: once the forget samples are misclassified their gradients grow and
    remaining accuracy collapses within a few steps, so the learning rate and the number of
    epochs are the only brakes (a cliff, not a slope). ``loss_ceiling`` optionally stops pushing
    a sample once its cross-entropy exceeds the ceiling (per-sample loss clamped, zero gradient
    beyond it), e.g. ``log(num_classes)``: the true class is then no more likely than chance.

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes.
        lr: learning rate.
        loss_ceiling: per-sample cross-entropy above which a sample stops contributing
            (``None``: plain gradient ascent).
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> GradientAscent(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).hparams.lr
        0.005
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 5e-3,
        loss_ceiling: float | None = None,
        **kwargs: Any,
    ) -> None:
        number("loss_ceiling", loss_ceiling, 0.0, optional=True)
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)
        self.save_hyperparameters("loss_ceiling")
        self.loss_ceiling = loss_ceiling

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = F.cross_entropy(self(batch[0]), batch[1], reduction="none")
        if self.loss_ceiling is not None:
            losses = losses.clamp(max=self.loss_ceiling)
        loss = -losses.mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss
