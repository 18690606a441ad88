"""LightningModules: `UnlearningModule` (the forget stage) and `ClassifierModule` (original/retrain)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from unsc_lightning.arguments import class_list, classifier_arguments, integer, number
from unsc_lightning.checkpoint import load_model_state
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.evaluation import EvaluationMixin
from unsc_lightning.export import ExportedModel, export_model
from unsc_lightning.pseudo_labels import PseudoLabelRule, random_pseudo_labels, unsc_pseudo_labels

OptimizerName = Literal["sgd", "adam", "adamw"]
#: :class:`~unsc_lightning.evaluation.EvaluationMixin` under the name the classes below use.
_EvaluationMixin = EvaluationMixin
#: class-wise forgetting stops once at most this share of forget samples keep their class
CLASS_WISE_TARGET = 0.01
#: learning rate of Adam / AdamW when `UnlearningModule(lr=None)`
DEFAULT_ADAM_LR = 1e-3


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

    At its defaults it needs no tuning for a new model. Steps are *relative*: with ``lr=None``
    and SGD each weight tensor moves by ``relative_step * ||W||`` per step along its (projected)
    gradient, so one step size suits models of any scale (measured on a zoo of CNNs, a ViT, a
    ConvNeXt and an embedding model in ``benchmarks/zoo.py``, where a fixed SGD rate needed
    anything from 2 to 100+ epochs). And it stops by itself (``stop_at_target``): class-wise,
    at the end of the first epoch in which at most ``target_forget_acc`` (default 1 %) of the
    forget samples were classified as their true class (measured on the logits ``training_step``
    computes anyway, before each update); sample-wise, once the forget samples' accuracy falls to
    the held-out accuracy (:class:`~unsc_lightning.baselines.StopAtHeldOutAccuracy`, added through
    ``configure_callbacks`` when the DataModule has ``forget_dataloader()`` and
    ``val_dataloader()``). The Trainer's ``max_epochs`` stays the cap. The paper's fixed recipes:
    ``lr=0.04, optimizer="sgd", stop_at_target=False`` and ``max_epochs=25``.

    Args:
        model: trained classifier returning logits; trained in place (see above).
        num_classes: number of classes.
        forget_classes: forgotten classes; ``None`` or ``[]`` for sample-level forgetting.
        lr: learning rate of a plain optimizer step; ``None`` (default): relative steps of
            ``relative_step`` with SGD, ``1e-3`` with Adam / AdamW.
        optimizer: ``"sgd"`` (the authors': no momentum, no weight decay), ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: weight decay.
        pseudo_labels: ``"unsc"`` or ``"random"``.
        seed: seed of the random pseudo-labels.
        original_checkpoint: path of the trained (original) weights, loaded into ``model`` at
            construction: a Lightning checkpoint holding them under ``model.`` (what
            :class:`ClassifierModule` runs write) or a plain ``state_dict``. Read only, never
            written. ``None``: ``model`` already holds the trained weights.
        stop_at_target: end the fit once the forget accuracy reaches ``target_forget_acc``
            (see above); ``False`` trains for every epoch of the Trainer.
        target_forget_acc: accuracy in ``[0, 1]`` to stop at; ``None``: 1 % for class-wise
            forgetting (a retrained model's 0 %, with room for one or two stubborn samples),
            the held-out accuracy for sample-level forgetting.
        relative_step: step size relative to each weight's norm when ``lr=None`` with SGD (the
            gradient is rescaled to ``||W|| / ||G||`` after the null-space projection, which a
            rescaling keeps).

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> module = UnlearningModule(MNIST1DConvNet(), num_classes=10, forget_classes=[3])
        >>> module.remaining_classes[:4]
        [0, 1, 2, 4]
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float | None = None,
        optimizer: OptimizerName = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        pseudo_labels: PseudoLabelRule = "unsc",
        seed: int = 0,
        original_checkpoint: str | None = None,
        stop_at_target: bool = True,
        target_forget_acc: float | None = None,
        relative_step: float = 0.01,
    ) -> None:
        super().__init__()
        forget = classifier_arguments(model, num_classes, forget_classes, momentum, weight_decay)
        number("lr", lr, 0.0, optional=True)
        number("relative_step", relative_step, 0.0, 1.0)
        number("target_forget_acc", target_forget_acc, 0.0, 1.0, low_open=False, optional=True)
        integer("seed", seed, 0)
        if not isinstance(stop_at_target, bool):
            raise UnlearningConfigError(
                f"Expected `stop_at_target` to be True or False, got {stop_at_target!r}."
            )
        if original_checkpoint is not None and not isinstance(original_checkpoint, (str, Path)):
            raise UnlearningConfigError(
                "Expected `original_checkpoint` to be a file path or None, got "
                f"{type(original_checkpoint).__name__} {original_checkpoint!r}."
            )
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
        self.original = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("original_captured", torch.tensor(False))
        self._init_evaluation(num_classes, forget)
        self._generator = torch.Generator().manual_seed(seed)
        # forget samples classified as their true label in the current epoch / seen
        self._forget_counts = torch.zeros(2, dtype=torch.long)
        self.stopped_at_epoch: int | None = None
        self.last_forget_accuracy: float | None = None

    def train(self, mode: bool = True) -> UnlearningModule:
        super().train(mode)
        self.original.eval()  # the labelling copy never trains
        return self

    def _original_eval(self) -> nn.Module:
        """The frozen original, put back in eval mode if anything switched a submodule to train.

        Lightning 2.x restores per-module ``training`` flags directly (``module.train()`` is not
        called at fit start), and users call ``train()`` on whole modules: either would let
        dropout randomise the pseudo-labels and BatchNorm update the original's statistics.
        """
        if any(m.training for m in self.original.modules()):
            self.original.eval()
        return self.original

    def forward(self, x: Tensor) -> Tensor:
        return self._classifier_logits(self.model(x))

    def setup(self, stage: str) -> None:
        self._check_forget_classes()

    def on_fit_start(self) -> None:
        if not bool(self.original_captured):
            # θ_o: a copy of the weights before the first update (kept in checkpoints so a
            # resumed fit labels with the same original model).
            self.original.load_state_dict(self.model.state_dict())
            self.original_captured.fill_(True)  # type: ignore[operator]

    def on_fit_end(self) -> None:
        last = self.last_forget_accuracy
        if self._stops_in_training_step and self.stopped_at_epoch is None and last is not None:
            rank_zero_warn(
                f"UnlearningModule: the forget accuracy is still {last:.1%} after "
                f"{self.trainer.current_epoch} epochs, above the target "
                f"{self._class_target:.1%}: the forgotten classes are not forgotten yet. Raise the "
                "Trainer's `max_epochs` (or `relative_step`, or `lr`)."
            )
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
            original_logits = self._classifier_logits(self._original_eval()(inputs))
        return unsc_pseudo_labels(original_logits, labels, self.forget_classes)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch[0], batch[1]
        targets = self.pseudo_label(inputs, labels)
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        self.log("train/loss", loss, prog_bar=True)
        # forget accuracy for free: these logits are computed anyway (before this step's update)
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self._forget_counts += torch.stack([correct.cpu(), torch.tensor(labels.numel())])
        return loss

    def on_train_epoch_start(self) -> None:
        self._forget_counts.zero_()

    def on_train_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._forget_counts.to(self.device), reduce_op="sum")
        correct, seen = (int(v) for v in counts)
        if seen == 0:
            return
        accuracy = correct / seen
        self.last_forget_accuracy = accuracy
        self.log("train/forget_acc", accuracy, sync_dist=False)
        if self._stops_in_training_step and accuracy <= self._class_target:
            self.stopped_at_epoch = self.current_epoch
            self.trainer.should_stop = True
            rank_zero_info(
                f"UnlearningModule: forget accuracy {accuracy:.4f} <= target "
                f"{self._class_target:.4f} after epoch {self.current_epoch}; stopping "
                "(`stop_at_target=False` runs every epoch)."
            )

    @property
    def _stops_in_training_step(self) -> bool:
        """Class-wise forgetting stops on the forget accuracy seen in ``training_step``."""
        return bool(self._hp.stop_at_target) and bool(self.forget_classes)

    @property
    def _class_target(self) -> float:
        target = self._hp.target_forget_acc
        return CLASS_WISE_TARGET if target is None else float(target)

    def configure_callbacks(self) -> list[Callback]:
        """Sample-level forgetting stops at the held-out accuracy (:class:`StopAtHeldOutAccuracy`)."""
        if not self._hp.stop_at_target or self.forget_classes:
            return []
        # imported here: `baselines` builds on this module (a top-level import would be circular)
        from unsc_lightning.baselines.stopping import StopAtHeldOutAccuracy

        trainer = self._trainer
        if any(isinstance(c, StopAtHeldOutAccuracy) for c in getattr(trainer, "callbacks", [])):
            return []  # the user's own stopping rule wins
        datamodule = getattr(trainer, "datamodule", None)
        if not all(
            callable(getattr(datamodule, name, None))
            for name in ("forget_dataloader", "val_dataloader")
        ):
            rank_zero_warn(
                "`stop_at_target=True` with sample-level forgetting stops at the held-out accuracy, "
                "which needs a DataModule with `forget_dataloader()` and `val_dataloader()`; none is "
                "attached, so unlearning runs until the Trainer's `max_epochs`."
            )
            return []
        return [StopAtHeldOutAccuracy(target=self._hp.target_forget_acc)]

    @property
    def _relative_steps(self) -> bool:
        """Steps sized relative to each weight: ``lr=None`` with SGD (the default)."""
        return self._hp.lr is None and self._hp.optimizer == "sgd"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._relative_steps:
            scale_to_weight_norms_(self.model.parameters())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        hp = self._hp
        if hp.optimizer == "sgd":
            lr = hp.relative_step if hp.lr is None else hp.lr
            return torch.optim.SGD(
                params, lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        optimizer_cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        lr = DEFAULT_ADAM_LR if hp.lr is None else hp.lr
        return optimizer_cls(params, lr=lr, weight_decay=hp.weight_decay)

    def export(self, path: str) -> ExportedModel:
        """Write the unlearned network's ``state_dict`` alone to ``path``, with ``<path>.sha256``.

        Unlike this module's checkpoints, the file holds no copy of the frozen original (which
        still knows the forgotten data); see :func:`unsc_lightning.export.export_model`. An
        existing file is never overwritten.
        """
        return export_model(self.model, path)


@torch.no_grad()
def scale_to_weight_norms_(parameters: Iterable[Tensor]) -> None:
    """Rescale each gradient in place to the norm of its parameter: ``G <- G * ||W|| / ||G||``.

    A plain SGD step with learning rate ``s`` then moves every weight tensor by ``s * ||W||``
    (a relative step, as LARS does), so one ``s`` suits models of any scale, width or depth. A
    rescaling keeps a projected gradient in the null space. Parameters with a zero norm (or a zero
    gradient) are left as they are.
    """
    for parameter in parameters:
        grad = parameter.grad
        if grad is None:
            continue
        grad_norm, weight_norm = grad.norm(), parameter.norm()
        if grad_norm > 0 and weight_norm > 0:
            grad.mul_(weight_norm / grad_norm)


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
        forget = classifier_arguments(model, num_classes, forget_classes, momentum, weight_decay)
        number("lr", lr, 0.0)
        integer("warmup_epochs", warmup_epochs, 0)
        if milestones is not None:
            milestones = class_list("milestones", milestones)
        number("gamma", gamma, 0.0)
        number("label_smoothing", label_smoothing, 0.0, 1.0, low_open=False, high_open=True)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes = num_classes
        self.forget_classes = forget
        self.milestones = list(milestones) if milestones is not None else [30, 60, 90]
        self._init_evaluation(num_classes, forget)

    def forward(self, x: Tensor) -> Tensor:
        return self._classifier_logits(self.model(x))

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
