"""Baselines: each one unlearns end to end on a tiny split and moves the model the expected way."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from unsc_lightning import ForgetSpec, UnlearningConfigError
from unsc_lightning.baselines import (
    SCRUB,
    BoundaryShrink,
    FineTune,
    GradientAscent,
    L1Sparse,
    RandomLabels,
    RetrainFromScratch,
    SalUn,
    StopAtHeldOutAccuracy,
    distillation_kl,
    loader_accuracy,
    saliency_masks,
    unsc_no_nullspace,
    unsc_random_labels,
)
from unsc_lightning.lab.recipes import (
    BASELINE_RECIPES,
    EMBEDDED,
    METHODS,
    UNLEARNING_METHODS,
    MethodRecipe,
    method_recipe,
)
from unsc_lightning.lab.runs import (
    UnlearningRun,
    make_datamodule,
    make_trainer,
    run_method,
    train_classifier,
)
from unsc_lightning.lab.scoring import evaluate
from unsc_lightning.models import DigitsConvNet

DATASET = "digits"
FORGET = ForgetSpec(kind="class", classes=[3])
TINY_TRAIN = replace(EMBEDDED[DATASET]["train"], epochs=6, milestones=[5], batch_size=64)

#: Short recipes for the tiny split: enough steps to move the forgotten class.
TINY_RECIPES: dict[str, MethodRecipe] = {
    "ft": MethodRecipe(epochs=6, lr=0.1, batch_size=64),
    "l1_sparse": MethodRecipe(epochs=6, lr=0.1, batch_size=64, options={"alpha": 1e-4}),
    "rl": MethodRecipe(epochs=3, lr=1e-3, batch_size=64),
    "ga": MethodRecipe(epochs=6, lr=0.1, batch_size=64),
    "boundary_shrink": MethodRecipe(epochs=3, lr=1e-3, batch_size=64, options={"epsilon": 0.2}),
    "salun": MethodRecipe(epochs=3, lr=1e-2, batch_size=64, options={"mask_ratio": 0.5}),
    "scrub": MethodRecipe(epochs=4, lr=1e-2, batch_size=64, options={"max_epochs": 3}),
}


@pytest.fixture(scope="module")
def original() -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, _, _ = train_classifier(DATASET, FORGET, seed=0, train_on="all", recipe=TINY_TRAIN)
    torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def test_dm() -> Any:
    return make_datamodule(DATASET, FORGET, 0, "forget", 64)


def test_every_method_has_a_label_and_recipe() -> None:
    assert set(UNLEARNING_METHODS) == set(METHODS) - {"original", "retrain"}
    for dataset, recipes in BASELINE_RECIPES.items():
        baselines = {n for n, info in METHODS.items() if info.kind == "baseline"}
        assert set(recipes) == baselines, dataset
        for name in baselines:
            assert method_recipe(name, dataset) == recipes[name]
            assert method_recipe(name, dataset) is not recipes[name]


@pytest.fixture(scope="module")
def unlearned(original: nn.Module) -> dict[str, UnlearningRun]:
    """Lazily filled ``{method: run}`` so that tests share the expensive runs."""
    return {}


def _unlearn(method: str, original: nn.Module, cache: dict[str, UnlearningRun]) -> UnlearningRun:
    if method not in cache:
        cache[method] = run_method(
            method, original, DATASET, FORGET, seed=0, recipe=TINY_RECIPES.get(method)
        )
    return cache[method]


@pytest.mark.parametrize("method", UNLEARNING_METHODS)
def test_method_unlearns_the_forgotten_class(
    method: str, original: nn.Module, test_dm: Any, unlearned: Any
) -> None:
    before = evaluate(original, test_dm)
    state = copy.deepcopy(original.state_dict())
    model, seconds, calibration = _unlearn(method, original, unlearned)
    after = evaluate(model, test_dm)
    assert seconds > 0
    assert (calibration is not None) == (method in ("unsc", "unsc_random_labels"))
    assert after["acc_f"] < before["acc_f"] - 20, (method, before["acc_f"], after["acc_f"])
    assert not model.training
    # the original is left untouched
    for name, value in original.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_null_space_protects_remaining_accuracy(
    original: nn.Module, test_dm: Any, unlearned: Any
) -> None:
    with_null_space = evaluate(_unlearn("unsc", original, unlearned)[0], test_dm)["acc_r"]
    without = evaluate(_unlearn("unsc_no_nullspace", original, unlearned)[0], test_dm)["acc_r"]
    assert with_null_space >= without - 1.0


def test_reference_methods_are_not_run_by_run_method(original: nn.Module) -> None:
    with pytest.raises(UnlearningConfigError, match="`method`.*'retrain'"):
        run_method("retrain", original, DATASET, FORGET, seed=0)
    with pytest.raises(UnlearningConfigError, match="recipe for `method='unsc'`"):
        method_recipe("unsc", DATASET)


@pytest.mark.parametrize(
    ("method", "recipe", "expected"),
    [
        ("unsc", TINY_RECIPES["ft"], "UnlearnRecipe"),
        ("unsc_no_nullspace", TINY_RECIPES["ft"], "UnlearnRecipe"),
        ("ft", EMBEDDED[DATASET]["unlearn"], "MethodRecipe"),
    ],
)
def test_run_method_refuses_a_recipe_of_the_other_kind(
    original: nn.Module, method: str, recipe: Any, expected: str
) -> None:
    with pytest.raises(UnlearningConfigError, match=f"`recipe` to be a {expected}"):
        run_method(method, original, DATASET, FORGET, seed=0, recipe=recipe)


def test_random_labels_are_never_the_own_label(original: nn.Module) -> None:
    module = RandomLabels(copy.deepcopy(original), num_classes=10, forget_classes=[3])
    from unsc_lightning.pseudo_labels import random_pseudo_labels

    labels = torch.full((500,), 3)
    targets = random_pseudo_labels(10, labels, [], module.generator)
    assert not (targets == 3).any() and len(set(targets.tolist())) == 9


def test_boundary_shrink_labels_are_wrong_remaining_classes(
    original: nn.Module, test_dm: Any
) -> None:
    module = BoundaryShrink(
        copy.deepcopy(original), num_classes=10, forget_classes=[1, 3], epsilon=0.2
    )
    inputs, labels = next(iter(test_dm.forget_dataloader()))
    targets = module.neighbour_labels(inputs, labels)
    assert not torch.isin(targets, torch.tensor([1, 3])).any()
    assert not (targets == labels).any()
    # the FGSM step is what decides: the neighbour is the perturbed input's best other class
    probe = inputs.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(module.original(probe), labels).backward()
    logits = module.original(inputs + 0.2 * probe.grad.sign()).detach()
    logits[:, [1, 3]] = float("-inf")
    assert torch.equal(targets, logits.argmax(1))


def test_saliency_masks_keep_the_requested_share(original: nn.Module, test_dm: Any) -> None:
    model = copy.deepcopy(original)
    masks = saliency_masks(
        model, test_dm.forget_dataloader(), ratio=0.3, device=torch.device("cpu")
    )
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.3) < 0.01
    assert all(p.grad is None for p in model.parameters())


def test_salun_updates_only_salient_weights(original: nn.Module) -> None:
    dm = make_datamodule(DATASET, FORGET, 0, "forget", 64)
    model = copy.deepcopy(original)
    module = SalUn(model, num_classes=10, forget_classes=[3], lr=0.01, mask_ratio=0.2)
    make_trainer(1).fit(module, datamodule=dm)
    changed = unchanged_masked = 0
    for name, param in model.named_parameters():
        moved = param.detach() != original.state_dict()[name]
        changed += int(moved.sum())
        unchanged_masked += int((moved & (module.masks[name] == 0)).sum())
    assert changed > 0 and unchanged_masked == 0


def test_distillation_kl() -> None:
    logits = torch.randn(8, 5)
    assert distillation_kl(logits, logits, 4.0).abs() < 1e-6
    assert distillation_kl(logits, torch.randn(8, 5), 4.0) > 0


def test_scrub_moves_away_then_repairs(original: nn.Module, test_dm: Any) -> None:
    dm = make_datamodule(DATASET, FORGET, 0, "forget", 64)
    module = SCRUB(
        copy.deepcopy(original),
        num_classes=10,
        forget_classes=[3],
        lr=0.01,
        max_epochs=2,
        min_steps=2,
    )
    make_trainer(3).fit(module, datamodule=dm)
    assert module.teacher.training is False
    for name, value in module.teacher.state_dict().items():
        assert torch.equal(value, original.state_dict()[name])
    assert evaluate(module.model.eval(), test_dm)["acc_f"] < evaluate(original, test_dm)["acc_f"]


def test_l1_weight_decays_linearly(original: nn.Module) -> None:
    dm = make_datamodule(DATASET, FORGET, 0, "retain", 512)
    module = L1Sparse(copy.deepcopy(original), num_classes=10, forget_classes=[3], alpha=1e-4)
    seen: list[float] = []

    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen.append(float(trainer.callback_metrics["train/l1_weight"]))

    make_trainer(2, [Record()], limit_train_batches=1).fit(module, datamodule=dm)
    assert seen == pytest.approx([1e-4, 0.5e-4])


def test_stop_at_held_out_accuracy_for_random_forgetting(original: nn.Module) -> None:
    spec = ForgetSpec(kind="random", fraction=0.1, seed=0)
    dm = make_datamodule(DATASET, spec, 0, "forget", 64)
    stop = StopAtHeldOutAccuracy()
    model = run_method("unsc", original, DATASET, spec, seed=0, callbacks=[stop]).model
    assert stop.stopped_at_step is not None
    target = loader_accuracy(original, dm.val_dataloader()[0], torch.device("cpu"))
    forget_accuracy = loader_accuracy(model, dm.forget_dataloader(), torch.device("cpu"))
    before = loader_accuracy(original, dm.forget_dataloader(), torch.device("cpu"))
    assert forget_accuracy <= target < before
    assert forget_accuracy > 0.5  # held-out level, not zero


def test_ablation_factories(original: nn.Module) -> None:
    module, callback = unsc_random_labels(copy.deepcopy(original), 10, [3], threshold=0.9)
    assert module.hparams.pseudo_labels == "random" and callback.threshold == 0.9
    assert unsc_no_nullspace(copy.deepcopy(original), 10, [3]).hparams.pseudo_labels == "unsc"


def test_module_and_datamodule_must_agree(original: nn.Module) -> None:
    dm = make_datamodule(DATASET, FORGET, 0, "forget", 64)
    with pytest.raises(UnlearningConfigError, match="`train_on='retain'`"):
        make_trainer(1).fit(FineTune(copy.deepcopy(original), 10, [3]), datamodule=dm)
    with pytest.raises(UnlearningConfigError, match=r"`forget_classes=\[4\]`"):
        make_trainer(1).fit(GradientAscent(copy.deepcopy(original), 10, [4]), datamodule=dm)
    with pytest.raises(UnlearningConfigError, match="`train_on='retain'`"):
        make_trainer(1).fit(RetrainFromScratch(DigitsConvNet(), 10, [3]), datamodule=dm)


def test_retain_batches_need_a_source(original: nn.Module) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    forget = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.full((8,), 3)), batch_size=4)
    module = SalUn(copy.deepcopy(original), num_classes=10, forget_classes=[3])
    with pytest.raises(UnlearningConfigError, match="`retain_dataloader=`"):
        make_trainer(1).fit(module, train_dataloaders=forget)
    retain = DataLoader(
        TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4
    )
    module = SalUn(
        copy.deepcopy(original), num_classes=10, forget_classes=[3], retain_dataloader=retain
    )
    make_trainer(1).fit(module, train_dataloaders=forget)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (FineTune, {"lr": 0.0}, "`lr` > 0, got 0.0"),
        (FineTune, {"momentum": -1.0}, "`momentum` >= 0, got -1.0"),
        (FineTune, {"weight_decay": -1.0}, "`weight_decay` >= 0"),
        (FineTune, {"num_classes": 1}, "`num_classes`.*1"),
        (FineTune, {"forget_classes": [11]}, "`forget_classes`"),
        (FineTune, {"retain_batch_size": 0}, "`retain_batch_size`.*0"),
        (L1Sparse, {"alpha": -1.0}, "`alpha` >= 0, got -1.0"),
        (RandomLabels, {"retain_weight": -1.0}, "`retain_weight` >= 0"),
        (SalUn, {"mask_ratio": 0.0}, r"`mask_ratio` in \(0, 1\], got 0.0"),
        (BoundaryShrink, {"epsilon": 0.0}, "`epsilon` > 0, got 0.0"),
        (SCRUB, {"max_epochs": -1}, "`max_epochs`.*-1"),
        (SCRUB, {"min_steps": 1.5}, "`min_steps`.*1.5"),
        (SCRUB, {"temperature": 0.0}, "`temperature` > 0, got 0.0"),
        (SCRUB, {"alpha": -1.0}, "`alpha` >= 0"),
        (StopAtHeldOutAccuracy, {"target": 2.0}, "`target`.*2.0"),
        (StopAtHeldOutAccuracy, {"check_every_n_steps": 0}, "`check_every_n_steps`.*0"),
    ],
)
def test_misconfiguration(cls: type, kwargs: dict[str, Any], match: str) -> None:
    if cls is StopAtHeldOutAccuracy:
        with pytest.raises(UnlearningConfigError, match=match):
            cls(**kwargs)
        return
    arguments: dict[str, Any] = {
        "model": DigitsConvNet(),
        "num_classes": 10,
        "forget_classes": [3],
        **kwargs,
    }
    with pytest.raises(UnlearningConfigError, match=match):
        cls(**arguments)


def test_ablations_get_their_own_learning_rate() -> None:
    from unsc_lightning.lab.recipes import ABLATION_LR, unlearn_recipe

    for dataset, spec in EMBEDDED.items():
        assert unlearn_recipe("unsc", dataset) == spec["unlearn"]
        assert unlearn_recipe("unsc", dataset) is not spec["unlearn"]
        assert unlearn_recipe("unsc_random_labels", dataset).lr == spec["unlearn"].lr
        ablation = unlearn_recipe("unsc_no_nullspace", dataset)
        assert ablation.lr == ABLATION_LR[dataset]["unsc_no_nullspace"] != spec["unlearn"].lr
        assert ablation.epochs == spec["unlearn"].epochs


def test_a_baseline_restores_the_validation_limits_at_the_end_of_its_fit() -> None:
    # a validation epoch interrupted after the cheap-loader rule zeroed a loader's limit: the
    # end of the fit puts the limit back, as for UnlearningModule (EvaluationMixin.on_fit_end)
    from types import SimpleNamespace

    from unsc_lightning.baselines import FineTune

    module = FineTune(DigitsConvNet(), num_classes=10, forget_classes=[3])
    limits = [4, 0]
    module._trainer = SimpleNamespace(num_val_batches=limits)  # type: ignore[assignment]
    module._skipped_limits = [(1, 7)]
    module._retain_iterator = iter([])  # type: ignore[assignment]
    module.on_fit_end()
    assert limits == [4, 7]
    assert module._retain_iterator is None
