"""`UnlearningModule`, `ClassifierModule` and pseudo-labels; UNSC end to end on MNIST-1D."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    MNIST1D_FORGET,
    MNIST1D_SAMPLES,
    NUM_CLASSES,
    SubspaceDataModule,
    SubspaceProblem,
    forward_hook_count,
    logits_of,
    make_subspace_problem,
    mlp,
    quiet_trainer,
    tensor_datamodule,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import ClassifierModule, NullSpaceCalibration, UnlearningModule
from unsc_lightning.data import MNIST1DDataModule
from unsc_lightning.lab.scoring import evaluate
from unsc_lightning.pseudo_labels import random_pseudo_labels, unsc_pseudo_labels

pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    # UnlearningModule keeps its frozen original in eval mode on purpose
    r"ignore:Found \d+ module\(s\) in eval mode at the start of training",
)


# --------------------------------------------------------------------------------------------
# Pseudo-labels
# --------------------------------------------------------------------------------------------
def reference_pseudo_labels(logits: Tensor, labels: Tensor, forget_classes: list[int]) -> Tensor:
    """Loop reference: best class that is neither forgotten nor the sample's own label."""
    targets = []
    for row, label in zip(logits.tolist(), labels.tolist()):
        allowed = [k for k in range(len(row)) if k not in forget_classes and k != label]
        targets.append(max(allowed, key=lambda k: row[k]))
    return torch.tensor(targets)


@pytest.mark.parametrize(
    ("forget_classes", "label_pool"),
    [
        pytest.param([3], [3], id="one-class"),
        pytest.param([1, 4], [1, 4], id="two-classes"),
        pytest.param([], [0, 1, 2, 3, 4, 5], id="sample-level"),
    ],
)
def test_unsc_pseudo_labels_pick_best_remaining_class(forget_classes, label_pool):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, generator=generator)
    labels = torch.tensor(label_pool)[torch.randint(len(label_pool), (200,), generator=generator)]
    # make the original's favourite the forgotten class / own label for many samples
    logits[torch.arange(200), labels] += 3.0

    targets = unsc_pseudo_labels(logits, labels, forget_classes)

    assert targets.dtype == torch.long
    assert torch.equal(targets, reference_pseudo_labels(logits, labels, forget_classes))
    assert not torch.isin(targets, torch.tensor(forget_classes, dtype=torch.long)).any()
    assert not (targets == labels).any()


def test_unsc_pseudo_labels_ignore_forgotten_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [9.0, 0.0, 8.0, 7.0]])
    labels = torch.tensor([1, 0])
    # sample 0: the forgotten class 1 wins overall -> best remaining is 3; sample 1: class 0 forgotten -> 2
    assert unsc_pseudo_labels(logits, labels, [0, 1]).tolist() == [3, 2]
    # sample-level: only the own label is excluded
    assert unsc_pseudo_labels(logits, labels, []).tolist() == [3, 2]
    assert unsc_pseudo_labels(logits, torch.tensor([3, 2]), []).tolist() == [1, 0]


@pytest.mark.parametrize(
    ("forget_classes", "labels"), [([2], [2] * 500), ([], [0, 1, 2, 3, 4] * 100)]
)
def test_random_pseudo_labels_only_remaining_other_classes(forget_classes, labels):
    labels = torch.tensor(labels)
    first = random_pseudo_labels(5, labels, forget_classes, torch.Generator().manual_seed(7))
    again = random_pseudo_labels(5, labels, forget_classes, torch.Generator().manual_seed(7))

    assert torch.equal(first, again)  # seeded
    assert not (first == labels).any()
    assert not torch.isin(first, torch.tensor(forget_classes, dtype=torch.long)).any()
    # every allowed class is drawn (500 draws over at most 4 choices)
    for label in labels.unique().tolist():
        drawn = set(first[labels == label].tolist())
        assert drawn == {k for k in range(5) if k not in forget_classes and k != label}


def test_module_random_pseudo_labels_reproducible_and_remaining():
    labels = torch.full((64,), FORGET_CLASS)
    inputs = torch.randn(64, 20)
    draws = [
        UnlearningModule(
            mlp(), NUM_CLASSES, [FORGET_CLASS], pseudo_labels="random", seed=3
        ).pseudo_label(inputs, labels)
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])
    assert set(draws[0].tolist()) == {0, 1, 2, 3}


def test_module_unsc_pseudo_labels_come_from_the_original(problem: SubspaceProblem):
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    module.on_fit_start()
    with torch.no_grad():
        module.model[4].weight.mul_(-1.0)  # the trained model changes; labels must not
    targets = module.pseudo_label(problem.forget_x, problem.forget_y)
    expected = reference_pseudo_labels(
        logits_of(module.original, problem.forget_x), problem.forget_y, [FORGET_CLASS]
    )
    assert torch.equal(targets, expected)
    assert not torch.equal(
        targets,
        reference_pseudo_labels(
            logits_of(module.model, problem.forget_x), problem.forget_y, [FORGET_CLASS]
        ),
    )


# --------------------------------------------------------------------------------------------
# The frozen original
# --------------------------------------------------------------------------------------------
def test_original_is_captured_at_fit_start_and_stays_frozen(problem: SubspaceProblem):
    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], lr=0.05)
    with torch.no_grad():  # e.g. the user loads trained weights after building the module
        for param in module.model.parameters():
            param.add_(0.1)
    at_fit_start = copy.deepcopy(module.model.state_dict())

    module.train()
    assert not module.original.training
    assert not any(m.training for m in module.original.modules())
    assert not any(p.requires_grad for p in module.original.parameters())

    quiet_trainer(3).fit(module, train_dataloaders=problem.forget_loader())

    assert bool(module.original_captured)
    for name, value in module.original.state_dict().items():
        assert torch.equal(value, at_fit_start[name]), name
    assert not torch.equal(module.model.state_dict()["0.weight"], at_fit_start["0.weight"])
    assert not any(m.training for m in module.original.modules())

    # a second fit keeps labelling with the same original (the one before the first update)
    quiet_trainer(1).fit(module, train_dataloaders=problem.forget_loader())
    for name, value in module.original.state_dict().items():
        assert torch.equal(value, at_fit_start[name]), name


def test_unlearning_module_optimizer_excludes_frozen_parameters():
    module = UnlearningModule(
        mlp(), NUM_CLASSES, [FORGET_CLASS], optimizer="adamw", lr=1e-3, weight_decay=0.01
    )
    module.model[0].requires_grad_(False)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(module.model[0].weight) not in params
    assert id(module.model[2].weight) in params
    assert not any(id(p) in params for p in module.original.parameters())
    assert optimizer.param_groups[0]["weight_decay"] == 0.01


def test_module_and_datamodule_forget_classes_must_agree():
    dm = tensor_datamodule(num_classes=4, forget_classes=[1])
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    with pytest.raises(ValueError, match=r"`forget_classes=\[4\]` of the module differs"):
        quiet_trainer(1).fit(module, datamodule=dm)


# --------------------------------------------------------------------------------------------
# End to end on MNIST-1D
# --------------------------------------------------------------------------------------------
# Tuned: the authors' per-class schedule (0.97 + 0.003 k), plain SGD with a large step on the
# forget split only. Observed: original Acc_r 90.7 %, Acc_f 98.8 %; after UNSC Acc_r 90.5 %,
# Acc_f 0.0 %, in about 0.6 s.
UNLEARN_THRESHOLD = 0.97
UNLEARN_CLASS_STEP = 0.003
UNLEARN_LR = 1.0
UNLEARN_EPOCHS = 10


def _forget_datamodule() -> MNIST1DDataModule:
    return MNIST1DDataModule(
        num_samples=MNIST1D_SAMPLES, forget_classes=[MNIST1D_FORGET], batch_size=128
    )


def test_unsc_forgets_class_and_keeps_remaining_accuracy_on_mnist1d(mnist1d_model):
    dm = _forget_datamodule()
    original = evaluate(mnist1d_model, dm)
    assert original["acc_r"] > 80.0 and original["acc_f"] > 80.0  # a meaningful original model

    L.seed_everything(0, verbose=False)
    module = UnlearningModule(
        mnist1d_model, num_classes=10, forget_classes=[MNIST1D_FORGET], lr=UNLEARN_LR
    )
    callback = NullSpaceCalibration(
        threshold=UNLEARN_THRESHOLD, class_threshold_step=UNLEARN_CLASS_STEP
    )
    quiet_trainer(UNLEARN_EPOCHS, [callback], deterministic=True).fit(module, datamodule=dm)
    unlearned = evaluate(mnist1d_model, dm)

    assert callback.active_mode == "gradient"
    assert callback.retain_samples == dm.split_sizes()["train_retain"]
    assert unlearned["acc_f"] < 5.0
    assert abs(unlearned["acc_r"] - original["acc_r"]) <= 1.0
    for k in range(10):
        if k != MNIST1D_FORGET:  # no remaining class collapses either
            assert unlearned["per_class"][k] >= original["per_class"][k] - 5.0


def test_validate_logs_retain_forget_and_per_class_accuracy(mnist1d_model):
    dm = _forget_datamodule()
    module = UnlearningModule(mnist1d_model, num_classes=10, forget_classes=[MNIST1D_FORGET])
    trainer = quiet_trainer(1, limit_val_batches=None)
    trainer.validate(module, datamodule=dm, verbose=False)
    metrics = trainer.callback_metrics

    assert {"val/retain_acc", "val/forget_acc"} <= metrics.keys()
    assert {f"val/acc_class_{k}" for k in range(10)} <= metrics.keys()
    assert float(metrics["val/forget_acc"]) == pytest.approx(
        float(metrics[f"val/acc_class_{MNIST1D_FORGET}"])
    )
    remaining = [float(metrics[f"val/acc_class_{k}"]) for k in range(10) if k != MNIST1D_FORGET]
    assert float(metrics["val/retain_acc"]) == pytest.approx(
        sum(remaining) / len(remaining), abs=1e-6
    )
    assert 0.8 < float(metrics["val/retain_acc"]) <= 1.0


def test_classifier_module_learns_toy_problem(problem: SubspaceProblem):
    """The original/retrain module: warm-up + step schedule, loss goes down on remaining data."""
    torch.manual_seed(0)
    module = ClassifierModule(
        mlp(), num_classes=NUM_CLASSES, lr=0.05, warmup_epochs=1, milestones=[15]
    )
    loader = problem.retain_loader(batch_size=8)
    before = torch.nn.functional.cross_entropy(
        logits_of(module.model, problem.retain_x), problem.retain_y
    )
    trainer = quiet_trainer(20)
    trainer.fit(module, train_dataloaders=loader)
    after = torch.nn.functional.cross_entropy(
        logits_of(module.model, problem.retain_x), problem.retain_y
    )
    assert float(after) < 0.5 * float(before)
    # schedule: 4 steps per epoch, linear warm-up over the first epoch, x0.2 from epoch 15 on
    factor = module._lr_factor(4)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4 * 15) == pytest.approx(0.2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.2)


# --------------------------------------------------------------------------------------------
# The original labels in eval mode, whatever sets the modes (issue 12)
# --------------------------------------------------------------------------------------------
def test_pseudo_labels_of_a_dropout_original_are_deterministic(problem: SubspaceProblem):
    torch.manual_seed(0)
    module = UnlearningModule(mlp(dropout=0.5), NUM_CLASSES, [FORGET_CLASS])
    for submodule in module.original.modules():  # as Lightning's mode restore or a user might
        submodule.training = True
    x, y = problem.forget_x, problem.forget_y

    first, second = module.pseudo_label(x, y), module.pseudo_label(x, y)

    assert torch.equal(first, second)
    expected = reference_pseudo_labels(logits_of(module.original.eval(), x), y, [FORGET_CLASS])
    assert torch.equal(first, expected)


def test_batchnorm_original_keeps_its_running_statistics(problem: SubspaceProblem):
    torch.manual_seed(0)
    model = mlp(batch_norm=True)  # built in train mode, as users pass freshly loaded models
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    at_fit_start = copy.deepcopy(model.state_dict())

    quiet_trainer(2).fit(module, train_dataloaders=problem.forget_loader())

    for name, value in module.original.state_dict().items():
        assert torch.equal(value, at_fit_start[name]), name  # running_mean / running_var included
    assert not torch.equal(module.model.state_dict()["0.weight"], at_fit_start["0.weight"])


# --------------------------------------------------------------------------------------------
# No per-model tuning: relative steps and stop-at-target (issue 12)
# --------------------------------------------------------------------------------------------
def test_default_step_moves_every_weight_by_relative_step_of_its_norm(problem: SubspaceProblem):
    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], relative_step=0.02)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}

    quiet_trainer(1, limit_train_batches=1).fit(module, train_dataloaders=problem.forget_loader())

    for name, param in module.model.named_parameters():
        step = (param.detach() - before[name]).norm()
        assert torch.isclose(step, 0.02 * before[name].norm(), rtol=1e-4), name


@pytest.mark.parametrize("project_every", [None, 3])
def test_relative_steps_in_update_mode_equal_gradient_mode(
    problem: SubspaceProblem, project_every: int | None
):
    # update mode projects after the step: the step must be sized on the projected gradient,
    # else most of its length is projected away and the model barely forgets
    weights = {}
    for mode in ("gradient", "update"):
        torch.manual_seed(0)
        module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
        every = project_every if mode == "update" else None
        callback = NullSpaceCalibration(
            rule="pooled", mode=mode, project_every=every, retain_dataloader=problem.retain_loader()
        )
        quiet_trainer(3, callbacks=[callback], limit_train_batches=2).fit(
            module, train_dataloaders=problem.forget_loader()
        )
        weights[mode] = [p.detach().clone() for p in module.model.parameters()]
    for update, gradient in zip(weights["update"], weights["gradient"]):
        torch.testing.assert_close(update, gradient, atol=1e-5, rtol=1e-4)


def test_explicit_lr_is_a_plain_sgd_step(problem: SubspaceProblem):
    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], lr=0.05, optimizer="sgd")
    x, y = next(iter(problem.forget_loader()))
    loss = torch.nn.functional.cross_entropy(module(x), module.pseudo_label(x, y))
    (grad,) = torch.autograd.grad(loss, [module.model[0].weight])
    before = module.model[0].weight.detach().clone()

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    quiet_trainer(1).fit(module, train_dataloaders=loader)

    torch.testing.assert_close(module.model[0].weight.detach(), before - 0.05 * grad)


@pytest.mark.parametrize(
    ("options", "epochs_run", "stopped_at"),
    [
        ({}, None, "early"),  # defaults: stops by itself at <= 1 % forget accuracy
        ({"target_forget_acc": 1.0}, 1, 0),  # any accuracy reaches 100 %: after the first epoch
        ({"stop_at_target": False}, 30, None),  # the paper's fixed epochs
    ],
)
def test_class_wise_unlearning_stops_at_target(
    problem: SubspaceProblem, options: dict, epochs_run: int | None, stopped_at: object
):
    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], **options)
    callback = NullSpaceCalibration(rule="pooled", retain_dataloader=problem.retain_loader())
    trainer = quiet_trainer(30, callbacks=[callback])

    trainer.fit(module, train_dataloaders=problem.forget_loader())

    if stopped_at == "early":
        assert module.stopped_at_epoch is not None
        assert trainer.current_epoch == module.stopped_at_epoch + 1 < 30
        predictions = logits_of(module.model, problem.forget_x).argmax(dim=1)
        assert float((predictions == problem.forget_y).float().mean()) <= 0.01
    else:
        assert module.stopped_at_epoch == stopped_at
        assert trainer.current_epoch == epochs_run


def test_sample_level_unlearning_stops_at_held_out_accuracy():
    from unsc_lightning.baselines import StopAtHeldOutAccuracy
    from unsc_lightning.data import ForgetSpec

    dm = tensor_datamodule(forget=ForgetSpec(kind="random", fraction=0.1), batch_size=8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module = UnlearningModule(model, num_classes=4)
    trainer = quiet_trainer(3)

    trainer.fit(module, datamodule=dm)

    assert [type(c) for c in trainer.callbacks].count(StopAtHeldOutAccuracy) == 1

    with pytest.warns(UserWarning, match="`stop_at_target=True` with sample-level forgetting"):
        quiet_trainer(1).fit(UnlearningModule(model, num_classes=4), dm.train_dataloader())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target_forget_acc": 1.5}, r"Expected `target_forget_acc` in \[0, 1\] or None, got 1.5"),
        ({"relative_step": 0.0}, r"Expected `relative_step` in \(0, 1\], got 0.0"),
        ({"lr": -1.0}, r"Expected `lr` > 0, got -1.0"),
    ],
)
def test_unlearning_module_rejects_bad_stopping_and_step_options(options: dict, match: str):
    with pytest.raises(ValueError, match=match):
        UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], **options)


def test_class_wise_unlearning_that_misses_its_target_warns(problem: SubspaceProblem):
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[-1].bias[FORGET_CLASS] = 100.0  # predicts the forgotten class everywhere
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], relative_step=1e-6)
    callback = NullSpaceCalibration(rule="pooled", retain_dataloader=problem.retain_loader())
    with pytest.warns(UserWarning, match=r"forget accuracy is still .* after 2 epochs"):
        quiet_trainer(2, callbacks=[callback]).fit(
            module, train_dataloaders=problem.forget_loader()
        )
    assert module.stopped_at_epoch is None and module.last_forget_accuracy is not None


# --------------------------------------------------------------------------------------------
# Feature calibration (issue 16)
# --------------------------------------------------------------------------------------------
def _feature_calibrated(problem: SubspaceProblem, weight: float, epochs: int = 20) -> Any:
    torch.manual_seed(0)
    module = UnlearningModule(
        mlp(),
        NUM_CLASSES,
        [FORGET_CLASS],
        lr=0.05,
        stop_at_target=False,
        feature_calibration=weight,
    )
    callback = NullSpaceCalibration(
        threshold=1.0, rule="pooled", retain_dataloader=problem.retain_loader()
    )
    quiet_trainer(epochs, callbacks=[callback]).fit(
        module, train_dataloaders=problem.forget_loader()
    )
    return module


def test_feature_calibration_keeps_remaining_logits_at_threshold_one(problem: SubspaceProblem):
    torch.manual_seed(0)
    before = logits_of(mlp(), problem.retain_x)
    module = _feature_calibrated(problem, weight=5.0)
    after = logits_of(module.model, problem.retain_x)
    assert module.feature_layer == "4"  # the head, found as in the probe metric
    relative = (after - before).norm() / before.norm()
    assert relative <= 1e-4, relative
    # the remaining features came from the callback's basis pass, keyed by remaining classes
    reference = module.feature_reference
    assert reference is not None and int(reference.counts.sum()) > 0
    assert int(reference.counts[FORGET_CLASS]) == 0
    # and the forget features did move
    assert not torch.allclose(
        logits_of(module.model, problem.forget_x), logits_of(module.original, problem.forget_x)
    )
    assert forward_hook_count(module.model) == 0  # the capture hook is gone after the fit


def test_feature_calibration_lowers_linear_probe_accuracy():
    from unsc_lightning.metrics import linear_probe_accuracy

    problem = make_subspace_problem(seed=1)
    generator = torch.Generator().manual_seed(2)
    held_out = 2.0 * torch.randn(64, problem.forget_x.shape[1], generator=generator)
    problem.forget_x = torch.cat([problem.forget_x, held_out[:48]])
    problem.forget_y = torch.full((len(problem.forget_x),), FORGET_CLASS)
    test_x, test_y = held_out[48:], torch.full((16,), FORGET_CLASS)
    train_x = torch.cat([problem.retain_x, problem.forget_x])
    train_y = torch.cat([problem.retain_y, problem.forget_y])
    accuracy = {}
    for weight in (0.0, 5.0):
        model = _feature_calibrated(problem, weight, epochs=30).model
        accuracy[weight] = linear_probe_accuracy(
            model, train_x, train_y, test_x, test_y, [FORGET_CLASS]
        ).forget_acc
    assert accuracy[5.0] <= accuracy[0.0] - 0.1, accuracy


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"feature_calibration": -1.0}, r"Expected `feature_calibration` >= 0, got -1.0"),
        ({"feature_calibration": "1"}, r"Expected `feature_calibration`.*got '1'"),
        (
            {"feature_layer": "head"},
            r"Expected `feature_layer` to name a module of Sequential .*got 'head'",
        ),
        ({"feature_layer": 4}, r"Expected `feature_layer` to name a module .*got 4"),
        (
            {"feature_reference_size": 1},
            r"Expected `feature_reference_size` to be an integer >= 2, got 1",
        ),
    ],
)
def test_feature_calibration_rejects_bad_arguments(options: dict, match: str):
    with pytest.raises(ValueError, match=match):
        UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], **options)


def test_feature_calibration_without_remaining_data_says_what_to_add(problem: SubspaceProblem):
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], feature_calibration=1.0)
    with pytest.raises(
        ValueError, match=r"needs features of remaining data: add a `NullSpaceCalibration`"
    ):
        quiet_trainer(1).fit(module, train_dataloaders=problem.forget_loader())
    assert forward_hook_count(module.model) == 0


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_feature_calibration_reads_retain_dataloader_once_without_the_callback(
    problem: SubspaceProblem, precision: str
):
    # 64-true: the retain batches are converted to float64 as the Trainer's own batches are
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], feature_calibration=1.0)
    quiet_trainer(1, precision=precision).fit(module, datamodule=SubspaceDataModule(problem))
    assert module.feature_reference is not None
    assert int(module.feature_reference.counts.sum()) == len(problem.retain_x)


# --------------------------------------------------------------------------------------------
# What validation costs during fit (issue 13): cheap epochs, the full report at the end
# --------------------------------------------------------------------------------------------
FULL_KEYS = {"val/retain_acc", "val/mia_efficacy", "val/forget_test_auroc", "val/acc_class_0"}


class ValidationRecorder(L.Callback):
    """Per fit validation epoch (sanity check apart): the ``val/`` keys the module logged (its
    ``log`` is wrapped by :meth:`attach`) and the evaluation loaders that yielded batches."""

    def __init__(self) -> None:
        self.logged: list[set[str]] = []
        self.loaders: list[set[int]] = []

    def attach(self, module: L.LightningModule) -> ValidationRecorder:
        log = module.log

        def recording_log(name: str, *args: Any, **kwargs: Any) -> None:
            if name.startswith("val/"):
                self.logged[-1].add(name)
            log(name, *args, **kwargs)

        module.log = recording_log  # type: ignore[method-assign]
        return self

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loaders.append(set())
        self.logged.append(set())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, idx=0):
        self.loaders[-1].add(idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self.loaders.pop()
            self.logged.pop()


def _validated_fit(model, epochs: int, **options: Any) -> tuple[Any, L.Trainer, Any]:
    dm = _forget_datamodule()
    module = UnlearningModule(model, num_classes=10, forget_classes=[MNIST1D_FORGET], **options)
    recorder = ValidationRecorder().attach(module)
    trainer = quiet_trainer(epochs, [recorder], limit_val_batches=None, num_sanity_val_steps=2)
    trainer.fit(module, datamodule=dm)
    return module, trainer, recorder


def test_default_validation_runs_the_attack_only_on_the_last_epoch(mnist1d_model):
    module, trainer, recorder = _validated_fit(mnist1d_model, 3, lr=1e-4, stop_at_target=False)

    assert module.full_val_every_n_epochs is None
    assert len(recorder.logged) == 3
    for cheap in recorder.logged[:2]:
        assert cheap == {"val/forget_acc"}  # no attack, no remaining accuracy
    assert FULL_KEYS | {"val/forget_acc"} <= recorder.logged[2]
    # cheap epochs do not even load the other loaders' batches; the last one runs all four
    assert recorder.loaders == [{1}, {1}, {0, 1, 2, 3}]
    assert all(limit > 0 for limit in trainer.num_val_batches)  # the limits are back


def test_full_validation_every_n_epochs(mnist1d_model):
    _, _, recorder = _validated_fit(
        mnist1d_model, 4, lr=1e-4, stop_at_target=False, full_val_every_n_epochs=2
    )
    full = [keys >= FULL_KEYS for keys in recorder.logged]
    assert full == [False, True, False, True]
    assert recorder.loaders[0] == {1} and recorder.loaders[1] == {0, 1, 2, 3}


def test_full_report_at_test_and_validate_after_a_cheap_fit(mnist1d_model):
    module, trainer, _ = _validated_fit(mnist1d_model, 2, lr=1e-4, stop_at_target=False)
    dm = _forget_datamodule()

    trainer.test(module, datamodule=dm, verbose=False)
    tested = trainer.callback_metrics
    assert {k.replace("val/", "test/") for k in FULL_KEYS} <= tested.keys()
    assert module.test_evaluation.mia.attacker == "svc"

    trainer.validate(module, datamodule=dm, verbose=False)
    assert trainer.callback_metrics.keys() >= FULL_KEYS


def test_stop_at_target_still_stops_with_validation_and_ends_on_a_full_one(mnist1d_model):
    callback = NullSpaceCalibration(
        threshold=UNLEARN_THRESHOLD, class_threshold_step=UNLEARN_CLASS_STEP
    )
    dm = _forget_datamodule()
    module = UnlearningModule(
        mnist1d_model, num_classes=10, forget_classes=[MNIST1D_FORGET], lr=UNLEARN_LR
    )
    recorder = ValidationRecorder().attach(module)
    trainer = quiet_trainer(30, [callback, recorder], limit_val_batches=None)

    trainer.fit(module, datamodule=dm)

    assert module.stopped_at_epoch is not None
    assert trainer.current_epoch == module.stopped_at_epoch + 1 < 30
    assert len(recorder.logged) == module.stopped_at_epoch + 1
    assert recorder.logged[-1] >= FULL_KEYS  # the stopping epoch's validation is the full one
    assert all(keys == {"val/forget_acc"} for keys in recorder.logged[:-1])
    assert float(trainer.callback_metrics["val/forget_acc"]) <= 0.1  # the original: ~0.99


def test_sample_level_cheap_epochs_run_no_loader():
    from unsc_lightning.data import ForgetSpec

    dm = tensor_datamodule(forget=ForgetSpec(kind="random", fraction=0.1), batch_size=8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module = UnlearningModule(model, num_classes=4, lr=1e-4, stop_at_target=False)
    recorder = ValidationRecorder().attach(module)
    quiet_trainer(3, [recorder], limit_val_batches=None).fit(module, datamodule=dm)

    assert recorder.loaders == [set(), set(), {0, 1, 2, 3}]
    assert recorder.logged[0] == set()
    assert "val/mia_efficacy" in recorder.logged[2]


def test_classifier_module_still_validates_everything_every_epoch():
    dm = tensor_datamodule(forget_classes=[1], train_on="retain", batch_size=32)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module = ClassifierModule(model, num_classes=4, forget_classes=[1])
    recorder = ValidationRecorder().attach(module)
    quiet_trainer(2, [recorder], limit_val_batches=None).fit(module, datamodule=dm)

    assert recorder.loaders == [{0, 1, 2, 3}] * 2
    assert all(keys >= FULL_KEYS for keys in recorder.logged)


def test_full_val_every_n_epochs_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"`full_val_every_n_epochs` to be an integer >= 1"):
        UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], full_val_every_n_epochs=0)


def _span_problem(outside: float) -> tuple[Tensor, DataLoader, DataLoader, nn.Sequential]:
    """Remaining inputs spanning 16 of 64 dimensions (the pooled basis at threshold 1.0 has
    r = 16, so the projection is the direct form G - (G U) Uᵀ), forget inputs in that span plus
    ``outside`` times noise off it: ``(retain_x, retain loader, forget loader, Linear(64, 4))``."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 64, generator=generator)
    retain_x = torch.randn(256, 16, generator=generator) @ mixing
    forget_x = torch.randn(64, 16, generator=generator) @ mixing
    forget_x += outside * torch.randn(64, 64, generator=generator)
    retain = DataLoader(
        TensorDataset(retain_x, torch.randint(0, 4, (256,), generator=generator)), batch_size=64
    )
    forget = DataLoader(TensorDataset(forget_x, torch.zeros(64, dtype=torch.long)), batch_size=32)
    torch.manual_seed(0)
    return retain_x, retain, forget, nn.Sequential(nn.Linear(64, 4))


def test_relative_steps_do_not_amplify_projection_rounding():
    # forget inputs lie almost wholly in the remaining inputs' span (r = 16 of d = 64, so the
    # projection is G - (G U) Uᵀ): the projected gradient is tiny, and one float32 projection
    # leaves cancellation error along the span that a step of 1 % of the weight's norm amplifies
    retain_x, retain, forget, model = _span_problem(1e-6)
    before = model(retain_x).detach()
    module = UnlearningModule(model, 4, [0], stop_at_target=False)
    callback = NullSpaceCalibration(threshold=1.0, rule="pooled", retain_dataloader=retain)
    quiet_trainer(5, callbacks=[callback]).fit(module, train_dataloaders=forget)
    after = model(retain_x).detach()
    assert callback.engine is not None and callback.engine.bases["model.0"].shape[1] == 16
    assert float((after - before).norm() / before.norm()) < 1e-4


def test_relative_steps_project_once_where_projection_keeps_much_of_the_gradient(monkeypatch):
    # Forget inputs well outside the remaining inputs' span (r = 16 of d = 64, the direct form
    # G - (G U) Uᵀ): the projection keeps a good part of each gradient, its cancellation error is
    # then below the update's own rounding, and the gradient is not projected a second time.
    # The remaining outputs must still not move.
    from unsc_lightning.nullspace import engine as engine_module

    retain_x, retain, forget, model = _span_problem(3.0)
    before = model(retain_x).detach()
    projections = []
    project = engine_module._project_matrix_
    monkeypatch.setattr(
        engine_module, "_project_matrix_", lambda *a: projections.append(1) or project(*a)
    )
    module = UnlearningModule(model, 4, [0], stop_at_target=False)
    callback = NullSpaceCalibration(threshold=1.0, rule="pooled", retain_dataloader=retain)
    quiet_trainer(5, callbacks=[callback]).fit(module, train_dataloaders=forget)
    after = model(retain_x).detach()
    assert callback.engine is not None and callback.engine.bases["model.0"].shape[1] == 16
    assert len(projections) == 10  # 5 epochs x 2 steps, one projection each
    assert float((after - before).norm() / before.norm()) < 1e-5
    assert float((model[0].weight.detach() - module.original[0].weight).norm()) > 0.01


def test_relative_steps_hold_a_weight_whose_gradient_projects_to_rounding():
    # A gradient wholly inside the remaining subspace projects to float32 rounding; relative
    # steps must not rescale that to a step of `relative_step * ||W||` (torchvision ResNet-18's
    # last stage at 32x32). A gradient with a real null-space part still steps.
    from unsc_lightning.module import NULL_GRADIENT_FRACTION, drop_null_gradients_

    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 3))[0]
    inside = torch.nn.Parameter(torch.randn(4, 8))
    mixed = torch.nn.Parameter(torch.randn(4, 8))
    inside.grad = torch.randn(4, 3) @ basis.T  # in the span of the basis
    mixed.grad = torch.randn(4, 8)
    raw = {id(p): p.grad.norm() for p in (inside, mixed)}
    for parameter in (inside, mixed):  # what the projection leaves, in float32
        parameter.grad -= (parameter.grad @ basis) @ basis.T
    assert 0 < float(inside.grad.norm()) < NULL_GRADIENT_FRACTION * float(raw[id(inside)])
    kept = mixed.grad.clone()

    drop_null_gradients_([inside, mixed], raw)

    assert float(inside.grad.abs().max()) == 0.0
    assert torch.equal(mixed.grad, kept)


def test_raw_gradient_norms_are_unscaled_under_a_grad_scaler():
    # precision="16-mixed" on CUDA: on_after_backward sees gradients multiplied by the scaler's
    # scale, on_before_optimizer_step sees them unscaled; compared as they are, every gradient
    # would look like rounding (ratio 1 / scale) and no weight would move.
    from types import SimpleNamespace

    from unsc_lightning.module import drop_null_gradients_

    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    module._projections = [(object(), True)]  # as when a NullSpaceCalibration is attached
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    parameters = list(module.model.parameters())
    module._stepped = parameters  # as found in on_fit_start
    for parameter in parameters:
        parameter.grad = 2.0**16 * torch.randn_like(parameter)  # scaled, as after backward
    module.on_after_backward()
    for parameter in parameters:
        parameter.grad /= 2.0**16  # what the scaler's unscale_ does before the step hooks
    unscaled = [parameter.grad.clone() for parameter in parameters]

    drop_null_gradients_(parameters, module._raw_norms)

    assert all(torch.equal(p.grad, g) for p, g in zip(parameters, unscaled))


def test_relative_step_gradients_equal_dropping_then_scaling_one_parameter_at_a_time():
    # The fused form (every norm in one `_foreach_norm`, one multiplication per gradient) against
    # the rule written out per parameter: dropped where the projection left at most
    # NULL_GRADIENT_FRACTION of the raw norm, else rescaled to the weight's norm. Mixed dtypes,
    # a parameter without a raw norm, zero gradients and weights, and one without a gradient.
    from unsc_lightning.module import NULL_GRADIENT_FRACTION, relative_step_gradients_

    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 3), (4, 4), (6,), (2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64)))
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
    params[3].grad.zero_()
    with torch.no_grad():
        params[4].zero_()
    no_grad = torch.nn.Parameter(torch.ones(2))
    raw = {id(p): p.grad.norm() * 0.5 for p in params}
    raw[id(params[1])] = params[1].grad.norm() / NULL_GRADIENT_FRACTION * 2  # dropped
    del raw[id(params[2])]  # no raw norm: never dropped
    expected = []
    for p in params:
        grad, norm = p.grad.clone(), p.grad.norm()
        if id(p) in raw and not norm > NULL_GRADIENT_FRACTION * raw[id(p)]:
            grad = grad * 0
        elif norm > 0 and p.detach().norm() > 0:
            grad = grad * (p.detach().norm() / norm)
        expected.append(grad)

    relative_step_gradients_([*params, no_grad], raw)

    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
    assert float(params[1].grad.abs().max()) == 0.0
    assert no_grad.grad is None


def test_scale_to_weight_norms_matches_the_formula_and_leaves_zero_norms_alone():
    from unsc_lightning.module import scale_to_weight_norms_

    torch.manual_seed(0)
    moving, zero_grad, zero_weight = (torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3))
    moving.grad = torch.randn(3, 4)
    zero_grad.grad = torch.zeros(3, 4)
    with torch.no_grad():
        zero_weight.zero_()
    zero_weight.grad = torch.randn(3, 4)
    expected = moving.grad * (moving.detach().norm() / moving.grad.norm())
    kept = zero_weight.grad.clone()

    scale_to_weight_norms_([moving, zero_grad, zero_weight, torch.nn.Parameter(torch.ones(2))])

    assert torch.equal(moving.grad, expected)  # the same operations as G * (||W|| / ||G||)
    assert float(zero_grad.grad.abs().max()) == 0.0  # no NaN from 0 / 0
    assert torch.equal(zero_weight.grad, kept)
