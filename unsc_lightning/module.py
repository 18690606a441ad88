"""LightningModules: `UnlearningModule` (the forget stage) and `ClassifierModule` (original/retrain)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.checkpoint import load_model_state
from unsc_lightning.data.forget import validate_forget_classes
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.evaluation import EvaluationMixin
from unsc_lightning.pseudo_labels import PseudoLabelRule, random_pseudo_labels, unsc_pseudo_labels

OptimizerName = Literal["sgd", "adam", "adamw"]
#: :class:`~unsc_lightning.evaluation.EvaluationMixin` under the name the classes below use.
_EvaluationMixin = EvaluationMixin


def _validate_common(num_classes: int, lr: float) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UnlearningConfigError(
            f"Expected `num_classes` to be an integer >= 2, got {num_classes!r}."
        )
    if not lr > 0:
        raise UnlearningConfigError(f"Expected `lr` > 0, got {lr!r}.")


class UnlearningModule(_EvaluationMixin):
    """The UNSC forget stage: train forget samples toward pseudo-labels of the original model.

    Wraps any trained ``nn.Module`` classifier. At fit start a frozen copy of the model (the
    original ``θ_o``, taken before the first update and stored in checkpoints) labels each
    forget sample with the remaining class it ranks highest (``pseudo_labels="unsc"``), or a
    random remaining class (``"random"``, the paper's ablation); cross-entropy toward these
    labels on forget data is the whole objective. Use it with
    :class:`~unsc_lightning.NullSpaceCalibration` so remaining outputs do not move.

    What is modified and what is not: ``model`` *is* the network being unlearned -- the object
    you pass is trained in place (``module.model is model``) and after ``fit`` holds the
    unlearned weights; pass ``copy.deepcopy(model)`` to keep yours unchanged. The original
    weights are kept in ``module.original`` (a frozen copy, also written to this run's
    checkpoints as ``original.*``). An ``original_checkpoint`` file is only read; save the
    unlearned model to a new file (e.g. this run's ``ModelCheckpoint``, which Lightning writes
    atomically), never over the original's.

    Args:
        model: trained classifier returning logits; trained in place (see above).
        num_classes: number of classes.
        forget_classes: forgotten classes; ``None`` or ``[]`` for sample-level forgetting.
        lr: learning rate.
        optimizer: ``"sgd"`` (the authors': no momentum, no weight decay), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: weight decay.
        pseudo_labels: ``"unsc"`` or ``"random"``.
        seed: seed of the random pseudo-labels.
        original_checkpoint: path of the trained (original) weights, loaded into ``model`` at
            construction: a Lightning checkpoint holding them under ``model.`` (what
            :class:`ClassifierModule` runs write) or a plain ``state_dict``. Read only, never
            written. ``None``: ``model`` already holds the trained weights.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> module = UnlearningModule(MNIST1DConvNet(), num_classes=10, forget_classes=[3], lr=0.05)
        >>> module.remaining_classes[:4]
        [0, 1, 2, 4]
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 0.05,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        pseudo_labels: PseudoLabelRule = "unsc",
        seed: int = 0,
        original_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        _validate_common(num_classes, lr)
        forget = validate_forget_classes(forget_classes, num_classes) if forget_classes else []
        if optimizer not in ("sgd", "adam", "adamw"):
            raise UnlearningConfigError(
                f"Expected `optimizer` in 'sgd', 'adam', 'adamw', got {optimizer!r}."
            )
        if pseudo_labels not in ("unsc", "random"):
            raise UnlearningConfigError(
                f"Expected `pseudo_labels` in 'unsc', 'random', got {pseudo_labels!r}."
            )
        self.save_hyperparameters(ignore=["model"])
        self.num_classes = num_classes
        self.forget_classes = forget
        self.remaining_classes = [k for k in range(num_classes) if k not in forget]
        if original_checkpoint is not None:
            load_model_state(model, original_checkpoint, argument="original_checkpoint")
        self.model = model
        self.original = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("original_captured", torch.tensor(False))
        self._init_evaluation(num_classes, forget)
        self._generator = torch.Generator().manual_seed(seed)

    def train(self, mode: bool = True) -> UnlearningModule:
        super().train(mode)
        self.original.eval()  # the labelling copy never trains
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        self._check_forget_classes()

    def on_fit_start(self) -> None:
        if not bool(self.original_captured):
            # θ_o: a copy of the weights before the first update (kept in checkpoints so a
            # resumed fit labels with the same original model).
            self.original.load_state_dict(self.model.state_dict())
            self.original_captured.fill_(True)  # type: ignore[operator]

    def on_fit_end(self) -> None:
        if self.trainer.num_training_batches == 0:
            # Lightning only warns and ends the fit: the model would come back not unlearned
            raise RuntimeError(
                "The forget data are empty: the training dataloader yielded no batch, so nothing "
                "was unlearned. Check the forget specification (`forget_classes=` / `forget=`) or "
                "the dataloader passed to `fit`."
            )

    def pseudo_label(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """Targets for a batch of forget samples."""
        if self._hp.pseudo_labels == "random":
            return random_pseudo_labels(
                self.num_classes, labels, self.forget_classes, self._generator
            )
        with torch.no_grad():
            original_logits = self.original(inputs)
        return unsc_pseudo_labels(original_logits, labels, self.forget_classes)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch[0], batch[1]
        targets = self.pseudo_label(inputs, labels)
        loss = F.cross_entropy(self(inputs), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        hp = self._hp
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        optimizer_cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return optimizer_cls(params, lr=hp.lr, weight_decay=hp.weight_decay)


class ClassifierModule(_EvaluationMixin):
    """Train the original (or retrained-from-scratch) classifier with the authors' recipe.

    SGD with momentum and weight decay, a linear warm-up over the first ``warmup_epochs``
    (per iteration) and a multi-step decay by ``gamma`` at ``milestones`` (epochs).

    Args:
        model: classifier returning logits.
        num_classes: number of classes.
        forget_classes: classes reported as "forget" in evaluation (training is unaffected).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        warmup_epochs: epochs of linear warm-up.
        milestones: epochs at which the learning rate is multiplied by ``gamma``.
        gamma: decay factor.
        label_smoothing: cross-entropy label smoothing.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> ClassifierModule(MNIST1DConvNet(), num_classes=10).hparams.lr
        0.1
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        milestones: list[int] | None = None,
        gamma: float = 0.2,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        _validate_common(num_classes, lr)
        forget = validate_forget_classes(forget_classes, num_classes) if forget_classes else []
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.forget_classes = forget
        self.milestones = list(milestones) if milestones is not None else [30, 60, 90]
        self._init_evaluation(num_classes, forget)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch[0], batch[1]
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets, label_smoothing=self._hp.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == targets).float().mean())
        return loss

    def _lr_factor(self, steps_per_epoch: int) -> Any:
        warmup_steps = (
            max(1, self._hp.warmup_epochs * steps_per_epoch) if self._hp.warmup_epochs else 0
        )

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            epoch = step // max(1, steps_per_epoch)
            return self._hp.gamma ** sum(epoch >= m for m in self.milestones)

        return factor

    def configure_optimizers(self) -> Any:
        hp = self._hp
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        max_epochs = max(1, self.trainer.max_epochs or 1)
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // max_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor(steps_per_epoch))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
