"""Misuse of every public entry point: each mistake is refused at once with a message that names
the argument, shows the value received and says what to do -- or, for the listed "works"
cases, handled correctly. One parametrized table per entry point (callback constructor, the
callback in a fit, modules, data modules and forget specs, engine, baselines, checkpoints, CLI).

Configuration errors are `UnlearningConfigError` (both Lightning's `MisconfigurationException` and
`ValueError`) naming the argument and the value received; data problems are `RuntimeError`; the
pure-torch engine raises `NullSpaceEngineError` (a `ValueError`).
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    IN_FEATURES,
    NUM_CLASSES,
    BoringClassifier,
    SubspaceDataModule,
    make_subspace_problem,
    mlp,
    quiet_trainer,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import (
    ClassifierModule,
    ForgetSpec,
    NullSpaceCalibration,
    UnlearningConfigError,
    UnlearningDataModule,
    UnlearningModule,
)
from unsc_lightning.baselines import (
    SCRUB,
    BoundaryShrink,
    FineTune,
    GradientAscent,
    RandomLabels,
    SalUn,
    StopAtHeldOutAccuracy,
)
from unsc_lightning.cli import main as cli_main
from unsc_lightning.data import MNIST1DDataModule
from unsc_lightning.nullspace import NullSpaceEngine, NullSpaceEngineError

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    # UnlearningModule keeps its frozen original in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training",
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
Case = tuple[str, Callable[[], Any], type[Exception], str]

PROBLEM = make_subspace_problem()


def fit(
    module: L.LightningModule | None = None,
    datamodule: L.LightningDataModule | None = None,
    strategy: Any = "auto",
    **callback_kwargs: Any,
) -> None:
    """Fit ``module`` (default: a BoringClassifier) with a NullSpaceCalibration built from kwargs."""
    callback_kwargs.setdefault("threshold", 1.0)
    callback = NullSpaceCalibration(**callback_kwargs)
    module = module if module is not None else BoringClassifier()
    trainer = quiet_trainer(1, [callback], strategy=strategy)
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, train_dataloaders=PROBLEM.forget_loader())


def retain(**kwargs: Any) -> DataLoader:
    return PROBLEM.retain_loader(**kwargs)


def tensor_dm(train_labels: Tensor, test_labels: Tensor, **kwargs: Any) -> UnlearningDataModule:
    train = TensorDataset(torch.randn(train_labels.numel(), 3), train_labels)
    test = TensorDataset(torch.randn(test_labels.numel(), 3), test_labels)
    return UnlearningDataModule(train_dataset=train, test_dataset=test, **kwargs)


def setup_dm(**kwargs: Any) -> None:
    tensor_dm(
        torch.arange(100) % NUM_CLASSES,
        torch.arange(50) % NUM_CLASSES,
        num_classes=NUM_CLASSES,
        **kwargs,
    ).setup()


class _Scale(nn.Module):
    """A trainable module no handler supports."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(20))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.weight)[:, :NUM_CLASSES]


class _NoForward(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.num_classes = NUM_CLASSES

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _nan_retain() -> DataLoader:
    x = PROBLEM.retain_x.clone()
    x[3, 2] = float("nan")
    return DataLoader(TensorDataset(x, PROBLEM.retain_y), batch_size=8)


class _Returns(nn.Module):
    """An MLP whose output is wrapped by ``wrap`` (tuple, dict, HF-style object, ...)."""

    def __init__(self, wrap: Callable[[Tensor], Any]) -> None:
        super().__init__()
        self.net = mlp()
        self.wrap = wrap

    def forward(self, x: Tensor) -> Any:
        return self.wrap(self.net(x))


def _file(name: str, content: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_bytes(content)
    return path


def _text_file() -> Path:
    return _file("notes.txt", b"these are my notes, not weights\n")


def _saved(obj: Any) -> Path:
    path = Path(tempfile.mkdtemp()) / "saved.pt"
    torch.save(obj, path)
    return path


def _whole_module() -> Path:
    return _saved(mlp())


def _load_original(path: Path) -> None:
    UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], original_checkpoint=str(path))


ENGINE = NullSpaceEngineError

CONFIG = UnlearningConfigError

CALLBACK_CASES: list[Case] = [
    # -- NullSpaceCalibration constructor -----------------------------------------------------
    (
        "threshold-zero",
        lambda: NullSpaceCalibration(threshold=0),
        CONFIG,
        r"`threshold` in \(0, 1\], got 0",
    ),
    (
        "threshold-above-one",
        lambda: NullSpaceCalibration(threshold=1.5),
        CONFIG,
        r"`threshold` in \(0, 1\], got 1\.5",
    ),
    (
        "threshold-negative",
        lambda: NullSpaceCalibration(threshold=-1),
        CONFIG,
        r"`threshold` in \(0, 1\], got -1",
    ),
    (
        "threshold-mapping-bad-value",
        lambda: NullSpaceCalibration(threshold={"model.0": 0.9, "*": 2.0}),
        CONFIG,
        r"`threshold` in \(0, 1\], got \{'model\.0': 0\.9, '\*': 2\.0\}",
    ),
    (
        "threshold-string",
        lambda: NullSpaceCalibration(threshold="high"),
        CONFIG,
        r"`threshold` in \(0, 1\], got 'high'",
    ),
    (
        "rule",
        lambda: NullSpaceCalibration(rule="svd"),
        CONFIG,
        r"`rule` to be 'per_class' or 'pooled', got 'svd'",
    ),
    (
        "class-threshold-step-negative",
        lambda: NullSpaceCalibration(class_threshold_step=-0.1),
        CONFIG,
        r"`class_threshold_step` in \[0, 1\), got -0\.1",
    ),
    (
        "class-threshold-step-one",
        lambda: NullSpaceCalibration(class_threshold_step=1.0),
        CONFIG,
        r"`class_threshold_step` in \[0, 1\), got 1\.0",
    ),
    (
        "max-retain-batches",
        lambda: NullSpaceCalibration(max_retain_batches=0),
        CONFIG,
        r"`max_retain_batches` >= 1 or None, got 0",
    ),
    (
        "mode",
        lambda: NullSpaceCalibration(mode="adam"),
        CONFIG,
        r"`mode` to be 'auto', 'gradient' or 'update', got 'adam'",
    ),
    (
        "retain-dataloader-not-iterable",
        lambda: NullSpaceCalibration(retain_dataloader=42),
        CONFIG,
        r"`retain_dataloader` to be an iterable .* got int",
    ),
    # strict types: nothing coerced silently (issue 15)
    (
        "threshold-bool",
        lambda: NullSpaceCalibration(threshold=True),
        CONFIG,
        r"`threshold` in \(0, 1\], got True",
    ),
    (
        "threshold-string-number",
        lambda: NullSpaceCalibration(threshold="0.9"),
        CONFIG,
        r"`threshold` in \(0, 1\], got '0\.9'",
    ),
    (
        "threshold-mapping-int-key",
        lambda: NullSpaceCalibration(threshold={3: 0.9}),
        CONFIG,
        r"`threshold` mapping keys to be layer-name patterns",
    ),
    (
        "max-retain-batches-float",
        lambda: NullSpaceCalibration(max_retain_batches=1.5),
        CONFIG,
        r"`max_retain_batches` >= 1 or None, got 1\.5",
    ),
    (
        "max-retain-batches-string",
        lambda: NullSpaceCalibration(max_retain_batches="2"),
        CONFIG,
        r"`max_retain_batches` >= 1 or None, got '2'",
    ),
    (
        "max-retain-batches-bool",
        lambda: NullSpaceCalibration(max_retain_batches=True),
        CONFIG,
        r"`max_retain_batches` >= 1 or None, got True",
    ),
    (
        "max-samples-per-class",
        lambda: NullSpaceCalibration(max_samples_per_class=0),
        CONFIG,
        r"`max_samples_per_class` >= 1 or None, got 0",
    ),
    (
        "memory-budget-string",
        lambda: NullSpaceCalibration(memory_budget="1GB"),
        CONFIG,
        r"`memory_budget` >= 1 or None, got '1GB'",
    ),
    (
        "layers-int",
        lambda: NullSpaceCalibration(layers=3),
        CONFIG,
        r"`layers` to be a layer-name pattern or a list of patterns \(strings\), got 3",
    ),
    (
        "exclude-layers-list-of-ints",
        lambda: NullSpaceCalibration(exclude_layers=[1]),
        CONFIG,
        r"`exclude_layers` to be a layer-name pattern .* got \[1\]",
    ),
    (
        "freeze-bias-and-norm-string",
        lambda: NullSpaceCalibration(freeze_bias_and_norm="no"),
        CONFIG,
        r"`freeze_bias_and_norm` to be True or False, got 'no'",
    ),
    (
        "freeze-unconstrained-int",
        lambda: NullSpaceCalibration(freeze_unconstrained=0),
        CONFIG,
        r"`freeze_unconstrained` to be True or False, got 0",
    ),
    (
        "norm-eval-none",
        lambda: NullSpaceCalibration(norm_eval=None),
        CONFIG,
        r"`norm_eval` to be True or False, got None",
    ),
    (
        "log-drift-string",
        lambda: NullSpaceCalibration(log_drift="yes"),
        CONFIG,
        r"`log_drift` to be True or False, got 'yes'",
    ),
    (
        "drift-every-negative",
        lambda: NullSpaceCalibration(drift_every_n_steps=-1),
        CONFIG,
        r"`drift_every_n_steps` >= 0 .* got -1",
    ),
    (
        "drift-every-float",
        lambda: NullSpaceCalibration(drift_every_n_steps=2.5),
        CONFIG,
        r"`drift_every_n_steps` >= 0 .* got 2\.5",
    ),
    (
        "covariance-cache-int",
        lambda: NullSpaceCalibration(covariance_cache=3),
        CONFIG,
        r"`covariance_cache` to be a file path or None, got 3",
    ),
    (
        "remaining-classes-int",
        lambda: NullSpaceCalibration(remaining_classes=3),
        CONFIG,
        r"`remaining_classes` to be a list of class ids .* got 3; write `\[3\]`",
    ),
    (
        "remaining-classes-string",
        lambda: NullSpaceCalibration(remaining_classes="12"),
        CONFIG,
        r"`remaining_classes` to be a list of class ids .* got '12'",
    ),
    (
        "remaining-classes-float",
        lambda: NullSpaceCalibration(remaining_classes=[1.5]),
        CONFIG,
        r"`remaining_classes` to be a non-empty list .* got \[1\.5\]",
    ),
    (
        "remaining-classes-empty",
        lambda: NullSpaceCalibration(remaining_classes=[]),
        CONFIG,
        r"`remaining_classes` to be a non-empty list .* got \[\]",
    ),
    (
        "batch-adapter-not-callable",
        lambda: NullSpaceCalibration(batch_adapter=5),
        CONFIG,
        r"`batch_adapter` to be a callable .* got 5",
    ),
    (
        "mode-none",
        lambda: NullSpaceCalibration(mode=None),
        CONFIG,
        r"`mode` to be 'auto', 'gradient' or 'update', got None",
    ),
]

FIT_CASES: list[Case] = [
    # -- setup / on_fit_start -----------------------------------------------------------------
    (
        "no-retain-data",
        lambda: fit(),
        CONFIG,
        r"pass `retain_dataloader=` to the callback or give your DataModule a `retain_dataloader\(\)` method",
    ),
    (
        "datamodule-without-retain-loader",
        lambda: fit(datamodule=SubspaceDataModule(PROBLEM, with_retain=False)),
        CONFIG,
        r"pass `retain_dataloader=`",
    ),
    (
        "no-supported-layer",
        lambda: fit(BoringClassifier(nn.Sequential(_Scale())), retain_dataloader=retain()),
        CONFIG,
        r"BoringClassifier has no supported layer with a trainable weight",
    ),
    (
        "layers-match-nothing",
        lambda: fit(layers=["model.0", "encoder.*"], retain_dataloader=retain()),
        CONFIG,
        r"`layers` patterns \['encoder\.\*'\] match no supported layer",
    ),
    (
        "threshold-mapping-missing-layer",
        lambda: fit(threshold={"model.0": 0.9}, retain_dataloader=retain()),
        CONFIG,
        r"`threshold` mapping \{'model\.0': 0\.9\} has no entry for layers \['model\.2', 'model\.4'\]",
    ),
    (
        "retain-batch-type",
        lambda: fit(retain_dataloader=[3, 4]),
        CONFIG,
        r"Cannot split a batch of type int into inputs and labels.*`batch_adapter=`",
    ),
    (
        "no-forward",
        lambda: fit(_NoForward(), retain_dataloader=retain()),
        CONFIG,
        r"_NoForward does not define `forward`",
    ),
    (
        "sharded-strategy",
        lambda: NullSpaceCalibration(retain_dataloader=retain()).setup(
            SimpleNamespace(strategy=FSDPStrategy()),  # type: ignore[arg-type]
            BoringClassifier(),
            "fit",
        ),
        CONFIG,
        r"does not support the strategy `FSDPStrategy`",
    ),
    (
        "module-datamodule-forget-mismatch",
        lambda: quiet_trainer(1).fit(
            UnlearningModule(mlp(), 5, [FORGET_CLASS]),
            datamodule=tensor_dm(torch.arange(60) % 5, torch.arange(20) % 5, forget_classes=[1]),
        ),
        CONFIG,
        r"`forget_classes=\[4\]` of the module differs from the DataModule's \[1\]",
    ),
    # -- data problems while building the bases ----------------------------------------------
    (
        "empty-retain-data",
        lambda: fit(retain_dataloader=[]),
        RuntimeError,
        r"remaining \(retain\) data are empty",
    ),
    (
        "empty-retain-pooled",
        lambda: fit(rule="pooled", retain_dataloader=[]),
        RuntimeError,
        r"remaining \(retain\) data are empty",
    ),
    (
        "nan-activations",
        lambda: fit(retain_dataloader=_nan_retain()),
        RuntimeError,
        r"Layer `model\.0` received NaN or inf inputs",
    ),
    (
        "remaining-classes-include-module-forget",
        lambda: fit(
            UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS]),
            remaining_classes=[0, 1, FORGET_CLASS],
            retain_dataloader=retain(),
        ),
        CONFIG,
        r"`remaining_classes` without the forgotten classes, got \[0, 1, 4\]: \[4\] are forgotten by the UnlearningModule",
    ),
    (
        "remaining-classes-include-datamodule-forget",
        lambda: quiet_trainer(
            1, [NullSpaceCalibration(remaining_classes=[0, 1], covariance_cache="unused.pt")]
        ).fit(
            BoringClassifier(),
            datamodule=tensor_dm(
                torch.arange(60) % 5, torch.arange(20) % 5, num_classes=5, forget_classes=[1]
            ),
        ),
        CONFIG,
        r"\[1\] are forgotten by the UnlearningDataModule \(`forget_classes=\[1\]`\)",
    ),
    (
        "model-output-without-logits",
        lambda: quiet_trainer(1).fit(
            UnlearningModule(_Returns(lambda y: "logits"), NUM_CLASSES, [FORGET_CLASS]),
            train_dataloaders=PROBLEM.forget_loader(),
        ),
        CONFIG,
        r"`model` of UnlearningModule returned str, from which no logits tensor can be taken",
    ),
    (
        "num-classes-wider-than-model",
        lambda: quiet_trainer(1).fit(
            UnlearningModule(mlp(), NUM_CLASSES + 2, [FORGET_CLASS]),
            train_dataloaders=PROBLEM.forget_loader(),
        ),
        CONFIG,
        r"logits of `model` to have shape \(batch, `num_classes`=7\), got \(\d+, 5\)",
    ),
    (
        "num-classes-narrower-than-model",
        lambda: quiet_trainer(1).fit(
            UnlearningModule(mlp(), 3, [1]), train_dataloaders=PROBLEM.forget_loader()
        ),
        CONFIG,
        r"`num_classes`=3\), got \(\d+, 5\)",
    ),
    (
        "classifier-num-classes-mismatch",
        lambda: quiet_trainer(1).fit(
            ClassifierModule(mlp(), 7), train_dataloaders=PROBLEM.forget_loader()
        ),
        CONFIG,
        r"`num_classes`=7\), got \(\d+, 5\)",
    ),
    (
        "baseline-num-classes-mismatch",
        lambda: quiet_trainer(1).fit(
            GradientAscent(mlp(), 7, [FORGET_CLASS]), train_dataloaders=PROBLEM.forget_loader()
        ),
        CONFIG,
        r"`num_classes`=7\), got \(\d+, 5\)",
    ),
]

MODULE_CASES: list[Case] = [
    # -- modules ------------------------------------------------------------------------------
    (
        "module-forget-out-of-range",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[5]),
        CONFIG,
        r"`forget_classes` in \[0, 4\] .* got \[5\]",
    ),
    (
        "module-forget-negative",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[-1]),
        CONFIG,
        r"`forget_classes` in \[0, 4\] .* got \[-1\]",
    ),
    (
        "module-forget-duplicated",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[2, 2]),
        CONFIG,
        r"`forget_classes` without duplicates, got \[2, 2\]",
    ),
    (
        "module-forget-all",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[0, 1, 2, 3, 4]),
        CONFIG,
        r"`forget_classes=\[0, 1, 2, 3, 4\]` names every one of the 5 classes",
    ),
    (
        "module-num-classes",
        lambda: UnlearningModule(mlp(), 1),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got 1",
    ),
    ("module-lr", lambda: UnlearningModule(mlp(), 5, [4], lr=0.0), CONFIG, r"`lr` > 0, got 0\.0"),
    (
        "module-optimizer",
        lambda: UnlearningModule(mlp(), 5, [4], optimizer="rmsprop"),
        CONFIG,
        r"`optimizer` in .* got 'rmsprop'",
    ),
    (
        "module-pseudo-labels",
        lambda: UnlearningModule(mlp(), 5, [4], pseudo_labels="oracle"),
        CONFIG,
        r"`pseudo_labels` in .* got 'oracle'",
    ),
    (
        "classifier-forget-out-of-range",
        lambda: ClassifierModule(mlp(), 5, forget_classes=[7]),
        CONFIG,
        r"`forget_classes` in \[0, 4\] .* got \[7\]",
    ),
    ("classifier-lr", lambda: ClassifierModule(mlp(), 5, lr=-0.1), CONFIG, r"`lr` > 0, got -0\.1"),
    # strict types (issue 15)
    (
        "module-forget-string",
        lambda: UnlearningModule(mlp(), 5, forget_classes="12"),
        CONFIG,
        r"`forget_classes` to be a list of class ids .* got '12' \(a str\)",
    ),
    (
        "module-forget-float",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[3.7]),
        CONFIG,
        r"`forget_classes` to be a list of integer class ids, got \[3\.7\] \(3\.7 not an integer\)",
    ),
    (
        "module-forget-bool",
        lambda: UnlearningModule(mlp(), 5, forget_classes=[True]),
        CONFIG,
        r"got \[True\] \(True \(a bool\) not an integer\)",
    ),
    (
        "module-forget-int",
        lambda: UnlearningModule(mlp(), 5, forget_classes=3),
        CONFIG,
        r"`forget_classes` .* got 3; write `\[3\]` for one class",
    ),
    (
        "module-num-classes-string",
        lambda: UnlearningModule(mlp(), "5"),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got '5' \(a str\); write it without quotes",
    ),
    (
        "module-num-classes-float",
        lambda: UnlearningModule(mlp(), 5.0),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got 5\.0",
    ),
    (
        "module-num-classes-bool",
        lambda: UnlearningModule(mlp(), True),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got True",
    ),
    (
        "module-lr-string",
        lambda: UnlearningModule(mlp(), 5, [4], lr="0.1"),
        CONFIG,
        r"`lr` > 0, got '0\.1' \(a str\); write the number without quotes",
    ),
    (
        "module-lr-bool",
        lambda: UnlearningModule(mlp(), 5, [4], lr=True),
        CONFIG,
        r"`lr` > 0, got True",
    ),
    (
        "module-momentum",
        lambda: UnlearningModule(mlp(), 5, [4], momentum=-0.5),
        CONFIG,
        r"`momentum` >= 0, got -0\.5",
    ),
    (
        "module-weight-decay-string",
        lambda: UnlearningModule(mlp(), 5, [4], weight_decay="0"),
        CONFIG,
        r"`weight_decay` >= 0, got '0'",
    ),
    (
        "module-relative-step",
        lambda: UnlearningModule(mlp(), 5, [4], relative_step=0),
        CONFIG,
        r"`relative_step` in \(0, 1\] or None, got 0|`relative_step` in \(0, 1\], got 0",
    ),
    (
        "module-target-string",
        lambda: UnlearningModule(mlp(), 5, [4], target_forget_acc="0.01"),
        CONFIG,
        r"`target_forget_acc` in \[0, 1\] or None, got '0\.01'",
    ),
    (
        "module-seed",
        lambda: UnlearningModule(mlp(), 5, [4], seed=-1),
        CONFIG,
        r"`seed` to be an integer >= 0, got -1",
    ),
    (
        "module-stop-at-target",
        lambda: UnlearningModule(mlp(), 5, [4], stop_at_target="no"),
        CONFIG,
        r"`stop_at_target` to be True or False, got 'no'",
    ),
    (
        "module-optimizer-none",
        lambda: UnlearningModule(mlp(), 5, [4], optimizer=None),
        CONFIG,
        r"`optimizer` in .* got None",
    ),
    (
        "module-model-not-a-module",
        lambda: UnlearningModule("resnet18", 5, [4]),
        CONFIG,
        r"`model` to be a torch `nn\.Module` classifier, got str",
    ),
    (
        "module-original-checkpoint-int",
        lambda: UnlearningModule(mlp(), 5, [4], original_checkpoint=3),
        CONFIG,
        r"`original_checkpoint` to be a file path or None, got int 3",
    ),
    (
        "classifier-forget-int",
        lambda: ClassifierModule(mlp(), 5, forget_classes=2),
        CONFIG,
        r"write `\[2\]` for one class",
    ),
    (
        "classifier-num-classes-string",
        lambda: ClassifierModule(mlp(), "10"),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got '10'",
    ),
    (
        "classifier-warmup",
        lambda: ClassifierModule(mlp(), 5, warmup_epochs=-1),
        CONFIG,
        r"`warmup_epochs` to be an integer >= 0, got -1",
    ),
    (
        "classifier-milestones-string",
        lambda: ClassifierModule(mlp(), 5, milestones="30"),
        CONFIG,
        r"`milestones` to be a list .* got '30'",
    ),
    (
        "classifier-gamma",
        lambda: ClassifierModule(mlp(), 5, gamma=0),
        CONFIG,
        r"`gamma` > 0, got 0",
    ),
    (
        "classifier-label-smoothing",
        lambda: ClassifierModule(mlp(), 5, label_smoothing=1.0),
        CONFIG,
        r"`label_smoothing` in \[0, 1\), got 1\.0",
    ),
]

DATAMODULE_CASES: list[Case] = [
    # -- data module --------------------------------------------------------------------------
    (
        "dm-forget-out-of-range",
        lambda: setup_dm(forget_classes=[5]),
        CONFIG,
        r"`forget_classes` in \[0, 4\] .* got \[5\]",
    ),
    (
        "dm-forget-duplicated",
        lambda: setup_dm(forget_classes=[1, 1]),
        CONFIG,
        r"`forget_classes` without duplicates, got \[1, 1\]",
    ),
    (
        "dm-forget-empty",
        lambda: setup_dm(forget_classes=[]),
        CONFIG,
        r"`forget_classes` to name at least one class, got \[\]",
    ),
    (
        "dm-forget-all",
        lambda: setup_dm(forget_classes=[0, 1, 2, 3, 4]),
        CONFIG,
        r"`forget_classes=\[0, 1, 2, 3, 4\]` names every one",
    ),
    (
        "dm-forget-kind",
        lambda: setup_dm(forget=ForgetSpec(kind="pixels")),
        CONFIG,
        r"`kind` to be one of .* got 'pixels'",
    ),
    (
        "dm-forget-fraction",
        lambda: setup_dm(forget=ForgetSpec(kind="random", fraction=1.0)),
        CONFIG,
        r"`fraction` in \(0, 1\) .* got 1\.0",
    ),
    (
        "dm-forget-both",
        lambda: setup_dm(forget_classes=[1], forget=ForgetSpec(classes=[2])),
        CONFIG,
        r"both `forget_classes=\[1\]` and `forget=",
    ),
    (
        "dm-train-on",
        lambda: setup_dm(forget_classes=[1], train_on="test"),
        CONFIG,
        r"`train_on` to be one of .* got 'test'",
    ),
    (
        "dm-val-fraction",
        lambda: setup_dm(forget_classes=[1], val_fraction=1.0),
        CONFIG,
        r"`val_fraction` in \[0, 1\), got 1\.0",
    ),
    (
        "dm-batch-size",
        lambda: setup_dm(forget_classes=[1], batch_size=0),
        CONFIG,
        r"`batch_size` to be an integer >= 1, got 0",
    ),
    (
        "dm-eval-batch-size",
        lambda: setup_dm(forget_classes=[1], eval_batch_size=0),
        CONFIG,
        r"`eval_batch_size` to be an integer >= 1, got 0",
    ),
    (
        "dm-only-train-dataset",
        lambda: UnlearningDataModule(train_dataset=TensorDataset(torch.zeros(2))),
        CONFIG,
        r"Pass both `train_dataset` and `test_dataset`",
    ),
    (
        "dm-no-datasets",
        lambda: UnlearningDataModule(forget_classes=[1]).setup(),
        CONFIG,
        r"needs `train_dataset` and `test_dataset`",
    ),
    (
        "dm-from-name",
        lambda: UnlearningDataModule.from_name("imagenet"),
        CONFIG,
        r"`name` to be one of \['cifar10', 'cifar100', 'digits', 'fmnist', 'mnist1d', 'svhn'\], got 'imagenet'",
    ),
    (
        "dm-from-name-other-family",
        lambda: MNIST1DDataModule.from_name("digits"),
        CONFIG,
        r"`name='digits'` names DigitsDataModule, which is not a MNIST1DDataModule",
    ),
    (
        "mnist1d-num-samples",
        lambda: MNIST1DDataModule(num_samples=10),
        CONFIG,
        r"`num_samples` >= 100, got 10",
    ),
    (
        "dm-empty-forget-set",
        lambda: tensor_dm(
            torch.arange(40) % 4, torch.arange(20) % 4, num_classes=5, forget_classes=[4]
        ).setup(),
        RuntimeError,
        r"forget set is empty",
    ),
    (
        "dm-everything-forgotten",
        lambda: tensor_dm(
            torch.arange(40) % 2,
            torch.arange(20) % 3,
            num_classes=3,
            forget_classes=[0, 1],
            val_fraction=0.0,
        ).setup(),
        RuntimeError,
        r"remaining training data are empty",
    ),
    # strict types (issue 15)
    (
        "dm-forget-string",
        lambda: UnlearningDataModule(forget_classes="12"),
        CONFIG,
        r"`forget_classes` to be a list of class ids .* got '12'",
    ),
    (
        "dm-forget-int",
        lambda: UnlearningDataModule(forget_classes=3),
        CONFIG,
        r"got 3; write `\[3\]` for one class",
    ),
    (
        "dm-forget-float",
        lambda: UnlearningDataModule(forget_classes=[3.7]),
        CONFIG,
        r"\(3\.7 not an integer\)",
    ),
    (
        "dm-forget-bool",
        lambda: UnlearningDataModule(forget_classes=[True]),
        CONFIG,
        r"\(True \(a bool\) not an integer\)",
    ),
    (
        "dm-forget-not-a-spec",
        lambda: UnlearningDataModule(forget={"kind": "class", "classes": [1]}),
        CONFIG,
        r"`forget` to be a `ForgetSpec` or None, got dict",
    ),
    (
        "dm-batch-size-string",
        lambda: UnlearningDataModule(batch_size="8"),
        CONFIG,
        r"`batch_size` to be an integer >= 1, got '8' \(a str\)",
    ),
    (
        "dm-batch-size-float",
        lambda: UnlearningDataModule(batch_size=8.5),
        CONFIG,
        r"`batch_size` to be an integer >= 1, got 8\.5",
    ),
    (
        "dm-val-fraction-string",
        lambda: UnlearningDataModule(val_fraction="0.1"),
        CONFIG,
        r"`val_fraction` in \[0, 1\), got '0\.1'",
    ),
    (
        "dm-num-workers",
        lambda: UnlearningDataModule(num_workers=-1),
        CONFIG,
        r"`num_workers` to be an integer >= 0, got -1",
    ),
    (
        "dm-seed-float",
        lambda: UnlearningDataModule(seed=1.5),
        CONFIG,
        r"`seed` to be an integer >= 0, got 1\.5",
    ),
    (
        "dm-num-classes",
        lambda: UnlearningDataModule(num_classes=1),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got 1",
    ),
    (
        "dm-from-name-not-a-string",
        lambda: UnlearningDataModule.from_name(["mnist1d"]),
        CONFIG,
        r"`name` to be one of .* got \['mnist1d'\]",
    ),
    (
        "spec-classes-int",
        lambda: ForgetSpec(classes=3),
        CONFIG,
        r"`classes` .* got 3; write `\[3\]`",
    ),
    (
        "spec-classes-string",
        lambda: ForgetSpec(classes="12"),
        CONFIG,
        r"`classes` to be a list of class ids .* got '12'",
    ),
    (
        "spec-subclasses-bool",
        lambda: ForgetSpec(kind="subclass", subclasses=[False]),
        CONFIG,
        r"`subclasses` .* \(False \(a bool\) not an integer\)",
    ),
    (
        "spec-fraction-string",
        lambda: ForgetSpec(kind="random", fraction="0.1"),
        CONFIG,
        r"`fraction` in \(0, 1\) .* got '0\.1'",
    ),
    ("spec-seed", lambda: ForgetSpec(seed=-1), CONFIG, r"`seed` to be an integer >= 0, got -1"),
    (
        "spec-kind-at-construction",
        lambda: ForgetSpec(kind="classes"),
        CONFIG,
        r"`kind` to be one of .* got 'classes'",
    ),
    (
        "spec-subclasses-empty",
        lambda: setup_dm(forget=ForgetSpec(kind="subclass")),
        CONFIG,
        r"`subclasses` to name at least one fine class",
    ),
]

ENGINE_CASES: list[Case] = [
    (
        "engine-threshold",
        lambda: NullSpaceEngine(mlp(), threshold=1.5),
        ENGINE,
        r"`threshold` in \(0, 1\], got 1\.5",
    ),
    (
        "engine-threshold-zero",
        lambda: NullSpaceEngine(mlp(), threshold=0.0),
        ENGINE,
        r"`threshold` in \(0, 1\], got 0\.0",
    ),
    (
        "engine-threshold-string",
        lambda: NullSpaceEngine(mlp(), threshold="0.97"),
        ENGINE,
        r"`threshold` in \(0, 1\], got '0\.97'",
    ),
    (
        "engine-threshold-bool",
        lambda: NullSpaceEngine(mlp(), threshold=True),
        ENGINE,
        r"`threshold` in \(0, 1\], got True",
    ),
    (
        "engine-threshold-mapping",
        lambda: NullSpaceEngine(mlp(), threshold={"0": 0.9, "2": -1}),
        ENGINE,
        r"`threshold` in \(0, 1\]",
    ),
    (
        "engine-rule",
        lambda: NullSpaceEngine(mlp(), rule="gpm"),
        ENGINE,
        r"`rule` to be 'per_class' or 'pooled', got 'gpm'",
    ),
    (
        "engine-class-threshold-step",
        lambda: NullSpaceEngine(mlp(), class_threshold_step=-0.1),
        ENGINE,
        r"`class_threshold_step` in \[0, 1\), got -0\.1",
    ),
    (
        "engine-layers-int",
        lambda: NullSpaceEngine(mlp(), layers=0),
        ENGINE,
        r"`layers` to be a layer-name pattern .* got 0",
    ),
    (
        "engine-exclude-layers",
        lambda: NullSpaceEngine(mlp(), exclude_layers=[0, 2]),
        ENGINE,
        r"`exclude_layers` to be a layer-name pattern .* got \[0, 2\]",
    ),
    (
        "engine-freeze-bias-and-norm",
        lambda: NullSpaceEngine(mlp(), freeze_bias_and_norm="yes"),
        ENGINE,
        r"`freeze_bias_and_norm` to be True or False, got 'yes'",
    ),
    (
        "engine-norm-eval",
        lambda: NullSpaceEngine(mlp(), norm_eval=1),
        ENGINE,
        r"`norm_eval` to be True or False, got 1",
    ),
    (
        "engine-max-samples-per-class",
        lambda: NullSpaceEngine(mlp(), max_samples_per_class=2.5),
        ENGINE,
        r"`max_samples_per_class` >= 1 or None, got 2\.5",
    ),
    (
        "engine-memory-budget",
        lambda: NullSpaceEngine(mlp(), memory_budget=0),
        ENGINE,
        r"`memory_budget` >= 1 or None, got 0",
    ),
    (
        "engine-model-not-a-module",
        lambda: NullSpaceEngine(lambda x: x),
        ENGINE,
        r"`model` to be a torch `nn\.Module`, got function",
    ),
    (
        "engine-batch-type",
        lambda: NullSpaceEngine(mlp(), threshold=1.0).build([3]),
        ENGINE,
        r"Cannot split a batch of type int into inputs and labels",
    ),
]

BASELINE_CASES: list[Case] = [
    (
        "baseline-forget-int",
        lambda: FineTune(mlp(), 5, forget_classes=4),
        CONFIG,
        r"`forget_classes` .* got 4; write `\[4\]`",
    ),
    (
        "baseline-num-classes-string",
        lambda: GradientAscent(mlp(), "5", [4]),
        CONFIG,
        r"`num_classes` to be an integer >= 2, got '5'",
    ),
    (
        "baseline-lr-string",
        lambda: RandomLabels(mlp(), 5, [4], lr="1e-4"),
        CONFIG,
        r"`lr` > 0, got '1e-4' \(a str\)",
    ),
    (
        "baseline-retain-weight-string",
        lambda: RandomLabels(mlp(), 5, [4], retain_weight="0.5"),
        CONFIG,
        r"`retain_weight` >= 0, got '0\.5'",
    ),
    (
        "baseline-retain-batch-size",
        lambda: FineTune(mlp(), 5, [4], retain_batch_size=0),
        CONFIG,
        r"`retain_batch_size` to be an integer >= 1, got 0",
    ),
    (
        "baseline-seed-string",
        lambda: FineTune(mlp(), 5, [4], seed="0"),
        CONFIG,
        r"`seed` to be an integer >= 0, got '0'",
    ),
    (
        "baseline-norm-eval",
        lambda: FineTune(mlp(), 5, [4], norm_eval="yes"),
        CONFIG,
        r"`norm_eval` to be True or False, got 'yes'",
    ),
    (
        "baseline-epsilon-string",
        lambda: BoundaryShrink(mlp(), 5, [4], epsilon="0.1"),
        CONFIG,
        r"`epsilon` > 0, got '0\.1'",
    ),
    (
        "baseline-mask-ratio",
        lambda: SalUn(mlp(), 5, [4], mask_ratio=True),
        CONFIG,
        r"`mask_ratio` in \(0, 1\], got True",
    ),
    (
        "baseline-scrub-min-steps",
        lambda: SCRUB(mlp(), 5, [4], min_steps=1.5),
        CONFIG,
        r"`min_steps` to be an integer >= 0, got 1\.5",
    ),
    (
        "baseline-stopping-target",
        lambda: StopAtHeldOutAccuracy(target="0.5"),
        CONFIG,
        r"`target` in \[0, 1\] or None, got '0\.5'",
    ),
]

CHECKPOINT_CASES: list[Case] = [
    (
        "checkpoint-text-file",
        lambda: _load_original(_text_file()),
        CONFIG,
        r"`original_checkpoint='.*notes\.txt'` is not a PyTorch checkpoint .*`torch\.save\(model\.state_dict\(\), path\)`",
    ),
    (
        "checkpoint-empty-file",
        lambda: _load_original(_file("empty.ckpt", b"")),
        CONFIG,
        r"`original_checkpoint='.*empty\.ckpt'` is not a PyTorch checkpoint",
    ),
    (
        "checkpoint-whole-module",
        lambda: _load_original(_whole_module()),
        CONFIG,
        r"holds pickled Python objects \(e\.g\. a whole model saved with `torch\.save\(model, path\)`\).*Save the weights instead",
    ),
    (
        "checkpoint-missing",
        lambda: _load_original(Path(tempfile.mkdtemp()) / "missing.ckpt"),
        CONFIG,
        r"`original_checkpoint` to be an existing checkpoint file, got '.*missing\.ckpt'",
    ),
    (
        "checkpoint-directory",
        lambda: _load_original(Path(tempfile.mkdtemp())),
        CONFIG,
        r"`original_checkpoint` to be an existing checkpoint file",
    ),
    (
        "checkpoint-tensor",
        lambda: _load_original(_saved(torch.zeros(3))),
        CONFIG,
        r"holds a Tensor, not a checkpoint or a `state_dict`",
    ),
    (
        "checkpoint-other-prefix",
        lambda: _load_original(_saved({"state_dict": {"net.0.weight": torch.zeros(1)}})),
        CONFIG,
        r"has no key under `model\.`",
    ),
]

TABLES: dict[str, list[Case]] = {
    "callback": CALLBACK_CASES,
    "fit": FIT_CASES,
    "module": MODULE_CASES,
    "datamodule": DATAMODULE_CASES,
    "engine": ENGINE_CASES,
    "baseline": BASELINE_CASES,
    "checkpoint": CHECKPOINT_CASES,
}
ALL_CASES = [case for table in TABLES.values() for case in table]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [case[1:] for case in ALL_CASES],
    ids=[case[0] for case in ALL_CASES],
)
def test_misuse(make, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a case might write lands in the repository
    with pytest.raises(error, match=match) as info:
        make()
    if error is CONFIG:
        assert isinstance(info.value, MisconfigurationException)
        assert isinstance(info.value, ValueError)
    elif error is ENGINE:
        assert isinstance(info.value, ValueError)
    else:
        assert not isinstance(info.value, UnlearningConfigError)


def test_case_ids_unique_and_enough():
    ids = [case[0] for case in ALL_CASES] + [case[0] for case in CLI_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 80


def test_unsupported_layers_warn_by_name():
    model = nn.Sequential(nn.Linear(20, 20), _Scale())
    with pytest.warns(UserWarning, match=r"`model\.1\.\w+` \(unsupported\)"):
        fit(BoringClassifier(model), retain_dataloader=retain())


# --------------------------------------------------------------------------------------------
# Works: inputs that look odd but are right, with the behaviour they must have
# --------------------------------------------------------------------------------------------
class _HFOutput:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.hidden_states = None


@pytest.mark.parametrize(
    "wrap",
    [
        lambda y: (y, y.detach() * 0),
        lambda y: {"logits": y, "features": y.detach()},
        lambda y: _HFOutput(y),
    ],
    ids=["tuple", "dict", "hf-object"],
)
def test_model_outputs_tuple_dict_or_logits_object_unlearn_like_a_tensor(wrap):
    results = []
    for make in (lambda: _Returns(lambda y: y), lambda: _Returns(wrap)):
        torch.manual_seed(0)
        model = make()
        module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
        callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=PROBLEM.retain_loader())
        quiet_trainer(1, [callback]).fit(module, train_dataloaders=PROBLEM.forget_loader())
        x = PROBLEM.forget_loader().dataset.tensors[0]
        results.append(module(x).detach())
    assert torch.equal(results[0], results[1])


def test_single_string_layer_patterns_and_numpy_class_ids_are_accepted():
    callback = NullSpaceCalibration(layers="model.0", exclude_layers="model.4")
    assert callback.layers == ["model.0"] and callback.exclude_layers == ["model.4"]
    module = UnlearningModule(mlp(), NUM_CLASSES, forget_classes=np.array([FORGET_CLASS]))
    assert module.forget_classes == [FORGET_CLASS]
    assert isinstance(module.forget_classes[0], int)
    dm = UnlearningDataModule(forget_classes=(np.int64(2),), num_classes=NUM_CLASSES)
    assert dm.forget_classes == [2]


# --------------------------------------------------------------------------------------------
# CLI: the command fails with our message as the last line, and leaves nothing behind
# --------------------------------------------------------------------------------------------
CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    (
        "cli-threshold-above-one",
        lambda tmp: [
            "fit",
            "--config",
            str(CONFIG_DIR / "mnist1d_unsc.yaml"),
            "--trainer.callbacks.init_args.threshold=1.5",
        ],
        r"^unsc-lightning fit: error: Expected `threshold` in \(0, 1\], got 1\.5\.$",
    ),
    (
        "demo-out-is-a-file",
        lambda tmp: ["demo", "--out", str(_touch(tmp / "report.txt"))],
        r"^unsc-lightning demo: error: `--out '.*report\.txt'` is an existing file, not a folder",
    ),
    (
        "demo-out-under-a-file",
        lambda tmp: ["demo", "--out", str(_touch(tmp / "report.txt") / "demo")],
        r"^unsc-lightning demo: error: `--out '.*report\.txt/demo'` cannot be written: '.*report\.txt' is not a writable folder",
    ),
    (
        "demo-forget-out-of-range",
        lambda tmp: ["demo", "--forget-classes", "12", "--out", str(tmp / "new" / "demo")],
        r"^unsc-lightning demo: error: Expected `forget_classes` in \[0, 9\] .* got \[12\]",
    ),
    (
        "demo-forget-every-class",
        lambda tmp: ["demo", "--forget-classes", *map(str, range(10)), "--out", str(tmp / "new")],
        r"names every one of the 10 classes",
    ),
]


def _touch(path: Path) -> Path:
    path.write_text("the user's own file\n")
    return path


@pytest.mark.parametrize(
    ("argv", "last_line"), [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES]
)
def test_cli_misuse(argv, last_line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    args = argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(args)
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert code == 2
    assert re.search(last_line, lines[-1]), lines[-1]
    assert "Traceback" not in stderr.getvalue() or args[0] != "demo"
    # nothing the user owns changed, no empty output folder left behind
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "new").exists()


def fit_retain(
    module: Any = None, retain: Any = None, train: DataLoader | None = None, **callback_kwargs: Any
) -> NullSpaceCalibration:
    """Fit with ``retain`` (default: the problem's remaining data) and ``train`` forget data."""
    callback_kwargs.setdefault("threshold", 1.0)
    callback = NullSpaceCalibration(
        retain_dataloader=retain if retain is not None else PROBLEM.retain_loader(),
        **callback_kwargs,
    )
    module = module if module is not None else BoringClassifier()
    quiet_trainer(1, [callback]).fit(
        module, train_dataloaders=train if train is not None else PROBLEM.forget_loader()
    )
    return callback


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def test_empty_forget_dataloader_raises_instead_of_returning_the_model_unchanged():
    empty = DataLoader(
        TensorDataset(torch.zeros(0, IN_FEATURES), torch.zeros(0, dtype=torch.long)), batch_size=8
    )
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    with pytest.raises(
        RuntimeError,
        match=r"The forget data are empty: the training dataloader yielded no batch, so nothing was unlearned",
    ):
        fit_retain(module, train=empty)


def test_inf_activations_while_building_bases():
    x = PROBLEM.retain_x.clone()
    x[5, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"Layer `model\.0` received NaN or inf inputs") as info:
        fit_retain(retain=DataLoader(TensorDataset(x, PROBLEM.retain_y), batch_size=8))
    assert not isinstance(info.value, UnlearningConfigError)


def test_retain_inputs_the_model_cannot_run():
    retain = DataLoader(
        TensorDataset(torch.randn(16, 7), torch.arange(16) % FORGET_CLASS), batch_size=8
    )
    with pytest.raises(
        RuntimeError,
        match=r"The remaining \(retain\) data could not be run through `BoringClassifier\.forward` \(a batch of inputs of shape \(8, 7\), torch\.float32\); check that the retain dataloader",
    ) as info:
        fit_retain(retain=retain)
    assert info.value.__cause__ is not None  # the original error is chained


class _PooledConvNet(nn.Module):
    """Accepts sequences of any length: a wrong retain length would go unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 4, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_retain_input_shape_differs_from_training_data():
    generator = torch.Generator().manual_seed(0)
    retain = DataLoader(
        TensorDataset(torch.randn(16, 1, 12, generator=generator), torch.arange(16) % FORGET_CLASS),
        batch_size=8,
    )
    train = DataLoader(
        TensorDataset(torch.randn(16, 1, 16, generator=generator), torch.full((16,), FORGET_CLASS)),
        batch_size=8,
    )
    module = BoringClassifier(_PooledConvNet())
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(
        UnlearningConfigError,
        match=r"retain\) data have per-sample input shape \(1, 12\) but the training batches have \(1, 16\)",
    ):
        fit_retain(module, retain=retain, train=train)
    # raised at the first batch, before any step
    assert all(torch.equal(value, module.state_dict()[name]) for name, value in before.items())


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class _WithUnconstrainedParameters(nn.Module):
    """A raw offset parameter, a layer type without a handler and a parametrized Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(IN_FEATURES))
        self.prelu = nn.PReLU()
        self.scaled = torch.nn.utils.parametrizations.weight_norm(
            nn.Linear(IN_FEATURES, IN_FEATURES)
        )
        self.head = mlp()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scaled(self.prelu(x + self.offset)))


def test_unconstrained_parameters_frozen_and_listed_in_one_warning():
    model = _WithUnconstrainedParameters()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_retain(BoringClassifier(model))
    messages = [str(w.message) for w in caught if "have no null-space basis" in str(w.message)]
    assert len(messages) == 1
    for name, reason in [
        ("model.offset", "unsupported"),
        ("model.prelu.weight", "unsupported"),
        ("model.scaled.parametrizations.weight.original0", "parametrized"),
        ("model.scaled.parametrizations.weight.original1", "parametrized"),
    ]:
        assert f"`{name}` ({reason})" in messages[0]
        assert torch.equal(
            dict(model.named_parameters())[name.removeprefix("model.")],
            before[name.removeprefix("model.")],
        )
    assert "`freeze_unconstrained=False`" in messages[0]
    assert all(p.requires_grad for p in model.parameters())  # restored after the fit


def test_unconstrained_parameters_left_free_on_request_warn_by_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_retain(BoringClassifier(_WithUnconstrainedParameters()), freeze_unconstrained=False)
    messages = [str(w.message) for w in caught if "are NOT constrained" in str(w.message)]
    assert len(messages) == 1 and "`model.offset` (unsupported)" in messages[0]


# --------------------------------------------------------------------------------------------
# Checkpoints of another model
# --------------------------------------------------------------------------------------------
@pytest.fixture
def unlearning_checkpoint(tmp_path: Path) -> Path:
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=PROBLEM.retain_loader())
    trainer = quiet_trainer(1, [callback])
    trainer.fit(
        UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS]),
        train_dataloaders=PROBLEM.forget_loader(),
    )
    path = tmp_path / "unlearning.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_resume_from_checkpoint_of_another_architecture(unlearning_checkpoint):
    # the network's weights are restored before the callback state: Lightning's strict load names it
    other = UnlearningModule(mlp(hidden=32), NUM_CLASSES, [FORGET_CLASS])
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=PROBLEM.retain_loader())
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for model\.0\.weight: copying a param with shape torch\.Size\(\[64, 20\]\)",
    ):
        quiet_trainer(2, [callback]).fit(
            other, train_dataloaders=PROBLEM.forget_loader(), ckpt_path=unlearning_checkpoint
        )


def test_resume_with_callback_state_of_other_layers(unlearning_checkpoint):
    callback = NullSpaceCalibration(
        threshold=1.0, layers=["model.0", "model.2"], retain_dataloader=PROBLEM.retain_loader()
    )
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    with pytest.raises(
        UnlearningConfigError,
        match=r"state in this checkpoint was built for another model, layer set or settings",
    ):
        quiet_trainer(2, [callback]).fit(
            module, train_dataloaders=PROBLEM.forget_loader(), ckpt_path=unlearning_checkpoint
        )


def test_original_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "original.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in mlp(hidden=32).state_dict().items()}}, path
    )
    with pytest.raises(
        UnlearningConfigError,
        match=r"(?s)The weights in `original_checkpoint='.*original\.ckpt'` do not fit Sequential: .*size mismatch for 0\.weight",
    ):
        UnlearningModule(mlp(hidden=64), NUM_CLASSES, [FORGET_CLASS], original_checkpoint=str(path))


@pytest.mark.parametrize("gram", ["float16", "fast", 32, torch.bfloat16])
def test_gram_setting_is_refused_with_its_value(gram):
    with pytest.raises(UnlearningConfigError, match="gram"):
        NullSpaceCalibration(gram=gram)


@pytest.mark.parametrize(
    ("gram", "dtype"), [("float64", torch.float64), ("float32", torch.float32)]
)
def test_gram_setting_reaches_the_engine_and_the_fingerprint(gram, dtype):
    callback = NullSpaceCalibration(gram=gram)
    module = L.LightningModule()
    module.net = nn.Linear(4, 3)
    engine = callback._make_engine(module)
    assert engine.gram.dtype == dtype
    assert engine.fingerprint() != NullSpaceCalibration()._make_engine(module).fingerprint()


@pytest.mark.parametrize("where", ["submodule", "lightning_module"])
def test_torch_compiled_models_are_refused_with_what_to_do(where):
    # Forward hooks added after compilation do not run in the compiled graph: the basis pass
    # would read a layer's inputs once at best (the drift probe then found "no input").
    problem = make_subspace_problem()
    net = mlp()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    model = torch.compile(net) if where == "submodule" else net
    module: Any = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS])
    if where == "lightning_module":
        module = torch.compile(module)
    calibration = NullSpaceCalibration(retain_dataloader=problem.retain_loader())
    expected = "`model`" if where == "submodule" else "the UnlearningModule itself"
    with pytest.raises(UnlearningConfigError, match=r"inside `torch.compile`d modules") as info:
        quiet_trainer(1, [calibration]).fit(module, train_dataloaders=problem.forget_loader())
    assert expected in str(info.value) and "compile the result afterwards" in str(info.value)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())


def test_compiled_parts_without_constrained_layers_are_accepted():
    # only compiled modules that hold a constrained layer hide inputs from the basis pass
    problem = make_subspace_problem()
    net = mlp()
    net[1] = torch.compile(net[1], backend="eager")  # the activation: no weight
    module = UnlearningModule(net, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    calibration = NullSpaceCalibration(retain_dataloader=problem.retain_loader())
    quiet_trainer(1, [calibration]).fit(module, train_dataloaders=problem.forget_loader())
    assert calibration.bases
