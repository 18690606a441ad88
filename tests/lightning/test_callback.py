"""`NullSpaceCalibration` inside a real `Trainer.fit`: exactness, vanilla equivalence, state, hooks."""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    IN_FEATURES,
    NUM_CLASSES,
    NUM_RETAIN,
    SUBSPACE_DIM,
    BoringClassifier,
    RaisingLoader,
    SubspaceDataModule,
    SubspaceProblem,
    forward_hook_count,
    logits_of,
    make_subspace_problem,
    max_relative_change,
    mean_relative_change,
    mlp,
    quiet_trainer,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError, UnlearningModule

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    # UnlearningModule keeps its frozen original in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training",
)

EXACT = 1e-5  # float32 rounding accumulated over 60 steps stays near 1e-6
MOVED = 0.3  # forget logits must change by at least 30 % (they change by about 100 %)
EPOCHS = 30  # 16 forget samples, batch 8: 60 optimizer steps


def unlearning_module(
    optimizer: str = "sgd", lr: float = 0.02, seed: int = 0, **kwargs: Any
) -> UnlearningModule:
    torch.manual_seed(seed)
    return UnlearningModule(
        mlp(),
        num_classes=NUM_CLASSES,
        forget_classes=[FORGET_CLASS],
        lr=lr,
        optimizer=optimizer,
        stop_at_target=kwargs.pop("stop_at_target", False),  # fixed epochs: changes are measured
        **kwargs,
    )


def fit_and_measure(
    problem: SubspaceProblem,
    module: UnlearningModule,
    callback: NullSpaceCalibration,
    epochs: int = EPOCHS,
    datamodule: L.LightningDataModule | None = None,
    **trainer_kwargs: Any,
) -> tuple[float, float]:
    """Fit on the forget data; return (max relative change of remaining logits, mean of forget ones)."""
    retain_before = logits_of(module.model, problem.retain_x)
    forget_before = logits_of(module.model, problem.forget_x)
    trainer = quiet_trainer(epochs, [callback], **trainer_kwargs)
    if datamodule is not None:
        trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, train_dataloaders=problem.forget_loader())
    retain_change = max_relative_change(retain_before, logits_of(module.model, problem.retain_x))
    forget_change = mean_relative_change(forget_before, logits_of(module.model, problem.forget_x))
    return retain_change, forget_change


def hidden_inputs(model: nn.Sequential, inputs: Tensor) -> dict[str, Tensor]:
    """Inputs of every Linear layer of ``model`` (keys as in ``UnlearningModule.named_modules``)."""
    seen: dict[str, Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, name=f"model.{i}": seen.setdefault(name, args[0].detach())
        )
        for i, layer in enumerate(model)
        if isinstance(layer, nn.Linear)
    ]
    try:
        logits_of(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# --------------------------------------------------------------------------------------------
# 1. Exactness: remaining outputs do not move, forget outputs do
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "module_kwargs", "trainer_kwargs"),
    [
        pytest.param("per_class", {}, {}, id="per_class-sgd"),
        pytest.param("pooled", {}, {}, id="pooled-sgd"),
        pytest.param(
            "per_class",
            {"momentum": 0.9, "lr": 0.005},
            {"gradient_clip_val": 0.5},
            id="momentum-clipped",
        ),
    ],
)
def test_remaining_outputs_unchanged_in_fit(problem, rule, module_kwargs, trainer_kwargs):
    module = unlearning_module(**module_kwargs)
    callback = NullSpaceCalibration(
        threshold=1.0, rule=rule, retain_dataloader=problem.retain_loader()
    )

    retain_change, forget_change = fit_and_measure(problem, module, callback, **trainer_kwargs)

    assert callback.active_mode == "gradient"
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_remaining_outputs_unchanged_with_datamodule_retain_loader(problem):
    module = unlearning_module()
    callback = NullSpaceCalibration(threshold=1.0, rule="per_class")  # finds dm.retain_dataloader()

    retain_change, forget_change = fit_and_measure(
        problem, module, callback, datamodule=SubspaceDataModule(problem)
    )

    assert callback.retain_samples == NUM_RETAIN
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_unconstrained_training_moves_remaining_outputs(problem):
    """Control for the exactness tests: the same fit without the callback changes remaining logits."""
    module = unlearning_module()
    retain_before = logits_of(module.model, problem.retain_x)
    quiet_trainer(EPOCHS).fit(module, train_dataloaders=problem.forget_loader())
    assert (
        max_relative_change(retain_before, logits_of(module.model, problem.retain_x)) > 100 * EXACT
    )


@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_bases_are_read_only_cpu_float32_named_by_module(problem, rule):
    module = unlearning_module()
    callback = NullSpaceCalibration(
        threshold=1.0, rule=rule, retain_dataloader=problem.retain_loader()
    )
    inputs = {name: x.double() for name, x in hidden_inputs(module.model, problem.retain_x).items()}

    quiet_trainer(1, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    bases = callback.bases
    assert isinstance(bases, MappingProxyType)
    with pytest.raises(TypeError):
        bases["model.0"] = torch.zeros(1)  # type: ignore[index]
    linear_names = {
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.")
    }
    assert set(bases) == linear_names == {"model.0", "model.2", "model.4"}
    for name, basis in bases.items():
        layer = module.get_submodule(name)
        assert basis.dtype == torch.float32
        assert basis.device.type == "cpu"
        assert basis.shape[0] == layer.in_features
        # orthonormal, spans every remaining input of the layer, and no more than that
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
        rows = inputs[name]
        residual = rows - rows @ basis.double() @ basis.double().T
        assert float(residual.norm() / rows.norm()) < 1e-5
        assert basis.shape[1] == int(torch.linalg.matrix_rank(rows, rtol=1e-5))  # float32 data
        assert callback.layer_infos[name].rank == basis.shape[1]
    assert bases["model.0"].shape == (IN_FEATURES, SUBSPACE_DIM)
    assert (
        bases["model.2"].shape[1] < 64
    )  # 32 remaining samples: hidden inputs are rank-deficient too


# --------------------------------------------------------------------------------------------
# 2. Compare to vanilla
# --------------------------------------------------------------------------------------------
def _train_final_weights(
    problem: SubspaceProblem, callback: NullSpaceCalibration | None
) -> dict[str, Tensor]:
    L.seed_everything(1, verbose=False)
    module = BoringClassifier(mlp(batch_norm=True, dropout=0.2), lr=0.1)
    module.train()
    # train toward remaining classes with a seeded shuffle, identical in both runs
    targets = torch.arange(problem.forget_x.shape[0]) % FORGET_CLASS
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(
        TensorDataset(problem.forget_x, targets), batch_size=8, shuffle=True, generator=generator
    )
    quiet_trainer(5, [callback] if callback is not None else []).fit(
        module, train_dataloaders=loader
    )
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_without_selected_layers_reproduces_plain_training_bitwise(problem, mode):
    vanilla = _train_final_weights(problem, None)
    callback = NullSpaceCalibration(
        layers=[],
        freeze_bias_and_norm=False,
        norm_eval=False,
        mode=mode,
        retain_dataloader=RaisingLoader(),  # nothing to build: the data are never read
    )
    with pytest.warns(UserWarning, match="no layer selected"):
        calibrated = _train_final_weights(problem, callback)

    assert callback.bases == {}
    assert vanilla.keys() == calibrated.keys()
    for name in vanilla:
        assert torch.equal(vanilla[name], calibrated[name]), name
    # sanity: training did change the weights (so bitwise equality is meaningful)
    L.seed_everything(1, verbose=False)
    initial = BoringClassifier(mlp(batch_norm=True, dropout=0.2)).state_dict()
    assert not torch.equal(initial["model.0.weight"], vanilla["model.0.weight"])
    assert not torch.equal(initial["model.1.running_mean"], vanilla["model.1.running_mean"])


# --------------------------------------------------------------------------------------------
# 3. Biases, normalisation and the user's train/eval modes
# --------------------------------------------------------------------------------------------
class _DuringFit(L.Callback):
    """Records requires_grad flags and norm modes on every training batch."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        norms = [m for m in pl_module.model.modules() if isinstance(m, nn.BatchNorm1d)]
        self.records.append(
            {
                "bias_grad": [pl_module.model[i].bias.requires_grad for i in (0, 4, 8)],
                "norm_grad": [p.requires_grad for m in norms for p in m.parameters()],
                "norm_training": [m.training for m in norms],
                "dropout_training": pl_module.model[3].training,
            }
        )


def test_bias_and_norm_frozen_during_fit_and_restored_after(problem):
    # 20 -> 64 (BN, ReLU, Dropout) -> 64 (BN, ReLU, Dropout) -> 5: Linear layers at 0, 4, 8
    model = mlp(batch_norm=True, dropout=0.1)
    model[5].requires_grad_(False)  # the user froze the second norm: it must stay frozen
    module = BoringClassifier(model)
    module.train()
    model[2].eval()  # an odd but legal user choice: a ReLU in eval mode
    modes_before = {name: m.training for name, m in module.named_modules()}
    state_before = copy.deepcopy(model.state_dict())
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    probe = _DuringFit()

    quiet_trainer(3, [callback, probe]).fit(module, train_dataloaders=problem.forget_loader())

    assert probe.records, "no training batch observed"
    for record in probe.records:
        assert record["bias_grad"] == [False, False, False]
        assert record["norm_grad"] == [False] * 4
        assert record["norm_training"] == [False, False]
        assert record["dropout_training"] is True  # dropout stays as the user set it
    state_after = model.state_dict()
    for name in ("0.bias", "4.bias", "8.bias", "1.weight", "1.bias", "5.weight", "5.bias"):
        assert torch.equal(state_before[name], state_after[name]), name
    for name in (
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "5.running_mean",
        "5.running_var",
    ):
        assert torch.equal(state_before[name], state_after[name]), name
    assert not torch.equal(state_before["0.weight"], state_after["0.weight"])  # weights did train
    assert all(model[i].bias.requires_grad for i in (0, 4, 8))
    assert all(p.requires_grad for p in model[1].parameters())
    assert not any(p.requires_grad for p in model[5].parameters())
    assert {name: m.training for name, m in module.named_modules()} == modes_before


def test_model_in_eval_mode_stays_in_eval_mode_after_fit(problem):
    module = unlearning_module()
    module.eval()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    quiet_trainer(1, [callback]).fit(module, train_dataloaders=problem.forget_loader())
    assert not any(m.training for m in module.modules())


# --------------------------------------------------------------------------------------------
# 4. Hook lifetime
# --------------------------------------------------------------------------------------------
class _StepHookProbe(L.Callback):
    def __init__(self) -> None:
        self.during: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        self.during.append(
            len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)
        )


def _step_hook_count(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


def test_no_hooks_left_after_fit_and_second_fit(problem):
    module = unlearning_module(optimizer="adam", lr=1e-3)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    hooks_before = forward_hook_count(module)
    for _ in range(2):
        probe = _StepHookProbe()
        trainer = quiet_trainer(1, [callback, probe])
        trainer.fit(module, train_dataloaders=problem.forget_loader())
        assert callback.active_mode == "update"
        assert probe.during and all(  # one pre-step and one post-step hook
            count == 2 for count in probe.during
        )  # while fitting (update mode copies the weights once, at attach)
        assert _step_hook_count(trainer.optimizers[0]) == 0
        assert forward_hook_count(module) == hooks_before == 0
        assert all(p.requires_grad for p in module.model.parameters())


def test_no_hooks_or_frozen_parameters_left_after_exception_in_training_step(problem):
    module = BoringClassifier(
        mlp(batch_norm=True), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), fail_at_step=3
    )
    module.train()
    modes_before = {name: m.training for name, m in module.named_modules()}
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    trainer = quiet_trainer(5, [callback])

    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.fit(module, train_dataloaders=problem.forget_loader())

    assert callback.active_mode == "update"
    assert _step_hook_count(trainer.optimizers[0]) == 0
    assert forward_hook_count(module) == 0
    assert all(p.requires_grad for p in module.parameters())
    assert {name: m.training for name, m in module.named_modules()} == modes_before


class _FailingRetainLoader:
    """Yields one retain batch, then fails: an exception in the middle of the basis pass."""

    def __init__(self, problem: SubspaceProblem) -> None:
        self.problem = problem

    def __iter__(self):
        yield self.problem.retain_x[:8], self.problem.retain_y[:8]
        raise OSError("retain storage went away")


def test_no_hooks_or_frozen_parameters_left_after_exception_while_building_bases(problem):
    module = BoringClassifier(mlp(batch_norm=True))
    module.train()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=_FailingRetainLoader(problem))

    with pytest.raises(OSError, match="retain storage went away"):
        quiet_trainer(1, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    assert forward_hook_count(module) == 0
    assert all(p.requires_grad for p in module.parameters())
    assert all(m.training for m in module.modules())


# --------------------------------------------------------------------------------------------
# 5. Projection modes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module_kwargs", "expected"),
    [
        ({"optimizer": "sgd"}, "gradient"),
        ({"optimizer": "sgd", "momentum": 0.9}, "gradient"),
        ({"optimizer": "sgd", "weight_decay": 1e-4}, "update"),
        ({"optimizer": "adam", "lr": 1e-3}, "update"),
        ({"optimizer": "adamw", "lr": 1e-3}, "update"),
    ],
)
def test_auto_mode_picks_projection_for_optimizer(problem, module_kwargs, expected):
    callback = NullSpaceCalibration(
        threshold=1.0, mode="auto", retain_dataloader=problem.retain_loader()
    )
    quiet_trainer(1, [callback], max_steps=1).fit(
        unlearning_module(**module_kwargs), train_dataloaders=problem.forget_loader()
    )
    assert callback.active_mode == expected


@pytest.mark.parametrize(
    "module_kwargs",
    [
        pytest.param({"optimizer": "adam", "lr": 2e-3}, id="adam"),
        pytest.param(
            {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.1}, id="adamw-weight-decay"
        ),
        pytest.param({"optimizer": "sgd", "lr": 0.02, "weight_decay": 0.05}, id="sgd-weight-decay"),
    ],
)
def test_update_mode_keeps_remaining_outputs_for_any_optimizer(problem, module_kwargs):
    module = unlearning_module(**module_kwargs)
    callback = NullSpaceCalibration(
        threshold=1.0, mode="update", retain_dataloader=problem.retain_loader()
    )

    retain_change, forget_change = fit_and_measure(problem, module, callback)

    assert callback.active_mode == "update"
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_gradient_mode_with_adam_leaves_the_null_space(problem):
    """Adam rescales coordinates after the projection, so only update projection is exact."""
    module = unlearning_module(optimizer="adam", lr=2e-3)
    callback = NullSpaceCalibration(
        threshold=1.0, mode="gradient", retain_dataloader=problem.retain_loader()
    )

    retain_change, _ = fit_and_measure(problem, module, callback)

    assert callback.active_mode == "gradient"
    assert retain_change > 1000 * EXACT


# --------------------------------------------------------------------------------------------
# 6. Checkpoint state
# --------------------------------------------------------------------------------------------
def _fitted_callback(problem: SubspaceProblem, **kwargs: Any) -> NullSpaceCalibration:
    callback = NullSpaceCalibration(
        threshold=1.0, retain_dataloader=problem.retain_loader(), **kwargs
    )
    quiet_trainer(1, [callback]).fit(unlearning_module(), train_dataloaders=problem.forget_loader())
    return callback


def test_state_dict_holds_bases_and_fingerprint(problem):
    assert NullSpaceCalibration().state_dict() == {}  # nothing built yet
    callback = _fitted_callback(problem)
    state = callback.state_dict()

    assert isinstance(state["fingerprint"], str) and state["fingerprint"]
    assert state["bases"].keys() == callback.bases.keys()
    for name, basis in state["bases"].items():
        assert torch.equal(basis, callback.bases[name])
        assert basis.data_ptr() != callback.bases[name].data_ptr()  # a copy, not a view
    assert state["retain_samples"] == NUM_RETAIN


def test_loaded_state_is_reused_without_reading_retain_data(problem):
    state = _fitted_callback(problem).state_dict()
    module = unlearning_module(seed=0)
    resumed = NullSpaceCalibration(threshold=1.0, retain_dataloader=RaisingLoader())
    resumed.load_state_dict(state)

    retain_change, forget_change = fit_and_measure(problem, module, resumed)

    assert resumed.bases.keys() == state["bases"].keys()
    for name, basis in state["bases"].items():
        assert torch.equal(resumed.bases[name], basis)
    assert resumed.retain_samples == NUM_RETAIN
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_resume_from_lightning_checkpoint_reuses_bases(problem, tmp_path):
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    module = unlearning_module()
    retain_before = logits_of(module.model, problem.retain_x)
    trainer = quiet_trainer(2, [callback])
    trainer.fit(module, train_dataloaders=problem.forget_loader())
    path = tmp_path / "unlearning.ckpt"
    trainer.save_checkpoint(path)

    resumed = NullSpaceCalibration(threshold=1.0, retain_dataloader=RaisingLoader())
    fresh = unlearning_module(
        seed=5
    )  # other initial weights: everything must come from the checkpoint
    quiet_trainer(4, [resumed]).fit(
        fresh, train_dataloaders=problem.forget_loader(), ckpt_path=path
    )

    for name, basis in callback.bases.items():
        assert torch.equal(resumed.bases[name], basis)
    assert max_relative_change(retain_before, logits_of(fresh.model, problem.retain_x)) <= EXACT
    for name, value in module.original.state_dict().items():
        assert torch.equal(fresh.original.state_dict()[name], value)


@pytest.mark.parametrize(
    ("module_factory", "callback_kwargs"),
    [
        pytest.param(lambda: BoringClassifier(mlp(hidden=32)), {}, id="other-model"),
        pytest.param(lambda: unlearning_module(), {"layers": ["model.0"]}, id="other-layers"),
        pytest.param(lambda: unlearning_module(), {"threshold": 0.9}, id="other-threshold"),
    ],
)
def test_fingerprint_mismatch_raises(problem, module_factory, callback_kwargs):
    state = _fitted_callback(problem).state_dict()
    kwargs = {"threshold": 1.0, "retain_dataloader": RaisingLoader(), **callback_kwargs}
    other = NullSpaceCalibration(**kwargs)
    other.load_state_dict(state)

    with pytest.raises(
        UnlearningConfigError, match="built for another model, layer set or settings"
    ):
        quiet_trainer(1, [other]).fit(module_factory(), train_dataloaders=problem.forget_loader())


def test_problem_fixture_is_a_proper_subspace():
    problem = make_subspace_problem()
    assert int(torch.linalg.matrix_rank(problem.retain_x.double(), rtol=1e-5)) == SUBSPACE_DIM
    assert int(torch.linalg.matrix_rank(problem.forget_x.double())) > SUBSPACE_DIM
    assert set(problem.retain_y.tolist()) == set(range(FORGET_CLASS))


def test_constructor_does_not_start_iterating_the_retain_loader(problem):
    """Validating `retain_dataloader` must not call `iter()` (that starts DataLoader workers)."""

    class CountingLoader:
        def __init__(self) -> None:
            self.iterations = 0

        def __iter__(self):
            self.iterations += 1  # runs when `iter()` is called (not a generator function)
            return iter([(problem.retain_x, problem.retain_y)])

    class SequenceOnly:  # the old sequence protocol: iterable through `__getitem__`
        def __getitem__(self, index: int):
            if index:
                raise IndexError(index)
            return problem.retain_x, problem.retain_y

    loader = CountingLoader()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=loader)
    assert loader.iterations == 0
    quiet_trainer(1, [callback]).fit(unlearning_module(), train_dataloaders=problem.forget_loader())
    assert loader.iterations == 1
    assert callback.retain_samples == NUM_RETAIN

    sequence = NullSpaceCalibration(threshold=1.0, retain_dataloader=SequenceOnly())
    quiet_trainer(1, [sequence]).fit(unlearning_module(), train_dataloaders=problem.forget_loader())
    assert sequence.retain_samples == NUM_RETAIN
