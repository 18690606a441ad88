"""Projection modes beyond `tests/test_callback.py`: why gradient projection fails with weight
decay, `auto` reporting its choice, and update projection for optimizers the module does not offer.

`tests/test_callback.py` already checks that ``mode="update"`` is exact for Adam, AdamW with
weight decay and SGD with weight decay, that ``mode="gradient"`` with Adam is not, and which mode
``auto`` picks per optimizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    BoringClassifier,
    SubspaceProblem,
    logits_of,
    max_relative_change,
    mean_relative_change,
    mlp,
    quiet_trainer,
)

from unsc_lightning import NullSpaceCalibration, UnlearningModule

EXACT = 1e-5  # relative change of remaining logits allowed (float32 rounding)
MOVED = 0.3  # forget logits must change by at least 30 %
EPOCHS = 20  # 16 forget samples, batch 8: 40 optimizer steps


def fit(
    problem: SubspaceProblem,
    module: L.LightningModule,
    callback: NullSpaceCalibration,
    epochs: int = EPOCHS,
    **trainer_kwargs: Any,
) -> tuple[float, float]:
    """Fit on the forget data; (max relative change of remaining logits, mean of forget ones)."""
    model = module.model
    retain_before = logits_of(model, problem.retain_x)
    forget_before = logits_of(model, problem.forget_x)
    quiet_trainer(epochs, [callback], **trainer_kwargs).fit(
        module, train_dataloaders=problem.forget_loader()
    )
    retain_change = max_relative_change(retain_before, logits_of(model, problem.retain_x))
    forget_change = mean_relative_change(forget_before, logits_of(model, problem.forget_x))
    return retain_change, forget_change


def unlearning_module(**kwargs: Any) -> UnlearningModule:
    torch.manual_seed(0)
    kwargs.setdefault("stop_at_target", False)  # fixed epochs: the outputs are measured after them
    return UnlearningModule(mlp(), num_classes=NUM_CLASSES, forget_classes=[FORGET_CLASS], **kwargs)


def boring(optimizer: Callable[..., torch.optim.Optimizer]) -> BoringClassifier:
    torch.manual_seed(0)
    return BoringClassifier(mlp(), optimizer=optimizer)


# --------------------------------------------------------------------------------------------
# Gradient projection is exact only when the optimizer step is a linear map of the gradient
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module_kwargs",
    [
        # AdamW: decoupled decay `w -= lr * wd * w` shrinks the weight along every direction,
        # the remaining subspace included; Adam's per-coordinate scaling also rotates the step.
        pytest.param(
            {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.1}, id="adamw-weight-decay"
        ),
        # SGD: `wd * w` is added to the (already projected) gradient inside `step()`.
        pytest.param({"optimizer": "sgd", "lr": 0.02, "weight_decay": 0.05}, id="sgd-weight-decay"),
    ],
)
def test_gradient_mode_leaves_the_null_space_when_the_step_is_not_the_gradient(
    problem, module_kwargs
):
    callback = NullSpaceCalibration(
        threshold=1.0, mode="gradient", retain_dataloader=problem.retain_loader()
    )

    retain_change, _ = fit(problem, unlearning_module(**module_kwargs), callback)

    assert callback.active_mode == "gradient"
    assert retain_change > 100 * EXACT


def test_auto_mode_with_adam_projects_updates_and_says_so(problem, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    callback = NullSpaceCalibration(
        threshold=1.0, mode="auto", retain_dataloader=problem.retain_loader()
    )

    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        retain_change, forget_change = fit(
            problem, unlearning_module(optimizer="adam", lr=2e-3), callback
        )

    assert callback.active_mode == "update"
    assert "mode='auto' chose 'update' projection for optimizers [Adam]" in caplog.text
    assert retain_change <= EXACT
    assert forget_change >= MOVED


# --------------------------------------------------------------------------------------------
# Update projection: exact for any optimizer, whatever it does inside `step()`
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param(
            lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, weight_decay=1e-2), id="rmsprop"
        ),
        pytest.param(lambda p: torch.optim.Adagrad(p, lr=0.05, weight_decay=1e-2), id="adagrad"),
        pytest.param(lambda p: torch.optim.NAdam(p, lr=2e-3, weight_decay=1e-2), id="nadam"),
        pytest.param(
            lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-2),
            id="sgd-nesterov-wd",
        ),
        # several closure evaluations and weight changes inside one `step()`
        pytest.param(lambda p: torch.optim.LBFGS(p, lr=0.2, max_iter=4), id="lbfgs"),
    ],
)
def test_update_mode_is_exact_for_other_optimizers(problem, optimizer):
    callback = NullSpaceCalibration(
        threshold=1.0, mode="update", retain_dataloader=problem.retain_loader()
    )

    retain_change, forget_change = fit(problem, boring(optimizer), callback, epochs=10)

    assert callback.active_mode == "update"
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_update_mode_is_exact_with_accumulation_and_value_clipping(problem):
    """Both act on gradients before `step()`; the update projection runs after it."""
    callback = NullSpaceCalibration(
        threshold=1.0, mode="update", retain_dataloader=problem.retain_loader()
    )
    module = unlearning_module(optimizer="adamw", lr=2e-3, weight_decay=0.1)

    retain_change, forget_change = fit(
        problem,
        module,
        callback,
        accumulate_grad_batches=2,
        gradient_clip_val=0.01,
        gradient_clip_algorithm="value",
    )

    assert retain_change <= EXACT
    assert forget_change >= MOVED


class _WeightCopies(L.Callback):
    """Records the weight copies (``W₀``) the calibration's engine holds after each step."""

    def __init__(self, calibration: NullSpaceCalibration) -> None:
        self.calibration = calibration
        self.held: list[tuple[int, ...]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        anchors = self.calibration.engine._anchors.values()
        self.held.append(tuple(anchor.data_ptr() for anchor in anchors))


def test_update_mode_holds_one_weight_copy_for_the_whole_fit(problem):
    """One copy of each constrained weight, made once (no copy per step), freed at the end."""
    callback = NullSpaceCalibration(
        threshold=1.0, mode="update", retain_dataloader=problem.retain_loader()
    )
    probe = _WeightCopies(callback)
    module = unlearning_module(optimizer="adam", lr=2e-3)

    quiet_trainer(2, [callback, probe]).fit(module, train_dataloaders=problem.forget_loader())

    assert len(probe.held) == 4 and len(set(probe.held)) == 1
    assert len(probe.held[0]) == len(callback.engine.constrained_parameters) == 3
    assert callback.engine._anchors == {}
