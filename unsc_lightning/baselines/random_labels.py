"""Random labels (RL) and SalUn: train forget samples toward random wrong labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.arguments import number
from unsc_lightning.baselines.base import BaselineModule
from unsc_lightning.pseudo_labels import random_pseudo_labels


class RandomLabels(BaselineModule):
    """RL: cross-entropy of forget samples toward a random class other than their own.

    Labels are drawn anew for every batch, uniformly among all classes except the sample's own
    (Golatkar et al. 2020; the "random labels" baseline of Boundary Unlearning and UNSC).
    ``retain_weight > 0`` adds cross-entropy on a remaining batch per step (SalUn's variant).

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes.
        lr: learning rate.
        retain_weight: weight of the remaining-data cross-entropy (0: forget data only).
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> RandomLabels(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).hparams.retain_weight
        0.0
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 1e-4,
        retain_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        number("retain_weight", retain_weight, 0.0, low_open=False)
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)
        self.save_hyperparameters("retain_weight")
        self.retain_weight = float(retain_weight)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch[0], batch[1]
        targets = random_pseudo_labels(self.num_classes, labels, [], self.generator)
        loss = F.cross_entropy(self(inputs), targets)
        if self.retain_weight > 0:
            retain_inputs, retain_labels = self.next_retain_batch()
            loss = loss + self.retain_weight * F.cross_entropy(self(retain_inputs), retain_labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class SalUn(RandomLabels):
    """SalUn: random labels restricted to the weights most salient for the forget data.

    At the start of training the gradient of the forget loss ``CE(f(x_f), y_f)`` is accumulated
    over the forget set; the ``mask_ratio`` share of parameters with the largest ``|∇|``
    (one global threshold) are the only ones updated, with random labels on forget data plus
    cross-entropy on remaining data (Fan et al., ICLR 2024, Eq. 7).

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes.
        lr: learning rate.
        mask_ratio: share of parameters updated, in ``(0, 1]`` (the authors use 0.5).
        retain_weight: weight of the remaining-data cross-entropy.
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`; ``weight_decay``
            defaults to 0 so masked weights stay exactly fixed.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> SalUn(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).hparams.mask_ratio
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 1e-3,
        mask_ratio: float = 0.5,
        retain_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        number("mask_ratio", mask_ratio, 0.0, 1.0)
        super().__init__(
            model, num_classes, forget_classes, lr=lr, retain_weight=retain_weight, **kwargs
        )
        self.save_hyperparameters("mask_ratio")
        self.mask_ratio = float(mask_ratio)
        self.masks: dict[str, Tensor] = {}

    def on_train_start(self) -> None:
        self.masks = saliency_masks(
            self.model, self.trainer.train_dataloader, self.mask_ratio, self.device
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self.model.named_parameters():
            if param.grad is not None and name in self.masks:
                param.grad.mul_(self.masks[name])


def saliency_masks(
    model: nn.Module, forget_loader: Any, ratio: float, device: torch.device
) -> dict[str, Tensor]:
    """0/1 masks of the ``ratio`` share of trainable parameters with the largest forget-loss ``|∇|``.

    Args:
        model: the classifier (its ``.grad`` fields are cleared afterwards).
        forget_loader: batches ``(x, y, ...)`` of forget data.
        ratio: share of parameters kept, in ``(0, 1]``.
        device: device of the model.

    Returns:
        ``{parameter name: mask}`` for every trainable parameter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saliency = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    model.eval()
    for batch in forget_loader:
        model.zero_grad(set_to_none=True)
        inputs, labels = batch[0].to(device), batch[1].to(device)
        F.cross_entropy(model(inputs), labels, reduction="sum").backward()
        for name, p in params.items():
            if p.grad is not None:
                saliency[name] += p.grad.detach()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    flat = torch.cat([s.abs().flatten() for s in saliency.values()])
    keep = max(1, round(ratio * flat.numel()))
    threshold = torch.topk(flat, keep).values[-1]
    return {name: (s.abs() >= threshold).to(s.dtype) for name, s in saliency.items()}
