"""Every method the bench compares, with its defaults on the embedded data, and one way to run it.

Defaults were tuned per embedded data set, forgetting class 3 (see :data:`BASELINE_RECIPES`);
the modules' constructor defaults are the MNIST-1D values. UNSC and its two ablations always use
the UNSC recipe ``experiment.EMBEDDED[dataset]["unlearn"]``, read when they run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from unsc_lightning.baselines.base import BaselineModule
from unsc_lightning.baselines.boundary_shrink import BoundaryShrink
from unsc_lightning.baselines.finetune import FineTune, L1Sparse
from unsc_lightning.baselines.gradient_ascent import GradientAscent
from unsc_lightning.baselines.random_labels import RandomLabels, SalUn
from unsc_lightning.baselines.scrub import SCRUB
from unsc_lightning.data import ForgetSpec
from unsc_lightning.errors import UnlearningConfigError

MethodKind = Literal["reference", "unsc", "baseline"]


@dataclass
class MethodRecipe:
    """How long and how fast a baseline trains, plus its own constructor options.

    Args:
        epochs: epochs over the split the method trains on (forget data, or remaining data for
            FT and ℓ1-sparse).
        lr: learning rate.
        batch_size: batch size of that split.
        options: further keyword arguments of the method's module.
    """

    epochs: int
    lr: float
    batch_size: int = 128
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    """A method's display label, its kind and (for baselines) its LightningModule."""

    label: str
    kind: MethodKind
    module: type[BaselineModule] | None = None
    pseudo_labels: str = "unsc"
    null_space: bool = True


METHODS: dict[str, MethodInfo] = {
    "original": MethodInfo("Original", "reference"),
    "retrain": MethodInfo("Retrain", "reference"),
    "unsc": MethodInfo("UNSC", "unsc"),
    "ft": MethodInfo("FT", "baseline", FineTune),
    "rl": MethodInfo("RL", "baseline", RandomLabels),
    "ga": MethodInfo("GA", "baseline", GradientAscent),
    "boundary_shrink": MethodInfo("Boundary Shrink", "baseline", BoundaryShrink),
    "l1_sparse": MethodInfo("ℓ1-sparse", "baseline", L1Sparse),
    "salun": MethodInfo("SalUn", "baseline", SalUn),
    "scrub": MethodInfo("SCRUB", "baseline", SCRUB),
    "unsc_random_labels": MethodInfo("UNSC, random labels", "unsc", pseudo_labels="random"),
    "unsc_no_nullspace": MethodInfo("UNSC, no null space", "unsc", null_space=False),
}

#: Tuned defaults per embedded data set. Forget-driven methods count epochs over the forget split
#: (MNIST-1D: ~720 samples of class 3, 6 batches; digits: ~110, 2 batches); FT and ℓ1-sparse over
#: the remaining data. Chosen by the smallest average gap to the retrained model (Acc_r, Acc_f,
#: MIA-efficacy) on seed 0, then checked on seeds 1-2 (MNIST-1D). What the search showed:
#:
#: - the original models are very confident (forget-class logits ~30), so every method that trains
#:   forget data toward other labels (RL, Boundary Shrink, SalUn) needs learning rates around
#:   1e-4 and still costs remaining accuracy: a forget-only update moves every class;
#: - GA is a cliff, not a slope: nothing happens until the forget samples flip, then remaining
#:   accuracy collapses within one or two steps (MNIST-1D lr 5e-3: 4 epochs collapse on some
#:   seeds, 3 epochs forget nothing); a per-sample loss ceiling (``loss_ceiling=log C``) did not
#:   help;
#: - SCRUB needs about 8 min steps per max step (the authors' full pass over the remaining data);
#:   it is a cliff too: MNIST-1D with one max epoch or lr <= 1e-3 forgets nothing, digits with 5
#:   max epochs (10 max steps) at lr 1e-2 collapses, with 4 it forgets only part of the class;
#: - FT does not forget on digits (the training loss is ~0, nothing moves); on MNIST-1D it does.
BASELINE_RECIPES: dict[str, dict[str, MethodRecipe]] = {
    "mnist1d": {
        "ft": MethodRecipe(epochs=5, lr=0.1),
        "rl": MethodRecipe(epochs=2, lr=1e-4),
        "ga": MethodRecipe(epochs=4, lr=5e-3),
        "boundary_shrink": MethodRecipe(epochs=6, lr=5e-5, options={"epsilon": 0.1}),
        "l1_sparse": MethodRecipe(epochs=5, lr=0.1, options={"alpha": 1e-4}),
        "salun": MethodRecipe(
            epochs=20, lr=1e-3, options={"mask_ratio": 0.5, "retain_weight": 1.0}
        ),
        "scrub": MethodRecipe(epochs=12, lr=3e-3, options={"max_epochs": 2, "min_steps": 8}),
    },
    "digits": {
        "ft": MethodRecipe(epochs=5, lr=0.1, batch_size=64),
        "rl": MethodRecipe(epochs=5, lr=1e-3, batch_size=64),
        "ga": MethodRecipe(epochs=8, lr=3e-2, batch_size=64),
        "boundary_shrink": MethodRecipe(
            epochs=12, lr=1e-3, batch_size=64, options={"epsilon": 0.1}
        ),
        "l1_sparse": MethodRecipe(epochs=10, lr=0.1, batch_size=64, options={"alpha": 1e-4}),
        "salun": MethodRecipe(
            epochs=20, lr=1e-3, batch_size=64, options={"mask_ratio": 0.5, "retain_weight": 1.0}
        ),
        "scrub": MethodRecipe(
            epochs=16, lr=1e-2, batch_size=64, options={"max_epochs": 4, "min_steps": 8}
        ),
    },
}

#: Methods in table order.
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
#: Methods that unlearn a trained model (everything but the two references).
UNLEARNING_METHODS: tuple[str, ...] = tuple(
    n for n, info in METHODS.items() if info.kind != "reference"
)


def method_recipe(method: str, dataset: str) -> MethodRecipe:
    """The tuned recipe of a baseline on an embedded data set (a copy, safe to modify)."""
    if method not in BASELINE_RECIPES.get(dataset, {}):
        raise UnlearningConfigError(
            f"No baseline recipe for `method={method!r}` on `dataset={dataset!r}`; baselines: "
            f"{sorted(BASELINE_RECIPES.get(dataset, {}))}, data sets: {sorted(BASELINE_RECIPES)}."
        )
    return copy.deepcopy(BASELINE_RECIPES[dataset][method])


def run_method(
    method: str,
    model: nn.Module,
    dataset: str,
    forget: ForgetSpec,
    seed: int,
    *,
    recipe: MethodRecipe | None = None,
    callbacks: list[Callback] | None = None,
    data_options: dict[str, Any] | None = None,
    progress: Any = None,
) -> tuple[nn.Module, float]:
    """Unlearn ``forget`` from a copy of the trained ``model`` with one method.

    Args:
        method: a name of :data:`METHODS` other than ``"original"`` and ``"retrain"``.
        model: the trained original; it is not modified.
        dataset: embedded data set name.
        forget: what to forget.
        seed: seed of the splits and of training.
        recipe: baseline recipe (default: :func:`method_recipe`); UNSC and its ablations always
            use ``experiment.EMBEDDED[dataset]["unlearn"]``.
        callbacks: extra trainer callbacks (e.g. :class:`StopAtHeldOutAccuracy`).
        data_options: data module arguments (e.g. ``{"num_samples": 1000}``).
        progress: ``progress(epoch_done, max_epochs)`` after every epoch.

    Returns:
        ``(unlearned model in eval mode, wall-clock seconds of the fit)``; the seconds include
        everything the method computes before training (UNSC bases, SalUn saliency).
    """
    from unsc_lightning.lab.runs import (
        EpochProgress,
        make_datamodule,
        make_trainer,
        run_unsc_variant,
    )

    if method not in METHODS or METHODS[method].kind == "reference":
        raise UnlearningConfigError(
            f"Expected `method` to be one of {list(UNLEARNING_METHODS)}, got {method!r} "
            "(the original and retrained models come from `experiment.train_classifier`)."
        )
    info = METHODS[method]
    if info.kind == "unsc":
        unlearned, seconds, _ = run_unsc_variant(
            model,
            dataset,
            forget,
            seed,
            progress=progress,
            pseudo_labels=info.pseudo_labels,
            null_space=info.null_space,
            callbacks=callbacks,
            data_options=data_options,
        )
        return unlearned, seconds
    recipe = recipe or method_recipe(method, dataset)
    module_cls = cast(type[BaselineModule], info.module)  # every "baseline" entry names one
    dm = make_datamodule(
        dataset, forget, seed, module_cls.train_on, recipe.batch_size, **(data_options or {})
    )
    L.seed_everything(seed, workers=True, verbose=False)
    unlearned = copy.deepcopy(model).train()  # Lightning keeps the modes it is given
    module = module_cls(
        unlearned,
        num_classes=dm.num_classes,
        forget_classes=forget.forgotten_classes or None,
        lr=recipe.lr,
        seed=seed,
        **recipe.options,
    )
    trainer = make_trainer(recipe.epochs, [*(callbacks or []), EpochProgress(progress)])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    unlearned.eval()
    return unlearned, seconds
