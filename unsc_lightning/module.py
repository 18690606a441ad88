"""LightningModules: `UnlearningModule` (the forget stage) and `ClassifierModule` (original/retrain)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from unsc_lightning.arguments import class_list, classifier_arguments, flag, integer, number
from unsc_lightning.checkpoint import load_model_state
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.evaluation import EvaluationMixin
from unsc_lightning.export import ExportedModel, export_model
from unsc_lightning.metrics import find_feature_layer
from unsc_lightning.nullspace.engine import (
    NullSpaceEngine,
    default_batch_adapter,
    dense_grad,
    guarding_engines,
)
from unsc_lightning.pseudo_labels import PseudoLabelRule, random_pseudo_labels, unsc_pseudo_labels

OptimizerName = Literal["sgd", "adam", "adamw"]
#: :class:`~unsc_lightning.evaluation.EvaluationMixin` under the name the classes below use.
_EvaluationMixin = EvaluationMixin
#: class-wise forgetting stops once at most this share of forget samples keep their class
CLASS_WISE_TARGET = 0.01
#: learning rate of Adam / AdamW when `UnlearningModule(lr=None)`
DEFAULT_ADAM_LR = 1e-3
#: random directions of the sliced distance of `UnlearningModule(feature_calibration=...)`
FEATURE_PROJECTIONS = 64


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
        feature_calibration: weight of a feature-level term added to the pseudo-label loss
            (``0``, the default, leaves it out): the sliced Wasserstein-2 distance
            (:func:`sliced_feature_distance`) between the forget samples' features -- the input
            of ``feature_layer`` -- and features of remaining samples that the frozen original
            assigns to each forget sample's pseudo-label class. It moves the forgotten class into
            the remaining classes' feature distribution, so a linear probe on the features finds
            it less easily; under :class:`~unsc_lightning.NullSpaceCalibration` the remaining
            outputs still do not move (up to the basis threshold). The remaining features are
            collected from the callback's basis pass (no extra pass over the data; see
            :class:`FeatureReference`). Measured in ``docs/feature_forgetting.md``.
        feature_layer: the layer whose *input* is the feature vector (``named_modules()`` name);
            ``None``: the classification layer found by
            :func:`~unsc_lightning.metrics.find_feature_layer`.
        feature_reference_size: remaining feature vectors kept per class for
            ``feature_calibration`` (a uniform sample of what the basis pass sees).
        full_val_every_n_epochs: during ``fit`` most validation epochs are cheap: they log the
            held-out forgotten-class accuracy ``val/forget_acc`` alone (what unlearning moves; the
            null space keeps the remaining outputs). The full report -- ``val/retain_acc``, per-class accuracy,
            the threshold membership attack ``val/mia_efficacy``, the forget-vs-test AUROC -- is
            computed at the fit's last validation (its last epoch, or the epoch it stops at its
            target) and, with ``N``, every ``N``-th epoch (``1``: every epoch). ``trainer.validate``
            and ``trainer.test`` always report everything; see
            :class:`~unsc_lightning.evaluation.EvaluationMixin`.

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
        feature_calibration: float = 0.0,
        feature_layer: str | None = None,
        feature_reference_size: int = 1024,
        full_val_every_n_epochs: int | None = None,
    ) -> None:
        super().__init__()
        forget = classifier_arguments(model, num_classes, forget_classes, momentum, weight_decay)
        number("feature_calibration", feature_calibration, 0.0, low_open=False)
        if full_val_every_n_epochs is not None:
            integer("full_val_every_n_epochs", full_val_every_n_epochs, 1)
        integer("feature_reference_size", feature_reference_size, 2)
        feature_layer = _feature_layer_of(model, feature_layer, bool(feature_calibration))
        number("lr", lr, 0.0, optional=True)
        number("relative_step", relative_step, 0.0, 1.0)
        number("target_forget_acc", target_forget_acc, 0.0, 1.0, low_open=False, optional=True)
        integer("seed", seed, 0)
        flag("stop_at_target", stop_at_target)
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
        self._init_evaluation(num_classes, forget, full_val_every_n_epochs)
        self._generator = torch.Generator().manual_seed(seed)
        # forget samples classified as their true label in the current epoch / seen
        self._forget_counts = torch.zeros(2, dtype=torch.long)
        # gradient norms before projection, per parameter id (see on_after_backward)
        self._raw_norms: dict[int, Tensor] = {}
        self.stopped_at_epoch: int | None = None
        self.last_forget_accuracy: float | None = None
        self.feature_layer = feature_layer
        self.feature_reference: FeatureReference | None = None
        self._feature_capture = InputCapture()
        #: the null-space engines guarding this module's parameters (a calibration callback's),
        #: found once per fit in ``on_fit_start``
        self._engines: list[NullSpaceEngine] = []
        #: the parameters relative steps rescale: those left trainable once the calibration
        #: froze the rest (found once per fit, in ``on_fit_start``)
        self._stepped: list[Tensor] = []
        self._collecting_reference = False
        self._last_features: Tensor | None = None

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
        logits = self._classifier_logits(self.model(x))
        if self._feature_capture.active:
            features = self._feature_capture.take()
            if self._collecting_reference:
                self._add_reference(features, logits)
            else:
                self._last_features = features
        return logits

    def setup(self, stage: str) -> None:
        self._check_forget_classes()
        if stage == "fit" and self._hp.feature_calibration:
            # Between `setup` and this module's `on_fit_start` the only forward calls are the
            # callbacks' `on_fit_start` (Lightning calls the callbacks' hook first): the
            # NullSpaceCalibration basis pass over remaining data, whose features are recorded.
            self.feature_reference = FeatureReference(
                self.num_classes, self._hp.feature_reference_size, self._generator
            )
            self._feature_capture.start(self._layer(self.model))
            self._collecting_reference = True

    def teardown(self, stage: str) -> None:
        self._stop_feature_capture()
        self._engines = []

    def on_fit_start(self) -> None:
        # after the callbacks' `on_fit_start`: a calibration has built its engine
        self._engines = guarding_engines(self)
        self._stepped = [p for p in self.model.parameters() if p.requires_grad]
        if not bool(self.original_captured):
            # θ_o: a copy of the weights before the first update (kept in checkpoints so a
            # resumed fit labels with the same original model).
            self.original.load_state_dict(self.model.state_dict())
            self.original_captured.fill_(True)  # type: ignore[operator]
        if self.feature_reference is not None:
            self._collecting_reference = False
            if self.feature_reference.empty:
                self._reference_pass()
            self._feature_capture.start(self._layer(self.model))
        # Lightning warns about every module in eval mode at the start of training: the frozen
        # original is ours to keep in eval (every use goes through `_original_eval`), so its
        # flags wait in train mode until `on_train_start`
        self.original.train()

    def on_train_start(self) -> None:
        self.original.eval()

    def _layer(self, model: nn.Module) -> nn.Module:
        return dict(model.named_modules())[str(self.feature_layer)]

    def _stop_feature_capture(self) -> None:
        self._feature_capture.stop()
        self._collecting_reference = False
        self._last_features = None

    @torch.no_grad()
    def _add_reference(self, features: Tensor | None, logits: Tensor) -> None:
        """Remaining features, grouped by the remaining class the model ranks highest."""
        if self.feature_reference is None or features is None:
            return
        masked = logits.detach().clone()
        masked[:, self.forget_classes] = float("-inf")
        self.feature_reference.add(features.detach(), masked.argmax(dim=1))

    @torch.no_grad()
    def _reference_pass(self) -> None:
        """No basis pass was seen (no callback, or bases from a checkpoint or cache): one pass
        of the frozen original over the DataModule's ``retain_dataloader()``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader_of = getattr(datamodule, "retain_dataloader", None)
        if not callable(loader_of):
            self._stop_feature_capture()
            raise UnlearningConfigError(
                f"`feature_calibration={self._hp.feature_calibration}` needs features of "
                "remaining data: add a `NullSpaceCalibration` callback (its basis pass provides "
                "them) or attach a DataModule with a `retain_dataloader()` method."
            )
        rank_zero_info(
            "UnlearningModule: no basis pass to take remaining features from; `feature_calibration`"
            " reads `retain_dataloader()` once more through the frozen original."
        )
        original = self._original_eval()
        self._feature_capture.start(self._layer(original))
        try:
            convert = self.trainer.precision_plugin.convert_input  # as the Trainer's batches
            for batch in loader_of():
                inputs, _ = default_batch_adapter(convert(batch))
                logits = self._classifier_logits(original(inputs.to(self.device)))
                self._add_reference(self._feature_capture.take(), logits)
        finally:
            self._feature_capture.stop()
        if self.feature_reference is not None and self.feature_reference.empty:
            raise RuntimeError("`retain_dataloader()` yielded no batch: no remaining features.")

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self._stop_feature_capture()
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
        self._last_features = None
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        if self._hp.feature_calibration:
            feature_loss = self._feature_calibration_loss(targets)
            self.log("train/feature_loss", feature_loss)
            loss = loss + self._hp.feature_calibration * feature_loss
        self.log("train/loss", loss, prog_bar=True)
        # forget accuracy for free: these logits are computed anyway (before this step's update)
        # (counted where the logits are: no host synchronisation per step on a GPU)
        correct = (logits.detach().argmax(dim=1) == labels).sum()
        self._forget_counts += torch.stack([correct, correct.new_full((), labels.numel())])
        return loss

    def _feature_calibration_loss(self, targets: Tensor) -> Tensor:
        """Sliced distance of the batch's features to remaining features of its pseudo-labels."""
        features, self._last_features = self._last_features, None
        if features is None or self.feature_reference is None:
            raise RuntimeError(
                f"`feature_calibration` found no input of `feature_layer={self.feature_layer!r}` "
                "in this training step: the layer was not called by the model's forward."
            )
        reference, keep = self.feature_reference.sample(targets, self._generator)
        if int(keep.sum()) < 2:
            return features.sum() * 0.0
        directions = torch.randn(features.shape[1], FEATURE_PROJECTIONS, generator=self._generator)
        directions = directions.to(features) / directions.norm(dim=0).to(features)
        return sliced_feature_distance(features[keep], reference[keep], directions)

    def on_train_epoch_start(self) -> None:
        # on the training device, where training_step counts (no host copy per step)
        self._forget_counts = torch.zeros(2, dtype=torch.long, device=self.device)

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

    def _ends_after_this_epoch(self) -> bool:
        """Whether this epoch's forget accuracy so far already meets the stopping target (the
        validation at the end of the epoch is then the fit's last: a full one)."""
        if not self._stops_in_training_step:
            return False
        counts = self.trainer.strategy.reduce(self._forget_counts.to(self.device), reduce_op="sum")
        correct, seen = (int(v) for v in counts)
        return seen > 0 and correct / seen <= self._class_target

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

    def on_after_backward(self) -> None:
        # the gradients' norms before any projection (the last backward of an accumulation
        # wins: it sees the accumulated gradient), for on_before_optimizer_step; under a
        # GradScaler (precision="16-mixed" on CUDA) they are still scaled here, and unscaled there
        if self._relative_steps and self._engines:
            scale = _gradient_scale(self._trainer)
            params = [p for p in self._stepped if p.grad is not None]
            norms = gradient_norms([cast(Tensor, p.grad) for p in params])
            self._raw_norms = {id(p): norm / scale for p, norm in zip(params, norms)}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._relative_steps:
            # The step is sized on the projected gradient, so it is projected here (in gradient
            # mode the callback projected it already; update mode projects only after the step,
            # and sized on the unprojected gradient most of its length would be projected away).
            # Given the norms before projection, the engine also repairs the gradients whose
            # projection was mostly float32 cancellation error, which the rescaling would blow
            # up to a step of `relative_step` of the weight (see `NullSpaceEngine.project_step_`).
            for engine in self._engines:
                engine.project_step_(self._raw_norms)
            relative_step_gradients_(self._stepped, self._raw_norms)

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


def _feature_layer_of(model: nn.Module, feature_layer: Any, needed: bool) -> str | None:
    """The checked name of the feature layer (found when ``None`` and ``needed``)."""
    if feature_layer is None:
        return find_feature_layer(model) if needed else None
    names = [name for name, _ in model.named_modules() if name]
    if not isinstance(feature_layer, str) or feature_layer not in names:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise UnlearningConfigError(
            f"Expected `feature_layer` to name a module of {type(model).__name__} (as in "
            f"`named_modules()`: {shown}), got {feature_layer!r}."
        )
    return feature_layer


def sliced_feature_distance(features: Tensor, reference: Tensor, directions: Tensor) -> Tensor:
    """Sliced Wasserstein-2 distance between two equally large sets of feature vectors.

    Both sets are projected onto each unit column of ``directions`` (``d x P``); in one dimension
    the optimal transport pairs sorted values, so the squared distance is the mean squared
    difference of the sorted projections. It is divided by ``||r||^2 / d`` averaged over the
    reference (the mean squared projection of a reference vector on a random unit direction), so
    the weight of the term does not depend on the features' scale or width.

    Args:
        features: ``(N, d)`` features being moved (gradients flow through them).
        reference: ``(N, d)`` target features.
        directions: ``(d, P)`` unit directions.
    """
    moved = (features @ directions).sort(dim=0).values
    target = (reference @ directions).sort(dim=0).values
    scale = reference.pow(2).sum(dim=1).mean() / features.shape[1]
    return (moved - target).pow(2).mean() / scale.clamp_min(torch.finfo(scale.dtype).tiny)


class InputCapture:
    """Owns one forward pre-hook that records a layer's input, flattened per sample."""

    def __init__(self) -> None:
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._inputs: list[Tensor] = []

    @property
    def active(self) -> bool:
        return self._handle is not None

    def start(self, layer: nn.Module) -> None:
        self.stop()
        self._handle = layer.register_forward_pre_hook(self._record)

    def _record(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self._inputs = [args[0].flatten(1)]  # only the last call of a forward is kept

    def take(self) -> Tensor | None:
        """The input of the layer's last call since the previous ``take``, if any."""
        inputs, self._inputs = self._inputs, []
        return inputs[-1] if inputs else None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._inputs = []


class FeatureReference:
    """Features of remaining data, at most ``size`` per class, a uniform sample of those seen.

    Each added row gets a random key and each class keeps the rows with the ``size`` smallest
    keys (bottom-k sampling: a uniform sample without replacement of the stream, in any order).
    Rows are grouped by the class the frozen original ranks highest among remaining classes --
    the same rule as the pseudo-labels -- so the basis pass, which runs the model on inputs
    alone, is enough. Under the null-space constraint the unlearned model's features of
    remaining data stay these.

    Example:
        >>> reference = FeatureReference(num_classes=3, size=2, generator=torch.Generator())
        >>> reference.add(torch.ones(5, 4), torch.tensor([0, 0, 0, 1, 1]))
        >>> reference.counts.tolist()
        [2, 2, 0]
    """

    def __init__(self, num_classes: int, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self._rows: list[Tensor | None] = [None] * num_classes
        self._keys: list[Tensor | None] = [None] * num_classes

    @property
    def empty(self) -> bool:
        return int(self.counts.sum()) == 0

    def add(self, features: Tensor | None, classes: Tensor) -> None:
        if features is None:
            return
        keys = torch.rand(len(features), generator=self.generator)
        classes = classes.cpu()
        for k in classes.unique().tolist():
            chosen = classes == k
            rows, row_keys = features[chosen.to(features.device)], keys[chosen]
            held, held_keys = self._rows[k], self._keys[k]
            if held is not None and held_keys is not None:
                rows, row_keys = torch.cat([held, rows]), torch.cat([held_keys, row_keys])
            kept = row_keys.argsort()[: self.size]
            self._rows[k], self._keys[k] = rows[kept.to(rows.device)], row_keys[kept]
            self.counts[k] = len(kept)

    def sample(self, classes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One random kept row of each entry's class (zeros where the class has none), and a
        mask of the entries that have one."""
        classes = classes.cpu()
        keep = self.counts[classes] > 0
        width, like = next((r.shape[1], r) for r in self._rows if r is not None)
        reference = like.new_zeros(len(classes), width)
        draws = torch.rand(len(classes), generator=generator)
        for k in classes[keep].unique().tolist():
            held = self._rows[k]
            entries = (classes == k).nonzero().flatten()
            if held is not None:
                picks = (draws[entries] * len(held)).long().clamp_max(len(held) - 1)
                reference[entries.to(like.device)] = held[picks.to(like.device)]
        return reference, keep.to(like.device)


def _gradient_scale(trainer: Any) -> float:
    """The factor a GradScaler multiplies the gradients by until it unscales them (1.0 without
    one, e.g. in float32 or bf16)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


#: a projected gradient at most this fraction of the gradient before projection is float32
#: cancellation error (~1e-7 relative), not a direction to step along: relative steps would blow
#: it up to ``relative_step * ||W||``. Such a weight does not move in that step.
NULL_GRADIENT_FRACTION = 1e-3


@torch.no_grad()
def drop_null_gradients_(parameters: Iterable[Tensor], raw_norms: Mapping[int, Tensor]) -> None:
    """Zero each gradient whose projection left at most :data:`NULL_GRADIENT_FRACTION` of its
    norm before projection (``raw_norms``: ``id(parameter) -> norm``; parameters without an
    entry are left alone). No host synchronisation: a multiplication by 0 or 1.

    Torchvision's ResNet-18 at 32x32 is the case: its last stage's 3x3 convolutions see 1x1
    maps, so their gradients lie wholly in the remaining subspace (the centre taps, all spanned
    by the remaining rows); what projection leaves is rounding, and rescaled it moved the
    remaining logits by 2.6 % in three epochs at ``threshold=1.0``.
    """
    _rescale_gradients_(parameters, raw_norms, to_weight_norms=False)


@torch.no_grad()
def scale_to_weight_norms_(parameters: Iterable[Tensor]) -> None:
    """Rescale each gradient in place to the norm of its parameter: ``G <- G * ||W|| / ||G||``.

    A plain SGD step with learning rate ``s`` then moves every weight tensor by ``s * ||W||``
    (a relative step, as LARS does), so one ``s`` suits models of any scale, width or depth. A
    rescaling keeps a projected gradient in the null space. Parameters with a zero norm (or a zero
    gradient) are left as they are. No host synchronisation (on a GPU, a test per parameter
    would wait for each norm).
    """
    _rescale_gradients_(parameters, {}, to_weight_norms=True)


@torch.no_grad()
def gradient_norms(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient's 2-norm, as 0-dim tensors on its device: one ``_foreach_norm`` for the
    dense ones (a few kernels on a GPU), a sparse one (``nn.Embedding(sparse=True)``) from its
    coalesced values (``_foreach_norm`` takes no sparse CUDA tensor)."""
    dense = [grad for grad in grads if not grad.is_sparse]
    norms = iter(torch._foreach_norm(dense) if dense else [])
    return [grad.coalesce().values().norm() if grad.is_sparse else next(norms) for grad in grads]


def relative_step_gradients_(parameters: Iterable[Tensor], raw_norms: Mapping[int, Tensor]) -> None:
    """:func:`drop_null_gradients_` then :func:`scale_to_weight_norms_`, in one pass: each
    gradient's norm taken once and each gradient multiplied once (by 0 where it is dropped)."""
    _rescale_gradients_(parameters, raw_norms, to_weight_norms=True)


def _rescale_gradients_(
    parameters: Iterable[Tensor], raw_norms: Mapping[int, Tensor], to_weight_norms: bool
) -> None:
    # per device and dtype, every norm in one `_foreach_norm` and every gradient multiplied in
    # one `_foreach_mul_` (a few kernels per step on a GPU instead of about ten per parameter)
    groups: dict[tuple[Any, ...], list[Tensor]] = {}
    for parameter in parameters:
        grad = dense_grad(parameter)  # a sparse one not constrained: SGD steps it dense too
        if grad is not None:
            key = (grad.device, grad.dtype, parameter.dtype)
            groups.setdefault(key, []).append(parameter)
    for group in groups.values():
        grads = [cast(Tensor, parameter.grad) for parameter in group]
        grad_norms = torch.stack(torch._foreach_norm(grads))
        factors = torch.ones_like(grad_norms)
        if to_weight_norms:
            weight_norms = torch.stack(torch._foreach_norm([p.detach() for p in group]))
            weight_norms = weight_norms.to(grad_norms.dtype)
            usable = (grad_norms > 0) & (weight_norms > 0)
            factors = torch.where(usable, weight_norms / grad_norms, factors)
        raw = [raw_norms.get(id(parameter)) for parameter in group]
        if any(norm is not None for norm in raw):
            zero = grad_norms.new_zeros(())  # no entry: no drop (a zero gradient stays zero)
            threshold = torch.stack([zero if norm is None else norm.to(zero) for norm in raw])
            factors = factors * (grad_norms > NULL_GRADIENT_FRACTION * threshold)
        torch._foreach_mul_(grads, list(factors.unbind()))


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
