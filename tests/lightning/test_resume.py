"""Resuming an unlearning run from a Lightning checkpoint: same bases, same θ_o, same final weights.

`test_callback.py` covers the callback's `state_dict` and a resume that only checks the bases;
here an unlearning run is interrupted after epoch k -- by `ModelCheckpoint(every_n_epochs=1)`
files and by a crash with `save_last=True` -- and resumed with `fit(ckpt_path=...)` from fresh
objects, against an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    NUM_RETAIN,
    RaisingLoader,
    SubspaceProblem,
    logits_of,
    max_relative_change,
    mlp,
    quiet_trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.pseudo_labels import unsc_pseudo_labels

EPOCHS = 6
STOP_AFTER = 3  # epochs done before the interruption
EXACT = 1e-5


def unlearning_module(seed: int = 0) -> UnlearningModule:
    torch.manual_seed(seed)
    # momentum: the optimizer state must come back from the checkpoint too
    return UnlearningModule(
        mlp(), NUM_CLASSES, [FORGET_CLASS], lr=0.05, momentum=0.9, stop_at_target=False
    )


def forget_loader(problem: SubspaceProblem) -> DataLoader:
    # no shuffling: a resumed DataLoader does not replay the generator state of an uninterrupted
    # one, so a shuffled order would differ after the resume (a Lightning/DataLoader property)
    return DataLoader(TensorDataset(problem.forget_x, problem.forget_y), batch_size=8)


def calibration(retain: Any) -> NullSpaceCalibration:
    return NullSpaceCalibration(threshold=1.0, retain_dataloader=retain)


def checkpointing_trainer(tmp_path: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1, save_last=True
    )
    return quiet_trainer(EPOCHS, [*callbacks, checkpoints], enable_checkpointing=True, **kwargs)


def weights(module: L.LightningModule) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def max_abs_difference(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(
        float((first[k].double().cpu() - second[k].double().cpu()).abs().max())
        for k in first
        if first[k].is_floating_point()
    )


class _CrashAtEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"pre-empted at epoch {self.epoch}")


class _PseudoLabelSpy(L.Callback):
    """Records the pseudo-labels of every training batch."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.used: list[Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs, labels = batch
        self.inputs.append(inputs.cpu().clone())
        self.used.append(pl_module.pseudo_label(inputs, labels).cpu())


def labels_of(model: torch.nn.Module, inputs: Tensor) -> Tensor:
    return unsc_pseudo_labels(
        logits_of(model, inputs), torch.full((len(inputs),), FORGET_CLASS), [FORGET_CLASS]
    )


def uninterrupted_original(run: dict[str, Any]) -> torch.nn.Module:
    model = mlp()
    model.load_state_dict(run["initial"])
    return model


@pytest.fixture
def uninterrupted(problem: SubspaceProblem, tmp_path: Path) -> dict[str, Any]:
    module = unlearning_module()
    initial = weights(module.model)
    callback = calibration(problem.retain_loader())
    checkpointing_trainer(tmp_path / "full", [callback]).fit(
        module, train_dataloaders=forget_loader(problem)
    )
    return {
        "initial": initial,
        "final": weights(module),
        "bases": dict(callback.bases),
        "dir": tmp_path / "full",
    }


@pytest.mark.parametrize("interruption", ["every_n_epochs", "crash_then_last"])
def test_resume_mid_unlearning_gives_uninterrupted_weights(
    problem, tmp_path, uninterrupted, interruption
):
    if interruption == "every_n_epochs":
        path = uninterrupted["dir"] / f"epoch={STOP_AFTER - 1}.ckpt"
    else:
        first = calibration(problem.retain_loader())
        crashed = unlearning_module()
        trainer = checkpointing_trainer(tmp_path / "crash", [first, _CrashAtEpoch(STOP_AFTER)])
        with pytest.raises(RuntimeError, match="pre-empted"):
            trainer.fit(crashed, train_dataloaders=forget_loader(problem))
        assert trainer.interrupted and trainer.current_epoch == STOP_AFTER
        path = tmp_path / "crash" / "last.ckpt"
    assert torch.load(path, weights_only=False)["epoch"] == STOP_AFTER - 1

    resumed = calibration(RaisingLoader())  # the retain data must not be read again
    fresh = unlearning_module(seed=5)  # other weights: everything has to come from the checkpoint
    spy = _PseudoLabelSpy()
    quiet_trainer(EPOCHS, [resumed, spy]).fit(
        fresh, train_dataloaders=forget_loader(problem), ckpt_path=path
    )

    # bases reused, bitwise, with their sample count
    assert resumed.bases.keys() == uninterrupted["bases"].keys()
    for name, basis in uninterrupted["bases"].items():
        assert torch.equal(resumed.bases[name], basis), name
    assert resumed.retain_samples == NUM_RETAIN
    # the final weights are those of the uninterrupted run (same float ops in the same order)
    assert max_abs_difference(weights(fresh), uninterrupted["final"]) == 0.0
    # θ_o came back from the checkpoint: the original before unlearning, neither the partially
    # unlearned weights stored at epoch k nor the copy `fresh` made of its own model
    at_epoch_k = torch.load(path, weights_only=False)["state_dict"]
    assert max_abs_difference(weights(fresh.original), uninterrupted["initial"]) == 0.0
    assert (
        max_abs_difference(
            weights(fresh.original), {k: at_epoch_k[f"model.{k}"] for k in uninterrupted["initial"]}
        )
        > 1e-3
    )
    stale_copy = unlearning_module(seed=5).original
    assert all(
        torch.equal(used, labels_of(uninterrupted_original(uninterrupted), x))
        for used, x in zip(spy.used, spy.inputs)
    )
    assert any(
        not torch.equal(used, labels_of(stale_copy, x)) for used, x in zip(spy.used, spy.inputs)
    )
    assert (
        max_relative_change(
            logits_of(fresh.original, problem.retain_x), logits_of(fresh.model, problem.retain_x)
        )
        <= EXACT
    )


def test_resume_with_other_layers_raises_before_training(problem, uninterrupted):
    """Same architecture, other constrained layers: the stored bases do not fit and are not used."""
    path = uninterrupted["dir"] / f"epoch={STOP_AFTER - 1}.ckpt"
    other = NullSpaceCalibration(
        threshold=1.0, exclude_layers=["model.4"], retain_dataloader=RaisingLoader()
    )
    module = unlearning_module()
    before = weights(module)
    with pytest.raises(
        ValueError,
        match=r"built for another model, layer set or settings .* resume with the same model",
    ):
        quiet_trainer(EPOCHS, [other]).fit(
            module, train_dataloaders=forget_loader(problem), ckpt_path=path
        )
    assert other.bases == {}
    assert all(p.requires_grad for p in module.model.parameters())  # released after the error
    checkpoint_model = torch.load(path, weights_only=False)["state_dict"]
    # weights as restored from the checkpoint: no step was taken
    assert max_abs_difference(weights(module), {k: checkpoint_model[k] for k in before}) == 0.0
