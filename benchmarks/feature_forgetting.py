"""Feature-level forgetting (issue 16): does a linear probe still find the forgotten class?

For each data set (MNIST-1D, digits; forget class 3, the ``EMBEDDED`` UNSC recipe with SGD, no
early stop) this trains the original and the retrained model (cached), unlearns with UNSC with and
without ``UnlearningModule(feature_calibration=w)`` and reports for each model: remaining accuracy,
head accuracy on the forgotten class, the forgotten-class test accuracy of a linear probe on the
penultimate features (``lab.scoring.recovery``: standardised logistic regression on remaining and
forgotten training data), relearning steps and MIA-efficacy.

    python benchmarks/feature_forgetting.py --datasets mnist1d digits --seeds 0 1 2 \\
        --weights 0 1 --json ff.json

``benchmarks/feature_objectives.py`` holds the other objectives that were tried.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from _common import parser, setup, table, write_json
from torch import nn

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED
from unsc_lightning.lab.runs import make_datamodule, make_trainer, train_classifier
from unsc_lightning.lab.scoring import evaluate, mia_efficacy_of, recovery

FORGET = 3
COLUMNS = ["dataset", "seed", "model", "acc_r", "head_acc_f", "probe_acc_f", "relearn", "mia"]


def unlearn(original: nn.Module, dm: Any, dataset: str, seed: int, weight: float) -> nn.Module:
    """UNSC with the data set's fixed recipe and ``feature_calibration=weight``."""
    recipe = EMBEDDED[dataset]["unlearn"]
    L.seed_everything(seed, verbose=False)
    model = copy.deepcopy(original)
    module = UnlearningModule(
        model,
        num_classes=dm.num_classes,
        forget_classes=[FORGET],
        lr=recipe.lr,
        optimizer="sgd",
        stop_at_target=False,
        seed=seed,
        feature_calibration=weight,
    )
    callback = NullSpaceCalibration(
        threshold=recipe.threshold,
        class_threshold_step=recipe.class_threshold_step,
        rule=recipe.rule,
        log_drift=False,
    )
    make_trainer(recipe.epochs, [callback]).fit(module, datamodule=dm)
    return model


def scored(model: nn.Module, dm: Any, original_acc_f: float, seed: int) -> dict[str, Any]:
    accuracy = evaluate(model, dm)
    found = recovery(model, dm, original_acc_f, seed=seed)
    return {
        "acc_r": round(accuracy["acc_r"], 2),
        "head_acc_f": round(accuracy["acc_f"], 2),
        "probe_acc_f": round(found["probe_acc_f"], 1),
        "relearn": found["relearn_steps"],
        "mia": round(mia_efficacy_of(model, dm, seed=seed), 1),
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--datasets", nargs="+", default=["mnist1d"])
    args.add_argument("--seeds", nargs="+", type=int, default=[0])
    args.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0])
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_ff_cache"))
    options = args.parse_args()
    setup(options)
    forget = ForgetSpec(kind="class", classes=[FORGET])
    rows: list[dict[str, Any]] = []
    for dataset in options.datasets:
        batch_size = EMBEDDED[dataset]["unlearn"].batch_size
        for seed in options.seeds:
            dm = make_datamodule(dataset, forget, seed, "forget", batch_size)
            dm.setup("fit")
            original, _, _ = train_classifier(dataset, forget, seed, "all", options.cache_dir)
            retrain, _, _ = train_classifier(dataset, forget, seed, "retain", options.cache_dir)
            original_acc_f = evaluate(original, dm)["acc_f"]
            models: dict[str, tuple[nn.Module, float]] = {
                "original": (original, 0.0),
                "retrain": (retrain, 0.0),
            }
            for weight in options.weights:
                start = time.perf_counter()
                model = unlearn(original, dm, dataset, seed, weight)
                models[f"unsc (feature_calibration={weight:g})"] = (
                    model,
                    time.perf_counter() - start,
                )
            for name, (model, seconds) in models.items():
                row = {"dataset": dataset, "seed": seed, "model": name, "seconds": seconds}
                rows.append(row | scored(model, dm, original_acc_f, seed))
                print(rows[-1], flush=True)
    print(table(rows, COLUMNS))
    write_json(options.json, {"results": rows})


if __name__ == "__main__":
    main()
