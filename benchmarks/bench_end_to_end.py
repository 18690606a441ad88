"""UNSC end to end (bases + unlearning) against retraining from scratch, on MNIST-1D.

Uses :mod:`unsc_lightning.lab` exactly as the ``bench`` command does: the original model
is trained on all training data, the retrained model on the remaining data only (same recipe),
and UNSC unlearns a copy of the original with the MNIST-1D recipe (``UnlearnRecipe``). Reported:
wall time of each (the whole call and the ``Trainer.fit`` part), remaining- and forgotten-class
test accuracy, and UNSC's breakdown — trainer construction and data set-up, the covariance pass
over the remaining data, the eigendecompositions, the unlearning epochs, and what is left.

Example:
    python benchmarks/bench_end_to_end.py --threads 1 --json bench_end_to_end.json
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import lightning.pytorch as L
import torch
from _common import machine, parser, setup, table, write_json

from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED
from unsc_lightning.lab.runs import make_datamodule, run_method, train_classifier
from unsc_lightning.lab.scoring import evaluate


class PhaseTimer(L.Callback):
    """Timestamps of the fit phases (placed after `NullSpaceCalibration` in the callback list)."""

    def __init__(self) -> None:
        self.stamps: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stamps.setdefault("setup", time.perf_counter())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["fit_start"] = time.perf_counter()  # the calibration's bases are built

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["train_start"] = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["train_end"] = time.perf_counter()


@torch.no_grad()
def plain_pass_seconds(model: torch.nn.Module, loader: Any) -> float:
    """A plain no-grad forward pass over ``loader`` (data loading included): the cost floor."""
    model.eval()
    start = time.perf_counter()
    for inputs, _ in loader:
        model(inputs)
    return time.perf_counter() - start


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--forget-class", type=int, default=3)
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples generated")
    args.add_argument(
        "--unlearn-epochs", type=int, default=None, help="override the recipe's epochs"
    )
    options = args.parse_args()
    device = setup(options)
    if device.type != "cpu":
        print(
            "note: unsc_lightning.lab trains on the CPU (make_trainer); --device is recorded only"
        )
    forget = ForgetSpec(kind="class", classes=[options.forget_class])
    data = {"num_samples": options.num_samples}
    seed = options.seed
    recipe = EMBEDDED["mnist1d"]["unlearn"]
    if options.unlearn_epochs is not None:
        recipe = replace(recipe, epochs=options.unlearn_epochs)

    original, original_fit_s, _ = train_classifier(
        "mnist1d", forget, seed, "all", data_options=data
    )

    start = time.perf_counter()
    retrained, retrain_fit_s, _ = train_classifier(
        "mnist1d", forget, seed, "retain", data_options=data
    )
    retrain_wall = time.perf_counter() - start

    timer = PhaseTimer()
    start = time.perf_counter()
    with nullcontext():
        unlearned, unsc_fit_s, callback = run_method(
            "unsc",
            original,
            "mnist1d",
            forget,
            seed,
            recipe=recipe,
            callbacks=[timer],
            data_options=data,
        )
    unsc_wall = time.perf_counter() - start

    dm = make_datamodule("mnist1d", forget, seed, "forget", recipe.batch_size, **data)
    scores = {
        name: evaluate(model, dm)
        for name, model in (("original", original), ("retrain", retrained), ("unsc", unlearned))
    }
    sizes = dm.split_sizes()
    floor_s = plain_pass_seconds(original, dm.retain_dataloader())
    stamps = timer.stamps
    bases_s = stamps["fit_start"] - stamps["setup"]
    breakdown = {
        "covariance_pass_s": bases_s - callback.engine.timings["bases"],
        "eigendecomposition_s": callback.engine.timings["bases"],
        "unlearning_epochs_s": stamps["train_end"] - stamps["train_start"],
    }
    # the rest: data module and Trainer construction, model copy, Lightning's fit set-up/teardown
    breakdown["trainer_setup_and_rest_s"] = unsc_wall - sum(breakdown.values())
    rows = [
        {
            "method": "retrain",
            "wall_s": retrain_wall,
            "fit_s": retrain_fit_s,
            "acc_r": scores["retrain"]["acc_r"],
            "acc_f": scores["retrain"]["acc_f"],
        },
        {
            "method": "unsc",
            "wall_s": unsc_wall,
            "fit_s": unsc_fit_s,
            "acc_r": scores["unsc"]["acc_r"],
            "acc_f": scores["unsc"]["acc_f"],
        },
        {
            "method": "original",
            "wall_s": float("nan"),
            "fit_s": original_fit_s,
            "acc_r": scores["original"]["acc_r"],
            "acc_f": scores["original"]["acc_f"],
        },
    ]
    ratio = unsc_wall / retrain_wall
    print(table(rows, ["method", "wall_s", "fit_s", "acc_r", "acc_f"]))
    print(
        table(
            [
                {"phase": k, "seconds": v, "share_of_unsc": v / unsc_wall}
                for k, v in breakdown.items()
            ],
            ["phase", "seconds", "share_of_unsc"],
        )
    )
    print(
        f"UNSC / retrain wall time: {ratio:.3f}; remaining samples {sizes['train_retain']}, "
        f"forget samples {sizes['train_forget']}"
    )
    print(f"plain no-grad pass over the retain loader: {floor_s:.3g} s")
    write_json(
        options.json,
        {
            "benchmark": "bench_end_to_end",
            "dataset": "mnist1d",
            "forget_class": options.forget_class,
            "seed": seed,
            "num_samples": options.num_samples,
            "splits": sizes,
            "unlearn_recipe": vars(recipe) if hasattr(recipe, "__dict__") else str(recipe),
            "retrain_recipe": vars(EMBEDDED["mnist1d"]["train"]),
            "results": rows,
            "unsc_breakdown": breakdown,
            "unsc_over_retrain_wall": ratio,
            "unsc_over_retrain_fit": unsc_fit_s / retrain_fit_s,
            "plain_no_grad_pass_over_retain_loader_s": floor_s,
            "covariance_pass_over_plain_pass": breakdown["covariance_pass_s"] / floor_s,
            "retain_samples_in_bases": callback.retain_samples,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
