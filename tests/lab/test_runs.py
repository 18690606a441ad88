"""`lab.runs.run_method` passes Trainer and module options through (issue 13's benchmarks)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import pytest

from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.recipes import EMBEDDED, UnlearnRecipe
from unsc_lightning.lab.runs import run_method

pytestmark = pytest.mark.filterwarnings(
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training"
)


class Seen(L.Callback):
    """What the fit ran with: the module's validation schedule, the trainer's validation limit,
    and how many validation epochs logged the membership attack."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {"attack_epochs": 0}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen["every"] = getattr(pl_module, "full_val_every_n_epochs", "missing")
        self.seen["stop_at_target"] = pl_module.hparams.get("stop_at_target")
        self.seen["relative_step"] = pl_module.hparams.get("relative_step")
        self.seen["limit_val_batches"] = trainer.limit_val_batches

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and getattr(pl_module, "full_validation", False):
            self.seen["attack_epochs"] += 1


@pytest.mark.parametrize(
    ("trainer_options", "module_options", "expected"),
    [
        ({}, {}, {"every": None, "stop_at_target": False, "limit_val_batches": 0}),
        (
            {"limit_val_batches": 1.0},
            {"full_val_every_n_epochs": 1, "relative_step": 0.02},
            {"every": 1, "stop_at_target": False, "limit_val_batches": 1.0, "attack_epochs": 2},
        ),
    ],
    ids=["lab-defaults", "validated"],
)
def test_run_method_passes_trainer_and_module_options(trainer_options, module_options, expected):
    model = EMBEDDED["digits"]["model"](10).eval()
    seen = Seen()
    run = run_method(
        "unsc",
        model,
        "digits",
        ForgetSpec(kind="class", classes=[3]),
        0,
        recipe=UnlearnRecipe(epochs=2, lr=1e-4, batch_size=64),
        callbacks=[seen],
        trainer_options=trainer_options,
        module_options=module_options,
    )
    assert run.calibration is not None
    for key, value in expected.items():
        assert seen.seen[key] == value, key
    # module options add to the recipe's arguments (the lab's fixed epochs stay)
    assert seen.seen["relative_step"] == module_options.get("relative_step", 0.01)
