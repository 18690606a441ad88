"""UNSC's wall time against its own floor, and what validation adds to a fit (MNIST-1D).

The floor of UNSC is what any forget-stage method that reads the remaining data once must pay:
one plain no-grad forward pass over the remaining training data (the loader the bases are built
from) plus the unlearning epochs UNSC ran, over the forget data, *without* the null-space
callback (the same ``UnlearningModule``, recipe and Trainer settings). UNSC's time is its whole
``Trainer.fit``, bases included. All runs are interleaved in one process and the fastest of
``--repeats`` is kept for each (the machine is shared: the least disturbed run).

Where the excess goes (UNSC minus floor): the covariance pass (the basis pass over the remaining
data minus a plain forward pass over it), the eigendecompositions, the projection inside the
unlearning epochs (UNSC's epochs minus the floor's) and the rest (Lightning set-up and tear-down,
the callback's bookkeeping).

``unsc_unmerged``: the same UNSC fit with one basis-pass forward per retain batch (the pass
before small batches were merged, ``basis_pass.MERGE_SAMPLES`` patched to 1), in the same
process.

Validation: the same UNSC fit with Lightning's default validation (every epoch, all of the data
module's evaluation loaders, the default two sanity batches) under ``UnlearningModule``'s
default schedule (the held-out forgotten-class accuracy every epoch, the full report -- remaining
accuracy, per class, threshold attack, AUROC -- on the last validation) and with
``full_val_every_n_epochs=1`` (the full report every epoch: the schedule before issue 13).

Example:
    python benchmarks/bench_floor.py --threads 1 --json docs/results/bench_floor.json
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

from _common import (
    PhaseTimer,
    best,
    machine,
    parser,
    plain_pass_seconds,
    setup,
    table,
    trainer_options,
    write_json,
)

from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED, unlearn_recipe
from unsc_lightning.lab.runs import make_datamodule, run_method, train_classifier
from unsc_lightning.lab.scoring import evaluate
from unsc_lightning.nullspace import basis_pass


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--forget-class", type=int, default=3)
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--num-samples", type=int, default=10_000, help="MNIST-1D samples generated")
    args.set_defaults(repeats=5)
    options = args.parse_args()
    device = setup(options)
    forget = ForgetSpec(kind="class", classes=[options.forget_class])
    data = {"num_samples": options.num_samples}
    seed = options.seed
    recipe = EMBEDDED["mnist1d"]["unlearn"]
    original, _, _ = train_classifier("mnist1d", forget, seed, "all", data_options=data)
    dm = make_datamodule("mnist1d", forget, seed, "forget", recipe.batch_size, **data)
    sizes = dm.split_sizes()
    validate = {"limit_val_batches": 1.0, "num_sanity_val_steps": 2}

    def fit(method: str, **kwargs: Any) -> tuple[float, PhaseTimer, Any]:
        timer = PhaseTimer()
        kwargs.setdefault("recipe", recipe)
        kwargs["trainer_options"] = {**trainer_options(device), **kwargs.get("trainer_options", {})}
        run = run_method(method, original, "mnist1d", forget, seed, callbacks=[timer], **kwargs)
        return run.seconds, timer, run

    runs: dict[str, list[float]] = {}
    timers: dict[str, list[PhaseTimer]] = {}
    last: dict[str, Any] = {}
    configs = {
        "unsc": {},
        # the same module, recipe and Trainer without the null-space callback; its learning rate
        # is the ablation's (UNSC's 2.0 diverges to NaN without the projection): the same work
        "floor_epochs": {
            "method": "unsc_no_nullspace",
            "recipe": unlearn_recipe("unsc_no_nullspace", "mnist1d"),
        },
        # the same UNSC fit with one basis-pass forward per retain batch (before the eighth
        # pass merged small batches): what merging changed, in the same process
        "unsc_unmerged": {"merge_samples": 1},
        "unsc_val_default": {"trainer_options": validate},
        "unsc_val_full_every_epoch": {
            "trainer_options": validate,
            "module_options": {"full_val_every_n_epochs": 1},
        },
    }
    plain: list[float] = []
    for _ in range(options.repeats):
        plain.append(plain_pass_seconds(copy.deepcopy(original), dm.retain_dataloader(), device))
        for name, config in configs.items():
            config = dict(config)
            method = config.pop("method", "unsc")
            merge = basis_pass.MERGE_SAMPLES
            basis_pass.MERGE_SAMPLES = config.pop("merge_samples", merge)
            try:
                seconds, timer, run = fit(method, **config)
            finally:
                basis_pass.MERGE_SAMPLES = merge
            runs.setdefault(name, []).append(seconds)
            timers.setdefault(name, []).append(timer)
            last[name] = run

    def fastest(name: str) -> tuple[float, PhaseTimer]:
        index = min(range(len(runs[name])), key=runs[name].__getitem__)
        return runs[name][index], timers[name][index]

    unsc_s, unsc_timer = fastest("unsc")
    floor_fit_s, floor_timer = fastest("floor_epochs")
    plain_s = best(plain)
    floor_s = plain_s + floor_fit_s
    calibration = last["unsc"].calibration
    stamps, floor_stamps = unsc_timer.stamps, floor_timer.stamps

    def phases(stamps: dict[str, float], total: float) -> dict[str, float]:
        before = stamps["train_start"] - stamps["setup"]  # UNSC: the basis pass is in here
        epochs = stamps["train_end"] - stamps["train_start"]
        return {"before_training": before, "epochs": epochs, "rest": total - before - epochs}

    unsc_phases, floor_phases = phases(stamps, unsc_s), phases(floor_stamps, floor_fit_s)
    eigh_s = calibration.engine.timings["bases"]
    excess = {
        # the basis pass beyond what the floor's plain pass costs, eigendecompositions apart
        "covariance_pass_over_plain_pass_s": unsc_phases["before_training"]
        - floor_phases["before_training"]
        - eigh_s
        - plain_s,
        "eigendecompositions_s": eigh_s,
        "projection_in_epochs_s": unsc_phases["epochs"] - floor_phases["epochs"],
        "setup_teardown_and_rest_s": unsc_phases["rest"] - floor_phases["rest"],
    }
    epochs_used = unsc_timer.epochs
    if floor_timer.epochs != epochs_used:
        raise RuntimeError(f"the floor ran {floor_timer.epochs} epochs, UNSC {epochs_used}")

    val_rows = []
    for name in ("unsc_val_default", "unsc_val_full_every_epoch"):
        seconds, timer = fastest(name)
        val_rows.append(
            {
                "run": name,
                "fit_s": seconds,
                "over_fit_without_validation": seconds / unsc_s - 1,
                # the runs are interleaved: each repeat's pair ran back to back (less noise)
                "paired_median_over_fit_without_validation": statistics.median(
                    v / u - 1 for v, u in zip(runs[name], runs["unsc"])
                ),
                "validation_s": timer.validation_s,
                "validation_share_of_fit": timer.validation_s / seconds,
                "epochs_with_attack": sum("val/mia_efficacy" in k for k in timer.logged),
                "validation_epochs": len(timer.logged),
            }
        )
    scores = {
        name: evaluate(last[name].model, dm)
        for name in ("unsc", "unsc_val_default", "floor_epochs")
    }
    ratio = unsc_s / floor_s
    unmerged_s, _ = fastest("unsc_unmerged")
    paired_ratio = statistics.median(
        u / (p + f) for u, p, f in zip(runs["unsc"], plain, runs["floor_epochs"])
    )
    rows = [
        {"run": "UNSC Trainer.fit (bases included)", "seconds": unsc_s},
        {"run": "floor: plain no-grad pass over remaining data", "seconds": plain_s},
        {"run": "floor: same fit without the callback", "seconds": floor_fit_s},
        {"run": "floor total", "seconds": floor_s},
    ]
    print(table(rows, ["run", "seconds"]))
    print(
        table(
            [{"part": k, "seconds": v, "share_of_floor": v / floor_s} for k, v in excess.items()],
            ["part", "seconds", "share_of_floor"],
        )
    )
    print(f"UNSC / floor: {ratio:.3f}, paired median {paired_ratio:.3f} (target <= 1.2)")
    print(f"UNSC with one forward per retain batch / floor: {unmerged_s / floor_s:.3f}")
    print(
        table(
            val_rows,
            [
                "run",
                "fit_s",
                "over_fit_without_validation",
                "paired_median_over_fit_without_validation",
                "validation_share_of_fit",
                "epochs_with_attack",
                "validation_epochs",
            ],
        )
    )
    write_json(
        options.json,
        {
            "benchmark": "bench_floor",
            "dataset": "mnist1d",
            "forget_class": options.forget_class,
            "seed": seed,
            "num_samples": options.num_samples,
            "splits": sizes,
            "unlearn_recipe": vars(recipe),
            "epochs_used": epochs_used,
            "repeats": options.repeats,
            "floor_definition": (
                "plain no-grad forward pass over retain_dataloader() + Trainer.fit of the same "
                "UnlearningModule/recipe/Trainer without NullSpaceCalibration (method "
                "'unsc_no_nullspace' with UNSC's recipe), fastest of the repeats each"
            ),
            "unsc_fit_s": unsc_s,
            "floor_plain_pass_s": plain_s,
            "floor_fit_without_callback_s": floor_fit_s,
            "floor_s": floor_s,
            "unsc_over_floor": ratio,
            "unsc_over_floor_paired_median": paired_ratio,
            "unsc_unmerged_fit_s": unmerged_s,
            "unsc_unmerged_over_floor": unmerged_s / floor_s,
            "unsc_phases_s": unsc_phases,
            "floor_fit_phases_s": floor_phases,
            "excess_over_floor": excess,
            "all_runs_s": runs,
            "plain_pass_runs_s": plain,
            "validation": val_rows,
            # what the default schedule logged: keys of each epoch's validation
            "validation_keys_logged_default": [
                {"epoch": epoch, "keys": keys}
                for epoch, keys in enumerate(fastest("unsc_val_default")[1].logged)
                if epoch in (0, epochs_used - 1)
            ],
            "test_accuracy": scores,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
