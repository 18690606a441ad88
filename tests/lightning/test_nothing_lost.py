"""Nothing lost: the original's checkpoint, the user's model state and determinism.

- The original checkpoint an unlearning run loads from is byte-identical afterwards; the
  unlearned model is a new checkpoint of the run, holding the unlearned ``model.*`` and the
  original ``original.*`` weights.
- ``UnlearningModule`` trains the ``model`` it is given in place (documented); the original
  weights live on in ``module.original``.
- After ``fit``, ``validate``, ``test`` or an exception the user's model has the train/eval
  modes, ``requires_grad`` flags and hooks it had before (`test_callback.py` covers a
  `BoringClassifier` through fit and exceptions; here the `UnlearningModule` with a frozen copy).
- The same seed gives bitwise-identical unlearned weights.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as L
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    SubspaceProblem,
    forward_hook_count,
    mlp,
    quiet_trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import (
    ClassifierModule,
    NullSpaceCalibration,
    UnlearningConfigError,
    UnlearningModule,
)
from unsc_lightning.checkpoint import load_model_state


def state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same_state(first: dict[str, Tensor], second: dict[str, Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------
# The original checkpoint and the user's model object
# --------------------------------------------------------------------------------------------
def test_original_checkpoint_untouched_and_unlearned_model_in_a_new_checkpoint(problem, tmp_path):
    torch.manual_seed(0)
    original_run = quiet_trainer(2)
    original_run.fit(
        ClassifierModule(mlp(), NUM_CLASSES, lr=0.05), train_dataloaders=problem.retain_loader()
    )
    original_path = tmp_path / "original" / "model.ckpt"
    original_run.save_checkpoint(original_path)
    original_bytes = original_path.read_bytes()
    original_mtime = original_path.stat().st_mtime_ns

    user_model = mlp()
    module = UnlearningModule(
        user_model, NUM_CLASSES, [FORGET_CLASS], lr=0.05, original_checkpoint=str(original_path)
    )
    original_weights = state(user_model)  # loaded from the file at construction
    run_dir = tmp_path / "unlearning"
    checkpoints = ModelCheckpoint(dirpath=run_dir, save_last=True)
    calibration = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    quiet_trainer(5, [calibration, checkpoints], enable_checkpointing=True).fit(
        module, train_dataloaders=problem.forget_loader()
    )

    # the original's file: same bytes, not even rewritten
    assert original_path.read_bytes() == original_bytes
    assert original_path.stat().st_mtime_ns == original_mtime
    assert sorted(p.name for p in original_path.parent.iterdir()) == ["model.ckpt"]
    # the unlearned model: a new file of this run, with both the unlearned and the original weights
    unlearned_path = run_dir / "last.ckpt"
    assert unlearned_path.is_file() and unlearned_path.resolve() != original_path.resolve()
    assert not [
        p.name for p in run_dir.iterdir() if p.suffix != ".ckpt"
    ]  # no partial/temporary files
    reloaded = mlp()
    load_model_state(reloaded, unlearned_path)
    assert same_state(state(reloaded), state(user_model))
    load_model_state(reloaded, unlearned_path, prefix="original.")
    assert same_state(state(reloaded), original_weights)
    # documented behaviour: `model` is trained in place, the original lives on in `module.original`
    assert module.model is user_model
    assert not same_state(state(user_model), original_weights)
    assert same_state(state(module.original), original_weights)


# --------------------------------------------------------------------------------------------
# Modes, flags and hooks after fit, validate, test and an exception
# --------------------------------------------------------------------------------------------
def user_model() -> nn.Sequential:
    """A trained model as users hand it over: in eval mode, with a norm layer and dropout."""
    torch.manual_seed(0)
    model = mlp(batch_norm=True, dropout=0.1)
    model.eval()
    return model


def snapshot(
    module: UnlearningModule, optimizers: list[torch.optim.Optimizer] = ()
) -> dict[str, Any]:
    return {
        "modes": {name: m.training for name, m in module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "forward_hooks": forward_hook_count(module),
        "backward_hooks": sum(
            len(m._backward_hooks) + len(m._backward_pre_hooks) for m in module.modules()
        ),
        "tensor_hooks": sum(bool(p._backward_hooks) for p in module.parameters()),
        "step_hooks": sum(
            len(o._optimizer_step_pre_hooks) + len(o._optimizer_step_post_hooks) for o in optimizers
        ),
    }


def test_user_model_unchanged_after_fit_validate_and_test(problem):
    module = UnlearningModule(user_model(), NUM_CLASSES, [FORGET_CLASS], optimizer="adam", lr=1e-3)
    module.model[1].requires_grad_(False)  # a norm layer the user froze
    before = snapshot(module)
    assert not any(m.training for m in module.model.modules()) and before["forward_hooks"] == 0

    calibration = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    trainer = quiet_trainer(2, [calibration])
    trainer.fit(module, train_dataloaders=problem.forget_loader())
    assert calibration.active_mode == "update"  # optimizer step hooks were attached during the fit
    assert snapshot(module, trainer.optimizers) == before

    for run in (
        quiet_trainer(1, [calibration], limit_val_batches=None).validate,
        quiet_trainer(1, [calibration]).test,
    ):
        run(module, dataloaders=problem.retain_loader(), verbose=False)
        assert snapshot(module) == before


def test_user_model_unchanged_after_an_exception_inside_the_fit(problem):
    """The callback itself raises on the first batch, with optimizer step hooks attached."""
    module = UnlearningModule(user_model(), NUM_CLASSES, [FORGET_CLASS], optimizer="adamw", lr=1e-3)
    before = snapshot(module)
    weights = state(module.model)
    tokens = TensorDataset(torch.randn(16, 2, 20), torch.full((16,), FORGET_CLASS))  # 3-D inputs
    wide = DataLoader(tokens, batch_size=8)
    calibration = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    trainer = quiet_trainer(2, [calibration])

    try:
        trainer.fit(module, train_dataloaders=wide)
    except UnlearningConfigError as error:
        assert "per-sample input shape (20,) but the training batches have (2, 20)" in str(error)
    else:  # pragma: no cover - the shape check must fire
        raise AssertionError("expected the retain/training shape check to raise")

    assert calibration.active_mode == "update"
    assert snapshot(module, trainer.optimizers) == before
    assert same_state(state(module.model), weights)


def test_weights_projected_in_complement_form_unchanged_after_an_exception_before_any_step():
    # Ranks above d/2 project as (M Q) Qᵀ: projecting weights that never moved rounds them
    # (M - (M Q) Qᵀ + (M Q) Qᵀ is not M bit for bit), so a fit that stops before its first
    # optimizer step must not project at all.
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 8, generator=generator)
    retain_x = torch.randn(128, 6, generator=generator) @ mixing  # rank 6 of d = 8
    retain = DataLoader(TensorDataset(retain_x, torch.randint(1, 3, (128,))), batch_size=64)
    wide = DataLoader(TensorDataset(torch.randn(8, 2, 8), torch.zeros(8, dtype=torch.long)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    weights = state(model)
    module = UnlearningModule(model, 3, [0], optimizer="adamw", lr=1e-3)
    calibration = NullSpaceCalibration(threshold=1.0, rule="pooled", retain_dataloader=retain)
    trainer = quiet_trainer(1, [calibration])

    try:
        trainer.fit(module, train_dataloaders=wide)
    except UnlearningConfigError:
        pass
    else:  # pragma: no cover - the shape check must fire
        raise AssertionError("expected the retain/training shape check to raise")

    assert calibration.active_mode == "update"
    assert calibration.bases["model.0"].shape[1] > 4  # the complement form
    assert same_state(state(model), weights)


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------
def unlearn(problem: SubspaceProblem, seed: int) -> dict[str, Tensor]:
    """Seeded run with every source of randomness: init, dropout, random pseudo-labels, shuffling."""
    L.seed_everything(seed, verbose=False)
    model = mlp(dropout=0.2)
    module = UnlearningModule(
        model, NUM_CLASSES, [FORGET_CLASS], lr=0.05, momentum=0.9, pseudo_labels="random", seed=seed
    )
    module.train()
    calibration = NullSpaceCalibration(threshold=0.97, retain_dataloader=problem.retain_loader())
    quiet_trainer(5, [calibration], deterministic=True).fit(
        module, train_dataloaders=problem.forget_loader(seed=seed)
    )
    return state(model)


def test_same_seed_gives_bitwise_identical_unlearned_weights(problem):
    first, second = unlearn(problem, seed=3), unlearn(problem, seed=3)
    assert same_state(first, second)
    assert not same_state(first, unlearn(problem, seed=4))  # the seed does matter


def test_copy_of_user_model_keeps_it_unchanged(problem):
    """The documented way to keep one's own object: hand over a copy."""
    mine = user_model()
    mine_before = state(mine)
    module = UnlearningModule(copy.deepcopy(mine), NUM_CLASSES, [FORGET_CLASS], lr=0.05)
    calibration = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    quiet_trainer(2, [calibration]).fit(module, train_dataloaders=problem.forget_loader())
    assert same_state(state(mine), mine_before)
    assert not same_state(state(module.model), mine_before)
