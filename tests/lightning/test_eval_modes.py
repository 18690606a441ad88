"""Lightning warns at the start of training about every module in eval mode ("Found N module(s)
in eval mode at the start of training"). The library keeps two kinds in eval on purpose:
``UnlearningModule``'s frozen original and, under ``NullSpaceCalibration``, the normalisation
layers. They must not raise that warning (it would follow every fit), must still be in eval for
every training forward, and a module the *user* left in eval must still be reported."""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    BoringClassifier,
    SubspaceProblem,
    make_subspace_problem,
    mlp,
    test_accelerator,
)
from torch import nn

from unsc_lightning import NullSpaceCalibration, UnlearningModule

EVAL_WARNING = "module(s) in eval mode at the start of training"


@pytest.fixture
def problem() -> SubspaceProblem:
    return make_subspace_problem()


def _modes_while_training(module: nn.Module, with_grad_only: bool = True) -> list[bool]:
    """Registers a forward pre-hook recording ``module.training`` at each forward with autograd
    on (training steps; validation and the basis pass run without grad), or at every forward."""
    seen: list[bool] = []

    def record(layer: nn.Module, _: object) -> None:
        if torch.is_grad_enabled() or not with_grad_only:
            seen.append(layer.training)

    module.register_forward_pre_hook(record)
    return seen


def _fit(problem: SubspaceProblem, module: L.LightningModule, calibrate: bool) -> list[str]:
    callbacks: list[L.Callback] = []
    if calibrate:
        callbacks.append(NullSpaceCalibration(retain_dataloader=problem.retain_loader()))
    trainer = L.Trainer(
        max_epochs=2,
        accelerator=test_accelerator(),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2,  # a validation before training: modes are captured and restored
    )
    retain, forget = problem.retain_loader(), problem.forget_loader()
    val = [retain, forget, retain, forget] if isinstance(module, UnlearningModule) else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train_dataloaders=forget, val_dataloaders=val)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("calibrate", [True, False])
def test_unlearning_module_keeps_its_eval_modules_without_the_warning(problem, calibrate):
    torch.manual_seed(0)
    model = mlp(batch_norm=True)
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    norm = model[1]
    statistics = norm.running_mean.clone()
    norm_modes = _modes_while_training(norm)
    # the original labels without grad: every one of its forwards
    original_modes = _modes_while_training(module.original, with_grad_only=False)

    messages = _fit(problem, module, calibrate)

    assert not [m for m in messages if EVAL_WARNING in m]
    # the original always in eval; the model's batch norm in eval for every training forward
    # under the calibration (norm_eval), in train without it
    assert original_modes and not any(original_modes)
    assert norm_modes and all(mode is not calibrate for mode in norm_modes)
    assert torch.equal(norm.running_mean, statistics) is calibrate
    assert not any(m.training for m in module.original.modules())


def test_plain_lightning_module_with_the_callback_keeps_norm_layers_in_eval_without_the_warning(
    problem,
):
    torch.manual_seed(0)
    module = BoringClassifier(mlp(batch_norm=True), lr=0.1)
    norm = module.model[1]
    statistics = norm.running_var.clone()
    norm_modes = _modes_while_training(norm)

    messages = _fit(problem, module, calibrate=True)

    assert not [m for m in messages if EVAL_WARNING in m]
    assert norm_modes and not any(norm_modes)
    assert torch.equal(norm.running_var, statistics)
    assert norm.training  # the user's mode is back after the fit


def test_a_module_the_user_left_in_eval_is_still_reported(problem):
    torch.manual_seed(0)
    model = mlp(batch_norm=True, dropout=0.2)
    model[3].eval()  # the user's own choice: the first Dropout
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)

    messages = _fit(problem, module, calibrate=True)

    assert [m for m in messages if "Found 1 module(s) in eval mode" in m]
