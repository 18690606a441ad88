"""Boundary Shrink: move forget samples to the nearest wrong class found by an FGSM step."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.arguments import number
from unsc_lightning.baselines.base import BaselineModule


class BoundaryShrink(BaselineModule):
    """Boundary Shrink (Chen et al., *Boundary Unlearning*, CVPR 2023).

    For every forget sample, one FGSM step of size ``epsilon`` against the *original* model
    (a frozen copy taken at fit start) crosses the nearest decision boundary; the class the
    original model predicts there is the sample's new label, and the model is trained toward it
    with cross-entropy on forget data. When the step does not cross a boundary, or lands in a
    forgotten class, the best other class of the perturbed logits is used (the released code
    would keep the own or another forgotten label, which forgets nothing).

    Args:
        model: trained classifier; trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes.
        lr: learning rate.
        epsilon: FGSM step in input units (the authors: 0.1 on normalised images).
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> BoundaryShrink(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).hparams.epsilon
        0.1
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 5e-5,
        epsilon: float = 0.1,
        **kwargs: Any,
    ) -> None:
        number("epsilon", epsilon, 0.0)
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)
        self.save_hyperparameters("epsilon")
        self.epsilon = float(epsilon)
        self.original = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> BoundaryShrink:
        super().train(mode)
        self.original.eval()
        return self

    def on_fit_start(self) -> None:
        self.original.load_state_dict(self.model.state_dict())

    def neighbour_labels(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """Nearest wrong remaining class of each sample under the original model (FGSM)."""
        with torch.enable_grad():
            probe = inputs.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(self._classifier_logits(self.original(probe)), labels)
            (gradient,) = torch.autograd.grad(loss, probe)
        with torch.no_grad():
            adversarial = inputs + self.epsilon * gradient.sign()
            logits = self._classifier_logits(self.original(adversarial))
            logits[torch.arange(labels.numel(), device=labels.device), labels] = float("-inf")
            if self.forget_classes:
                logits[:, self.forget_classes] = float("-inf")
            return logits.argmax(dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch[0], batch[1]
        targets = self.neighbour_labels(inputs, labels)
        loss = F.cross_entropy(self(inputs), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss
