"""Methods that train on the remaining data only: fine-tuning (FT) and ℓ1-sparse unlearning."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.arguments import number
from unsc_lightning.baselines.base import BaselineModule


class FineTune(BaselineModule):
    """FT: keep training the original model on the remaining data (catastrophic forgetting).

    Cross-entropy on remaining data only (``train_on="retain"``); the forgotten data fade
    because nothing reinforces them (Warnecke et al. 2023; Golatkar et al. 2020).

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes (evaluation only).
        lr: learning rate.
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> FineTune(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).train_on
        'retain'
    """

    train_on = "retain"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1]) + self.regularizer()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def regularizer(self) -> Tensor | float:
        """Extra loss term; none for plain fine-tuning."""
        return 0.0


class L1Sparse(FineTune):
    """ℓ1-sparse unlearning: fine-tuning with a decaying ℓ1 penalty (Jia et al., NeurIPS 2023).

    ``loss = CE(remaining) + γ_t ‖θ‖₁`` with ``γ_t = alpha · (1 − epoch / max_epochs)`` (the
    authors' linear decay), which sparsifies the model and so removes more of what only the
    forgotten data supported.

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes (evaluation only).
        lr: learning rate.
        alpha: initial ℓ1 weight (summed over every trainable parameter).
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> L1Sparse(MNIST1DConvNet(), num_classes=10, forget_classes=[3], alpha=1e-4).hparams.alpha
        0.0001
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 0.1,
        alpha: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        number("alpha", alpha, 0.0, low_open=False)
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)
        self.save_hyperparameters("alpha")
        self.alpha = float(alpha)

    def regularizer(self) -> Tensor | float:
        max_epochs = max(1, self.trainer.max_epochs or 1)
        weight = self.alpha * (1.0 - self.current_epoch / max_epochs)
        l1 = sum(p.abs().sum() for p in self.model.parameters() if p.requires_grad)
        self.log("train/l1_weight", weight)
        return weight * l1  # type: ignore[return-value]
