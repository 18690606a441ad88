"""Retain/forget evaluation shared by the unlearning modules and the baselines.

:class:`ForgetEvaluation` holds the metrics of one stage (retain/forget accuracy, per-class
accuracy, MIA-efficacy, forget-vs-test AUROC); :class:`EvaluationMixin` is the validation/test
loop of :class:`~unsc_lightning.UnlearningModule`, :class:`~unsc_lightning.ClassifierModule` and
:class:`~unsc_lightning.baselines.BaselineModule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics import ClassSubsetAccuracy, ForgetVsTestAUROC, MIAEfficacy
from unsc_lightning.nullspace.engine import NullSpaceEngineError, output_logits

DEFAULT_EVAL_LOADERS = ("retain", "forget", "member", "forget_train")
#: The evaluation loader a cheap validation epoch runs (see :class:`EvaluationMixin`): the held-out
#: samples of what is forgotten.
CHEAP_LOADERS = ("forget",)


class ForgetEvaluation(nn.Module):
    """Retain/forget accuracy, per-class accuracy, MIA-efficacy and the forget-vs-test AUROC.

    Accuracies are macro averages over classes (as the paper reports). Evaluation loaders are
    named by the DataModule's ``eval_loader_names`` (default ``("retain", "forget", "member",
    "forget_train")``): ``retain`` holds held-out samples of the remaining classes (accuracy and
    MIA non-members), ``forget`` held-out samples of what is forgotten (accuracy), ``member``
    remaining *training* samples (MIA members) and ``forget_train`` the forgotten training
    samples the attack is applied to. Loaders a DataModule does not provide are skipped, and so
    are the metrics that need them.

    Args:
        num_classes: number of classes.
        forget_classes: forgotten classes (empty for sample-level forgetting).
        mia_attacker: ``"threshold"`` (cheap, used during validation) or ``"svc"`` (the field's
            standard, used at test); the logged key is ``{stage}/mia_efficacy`` either way, so
            validation and test MIA numbers must not be mixed in one table.

    Example:
        >>> import torch
        >>> evaluation = ForgetEvaluation(num_classes=3, forget_classes=[2])
        >>> evaluation.update("retain", torch.eye(3)[[0, 1]], torch.tensor([0, 1]))
        >>> evaluation.update("forget", torch.eye(3)[[0]], torch.tensor([2]))
        >>> {k: float(v) for k, v in evaluation.compute("test").items() if k.endswith("_acc")}
        {'test/retain_acc': 1.0, 'test/forget_acc': 0.0}
    """

    def __init__(
        self, num_classes: int, forget_classes: list[int], mia_attacker: str = "threshold"
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.forget_classes = list(forget_classes)
        remaining = [k for k in range(num_classes) if k not in self.forget_classes]
        self.retain = ClassSubsetAccuracy(num_classes, classes=remaining)
        self.forget = ClassSubsetAccuracy(num_classes, classes=self.forget_classes or None)
        self.per_class = ClassSubsetAccuracy(num_classes)
        self.mia = MIAEfficacy(attacker=mia_attacker)  # type: ignore[arg-type]
        self.auroc = ForgetVsTestAUROC()

    def update(self, loader: str, logits: Tensor, targets: Tensor, full: bool = True) -> None:
        """Add a batch of ``logits`` from the evaluation loader named ``loader``.

        ``full=False`` updates the remaining / forgotten accuracy alone (a cheap validation
        epoch: no per-class accuracy, nothing kept for the attack or the AUROC).
        """
        if loader == "retain":
            self.retain.update(logits, targets)
            if full:
                self.per_class.update(logits, targets)
                self.mia.update(logits, targets, "test")
                self.auroc.update(logits, targets, "test")
        elif loader == "forget":
            self.forget.update(logits, targets)
            if full and self.forget_classes:  # class-wise: forgotten classes have their own bars
                self.per_class.update(logits, targets)
        elif not full:
            return
        elif loader == "member":
            self.mia.update(logits, targets, "retain")
        elif loader == "forget_train":
            self.mia.update(logits, targets, "forget")
            self.auroc.update(logits, targets, "forget")

    def compute(self, prefix: str) -> dict[str, Tensor]:
        """Every metric with data, keyed ``{prefix}/<name>`` (e.g. ``test/retain_acc``)."""
        results: dict[str, Tensor] = {}
        if int(self.retain.total.sum()) > 0:
            results[f"{prefix}/retain_acc"] = self.retain.compute()
        if int(self.forget.total.sum()) > 0:
            results[f"{prefix}/forget_acc"] = self.forget.compute()
        if all(
            len(getattr(self.mia, f"{split}_features")) for split in ("retain", "test", "forget")
        ):
            results[f"{prefix}/mia_efficacy"] = self.mia.compute()
        if len(self.auroc.forget_scores) and len(self.auroc.test_scores):
            results[f"{prefix}/forget_test_auroc"] = self.auroc.compute()
        if int(self.per_class.total.sum()) > 0:
            per_class = self.per_class.per_class()
            for k in range(self.num_classes):
                if not torch.isnan(per_class[k]):
                    results[f"{prefix}/acc_class_{k}"] = per_class[k]
            remaining = [k for k in range(self.num_classes) if k not in self.forget_classes]
            spread = per_class[remaining]
            spread = spread[~torch.isnan(spread)]
            if spread.numel():  # the per-class spread behind the macro mean
                results[f"{prefix}/retain_acc_min"] = spread.min()
                results[f"{prefix}/retain_acc_max"] = spread.max()
        return results

    def reset(self) -> None:
        """Forget every batch seen so far."""
        for metric in (self.retain, self.forget, self.per_class, self.mia, self.auroc):
            metric.reset()


#: rows of :func:`summary_rows`: label and metric name (after the ``{stage}/`` prefix)
SUMMARY_METRICS = (
    ("remaining accuracy", "retain_acc"),
    ("forgotten accuracy", "forget_acc"),
    ("MIA-efficacy", "mia_efficacy"),
    ("forget-vs-test AUROC", "forget_test_auroc"),
    ("remaining per-class min", "retain_acc_min"),
    ("remaining per-class max", "retain_acc_max"),
)


def summary_rows(metrics: Mapping[str, Any], stage: str) -> list[tuple[str, str, float]]:
    """The compact end-of-run table: ``(label, key, value)`` for each metric logged.

    Remaining / forgotten accuracy, MIA-efficacy (SVC attacker at ``test``, threshold attacker at
    ``val``: labelled as such), the forget-vs-test AUROC, the per-class spread over remaining
    classes and the model's logit drift on remaining data (``nullspace_drift/model``), each once.

    Example:
        >>> import torch
        >>> summary_rows({"test/retain_acc": torch.tensor(0.9), "other": 1.0}, "test")
        [('remaining accuracy', 'test/retain_acc', 0.8999999761581421)]
    """
    attacker = "SVC" if stage == "test" else "threshold"
    rows = []
    for label, name in SUMMARY_METRICS:
        key = f"{stage}/{name}"
        if key in metrics:
            shown = f"{label} ({attacker})" if name == "mia_efficacy" else label
            rows.append((shown, key, float(metrics[key])))
    if "nullspace_drift/model" in metrics:
        drift = float(metrics["nullspace_drift/model"])
        rows.append(("logit drift on remaining data", "nullspace_drift/model", drift))
    return rows


class EvaluationMixin(L.LightningModule):
    """Validation and test loops shared by every unlearning module: one :class:`ForgetEvaluation`
    per stage, fed by the DataModule's named evaluation loaders and logged at epoch end.

    Subclasses call :meth:`_init_evaluation` in their constructor and
    :meth:`_check_forget_classes` in ``setup``; ``validation_step``, ``test_step`` and the
    epoch-end logging come from here, so UNSC, the ablations and the baselines log the same keys
    (``{val|test}/retain_acc``, ``/forget_acc``, ``/mia_efficacy``, ``/forget_test_auroc``,
    ``/acc_class_k``).

    What validation costs during ``fit`` is set by ``full_val_every_n_epochs``. With ``None``
    (``UnlearningModule``'s default) most validation epochs are *cheap*. They run the
    held-out samples of what is forgotten (the ``forget`` loader) and log ``val/forget_acc``,
    the number unlearning moves; the other loaders are not even loaded. Sample-level forgetting
    has no held-out forget samples (its ``forget`` loader holds the forgotten training samples,
    whose accuracy ``train/forget_acc`` already reports), so its cheap epochs run nothing. A
    *full* validation epoch runs every loader and logs everything: ``val/retain_acc``, the
    per-class accuracy, the threshold membership attack (``val/mia_efficacy``) and the
    forget-vs-test AUROC. It is the last validation of the fit (the one of the last epoch, of the
    epoch a module stops at its target, or after a callback set ``trainer.should_stop``) and,
    with ``N``, every ``N``-th epoch too (``1``: every epoch, as before issue 13, which added
    40-90 % to a small unlearning fit; ``benchmarks/bench_floor.py``). ``trainer.validate`` is
    always full; ``trainer.test`` reports everything, with the SVC attacker. The sanity check is
    cheap (full with ``full_val_every_n_epochs=1``, the default of ``ClassifierModule`` and the
    baselines, whose recipes keep the best validation checkpoint; ``UnlearningModule``'s is
    ``None``). A fit that ends in a way not known at its last validation (``max_time``, an
    ``EarlyStopping`` on validation metrics) ends on a cheap epoch; so does every epoch before
    the first full one: a ``ModelCheckpoint`` / ``EarlyStopping`` that monitors
    ``val/retain_acc`` needs ``full_val_every_n_epochs`` (or ``trainer.test`` after the fit).
    """

    @property
    def _hp(self) -> Any:
        """``hparams`` with attribute access typed for mypy."""
        return self.hparams

    val_evaluation: ForgetEvaluation
    test_evaluation: ForgetEvaluation

    #: a full validation every this many epochs of a fit (``None``: only the fit's last); ``1``
    #: (every epoch, sanity check included) for the classifier and the baselines, whose recipes
    #: keep the checkpoint of the best ``val/acc`` / ``val/retain_acc``
    full_val_every_n_epochs: int | None = 1
    #: whether the current validation epoch is full (every loader and metric)
    full_validation: bool = True

    def _init_evaluation(
        self,
        num_classes: int,
        forget_classes: list[int],
        full_val_every_n_epochs: int | None = 1,
    ) -> None:
        self.val_evaluation = ForgetEvaluation(
            num_classes, forget_classes, mia_attacker="threshold"
        )
        self.test_evaluation = ForgetEvaluation(num_classes, forget_classes, mia_attacker="svc")
        self.full_val_every_n_epochs = full_val_every_n_epochs
        self.full_validation = True
        self._skipped_limits: list[tuple[int, int | float]] = []

    def _validation_is_full(self) -> bool:
        """Whether this validation epoch is a full one (see the class docstring)."""
        trainer = self.trainer
        every = self.full_val_every_n_epochs
        if trainer.sanity_checking:
            return every == 1
        if trainer.state.fn != TrainerFn.FITTING:  # `trainer.validate`: the user asked for it
            return True
        epoch = trainer.current_epoch
        if every and (epoch + 1) % every == 0:
            return True
        if trainer.should_stop or self._ends_after_this_epoch():
            return True
        # the last validation of the fit: no later epoch validates before `max_epochs` / `max_steps`
        max_epochs = trainer.max_epochs
        check_every = trainer.check_val_every_n_epoch or 1
        if max_epochs is not None and max_epochs >= 0 and epoch + check_every >= max_epochs:
            return True
        max_steps = trainer.max_steps
        return max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps

    def _ends_after_this_epoch(self) -> bool:
        """Whether the module itself ends the fit after the current epoch (a stopping rule)."""
        return False

    def _cheap_loaders(self) -> tuple[str, ...]:
        """The loaders of a cheap epoch: none when the ``forget`` loader holds no held-out data."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        held_out = getattr(getattr(datamodule, "forget", None), "held_out_forget", True)
        return CHEAP_LOADERS if held_out else ()

    def _check_forget_classes(self) -> None:
        """Raise when the attached DataModule forgets other classes than this module."""
        datamodule = getattr(self.trainer, "datamodule", None)
        theirs = getattr(datamodule, "forget_classes", None)
        ours = getattr(self, "forget_classes", None)
        if theirs is not None and ours is not None and sorted(theirs) != ours:
            raise UnlearningConfigError(
                f"`forget_classes={ours}` of the module differs from the DataModule's "
                f"{sorted(theirs)}; pass the same classes to both."
            )

    def _classifier_logits(self, output: Any, source: str = "model") -> Tensor:
        """The ``(N, num_classes)`` logits in a model output (tensor, tuple, dict, ``.logits``).

        Raises:
            UnlearningConfigError: for an output without a logits tensor, or logits whose width
                is not ``num_classes`` (pseudo-labels would go to classes that do not exist).
        """
        try:
            logits = output_logits(output)
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(
                f"`{source}` of {type(self).__name__} returned {type(output).__name__}, from which "
                "no logits tensor can be taken; return a tensor, a tuple whose first tensor is the "
                "logits, a dict with `logits`, or an object with `.logits`."
            ) from error
        num_classes = getattr(self, "num_classes", None)
        if num_classes is not None and (logits.ndim != 2 or logits.shape[1] != num_classes):
            raise UnlearningConfigError(
                f"Expected the logits of `{source}` to have shape (batch, `num_classes`="
                f"{num_classes}), got {tuple(logits.shape)}; set `num_classes` to the number of "
                "outputs of the model's classification head (or fix the head)."
            )
        return logits

    def _loader_name(self, dataloader_idx: int) -> str:
        datamodule = (
            getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        )
        names = getattr(datamodule, "eval_loader_names", DEFAULT_EVAL_LOADERS)
        return names[dataloader_idx] if dataloader_idx < len(names) else f"loader_{dataloader_idx}"

    def _eval_step(
        self, evaluation: ForgetEvaluation, batch: Any, dataloader_idx: int, full: bool = True
    ) -> Tensor:
        inputs, targets = batch[0], batch[1]
        logits = self(inputs)
        evaluation.update(self._loader_name(dataloader_idx), logits, targets, full=full)
        return logits

    def on_validation_epoch_start(self) -> None:
        self.full_validation = self._validation_is_full()
        if not self.full_validation:
            self._skip_loaders()

    def _skip_loaders(self) -> None:
        """Keep a cheap epoch from even *loading* the batches of the loaders it does not run.

        Lightning runs the evaluation loaders one after the other and reads each one's batch
        limit (``trainer.num_val_batches``, a list it keeps for the whole fit) when it reaches
        that loader, so a zero limit set here, before the first batch, skips the loader; the
        limits are restored at the end of the epoch. ``validation_step`` skips those batches
        too: with a Lightning that reads the limits otherwise only the loading is spent, never a
        result changed.
        """
        trainer = self.trainer
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        limits = trainer.num_val_batches
        if not isinstance(limits, list):
            return
        cheap = self._cheap_loaders()
        self._restore_loaders()
        self._skipped_limits = [
            (i, limit)
            for i, limit in enumerate(limits)
            if limit and self._loader_name(i) not in cheap
        ]
        for i, _ in self._skipped_limits:
            limits[i] = 0

    def _restore_loaders(self) -> None:
        skipped, self._skipped_limits = self._skipped_limits, []
        if skipped and self._trainer is not None:
            limits = self._trainer.num_val_batches
            for i, limit in skipped:
                if i < len(limits):
                    limits[i] = limit

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if (
            not self.full_validation
            and self._loader_name(dataloader_idx) not in self._cheap_loaders()
        ):
            return  # a cheap epoch: only the held-out forget samples
        self._eval_step(self.val_evaluation, batch, dataloader_idx, full=self.full_validation)

    def on_validation_epoch_end(self) -> None:
        self._restore_loaders()
        self._log_evaluation(self.val_evaluation, "val")

    def on_fit_end(self) -> None:
        self._restore_loaders()  # an interrupted validation epoch leaves no zero limit behind

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_evaluation, batch, dataloader_idx)

    def _log_evaluation(self, evaluation: ForgetEvaluation, prefix: str) -> None:
        results = evaluation.compute(prefix)
        for name, value in results.items():
            self.log(
                name,
                value,
                prog_bar=name.endswith(("retain_acc", "forget_acc")),
                add_dataloader_idx=False,
                # already reduced by the metrics; the mean of identical values is a no-op that
                # keeps Lightning from warning under DDP
                sync_dist=self.trainer.world_size > 1,
            )
        evaluation.reset()

    def on_test_epoch_end(self) -> None:
        self._log_evaluation(self.test_evaluation, "test")
