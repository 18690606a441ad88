"""Every misconfiguration and data-problem branch, with the message it must give.

Configuration errors are `UnlearningConfigError` (both Lightning's `MisconfigurationException` and
`ValueError`) naming the argument and the value received; data problems are `RuntimeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
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
from unsc_lightning.data import MNIST1DDataModule

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    # UnlearningModule keeps its frozen original in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training",
)

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


class _UnusedLayer(BoringClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(20, 20)  # trainable, never called by forward


def _nan_retain() -> DataLoader:
    x = PROBLEM.retain_x.clone()
    x[3, 2] = float("nan")
    return DataLoader(TensorDataset(x, PROBLEM.retain_y), batch_size=8)


CONFIG = UnlearningConfigError
CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
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
        r"`batch_size` >= 1, got 0",
    ),
    (
        "dm-eval-batch-size",
        lambda: setup_dm(forget_classes=[1], eval_batch_size=0),
        CONFIG,
        r"`eval_batch_size` >= 1, got 0",
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
        "layer-without-input",
        lambda: fit(_UnusedLayer(), retain_dataloader=retain()),
        RuntimeError,
        r"Layers \['unused'\] received no input",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "match"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_misconfiguration(make, error, match):
    with pytest.raises(error, match=match) as info:
        make()
    if error is CONFIG:
        assert isinstance(info.value, MisconfigurationException)
        assert isinstance(info.value, ValueError)
    else:
        assert not isinstance(info.value, UnlearningConfigError)


def test_unsupported_layers_warn_by_name():
    model = nn.Sequential(nn.Linear(20, 20), _Scale())
    with pytest.warns(UserWarning, match=r"`model\.1\.\w+` \(unsupported\)"):
        fit(BoringClassifier(model), retain_dataloader=retain())
