"""SCRUB: a student that stays close to its teacher on remaining data and moves away on forget data."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.arguments import integer, number
from unsc_lightning.baselines.base import BaselineModule


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``KL(teacher ‖ student)`` of temperature-softened outputs, scaled by ``T²`` (Hinton et al.)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


class SCRUB(BaselineModule):
    """SCRUB (Kurmanji et al., *Towards Unbounded Machine Unlearning*, NeurIPS 2023).

    The original model is a frozen teacher; the student (the model being unlearned) alternates
    *max* steps, which push its outputs on forget data away from the teacher's
    (``−KL(teacher ‖ student)``), and *min* steps on remaining data
    (``alpha · KL + gamma · CE``). Max steps run during the first ``max_epochs`` epochs only,
    then min steps alone repair the remaining classes (the authors' schedule). Every training
    step takes one forget batch: one max step on it (while in the max phase), then
    ``min_steps`` min steps on remaining batches. Manual optimisation, one SGD optimizer.

    Args:
        model: trained classifier; the student, trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes.
        lr: learning rate.
        max_epochs: number of epochs with max steps.
        min_steps: min steps per forget batch.
        alpha: weight of the distillation term of the min step.
        gamma: weight of the cross-entropy term of the min step.
        temperature: distillation temperature.
        kwargs: see :class:`~unsc_lightning.baselines.BaselineModule`.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> SCRUB(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).automatic_optimization
        False
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 3e-3,
        max_epochs: int = 2,
        min_steps: int = 8,
        alpha: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        **kwargs: Any,
    ) -> None:
        integer("max_epochs", max_epochs, 0)
        integer("min_steps", min_steps, 0)
        number("alpha", alpha, 0.0, low_open=False)
        number("gamma", gamma, 0.0, low_open=False)
        number("temperature", temperature, 0.0)
        super().__init__(model, num_classes, forget_classes, lr=lr, **kwargs)
        self.save_hyperparameters("max_epochs", "min_steps", "alpha", "gamma", "temperature")
        self.max_epochs, self.min_steps = max_epochs, min_steps
        self.alpha, self.gamma, self.temperature = float(alpha), float(gamma), float(temperature)
        self.automatic_optimization = False
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> SCRUB:
        super().train(mode)
        self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        self.teacher.load_state_dict(self.model.state_dict())

    def _step(self, loss: Tensor) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.current_epoch < self.max_epochs:
            inputs = batch[0]
            with torch.no_grad():
                teacher = self._classifier_logits(self.teacher(inputs))
            max_loss = -distillation_kl(self(inputs), teacher, self.temperature)
            self._step(max_loss)
            self.log("train/max_loss", max_loss)
        for _ in range(self.min_steps):
            inputs, labels = self.next_retain_batch()
            logits = self(inputs)
            with torch.no_grad():
                teacher = self._classifier_logits(self.teacher(inputs))
            distill = distillation_kl(logits, teacher, self.temperature)
            min_loss = self.alpha * distill + self.gamma * F.cross_entropy(logits, labels)
            self._step(min_loss)
            self.log("train/min_loss", min_loss, prog_bar=True)
