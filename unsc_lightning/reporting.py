"""`UnlearningReport`: one summary of an unlearning run for W&B (tables, charts) or any logger.

The callback reads what the fit already computed: per-class accuracy from
``trainer.callback_metrics`` (``val/acc_class_k`` or ``test/acc_class_k``, logged by
:class:`~unsc_lightning.UnlearningModule`) and the per-layer bases of the
:class:`~unsc_lightning.NullSpaceCalibration` callback. With a ``WandbLogger`` it adds tables,
a per-class bar chart and a membership-inference confidence histogram; with any other logger it
logs the same numbers as ``report/...`` scalars. The computations are plain functions below so
notebooks and scripts can call them without a trainer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics import mia_features
from unsc_lightning.nullspace.context import eval_mode

ReportWhen = Literal["fit", "test"]
#: Splits of the confidence histogram: forgotten training samples, held-out test samples of the
#: remaining classes (non-members) and remaining training samples (members).
MIA_REPORT_SPLITS: tuple[str, ...] = ("forget", "test", "retain")
_CLASS_KEY = re.compile(r"^(?P<prefix>.+)/acc_class_(?P<k>\d+)$")
_SPLIT_COLOURS = {"forget": "tab:red", "test": "tab:gray", "retain": "tab:blue"}


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def run_environment(trainer: L.Trainer) -> dict[str, Any]:
    """Where and how a fit ran: world size, devices, precision and effective batch size.

    ``effective_batch`` is the training loader's batch size × ``accumulate_grad_batches`` ×
    world size (the samples behind one optimizer step); the batch size is read from the loaded
    training loader, else from the DataModule's ``batch_size`` (``None`` when neither says).

    Example:
        >>> import lightning.pytorch as L
        >>> run_environment(L.Trainer(accelerator="cpu", devices=1, logger=False))["world_size"]
        1
    """
    loader = trainer.train_dataloader  # None before the fit loop loads it
    batch = getattr(loader, "batch_size", None)
    if batch is None:
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    accumulate = int(trainer.accumulate_grad_batches)
    return {
        "world_size": int(trainer.world_size),
        "num_nodes": int(trainer.num_nodes),
        "devices": int(trainer.num_devices),
        "accelerator": type(trainer.accelerator).__name__,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
        "batch_size": batch if isinstance(batch, int) else None,
        "accumulate_grad_batches": accumulate,
        "effective_batch": batch * accumulate * int(trainer.world_size)
        if isinstance(batch, int)
        else None,
    }


def log_run_environment(trainer: L.Trainer) -> dict[str, Any]:
    """:func:`run_environment`, logged as the ``run`` hyperparameter of every W&B logger
    (the run's config)."""
    environment = run_environment(trainer)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_hyperparams({"run": environment})
    return environment


class RunEnvironment(Callback):
    """Record :func:`run_environment` when training starts (and log it to W&B's config).

    Attributes:
        environment: the record of the latest fit (``None`` before one).
    """

    def __init__(self) -> None:
        self.environment: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.environment = log_run_environment(trainer)


def per_class_accuracy(metrics: Mapping[str, Any], prefix: str) -> dict[int, float]:
    """``class -> accuracy`` from metrics named ``{prefix}/acc_class_{k}``, sorted by class."""
    found: dict[int, float] = {}
    for name, value in metrics.items():
        match = _CLASS_KEY.match(name)
        if match and match["prefix"] == prefix:
            found[int(match["k"])] = float(value)
    return dict(sorted(found.items()))


def basis_rows(callback: NullSpaceCalibration) -> list[tuple[str, int, int, float]]:
    """``(layer, input dimension, rank, kept energy)`` for every basis of the callback."""
    return [(name, info.dim, info.rank, info.energy) for name, info in callback.layer_infos.items()]


def report_scalars(
    accuracies: Mapping[int, float], bases: Sequence[tuple[str, int, int, float]]
) -> dict[str, float]:
    """The scalars every logger receives: ``report/acc_class_k`` and ``report/basis/<layer>/...``."""
    scalars = {f"report/acc_class_{k}": value for k, value in accuracies.items()}
    for name, dim, rank, energy in bases:
        scalars[f"report/basis/{name}/dim"] = float(dim)
        scalars[f"report/basis/{name}/rank"] = float(rank)
        scalars[f"report/basis/{name}/energy"] = energy
    return scalars


@torch.no_grad()
def true_class_confidences(
    model: torch.nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    max_batches: int | None = None,
) -> Tensor:
    """Softmax probability of the true class for every sample of ``(x, y, ...)`` batches (CPU float64)."""
    confidences = []
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        inputs, targets = batch[0].to(device), batch[1].to(device)
        confidences.append(
            mia_features(model(inputs).float(), targets, "confidence").cpu().double()
        )
    return torch.cat(confidences) if confidences else torch.empty(0, dtype=torch.float64)


def confidence_histogram(
    confidences: Mapping[str, Tensor], bins: int = 20
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bin edges over ``[0, 1]`` and, per split, the fraction of its samples in each bin.

    Returns:
        ``(edges, fractions)`` with ``edges`` of shape ``(bins + 1,)`` and each fraction vector of
        shape ``(bins,)`` summing to 1 (all zeros for an empty split).
    """
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    fractions = {}
    for split, values in confidences.items():
        counts = torch.histc(values.double(), bins=bins, min=0.0, max=1.0)
        fractions[split] = counts / counts.sum() if values.numel() else counts
    return edges, fractions


# --------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------


def _render(figure: Any) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def per_class_accuracy_chart(
    accuracies: Mapping[int, float], forget_classes: Iterable[int] = (), title: str = ""
) -> np.ndarray:
    """Bar chart of per-class accuracy (forgotten classes in red) as an RGB ``uint8`` array."""
    from matplotlib.figure import Figure

    forgotten = set(forget_classes)
    classes = list(accuracies)
    figure = Figure(figsize=(6, 3), dpi=100, layout="tight")
    axes = figure.add_subplot()
    colours = [_SPLIT_COLOURS["forget" if k in forgotten else "retain"] for k in classes]
    axes.bar([str(k) for k in classes], [accuracies[k] for k in classes], color=colours)
    axes.set(xlabel="class", ylabel="accuracy", ylim=(0, 1), title=title or "Per-class accuracy")
    return _render(figure)


def confidence_histogram_chart(
    edges: Tensor, fractions: Mapping[str, Tensor], title: str = ""
) -> np.ndarray:
    """Step histograms of true-class confidence per split as an RGB ``uint8`` array."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3), dpi=100, layout="tight")
    axes = figure.add_subplot()
    for split, values in fractions.items():
        axes.stairs(values.numpy(), edges.numpy(), label=split, color=_SPLIT_COLOURS.get(split))
    axes.set(xlabel="true-class confidence", ylabel="fraction of samples", xlim=(0, 1))
    axes.set_title(title or "Membership inference: confidence")
    axes.legend()
    return _render(figure)


# --------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------


class UnlearningReport(Callback):
    """Log a summary of the unlearning run once: per-class accuracy, bases and (W&B) MIA charts.

    Every logger of the trainer receives the scalars ``report/acc_class_k`` (the latest
    ``{val|test}/acc_class_k``) and, when a :class:`~unsc_lightning.NullSpaceCalibration`
    callback is attached, ``report/basis/<layer>/dim``, ``.../rank`` and ``.../energy``. A
    ``WandbLogger`` additionally receives, in the same ``log`` call:

    - ``report/per_class_accuracy``: ``wandb.Table`` with columns ``class``, ``accuracy``;
    - ``report/per_class_accuracy_chart``: the bar chart as ``wandb.Image``;
    - ``report/nullspace_bases``: ``wandb.Table`` with ``layer``, ``input_dim``, ``rank``,
      ``energy``;
    - if the DataModule has ``forget_dataloader()``, ``test_dataloader()`` and
      ``retain_dataloader()``: the true-class softmax confidence of forgotten training samples,
      held-out test samples of the remaining classes (``test_dataloader()[0]``) and remaining
      training samples, as ``report/mia_confidence_histogram`` (``wandb.Image``),
      ``report/mia_confidence_table`` (``wandb.Table``: ``bin_start``, ``bin_end`` and the
      fraction of each split per bin) and the scalars ``report/mia/<split>_confidence_mean`` and
      ``report/mia/<split>_samples``. Forget samples that look like test samples rather than
      training samples have been forgotten.

    When it runs: with ``when="fit"`` at ``on_train_end``, after the last validation and
    *before* Lightning's teardown moves the model to the CPU (``on_fit_end`` runs after it, so the
    confidence pass would run on the CPU); per-class accuracy comes from ``val/``. With
    ``when="test"`` at ``on_test_end`` of each ``trainer.test`` call, from ``test/``. Only global
    rank zero computes and logs (the confidence pass is a plain forward without collectives).

    Args:
        when: ``"fit"`` or ``"test"``, see above.
        max_batches: at most this many batches of each split in the confidence pass
            (``None`` = all).
        mia_histogram: compute the confidence histogram (W&B only).
        bins: histogram bins over ``[0, 1]``.

    Attributes:
        last_report: the scalars, per-class accuracies, basis rows and histogram of the latest
            report (also without a logger), for notebooks and tests.

    Raises:
        UnlearningConfigError: for an invalid argument.

    Example:
        >>> import lightning.pytorch as L
        >>> from unsc_lightning import NullSpaceCalibration
        >>> from unsc_lightning.reporting import UnlearningReport
        >>> trainer = L.Trainer(callbacks=[NullSpaceCalibration(), UnlearningReport(max_batches=4)],
        ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        when: ReportWhen = "fit",
        max_batches: int | None = 10,
        mia_histogram: bool = True,
        bins: int = 20,
    ) -> None:
        if when not in ("fit", "test"):
            raise UnlearningConfigError(f"Expected `when` to be 'fit' or 'test', got {when!r}.")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise UnlearningConfigError(
                f"Expected `max_batches` >= 1 or None, got {max_batches!r}."
            )
        if not isinstance(bins, int) or bins < 1:
            raise UnlearningConfigError(f"Expected `bins` to be an integer >= 1, got {bins!r}.")
        self.when: ReportWhen = when
        self.max_batches = max_batches
        self.mia_histogram = mia_histogram
        self.bins = bins
        self.last_report: dict[str, Any] = {}
        #: :func:`run_environment` of the latest fit (also in W&B's config as ``run``).
        self.environment: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.environment = log_run_environment(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "fit":
            self._report(trainer, pl_module, prefix="val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "test":
            self._report(trainer, pl_module, prefix="test")

    # -- steps ----------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        accuracies = per_class_accuracy(trainer.callback_metrics, prefix)
        if not accuracies:
            rank_zero_warn(
                f"UnlearningReport: no `{prefix}/acc_class_k` metrics found; the per-class report is "
                f"skipped. Run {'validation (`limit_val_batches` > 0)' if prefix == 'val' else 'a test'} "
                "with a module that logs per-class accuracy (e.g. `UnlearningModule`)."
            )
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        calibration = next((c for c in callbacks if isinstance(c, NullSpaceCalibration)), None)
        bases = basis_rows(calibration) if calibration is not None else []
        scalars = report_scalars(accuracies, bases)
        self.last_report = {"scalars": scalars, "per_class_accuracy": accuracies, "bases": bases}
        if not trainer.loggers:
            rank_zero_warn("UnlearningReport: the trainer has no logger; the report is not logged.")
            return
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        extras: dict[str, Any] = {}
        if wandb_loggers:
            forget_classes = getattr(pl_module, "forget_classes", None) or []
            extras = self._wandb_extras(
                trainer, pl_module, prefix, accuracies, bases, forget_classes
            )
        for logger in trainer.loggers:
            payload = {**scalars, **extras} if isinstance(logger, WandbLogger) else scalars
            _log(logger, payload, trainer.global_step)

    def _wandb_extras(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prefix: str,
        accuracies: Mapping[int, float],
        bases: Sequence[tuple[str, int, int, float]],
        forget_classes: Sequence[int],
    ) -> dict[str, Any]:
        import wandb

        extras: dict[str, Any] = {}
        if accuracies:
            extras["report/per_class_accuracy"] = wandb.Table(
                columns=["class", "accuracy"], data=[[k, v] for k, v in accuracies.items()]
            )
            chart = per_class_accuracy_chart(
                accuracies, forget_classes, f"Per-class accuracy ({prefix})"
            )
            extras["report/per_class_accuracy_chart"] = wandb.Image(chart)
        if bases:
            extras["report/nullspace_bases"] = wandb.Table(
                columns=["layer", "input_dim", "rank", "energy"], data=[list(row) for row in bases]
            )
        confidences = self._confidences(trainer, pl_module) if self.mia_histogram else None
        if confidences is not None:
            edges, fractions = confidence_histogram(confidences, self.bins)
            self.last_report["mia_histogram"] = {"edges": edges, "fractions": fractions}
            extras["report/mia_confidence_histogram"] = wandb.Image(
                confidence_histogram_chart(edges, fractions)
            )
            rows = [
                [
                    float(edges[i]),
                    float(edges[i + 1]),
                    *(float(fractions[s][i]) for s in MIA_REPORT_SPLITS),
                ]
                for i in range(self.bins)
            ]
            extras["report/mia_confidence_table"] = wandb.Table(
                columns=["bin_start", "bin_end", *MIA_REPORT_SPLITS], data=rows
            )
            for split, values in confidences.items():
                extras[f"report/mia/{split}_samples"] = float(values.numel())
                if values.numel():
                    extras[f"report/mia/{split}_confidence_mean"] = float(values.mean())
        return extras

    def _confidences(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, Tensor] | None:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        needed = ("forget_dataloader", "test_dataloader", "retain_dataloader")
        if datamodule is None or not all(
            callable(getattr(datamodule, name, None)) for name in needed
        ):
            return None
        test = datamodule.test_dataloader()
        loaders = {
            "forget": datamodule.forget_dataloader(),
            "test": test[0] if isinstance(test, (list, tuple)) else test,
            "retain": datamodule.retain_dataloader(),
        }
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            return {
                split: true_class_confidences(pl_module, loader, pl_module.device, self.max_batches)
                for split, loader in loaders.items()
            }


def _log(logger: Logger, payload: Mapping[str, Any], step: int) -> None:
    logger.log_metrics(dict(payload), step=step)
    logger.save()
