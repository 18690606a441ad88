"""NullSpaceEngine: plain loop vs callback, classes from labels, class-grouped passes, memory,
tied weights, batch adapters, parameter accounting and model-level drift."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.problems import (
    IN_FEATURES,
    BoringClassifier,
    logits_of,
    make_subspace_problem,
    max_relative_change,
    mlp,
    quiet_trainer,
)
from helpers.zoo import PlainClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration
from unsc_lightning.nullspace import NullSpaceEngine, NullSpaceEngineError
from unsc_lightning.nullspace.rules import BasisInfo, class_threshold_schedule, per_class_basis


def _projector(basis: Tensor) -> Tensor:
    return basis.double() @ basis.double().T


class PlainModule(PlainClassifier):
    """What a user writes (forward, training_step, configure_optimizers), with plain SGD."""

    def __init__(self, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__(model, lr=lr)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_plain_loop_gives_the_weights_of_the_callback_in_a_trainer():
    problem = make_subspace_problem()
    torch.manual_seed(0)
    model = mlp()
    plain = copy.deepcopy(model)
    callback = NullSpaceCalibration(threshold=0.97, retain_dataloader=problem.retain_loader())
    forget = TensorDataset(problem.forget_x, problem.forget_y)
    quiet_trainer(2, [callback]).fit(PlainModule(model), DataLoader(forget, batch_size=8))

    engine = NullSpaceEngine(plain, threshold=0.97)
    engine.build(problem.retain_loader())
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    loader = DataLoader(forget, batch_size=8)
    with engine.guard():
        for _ in range(2):
            for x, y in loader:
                optimizer.zero_grad()
                F.cross_entropy(plain(x), y).backward()
                engine.project_gradients_()
                optimizer.step()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    assert all(p.requires_grad for p in plain.parameters())  # the guard restored everything
    assert set(engine.bases) == {"0", "2", "4"}
    for key, basis in engine.bases.items():
        assert torch.allclose(
            _projector(basis), _projector(callback.bases[f"model.{key}"]), atol=1e-5
        )


def test_per_class_rule_takes_classes_from_labels_without_num_classes():
    problem = make_subspace_problem()
    model = mlp()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    before = logits_of(model, problem.retain_x)
    quiet_trainer(3, [callback]).fit(PlainModule(model, lr=0.5), problem.forget_loader())
    assert callback.engine is not None and callback.engine.report is not None
    assert callback.engine.report.classes == [0, 1, 2, 3]
    assert max_relative_change(before, logits_of(model, problem.retain_x)) < 1e-4
    assert callback.model_drift is not None and callback.model_drift < 1e-4
    assert callback.prediction_change == 0.0


def test_unlabelled_retain_data_fall_back_to_the_pooled_rule():
    problem = make_subspace_problem()
    unlabelled = NullSpaceEngine(mlp(), threshold=0.97)
    unlabelled.build(problem.retain_loader(labels=False))
    pooled = NullSpaceEngine(copy.deepcopy(unlabelled.model), threshold=0.97, rule="pooled")
    pooled.build(problem.retain_loader())
    assert unlabelled.report is not None and unlabelled.report.classes == []
    for key, basis in unlabelled.bases.items():
        assert torch.allclose(_projector(basis), _projector(pooled.bases[key]), atol=1e-5)


@pytest.mark.parametrize("step", [0.0, 0.01])
def test_class_groups_in_several_passes_equal_one_pass(step):
    problem = make_subspace_problem()
    model = mlp()
    one = NullSpaceEngine(model, threshold=0.9, class_threshold_step=step)
    one.build(problem.retain_loader())
    grouped = NullSpaceEngine(model, threshold=0.9, class_threshold_step=step)
    grouped.memory_budget = grouped.estimate_bytes(1)  # one class's sums at a time
    grouped.build(problem.retain_loader())
    assert one.report is not None and grouped.report is not None
    assert (one.report.passes, grouped.report.passes) == (1, 4)
    assert grouped.report.peak_bytes <= grouped.report.estimate_bytes
    for key, basis in one.bases.items():
        assert basis.shape == grouped.bases[key].shape
        assert torch.allclose(_projector(basis), _projector(grouped.bases[key]), atol=1e-5)
        # one group: energy of the final basis; several: a lower bound
        assert grouped.layer_infos[key].energy <= one.layer_infos[key].energy + 1e-9


def test_per_class_engine_equals_the_direct_algorithm_1():
    problem = make_subspace_problem()
    model = nn.Sequential(nn.Linear(IN_FEATURES, 8))
    engine = NullSpaceEngine(model, threshold=0.95, class_threshold_step=0.01)
    engine.build(problem.retain_loader(batch_size=5))
    x, y = problem.retain_x.double(), problem.retain_y
    covariances = {int(k): x[y == k].T @ x[y == k] for k in y.unique()}
    expected, _ = per_class_basis(covariances, class_threshold_schedule(0.95, 0.01))
    assert torch.allclose(_projector(engine.bases["0"]), _projector(expected), atol=1e-5)


def test_hundred_classes_stay_within_the_estimate_below_three_squares():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator)
    y = torch.arange(500) % 100
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 100))
    engine = NullSpaceEngine(model, threshold=0.97)
    engine.memory_budget = engine.estimate_bytes(1)
    squares = sum(d * d for d in engine.dims.values())
    assert engine.estimate_bytes(1) < 3 * squares * 8  # float64 elements
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        engine.build(
            DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True, generator=generator)
        )
    assert engine.report is not None
    assert engine.report.classes == list(range(100)) and engine.report.passes == 100
    assert engine.report.peak_bytes <= engine.report.estimate_bytes
    # the dense per-class layout would hold 100 x sum(d^2) float64 at once
    largest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert largest < engine.report.estimate_bytes
    dense = NullSpaceEngine(model, threshold=0.97)
    dense.build(DataLoader(TensorDataset(x, y), batch_size=50))
    assert dense.report is not None and dense.report.passes == 1  # the default budget holds all
    assert dense.report.peak_bytes <= dense.report.estimate_bytes
    for key, basis in dense.bases.items():
        assert torch.allclose(_projector(basis), _projector(engine.bases[key]), atol=1e-4)


def test_budget_below_one_class_names_the_figure_and_the_way_out():
    engine = NullSpaceEngine(mlp(), memory_budget=1000)
    with pytest.raises(NullSpaceEngineError, match=r"needs about .* MiB .* Raise `memory_budget`"):
        engine.build(make_subspace_problem().retain_loader())


def test_max_samples_per_class_uses_that_many_samples():
    problem = make_subspace_problem()
    engine = NullSpaceEngine(mlp(), max_samples_per_class=3)
    engine.build(problem.retain_loader())
    assert engine.report is not None and engine.report.samples == 12  # 4 classes x 3


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(IN_FEATURES, IN_FEATURES, bias=False)
        self.b = nn.Linear(IN_FEATURES, IN_FEATURES, bias=False)
        self.b.weight = self.a.weight  # one parameter, two layers
        self.head = nn.Linear(IN_FEATURES, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "update"])
def test_tied_weight_keeps_the_outputs_of_every_layer_using_it(optimizer):
    problem = make_subspace_problem()
    torch.manual_seed(0)
    model = _Tied()
    factory = (lambda p: torch.optim.Adam(p, lr=0.05)) if optimizer == "adam" else None
    mode = "update" if optimizer == "update" else "auto"
    callback = NullSpaceCalibration(
        threshold=1.0, retain_dataloader=problem.retain_loader(), mode=mode
    )
    before = logits_of(model, problem.retain_x)
    quiet_trainer(3, [callback]).fit(
        BoringClassifier(model, lr=0.5, optimizer=factory), problem.forget_loader()
    )
    assert callback.engine is not None
    assert list(callback.engine.bases) == ["model.a", "model.head"]  # one basis for a and b
    assert max_relative_change(before, logits_of(model, problem.retain_x)) < 1e-4


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, pixel_values: Tensor, scale: Tensor) -> Tensor:
        return self.net(pixel_values * scale)


class _DictModule(PlainModule):
    def forward(self, pixel_values: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        return self.model(pixel_values, scale)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["pixel_values"], batch["scale"]), batch["labels"])


def _dict_loader(x: Tensor, y: Tensor) -> DataLoader:
    items = [{"pixel_values": a, "scale": torch.ones(1), "labels": b} for a, b in zip(x, y)]
    return DataLoader(items, batch_size=8)


def test_dict_batches_with_keyword_inputs_work_at_defaults():
    problem = make_subspace_problem()
    model = _DictModel()
    callback = NullSpaceCalibration(
        threshold=1.0, retain_dataloader=_dict_loader(problem.retain_x, problem.retain_y)
    )
    before = logits_of(model.net, problem.retain_x)
    quiet_trainer(2, [callback]).fit(
        _DictModule(model, lr=0.5), _dict_loader(problem.forget_x, problem.forget_y)
    )
    assert callback.engine is not None and callback.engine.report is not None
    assert callback.engine.report.classes == [0, 1, 2, 3]
    assert max_relative_change(before, logits_of(model.net, problem.retain_x)) < 1e-4


def test_batch_adapter_maps_a_custom_batch():
    problem = make_subspace_problem()
    batches = [{"inputs": (x,), "target": y} for x, y in problem.retain_loader()]
    engine = NullSpaceEngine(mlp())
    engine.build(batches, batch_adapter=lambda b: (b["inputs"], b["target"]))
    assert engine.report is not None and engine.report.samples == len(problem.retain_x)


class _TokenModel(nn.Module):
    """Class token and position embedding (raw parameters) around a Linear encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 6, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(len(x), 5, 4)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.proj(tokens))[:, 0])


def test_every_trainable_parameter_is_constrained_or_frozen_and_restored():
    problem = make_subspace_problem()
    model = _TokenModel()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    before = logits_of(model, problem.retain_x)
    with pytest.warns(
        UserWarning, match=r"`model\.cls_token` \(unsupported\), `model\.pos` \(unsupported\)"
    ):
        quiet_trainer(3, [callback]).fit(PlainModule(model, lr=0.5), problem.forget_loader())
    engine = callback.engine
    assert engine is not None
    names = {f"model.{n}" for n, _ in model.named_parameters()}
    assert set(engine.constrained_parameters) | set(engine.frozen_parameters) == names
    assert set(engine.constrained_parameters) == {"model.proj.weight", "model.head.weight"}
    assert not engine.free_parameters
    assert all(p.requires_grad for p in model.parameters())
    assert max_relative_change(before, logits_of(model, problem.retain_x)) < 1e-4


def test_model_drift_warns_when_free_parameters_move_remaining_outputs():
    problem = make_subspace_problem()
    model = _TokenModel()
    callback = NullSpaceCalibration(
        threshold=1.0, retain_dataloader=problem.retain_loader(), freeze_unconstrained=False
    )
    with pytest.warns(
        UserWarning, match=r"accuracy on a probe of \d+ remaining training samples fell from"
    ):
        quiet_trainer(5, [callback]).fit(PlainModule(model, lr=1.0), problem.forget_loader())
    assert callback.model_drift is not None and callback.model_drift > 0.05
    assert callback.prediction_change is not None and callback.prediction_change > 0.01


def _changed_probe(labelled: bool) -> tuple[NullSpaceEngine, Tensor, Tensor]:
    """An engine built on a linear classifier, then the classifier's rows swapped so that the
    probe's predictions change: ``(engine, predictions before, after)``."""
    torch.manual_seed(0)
    inputs = torch.randn(200, 6)
    model = nn.Linear(6, 4)
    labels = model(inputs).argmax(-1) if labelled else None
    batches = [(inputs, labels) if labelled else inputs]
    engine = NullSpaceEngine(model, threshold=0.97, rule="pooled")
    engine.build(batches, batch_adapter=None if labelled else (lambda batch: (batch, None)))
    before = model(inputs).argmax(-1)
    with torch.no_grad():
        model.weight[[0, 1]] = model.weight[[1, 0]].clone()  # classes 0 and 1 trade places
        model.bias[[0, 1]] = model.bias[[1, 0]].clone()
    return engine, before, model(inputs).argmax(-1)


def test_probe_accuracy_drop_warns_and_changed_predictions_alone_do_not():
    from unsc_lightning.diagnostics import model_evidence

    engine, before, after = _changed_probe(labelled=True)
    assert engine.probe_labels is not None and torch.equal(engine.probe_labels, before)
    changed = float((before != after).float().mean())
    assert changed > 0.2
    with pytest.warns(UserWarning, match=r"fell from 100\.0% to"):
        metrics = model_evidence(engine, engine.model)
    assert metrics["nullspace_drift/model_predictions"] == pytest.approx(changed)
    assert metrics["nullspace_drift/probe_accuracy_change"] == pytest.approx(-changed)
    # the same change where it moved wrong predictions to right ones: no warning, and the
    # accuracy change logged
    engine.probe_labels = after.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = model_evidence(engine, engine.model)
    assert metrics["nullspace_drift/probe_accuracy_change"] == pytest.approx(changed)
    # labels that are no class index of these logits: the changed-predictions rule
    engine.probe_labels = torch.full_like(after, 7)
    assert engine.probe_accuracy() is None
    with pytest.warns(UserWarning, match=r"predictions on remaining data changed for"):
        metrics = model_evidence(engine, engine.model)
    assert "nullspace_drift/probe_accuracy_change" not in metrics


def test_unlabelled_probe_warns_on_changed_predictions():
    from unsc_lightning.diagnostics import model_evidence

    engine, _, _ = _changed_probe(labelled=False)
    assert engine.probe_labels is None and engine.probe_accuracy() is None
    with pytest.warns(UserWarning, match=r"predictions on remaining data changed for"):
        model_evidence(engine, engine.model)


def test_schedule_reaching_one_warns_with_the_classes():
    engine = NullSpaceEngine(mlp(), threshold=0.97, class_threshold_step=0.01)
    with pytest.warns(UserWarning, match=r"reaches 1\.0 for classes \[3\]"):
        engine.build(make_subspace_problem().retain_loader())


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).mean(1))


def test_embedding_rows_of_every_remaining_token_stay_at_the_default_threshold():
    generator = torch.Generator().manual_seed(0)
    # remaining data use tokens 0..7, one of them rarely; the forget data use 8..11 too
    retain = torch.randint(0, 7, (64, 5), generator=generator)
    retain[0, 0] = 7  # a rare remaining token
    forget = torch.randint(0, 12, (16, 5), generator=generator)
    model = _Bag()
    engine = NullSpaceEngine(model)  # threshold 0.97
    engine.build([(retain, torch.arange(64) % 2)])
    before = model.embed.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with engine.guard():
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(model(forget), torch.full((16,), 2)).backward()
            engine.project_gradients_()
            optimizer.step()
    moved = (model.embed.weight.detach() - before).abs().amax(1)
    assert float(moved[:8].max()) < 1e-6  # every token seen in remaining data, the rare one too
    assert float(moved[8:].min()) > 1e-3  # tokens only the forget data use are free


def _small_build_data() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=generator)
    return [(x[:15], torch.arange(15) % 3), (x[15:], torch.arange(15) % 3)]


@pytest.mark.parametrize("process", [(2, 2), (-1, 2), (0,), [0, 2], (True, 2), (0.0, 2)])
def test_build_refuses_a_malformed_process(process):
    engine = NullSpaceEngine(nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(ValueError, match=r"`process` must be \(rank, world_size\)"):
        engine.build(_small_build_data(), reduce=lambda t: t, process=process)
    assert not engine.bases  # refused before any pass


def test_build_refuses_gather_or_process_without_reduce_and_a_gather_that_is_not_callable():
    engine = NullSpaceEngine(nn.Sequential(nn.Linear(6, 3)))
    data = _small_build_data()
    with pytest.raises(ValueError, match="need `reduce`"):
        engine.build(data, gather=lambda t: t)
    with pytest.raises(ValueError, match="need `reduce`"):
        engine.build(data, process=(0, 2))
    with pytest.raises(TypeError, match="`gather` must be callable"):
        engine.build(data, reduce=lambda t: t, gather="all")  # type: ignore[arg-type]
    engine.build(data, process=(0, 1))  # one process: nothing to share, accepted
    assert engine.bases


def test_build_refuses_processes_that_do_not_number_the_ranks_once():
    # one process standing for two that both claim rank 0: the sum over "processes" doubles
    engine = NullSpaceEngine(nn.Sequential(nn.Linear(6, 3)))
    with pytest.raises(RuntimeError, match=r"processes per rank: \[2, 0\]"):
        engine.build(_small_build_data(), reduce=lambda t: 2 * t, process=(0, 2))


def test_make_projectors_again_reuses_each_complement(monkeypatch):
    # the callback calls make_projectors after the build (the model may have moved): the QR of a
    # complement (r > d/2; ~0.3 s per 4608-wide layer on a CPU) must not run twice per fit
    from unsc_lightning.nullspace import projection

    calls: list[int] = []
    complement = projection.null_space_complement

    def counted(basis: Tensor) -> Tensor:
        calls.append(basis.shape[0])
        return complement(basis)

    monkeypatch.setattr(projection, "null_space_complement", counted)
    engine = NullSpaceEngine(mlp(), threshold=1.0)

    def wide_bases(seed: int) -> dict[str, tuple[Tensor, BasisInfo]]:  # rank d - 2 > d/2
        generator = torch.Generator().manual_seed(seed)
        return {
            key: (
                torch.linalg.qr(torch.randn(d, d - 2, generator=generator))[0],
                BasisInfo(d, d - 2, 1.0),
            )
            for key, d in engine.dims.items()
        }

    engine.set_bases(wide_bases(0))
    made = len(calls)
    assert made == len(engine.dims)
    before = dict(engine._projectors)
    engine.make_projectors()
    assert len(calls) == made
    assert all(engine._projectors[k] is before[k] for k in before)  # same device: same object
    engine.set_bases(wide_bases(1))
    assert len(calls) == 2 * made  # other bases: new complements
    for key, projector in engine._projectors.items():
        assert projector.source is engine.bases[key]
        gradient = torch.randn(3, engine.dims[key])
        assert float((projector.project(gradient) @ engine.bases[key]).abs().max()) < 1e-5


def test_project_step_projects_each_gradient_once_until_it_changes():
    problem = make_subspace_problem()
    torch.manual_seed(0)
    model = mlp()
    engine = NullSpaceEngine(model, threshold=0.97)
    engine.build(problem.retain_loader())
    F.cross_entropy(model(problem.forget_x), problem.forget_y).backward()
    weights = [model[int(key)].weight for key in engine.keys]
    raw = [w.grad.clone() for w in weights]

    engine.project_step_()
    once = [w.grad.clone() for w in weights]
    for grad, before, key in zip(once, raw, engine.keys):
        basis = engine.bases[key].double()
        assert not torch.equal(grad, before)
        assert float((grad.double() @ basis).norm()) < 1e-5 * float(before.norm())
    engine.project_step_()  # projected already: nothing changes, bit for bit
    assert all(torch.equal(w.grad, g) for w, g in zip(weights, once))

    weights[0].grad.add_(raw[0])  # a new contribution (e.g. another backward): projected again
    engine.project_step_()
    basis = engine.bases[engine.keys[0]].double()
    assert float((weights[0].grad.double() @ basis).norm()) < 1e-5 * float(raw[0].norm())
    assert all(torch.equal(w.grad, g) for w, g in zip(weights[1:], once[1:]))


def test_guarding_engines_finds_the_engine_only_while_its_guard_is_active():
    from unsc_lightning.nullspace import guarding_engines

    problem = make_subspace_problem()
    model = mlp()
    wrapper = nn.Sequential(model)
    engine = NullSpaceEngine(wrapper, threshold=0.97)
    engine.build(problem.retain_loader())
    assert guarding_engines(wrapper) == []
    with engine.guard():
        assert guarding_engines(wrapper) == [engine]
        assert guarding_engines(model) == [engine]  # a submodule holding constrained weights
        assert guarding_engines(nn.Linear(2, 2)) == []
    assert guarding_engines(wrapper) == []
