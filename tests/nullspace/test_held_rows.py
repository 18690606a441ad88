"""Classes held as rows (``gram.held_rows``): in a per-class basis pass, a wide layer keeps each
class's few rows as rows and the rule works on them (``basis._extend_rows``). The bases must be
those of the covariances ``Rᵀ R``: against the dense rule on the same covariances, against the
pass that forms the sums (``held_rows`` patched to 0), through class evictions, and when a
class's rows outgrow the limit and go to its sums after all."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.oracles import dense_per_class_basis, dense_pooled_basis
from torch import Tensor, nn

from unsc_lightning.nullspace import NullSpaceEngine, basis_pass, covariance
from unsc_lightning.nullspace.basis_pass import _Slots
from unsc_lightning.nullspace.covariance import CovarianceAccumulator
from unsc_lightning.nullspace.gram import held_rows
from unsc_lightning.nullspace.rules import (
    ClassRows,
    class_threshold_schedule,
    per_class_basis,
    pooled_rows_basis,
)


@pytest.fixture(autouse=True)
def _one_forward_per_batch(monkeypatch):
    # these tests are about how rows arrive batch by batch: no merging of small batches
    # (``basis_pass.MERGE_SAMPLES``; merging is tested in test_merged_batches.py)
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", 1)


def projector_gap(first: Tensor, second: Tensor) -> float:
    """Largest entry of ``U1 U1ᵀ - U2 U2ᵀ``."""
    first, second = first.double(), second.double()
    return float((first @ first.T - second @ second.T).abs().max())


def _rows(count: int, dim: int, rank: int, seed: int) -> Tensor:
    # ``count`` rows spanning ``rank`` directions with a decaying spectrum
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -3, rank, dtype=torch.float64)
    return (torch.randn(count, rank, generator=generator, dtype=torch.float64) * scales) @ mixing


def test_held_rows_limit():
    assert held_rows(511) == 0 and held_rows(512) == 512 // 3 - 8 and held_rows(4608) == 1528


@pytest.mark.parametrize("threshold", [0.9, 0.97, 1.0])
def test_rule_on_rows_equals_the_rule_on_their_covariances(threshold):
    dim = 300
    classes = {k: _rows(40 + 10 * k, dim, 30 + 5 * k, seed=k) for k in range(4)}
    schedule = class_threshold_schedule(threshold, 0.003)
    # from a starting basis too (a later group of classes)
    start, _ = per_class_basis({9: _rows(50, dim, 20, seed=9).T @ _rows(50, dim, 20, seed=9)}, 0.9)
    for basis in (None, start):
        held = {k: ClassRows(rows) for k, rows in classes.items()}
        dense = {k: rows.T @ rows for k, rows in classes.items()}
        found, info = per_class_basis(held, schedule, basis)
        expected, expected_info = dense_per_class_basis(dense, schedule, basis)
        assert found.shape == expected.shape
        assert 0 < found.shape[1] < dim
        assert projector_gap(found, expected) < 1e-8
        assert torch.allclose(found.T @ found, torch.eye(found.shape[1], dtype=found.dtype))
        assert info.energy == pytest.approx(expected_info.energy, abs=1e-12)
        # a mix of classes held as rows and as sums gives the same basis
        mixed = {k: held[k] if k % 2 else dense[k] for k in classes}
        assert projector_gap(per_class_basis(mixed, schedule, basis)[0], expected) < 1e-8


def test_a_class_already_captured_adds_nothing():
    rows = _rows(30, 200, 10, seed=0)
    first, _ = per_class_basis({0: ClassRows(rows)}, 0.99)
    again, info = per_class_basis({1: ClassRows(2.0 * rows)}, 0.99, first)
    assert again.shape == first.shape
    assert torch.equal(again, first)
    assert info.energy >= 0.99


def _wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Conv2d(64, 16, 3, padding=1),  # d = 576 on 2 x 2 maps: 4 rows per sample
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 600),
        nn.ReLU(),
        nn.Linear(600, 4),  # d = 600: one row per sample
    ).eval()


def _batches(samples: int, batch: int, descending: bool = False) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(samples, 3, 6, 6, generator=generator)
    y = torch.arange(samples) % 4
    if descending:  # the highest classes first: a small budget evicts them again
        order = torch.argsort(-y, stable=True)
        x, y = x[order], y[order]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


def _bases(batches, monkeypatch=None, **options) -> tuple[dict[str, Tensor], NullSpaceEngine]:
    options.setdefault("class_threshold_step", 0.003 if options.get("rule") != "pooled" else 0.0)
    engine = NullSpaceEngine(_wide_net(), threshold=0.97, **options)
    taken: list[str] = []
    original = covariance.CovarianceAccumulator.take_rows

    def counting(self):
        rows = original(self)
        taken.extend(name for name, _ in rows)
        return rows

    if monkeypatch is not None:
        monkeypatch.setattr(covariance.CovarianceAccumulator, "take_rows", counting)
    engine.build(batches)
    engine.taken = taken  # type: ignore[attr-defined]
    return dict(engine.bases), engine


@pytest.mark.parametrize("gram", ["auto", torch.float64])
def test_pass_with_held_rows_equals_the_pass_forming_every_sum(gram, monkeypatch):
    batches = _batches(120, 16)  # 30 samples per class: 120 rows at d = 576, 30 at d = 600
    found, engine = _bases(batches, monkeypatch, gram=gram)
    assert set(engine.taken) == {"3", "8"}  # the two wide layers, every class as rows
    assert engine.taken.count("3") == 4 and engine.taken.count("8") == 4
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 0)
    expected, reference = _bases(batches, gram=gram)
    tolerance = 1e-6 if gram == torch.float64 else 1e-5  # bases kept in float32
    for key, basis in expected.items():
        assert found[key].shape == basis.shape, key
        assert projector_gap(found[key], basis) < tolerance, key
    for key, info in reference.layer_infos.items():
        assert engine.layer_infos[key].energy == pytest.approx(info.energy, abs=1e-6), key
    assert engine.report is not None and reference.report is not None
    assert engine.report.peak_bytes <= engine.report.estimate_bytes
    assert reference.report.peak_bytes <= reference.report.estimate_bytes


def test_held_rows_survive_class_evictions_and_extra_passes(monkeypatch):
    batches = _batches(120, 16, descending=True)
    budget = NullSpaceEngine(_wide_net(), threshold=0.97).estimate_bytes(2)
    found, engine = _bases(batches, monkeypatch, gram=torch.float64, memory_budget=budget)
    assert engine.report is not None and engine.report.passes == 2
    assert "3" in engine.taken
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 0)
    expected, _ = _bases(batches, gram=torch.float64)  # one pass, every sum formed
    for key, basis in expected.items():
        assert projector_gap(found[key], basis) < 1e-6, key


def test_rows_beyond_the_limit_go_to_the_sums(monkeypatch):
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 40 if dim >= 512 else 0)
    batches = _batches(120, 16)  # 120 rows per class at d = 576: past 40, into the sums
    found, engine = _bases(batches, monkeypatch, gram=torch.float64)
    assert "3" not in engine.taken and engine.taken.count("8") == 4  # 30 rows < 40
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 0)
    expected, _ = _bases(batches, gram=torch.float64)
    for key, basis in expected.items():
        assert projector_gap(found[key], basis) < 1e-6, key


@pytest.mark.parametrize("threshold", [0.9, 0.99, 1.0])
def test_pooled_basis_from_rows_equals_the_one_from_their_covariance(threshold):
    rows = torch.cat([_rows(60, 300, 40, seed=k) for k in range(3)])
    found, info = pooled_rows_basis(ClassRows(rows), threshold)
    expected, expected_info = dense_pooled_basis(rows.T @ rows, threshold)
    assert found.shape == expected.shape and 0 < found.shape[1] < 300
    assert projector_gap(found, expected) < 1e-8
    assert info.energy == pytest.approx(expected_info.energy, abs=1e-12)


def test_pooled_pass_with_held_rows_equals_the_pass_forming_the_sums(monkeypatch):
    batches = _batches(120, 16)  # 480 rows at d = 576: into the sums; 120 at d = 600: rows
    found, engine = _bases(batches, monkeypatch, gram=torch.float64, rule="pooled")
    assert engine.taken == ["8"]
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 0)
    expected, reference = _bases(batches, gram=torch.float64, rule="pooled")
    for key, basis in expected.items():
        assert found[key].shape == basis.shape, key
        assert projector_gap(found[key], basis) < 1e-6, key
        assert engine.layer_infos[key].energy == pytest.approx(
            reference.layer_infos[key].energy, abs=1e-6
        )


def test_aligned_sums_reuse_or_release_the_first_pass_sums():
    dims = {"narrow": 4, "wide": 600}
    first = CovarianceAccumulator(dims, num_classes=0)
    slots = _Slots(3, fixed=None)
    slots.bind(first)
    assert slots.assign_all([2, 5], {}) == [0, 1]
    first._sums["narrow"].normal_()  # the wide layer never received a product
    first.samples_per_class[:] = torch.tensor([3, 4])
    expected = first._sums["narrow"].clone()
    # already in the group's order: the same accumulator, nothing copied
    assert slots.aligned(first, [2, 5]) is first
    # another order (and a class this process never saw): copied layer by layer, the source
    # layer released, the wide layer left without sums
    aligned = slots.aligned(first, [0, 2, 5])
    assert aligned is not first and "narrow" not in first._sums
    assert aligned.layer_sums("wide") is None
    narrow = aligned.layer_sums("narrow")
    assert narrow is not None
    assert torch.equal(narrow[0], torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(narrow[1:], expected)
    assert aligned.samples_per_class.tolist() == [0, 3, 4]


def test_the_bases_summary_names_the_layers_built_from_rows(caplog, monkeypatch):
    from types import SimpleNamespace

    from unsc_lightning.diagnostics import log_bases

    _, engine = _bases(_batches(120, 16))
    assert engine.report is not None and engine.report.held_rows == {"3": 4, "8": 4}
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log_bases(engine, SimpleNamespace(loggers=[]), "per_class")  # type: ignore[arg-type]
    lines = {line.split(":")[0].strip(): line for line in caplog.messages[-1].splitlines()}
    assert "(from rows: 4 classes)" in lines["3"] and "(from rows: 4 classes)" in lines["8"]
    assert "from rows" not in lines["0"] and "from rows" not in lines["6"]
    peak = f"{engine.report.peak_bytes / 2**20:.0f} MiB"
    assert f"(rule=per_class, {peak}):" in caplog.text
