"""`project_every=K`: the optimizer steps freely and the weights are projected every K steps,
before validation, in every checkpoint and at the end of the fit (also after an exception).

Remaining outputs must be unchanged wherever the weights leave the fit (the final model, each
checkpoint file, what validation sees); between two projections they may move, and the first
test shows that they do (otherwise the amortisation would not be tested at all).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    BoringClassifier,
    SubspaceProblem,
    logits_of,
    max_relative_change,
    mean_relative_change,
    mlp,
    quiet_trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError
from unsc_lightning.nullspace.engine import NullSpaceEngine

EXACT = 1e-5  # relative change of remaining logits allowed (as for `mode="update"`)
MOVED = 0.3
EPOCHS = 20  # 16 forget samples, batch 8: 40 optimizer steps
EVERY = 4

OPTIMIZERS = [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.05), id="sgd"),
    pytest.param(
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, weight_decay=5e-2), id="sgd-momentum-wd"
    ),
    pytest.param(lambda p: torch.optim.Adam(p, lr=2e-3), id="adam"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.1), id="adamw"),
]


def boring(optimizer: Callable[..., torch.optim.Optimizer], **kwargs: Any) -> BoringClassifier:
    torch.manual_seed(0)
    return BoringClassifier(mlp(), optimizer=optimizer, **kwargs)


def calibration(problem: SubspaceProblem, **kwargs: Any) -> NullSpaceCalibration:
    kwargs.setdefault("project_every", EVERY)
    return NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader(), **kwargs)


class _RemainingDrift(L.Callback):
    """Remaining-logit change after every training batch and at every validation start."""

    def __init__(self, problem: SubspaceProblem, reference: Tensor) -> None:
        self.problem, self.reference = problem, reference
        self.after_step: list[float] = []
        self.at_validation: list[float] = []

    def _change(self, pl_module: L.LightningModule) -> float:
        return max_relative_change(self.reference, logits_of(pl_module, self.problem.retain_x))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(self._change(pl_module))

    def on_validation_start(self, trainer, pl_module):
        self.at_validation.append(self._change(pl_module))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_project_every_leaves_remaining_outputs_unchanged_at_the_end(problem, optimizer):
    module = boring(optimizer)
    retain_before = logits_of(module, problem.retain_x)
    forget_before = logits_of(module, problem.forget_x)
    callback = calibration(problem)
    drift = _RemainingDrift(problem, retain_before)

    quiet_trainer(EPOCHS, [callback, drift]).fit(module, train_dataloaders=problem.forget_loader())

    assert callback.active_mode == "update"
    assert max_relative_change(retain_before, logits_of(module, problem.retain_x)) <= EXACT
    assert mean_relative_change(forget_before, logits_of(module, problem.forget_x)) >= MOVED
    # projected every 4th step only: in between the remaining outputs do move
    assert max(drift.after_step[i] for i in range(len(drift.after_step)) if (i + 1) % EVERY) > (
        100 * EXACT
    )
    assert max(drift.after_step[EVERY - 1 :: EVERY]) <= EXACT


def test_project_every_with_ranks_above_half_the_dimension(problem):
    """Hidden width 40: the second and third layers' bases have rank 32 > 40 / 2, so their
    projection uses the complement factor."""
    torch.manual_seed(0)
    module = BoringClassifier(mlp(hidden=40), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    retain_before = logits_of(module, problem.retain_x)
    forget_before = logits_of(module, problem.forget_x)
    callback = calibration(problem)

    quiet_trainer(EPOCHS, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    assert callback.layer_infos["model.2"].rank > 20
    assert max_relative_change(retain_before, logits_of(module, problem.retain_x)) <= EXACT
    assert mean_relative_change(forget_before, logits_of(module, problem.forget_x)) >= MOVED


class _Validating(BoringClassifier):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_validation_sees_projected_weights(problem):
    # 2 steps per epoch, projected every 4: every other validation falls between projections
    torch.manual_seed(0)
    module = _Validating(mlp(), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    drift = _RemainingDrift(problem, logits_of(module, problem.retain_x))
    trainer = quiet_trainer(6, [calibration(problem), drift], limit_val_batches=1)

    trainer.fit(module, problem.forget_loader(), problem.forget_loader())

    assert len(drift.at_validation) == 6
    assert max(drift.at_validation) <= EXACT
    assert max(drift.after_step) > 100 * EXACT


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights-only"])
def test_checkpoints_written_between_projections_hold_projected_weights(
    problem, tmp_path: Path, weights_only: bool
):
    module = boring(lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.1))
    original = copy.deepcopy(module)
    retain_before = logits_of(module, problem.retain_x)
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path,
        filename="{step}",
        every_n_train_steps=3,  # steps 3, 9, 15, ...: never a multiple of 4
        save_top_k=-1,
        save_weights_only=weights_only,
    )
    drift = _RemainingDrift(problem, retain_before)
    trainer = quiet_trainer(
        6, [calibration(problem), drift, checkpoints], enable_checkpointing=True
    )

    trainer.fit(module, train_dataloaders=problem.forget_loader())

    files = sorted(tmp_path.glob("step=*.ckpt"))
    assert [f.name for f in files] == ["step=12.ckpt", "step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    assert max(drift.after_step) > 100 * EXACT
    for path in files:
        restored = copy.deepcopy(original)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        restored.load_state_dict(state)
        assert max_relative_change(retain_before, logits_of(restored, problem.retain_x)) <= EXACT
        assert not torch.equal(state["model.0.weight"], original.model[0].weight)


def test_an_exception_between_projections_leaves_projected_weights(problem):
    module = boring(lambda p: torch.optim.Adam(p, lr=2e-3), fail_at_step=6)
    retain_before = logits_of(module, problem.retain_x)
    weight_before = module.model[0].weight.detach().clone()

    with pytest.raises(RuntimeError, match="boom at step 6"):
        quiet_trainer(EPOCHS, [calibration(problem)]).fit(
            module, train_dataloaders=problem.forget_loader()
        )

    assert not torch.equal(module.model[0].weight, weight_before)
    assert max_relative_change(retain_before, logits_of(module, problem.retain_x)) <= EXACT
    assert not module._state_dict_pre_hooks  # the projecting state_dict hook is gone


# --------------------------------------------------------------------------------------------
# Engine API: every=1 is the per-step update projection; SGD momentum is projected
# --------------------------------------------------------------------------------------------
def _adamw(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.1)


def _sgd_momentum(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.02, momentum=0.9, weight_decay=5e-2)


def _engine_fit(
    problem: SubspaceProblem,
    every: int | None,
    project_state: bool = False,
    make_optimizer: Callable[[Any], torch.optim.Optimizer] = _adamw,
) -> tuple[torch.nn.Module, NullSpaceEngine, torch.optim.Optimizer]:
    """Plain-PyTorch loop; ``every=None``: reference update projection (copy before each
    step, project the change after it, as `mode="update"` did before amortisation)."""
    torch.manual_seed(0)
    model = mlp()
    engine = NullSpaceEngine(model, threshold=1.0)
    engine.build(problem.retain_loader())
    optimizer = make_optimizer(model.parameters())
    with engine.guard():
        if every is not None:
            engine.attach(optimizer, every=every, project_state=project_state)
        for _ in range(5):
            for x, y in problem.forget_loader():
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                before = {k: c.parameter.detach().clone() for k, c in _constraints(engine)}
                optimizer.step()
                if every is None:
                    with torch.no_grad():
                        for key, c in _constraints(engine):
                            delta = c.parameter - before[key]
                            delta -= (delta @ engine.bases[key]) @ engine.bases[key].T
                            c.parameter.copy_(before[key] + delta)
    return model, engine, optimizer


def _constraints(engine: NullSpaceEngine) -> list[tuple[str, Any]]:
    return list(engine.accounting.constraints.items())


def test_every_step_equals_the_per_step_update_projection(problem):
    reference, _, _ = _engine_fit(problem, None)
    amortised, _, _ = _engine_fit(problem, 1)

    for (name, got), want in zip(amortised.named_parameters(), reference.parameters()):
        assert torch.allclose(got, want, atol=1e-6), name
    assert not torch.equal(amortised[0].weight, mlp_weight_at_seed())


def test_project_every_one_is_update_mode(problem):
    weights = []
    for kwargs in ({"mode": "update", "project_every": None}, {"project_every": 1}):
        module = boring(lambda p: torch.optim.Adam(p, lr=2e-3))
        quiet_trainer(5, [calibration(problem, **kwargs)]).fit(module, problem.forget_loader())
        weights.append(module.model[0].weight.detach())

    assert torch.equal(weights[0], weights[1])


def mlp_weight_at_seed() -> Tensor:
    torch.manual_seed(0)
    return mlp()[0].weight.detach()


@pytest.mark.parametrize("project_state", [False, True])
def test_project_state_projects_sgd_momentum_only_when_asked(problem, project_state):
    model, engine, optimizer = _engine_fit(problem, EVERY, project_state, _sgd_momentum)

    # the guard ended (detach): weights projected; momentum only with project_state
    buffer = optimizer.state[model[0].weight]["momentum_buffer"]
    remaining = float((buffer @ engine.bases["0"]).abs().max())
    assert (remaining <= 1e-6) == project_state


def test_project_state_leaves_adam_moments_alone(problem):
    """Projecting Adam's ``exp_avg`` would put momentum where ``exp_avg_sq`` is ~0."""
    with_state, _, adam_with = _engine_fit(problem, EVERY, True)
    without, _, adam_without = _engine_fit(problem, EVERY, False)

    for name in ("exp_avg", "exp_avg_sq"):
        first = adam_with.state[with_state[0].weight][name]
        second = adam_without.state[without[0].weight][name]
        assert torch.equal(first, second), name


@pytest.mark.parametrize(
    "kwargs",
    [{"project_every": 0}, {"project_every": "4"}, {"project_every": 4, "mode": "gradient"}],
)
def test_project_every_rejects_bad_values(kwargs):
    with pytest.raises(UnlearningConfigError, match="project_every"):
        NullSpaceCalibration(**kwargs)


def test_state_dict_projects_pending_steps_and_then_changes_nothing(problem):
    torch.manual_seed(0)
    model = mlp()
    engine = NullSpaceEngine(model, threshold=1.0)
    engine.build(problem.retain_loader())
    retain_before = logits_of(model, problem.retain_x)
    optimizer = _adamw(model.parameters())
    with engine.guard():
        engine.attach(optimizer, every=EVERY)
        x, y = next(iter(problem.forget_loader()))
        for _ in range(2):  # fewer than EVERY: not projected yet
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        assert max_relative_change(retain_before, logits_of(model, problem.retain_x)) > 1e-3

        first = {k: v.clone() for k, v in model.state_dict().items()}
        second = model.state_dict()

        assert max_relative_change(retain_before, logits_of(model, problem.retain_x)) <= EXACT
        assert all(torch.equal(first[k], second[k]) for k in first)
