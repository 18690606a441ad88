"""Train, cache and unlearn: the runs every experiment is made of.

:func:`train_classifier` trains (or reads from the cache) the original and the retrained model;
:func:`run_method` unlearns a copy of the original with UNSC, one of its ablations or a
baseline, all through the same steps. :mod:`unsc_lightning.lab.scoring` scores the results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.data import ForgetSpec, UnlearningDataModule
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.files import atomic_write
from unsc_lightning.lab.recipes import (
    EMBEDDED,
    METHODS,
    UNLEARNING_METHODS,
    MethodInfo,
    MethodRecipe,
    TrainRecipe,
    UnlearnRecipe,
    method_recipe,
    unlearn_recipe,
)
from unsc_lightning.module import ClassifierModule, UnlearningModule
from unsc_lightning.reporting import RunEnvironment

ProgressFn = Callable[[int, int], None]


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


def restrict_forget_split(dm: UnlearningDataModule, classes: list[int]) -> UnlearningDataModule:
    """Keep only the forgotten training samples of ``classes`` in ``dm``'s forget split.

    The remaining split (everything not forgotten by any request so far) is untouched; what the
    method trains on (``train_dataloader()`` for forget-driven methods) and the forget loader are
    the current request's samples.
    """
    dm.setup()
    forget = dm.splits["train_forget"]
    targets = dm.forget_targets()
    keep = torch.isin(targets, torch.tensor(classes))
    dm.splits["train_forget"] = forget[keep]
    return dm


def _cache_key(
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    train_on: str,
    recipe: TrainRecipe,
    data_options: dict[str, Any] | None = None,
    model_seed: int | None = None,
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
    if model_seed is not None:
        payload["model_seed"] = model_seed
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
    environment: RunEnvironment | None = None,
    model_seed: int | None = None,
    trainer_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, float, bool]:
    """Train (or load from cache) the original (``train_on="all"``) or retrained model.

    ``trainer_options`` go to :func:`make_trainer` over its quiet CPU defaults (e.g.
    ``{"accelerator": "gpu"}``); they are not part of the cache key.

    ``data_options`` are passed to the data module (e.g. ``{"num_samples": 1000}``) and are part
    of the cache key. ``environment`` records where the model was trained (world size, devices,
    precision, effective batch; kept in the cache with the model). ``model_seed`` (default
    ``seed``) seeds the initialisation and the training order while ``seed`` keeps choosing the
    splits: models of one split that differ only in their training randomness (the audit).

    Returns:
        ``(model, seconds, cached)``; for a cached model ``seconds`` is the training time
        recorded when it was trained.
    """
    spec = EMBEDDED[dataset]
    recipe = recipe or spec["train"]
    key = _cache_key(dataset, forget, seed, train_on, recipe, data_options, model_seed)
    path = None if cache_dir is None else Path(cache_dir) / f"{dataset}_{train_on}_{key}.pt"
    dm = make_datamodule(dataset, forget, seed, train_on, recipe.batch_size, **(data_options or {}))
    _reseed_training(dm, model_seed)
    L.seed_everything(seed if model_seed is None else model_seed, workers=True, verbose=False)
    model = spec["model"](dm.num_classes)
    stored = _read_cached_model(path)
    if stored is not None:
        model.load_state_dict(stored["state_dict"])
        if environment is not None:
            environment.environment = stored.get("run")
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
    recorder = environment or RunEnvironment()
    trainer = make_trainer(
        recipe.epochs, [EpochProgress(progress), recorder], **(trainer_options or {})
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    model.cpu().eval()  # as from the cache, wherever it trained
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "state_dict": model.state_dict(),
            "seconds": seconds,
            "run": recorder.environment,
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return model, seconds, False


def _reseed_training(dm: UnlearningDataModule, model_seed: int | None) -> None:
    """Fix ``dm``'s splits with its own seed, then shuffle its training loader with ``model_seed``."""
    if model_seed is None:
        return
    dm.setup()  # the splits are drawn once, here, from the data module's seed
    dm.seed = model_seed  # from now on only the loaders' shuffling reads it


def _read_cached_model(path: Path | None) -> dict[str, Any] | None:
    """A cached model written by :func:`train_classifier`; ``None`` when missing or unreadable
    (the cache is this package's own: an unreadable entry is retrained and replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(stored, dict) or not {"state_dict", "seconds"} <= stored.keys():
        return None
    return stored


class UnlearningRun(NamedTuple):
    """What :func:`run_method` returns."""

    #: The unlearned copy of the original, in eval mode.
    model: nn.Module
    #: Wall-clock seconds of the whole fit, including what the method computes before training
    #: (UNSC bases, SalUn saliency).
    seconds: float
    #: The null-space callback of UNSC and its random-label ablation, else ``None``.
    calibration: NullSpaceCalibration | None


def run_method(
    method: str,
    model: nn.Module,
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    *,
    recipe: UnlearnRecipe | MethodRecipe | None = None,
    callbacks: list[Callback] | None = None,
    data_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    forget_train_classes: list[int] | None = None,
    model_seed: int | None = None,
    trainer_options: dict[str, Any] | None = None,
    module_options: dict[str, Any] | None = None,
) -> UnlearningRun:
    """Unlearn ``forget`` from a copy of the trained ``model`` with one method.

    UNSC, its ablations and the baselines go through the same steps: the data module of the
    split the method trains on, the seed, a copy of the model, the method's module (and, for
    UNSC, the :class:`~unsc_lightning.NullSpaceCalibration` callback), one timed fit.

    Args:
        method: a name of :data:`~unsc_lightning.lab.recipes.METHODS` other than
            ``"original"`` and ``"retrain"``.
        model: the trained original; it is not modified.
        dataset: embedded data set name.
        forget: what to forget.
        seed: seed of the splits and of training.
        recipe: an :class:`~unsc_lightning.lab.recipes.UnlearnRecipe` for UNSC and its ablations
            (default :func:`~unsc_lightning.lab.recipes.unlearn_recipe`), a
            :class:`~unsc_lightning.lab.recipes.MethodRecipe` for a baseline (default
            :func:`~unsc_lightning.lab.recipes.method_recipe`).
        callbacks: extra trainer callbacks (e.g. a stopping rule).
        data_options: data module arguments (e.g. ``{"num_samples": 1000}``).
        progress: ``progress(epoch_done, max_epochs)`` after every epoch.
        forget_train_classes: keep only these classes' samples in the forget split (a sequential
            request: the classes of earlier requests stay forgotten, their data are gone).
        model_seed: seed of the training randomness (order, random labels) when it should differ
            from the split ``seed`` (default ``seed``).
        trainer_options: :func:`make_trainer` options over its quiet defaults (e.g.
            ``{"limit_val_batches": 1.0}`` to validate every epoch).
        module_options: further keyword arguments of the method's module (e.g.
            ``{"full_val_every_n_epochs": 1}`` for UNSC).

    Returns:
        The unlearned model, the seconds of the fit and the null-space callback (if any).

    Raises:
        UnlearningConfigError: for an unknown or reference method, or a recipe of the wrong kind.
    """
    info = _unlearning_method(method)
    settings = _recipe_of(method, info, dataset, recipe)
    train_on = "forget" if info.module is None else info.module.train_on
    dm = make_datamodule(
        dataset, forget, seed, train_on, settings.batch_size, **(data_options or {})
    )
    if forget_train_classes is not None:
        restrict_forget_split(dm, forget_train_classes)
    _reseed_training(dm, model_seed)
    L.seed_everything(seed if model_seed is None else model_seed, workers=True, verbose=False)
    unlearned = copy.deepcopy(model)
    training_seed = seed if model_seed is None else model_seed
    module, calibration = _build(
        info, unlearned, dm.num_classes, forget, training_seed, settings, module_options or {}
    )
    extra: list[Callback] = [calibration] if calibration is not None else []
    trainer = make_trainer(
        settings.epochs,
        [*extra, *(callbacks or []), EpochProgress(progress)],
        **(trainer_options or {}),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    unlearned.eval()
    return UnlearningRun(unlearned, seconds, calibration)


def _unlearning_method(method: str) -> MethodInfo:
    if method not in METHODS or METHODS[method].kind == "reference":
        raise UnlearningConfigError(
            f"Expected `method` to be one of {list(UNLEARNING_METHODS)}, got {method!r} "
            "(the original and retrained models come from `train_classifier`)."
        )
    return METHODS[method]


def _recipe_of(
    method: str, info: MethodInfo, dataset: str, recipe: UnlearnRecipe | MethodRecipe | None
) -> UnlearnRecipe | MethodRecipe:
    expected = UnlearnRecipe if info.kind == "unsc" else MethodRecipe
    if recipe is None:
        return (
            unlearn_recipe(method, dataset)
            if info.kind == "unsc"
            else method_recipe(method, dataset)
        )
    if not isinstance(recipe, expected):
        raise UnlearningConfigError(
            f"Expected `recipe` to be a {expected.__name__} for `method={method!r}`, "
            f"got {type(recipe).__name__}."
        )
    return recipe


def _build(
    info: MethodInfo,
    model: nn.Module,
    num_classes: int,
    forget: ForgetSpec,
    seed: int,
    recipe: UnlearnRecipe | MethodRecipe,
    options: dict[str, Any] | None = None,
) -> tuple[L.LightningModule, NullSpaceCalibration | None]:
    """The method's LightningModule around ``model`` and, for UNSC, its null-space callback;
    ``options`` are further keyword arguments of the module."""
    options = options or {}
    forget_classes = forget.forgotten_classes or None
    if isinstance(recipe, UnlearnRecipe):
        module = UnlearningModule(
            model,
            num_classes=num_classes,
            forget_classes=forget_classes,
            lr=recipe.lr,
            optimizer="sgd",
            pseudo_labels=info.pseudo_labels,  # type: ignore[arg-type]
            seed=seed,
            # the recipe's fixed epochs: demo and bench numbers stay comparable
            **{"stop_at_target": False, **options},
        )
        if not info.null_space:
            return module, None
        calibration = NullSpaceCalibration(
            threshold=recipe.threshold,
            class_threshold_step=recipe.class_threshold_step,
            rule=recipe.rule,  # type: ignore[arg-type]
        )
        return module, calibration
    if info.module is None:
        raise UnlearningConfigError(f"`{info.label}` names no module to run.")
    # Lightning keeps the modes it is given: the baselines train the copy in train mode (their
    # `norm_eval` then keeps normalisation layers in eval mode); UNSC's copy keeps the original's
    # eval mode, as it always has.
    model.train()
    return info.module(
        model,
        num_classes=num_classes,
        forget_classes=forget_classes,
        lr=recipe.lr,
        seed=seed,
        **{**recipe.options, **options},
    ), None
