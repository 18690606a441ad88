"""Experiment pipeline shared by the `demo` and `bench` commands: train, cache, unlearn, evaluate."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.data import ForgetSpec, UnlearningDataModule
from unsc_lightning.metrics import MIAEfficacy
from unsc_lightning.models import DigitsConvNet, MNIST1DConvNet
from unsc_lightning.module import ClassifierModule, ForgetEvaluation, UnlearningModule

ProgressFn = Callable[[int, int], None]


@dataclass
class TrainRecipe:
    """Original / retrain recipe (the authors' schedule, scaled to the embedded data)."""

    epochs: int = 30
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    milestones: list[int] = field(default_factory=lambda: [15, 25])
    gamma: float = 0.2
    batch_size: int = 128


@dataclass
class UnlearnRecipe:
    """UNSC forget-stage settings (plain SGD on forget data, null-space projection).

    The MNIST-1D defaults were tuned on seeds 0-2, forgetting class 3 (lr 0.5-4, 20-40 epochs,
    per-class 0.97 + 0.003 k, pooled 0.96-0.995, lower thresholds on the head); a lower head
    threshold destroys remaining accuracy, a lower lr leaves 1-2.5 % forgotten-class accuracy.
    """

    epochs: int = 20
    lr: float = 2.0
    batch_size: int = 128
    threshold: float = 0.97
    class_threshold_step: float = 0.003
    rule: str = "per_class"


EMBEDDED: dict[str, dict[str, Any]] = {
    "mnist1d": {
        "model": lambda num_classes: MNIST1DConvNet(num_classes=num_classes),
        "train": TrainRecipe(),
        "unlearn": UnlearnRecipe(),
    },
    "digits": {
        "model": lambda num_classes: DigitsConvNet(num_classes=num_classes),
        "train": TrainRecipe(epochs=30, lr=0.05, milestones=[15, 25], batch_size=64),
        "unlearn": UnlearnRecipe(epochs=20, lr=0.5, batch_size=64),
    },
}


class EpochProgress(Callback):
    """Calls ``progress(epoch_done, max_epochs)`` after every training epoch."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress = progress

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress(trainer.current_epoch + 1, trainer.max_epochs or 1)


def make_trainer(
    max_epochs: int, callbacks: list[Callback] | None = None, **kwargs: Any
) -> L.Trainer:
    """A quiet CPU trainer: no logger, checkpoints, progress bar or model summary."""
    options: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "deterministic": True,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks or [], **options)


def make_datamodule(
    dataset: str, forget: ForgetSpec, seed: int, train_on: str, batch_size: int, **data_options: Any
) -> UnlearningDataModule:
    """The embedded data module for one stage; ``data_options`` go to its constructor (e.g.
    ``num_samples`` for MNIST-1D)."""
    return UnlearningDataModule.from_name(
        dataset, forget=forget, train_on=train_on, seed=seed, batch_size=batch_size, **data_options
    )


def _cache_key(
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    train_on: str,
    recipe: TrainRecipe,
    data_options: dict[str, Any] | None = None,
) -> str:
    payload: dict[str, Any] = {
        "dataset": dataset,
        "seed": seed,
        "train_on": train_on,
        "recipe": asdict(recipe),
    }
    if train_on == "retain":
        payload["forget"] = {
            k: v for k, v in asdict(forget).items() if v != []
        }  # stable for old specs
    if forget.kind == "subclass":  # the model learns coarse labels: a different original
        payload["labels"] = "coarse"
    if data_options:
        payload["data"] = data_options
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def train_classifier(
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    train_on: str,
    cache_dir: Path | None = None,
    recipe: TrainRecipe | None = None,
    progress: ProgressFn | None = None,
    data_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, float, bool]:
    """Train (or load from cache) the original (``train_on="all"``) or retrained model.

    ``data_options`` are passed to the data module (e.g. ``{"num_samples": 1000}``) and are part
    of the cache key.

    Returns:
        ``(model, seconds, cached)``; for a cached model ``seconds`` is the training time
        recorded when it was trained.
    """
    spec = EMBEDDED[dataset]
    recipe = recipe or spec["train"]
    key = _cache_key(dataset, forget, seed, train_on, recipe, data_options)
    path = None if cache_dir is None else Path(cache_dir) / f"{dataset}_{train_on}_{key}.pt"
    dm = make_datamodule(dataset, forget, seed, train_on, recipe.batch_size, **(data_options or {}))
    L.seed_everything(seed, workers=True, verbose=False)
    model = spec["model"](dm.num_classes)
    if path is not None and path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(stored["state_dict"])
        if progress is not None:
            progress(1, 1)
        return model, float(stored["seconds"]), True
    module = ClassifierModule(
        model,
        num_classes=dm.num_classes,
        forget_classes=forget.forgotten_classes or None,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        warmup_epochs=recipe.warmup_epochs,
        milestones=recipe.milestones,
        gamma=recipe.gamma,
    )
    trainer = make_trainer(recipe.epochs, [EpochProgress(progress)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "seconds": seconds}, tmp)
        tmp.replace(path)
    return model, seconds, False


def run_unsc(
    model: nn.Module,
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    recipe: UnlearnRecipe | None = None,
    progress: ProgressFn | None = None,
    callbacks: list[Callback] | None = None,
    data_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, float, NullSpaceCalibration]:
    """Unlearn ``forget`` from a copy of ``model`` with UNSC; returns (model, seconds, callback).

    ``callbacks`` are added to the trainer (e.g. a stopping rule); ``data_options`` go to the
    data module. ``seconds`` covers the whole fit: basis construction and unlearning.
    """
    unlearned, seconds, callback = run_unsc_variant(
        model,
        dataset,
        forget,
        seed,
        recipe,
        progress,
        callbacks=callbacks,
        data_options=data_options,
    )
    return unlearned, seconds, cast(NullSpaceCalibration, callback)


def run_unsc_variant(
    model: nn.Module,
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    recipe: UnlearnRecipe | None = None,
    progress: ProgressFn | None = None,
    *,
    pseudo_labels: str = "unsc",
    null_space: bool = True,
    callbacks: list[Callback] | None = None,
    data_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, float, NullSpaceCalibration | None]:
    """UNSC or one of its ablations, all with the same recipe.

    Args:
        model: trained original; a copy is unlearned.
        dataset: embedded data set name.
        forget: what to forget.
        seed: seed of the data splits and of training.
        recipe: forget-stage settings; ``EMBEDDED[dataset]["unlearn"]`` (read now) by default.
        progress: ``progress(epoch_done, max_epochs)`` after every epoch.
        pseudo_labels: ``"unsc"`` or ``"random"`` (random remaining labels, the paper's ablation).
        null_space: attach :class:`NullSpaceCalibration`; ``False`` trains toward the
            pseudo-labels without the null-space constraint (the other ablation).
        callbacks: extra trainer callbacks.
        data_options: data module arguments (e.g. ``num_samples``).

    Returns:
        ``(model, seconds, callback)``; ``callback`` is ``None`` when ``null_space=False``.
    """
    import copy

    recipe = recipe or EMBEDDED[dataset]["unlearn"]
    dm = make_datamodule(dataset, forget, seed, "forget", recipe.batch_size, **(data_options or {}))
    L.seed_everything(seed, workers=True, verbose=False)
    unlearned = copy.deepcopy(model)
    module = UnlearningModule(
        unlearned,
        num_classes=dm.num_classes,
        forget_classes=forget.forgotten_classes or None,
        lr=recipe.lr,
        optimizer="sgd",
        pseudo_labels=pseudo_labels,  # type: ignore[arg-type]
        seed=seed,
        stop_at_target=False,  # the recipe's fixed epochs: demo and bench numbers stay comparable
    )
    callback = None
    if null_space:
        callback = NullSpaceCalibration(
            threshold=recipe.threshold,
            class_threshold_step=recipe.class_threshold_step,
            rule=recipe.rule,  # type: ignore[arg-type]
        )
    extra = [callback] if callback is not None else []
    trainer = make_trainer(recipe.epochs, [*extra, *(callbacks or []), EpochProgress(progress)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    unlearned.eval()
    return unlearned, seconds, callback


@torch.no_grad()
def evaluate(model: nn.Module, dm: UnlearningDataModule) -> dict[str, Any]:
    """Test-set accuracy in percent: ``acc_r`` / ``acc_f`` (macro over classes) and per class.

    Uses the same :class:`~unsc_lightning.module.ForgetEvaluation` as the modules' test step, on
    the DataModule's ``retain`` and ``forget`` test loaders.
    """
    evaluation = ForgetEvaluation(dm.num_classes, dm.forget_classes)
    model.eval()
    for name, loader in zip(("retain", "forget"), dm.test_dataloader()[:2]):
        for inputs, targets in loader:
            evaluation.update(name, model(inputs), targets)
    results = evaluation.compute("test")
    nan = torch.tensor(float("nan"))
    values = evaluation.per_class.per_class()
    return {
        "acc_r": 100 * float(results.get("test/retain_acc", nan)),
        "acc_f": 100 * float(results.get("test/forget_acc", nan)),
        "per_class": [None if torch.isnan(v) else 100 * float(v) for v in values],
    }


@torch.no_grad()
def mia_efficacy_of(
    model: nn.Module, dm: UnlearningDataModule, attacker: str = "svc", seed: int = 0
) -> float:
    """MIA-efficacy in percent (REFERENCE.md protocol).

    Members are the remaining training samples, non-members the test samples of the remaining
    classes (forgotten classes removed), the attack is applied to the forgotten training samples.
    """
    metric = MIAEfficacy(attacker=attacker, seed=seed)  # type: ignore[arg-type]
    model.eval()
    loaders = {
        "retain": dm.retain_dataloader(),
        "test": dm.test_dataloader()[0],
        "forget": dm.forget_dataloader(),
    }
    for split, loader in loaders.items():
        for inputs, targets in loader:
            metric.update(model(inputs), targets, split)
    return 100 * float(metric.compute())
