"""Small batches merged before the basis pass's forward (``basis_pass.MergedBatches``): the
sums and bases must be those of one forward per batch, with labels in any order, a per-class
sample cap, class evictions (a small memory budget), batches whose shapes differ, and the merged
size bounded by :data:`~unsc_lightning.nullspace.basis_pass.MERGE_SAMPLES`, by the rows' bytes
per sample (:data:`~unsc_lightning.nullspace.basis_pass.MERGE_ROW_BYTES`) and by the inputs'
(:data:`~unsc_lightning.nullspace.basis_pass.MERGE_INPUT_BYTES`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from unsc_lightning.nullspace import NullSpaceEngine, basis_pass
from unsc_lightning.nullspace.basis_pass import BasisPass, MergedBatches, _Slots
from unsc_lightning.nullspace.batches import default_batch_adapter


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()


def _batches(samples: int, batch: int, length: int = 12, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, length, generator=generator)
    y = torch.randint(0, 5, (samples,), generator=generator)  # unsorted within each batch
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]


class _Counting(nn.Module):
    """The net, counting its forwards and the samples of each."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


def _sums(batches: list, model: nn.Module, **engine_options: object) -> dict:
    engine = NullSpaceEngine(model, threshold=0.97, gram=torch.float64, **engine_options)  # type: ignore[arg-type]
    runner = BasisPass(engine, torch.device("cpu"), default_batch_adapter, model, None)
    slots = _Slots(10, fixed=None)
    with torch.no_grad():
        accumulator = runner._pass(batches, slots, pooled_labels=False).weight_order_()
    return {k: {c: s[i] for i, c in enumerate(slots.classes)} for k, s in accumulator.sums.items()}


def _gap(first: Tensor, second: Tensor) -> float:
    first, second = first.double(), second.double()
    return float((first @ first.T - second @ second.T).abs().max())


def test_merged_pass_sums_equal_one_forward_per_batch(monkeypatch):
    batches = _batches(200, 8)
    model = _Counting(_net())
    merged = _sums(batches, model)
    merged_sizes = list(model.sizes)
    model.sizes.clear()
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", 1)
    separate = _sums(batches, model)
    assert model.sizes == [8] * 25
    # the first batch alone (its rows' size bounds the merge), then the other 192 at once
    assert merged_sizes == [8, 192]
    assert merged.keys() == separate.keys()
    for key, per_class in separate.items():
        assert merged[key].keys() == per_class.keys()
        for label, expected in per_class.items():
            scale = float(expected.abs().max())
            assert torch.allclose(merged[key][label], expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize(
    ("limit_samples", "row_bytes", "expected"),
    [
        (64, 1 << 30, [8, 64, 64, 64]),  # MERGE_SAMPLES bounds the merged batch
        # the rows with the most bytes per sample: the strided conv's 6 positions x 18 columns
        # of float64 (864 bytes); 16 samples' rows fit in 13,824 bytes: two batches of 8
        (512, 13_824, [8] + [16] * 12),
        (512, 13_823, [8] * 25),
        (512, 1, [8] * 25),  # no room: one forward per batch
    ],
)
def test_merged_batches_are_bounded_by_samples_and_row_bytes(
    monkeypatch, limit_samples, row_bytes, expected
):
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", limit_samples)
    monkeypatch.setattr(basis_pass, "MERGE_ROW_BYTES", row_bytes)
    model = _Counting(_net())
    _sums(_batches(200, 8), model)
    assert model.sizes == expected
    assert sum(model.sizes) == 200


def test_batches_of_another_shape_are_not_merged_and_the_sums_are_complete(monkeypatch):
    # lengths 12, 12, 16, 16, 12: only consecutive batches of one shape are merged
    batches = [
        b for i, length in enumerate([12, 12, 16, 16, 12]) for b in _batches(8, 8, length, i)
    ]
    model = _Counting(_net())
    merged = _sums(batches, model)
    assert model.sizes == [8, 8, 16, 8]
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", 1)
    separate = _sums(batches, model)
    for key, per_class in separate.items():
        for label, expected in per_class.items():
            scale = float(expected.abs().max())
            assert torch.allclose(merged[key][label], expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("options", [{"max_samples_per_class": 7}, {"evict": True}])
def test_merged_build_has_the_bases_of_one_forward_per_batch(monkeypatch, options):
    """With a per-class cap (counted batch by batch) and with class evictions (a budget for two
    classes' sums, the highest classes first: each lower class evicts a held one, whose merged
    rows must not land in the new class's slot)."""
    batches = _batches(240, 8)
    if options.pop("evict", False):
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        order = torch.argsort(-y, stable=True)
        x, y = x[order], y[order]
        batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 240, 8)]
        options["memory_budget"] = NullSpaceEngine(_net(), threshold=0.97).estimate_bytes(2)

    def build() -> NullSpaceEngine:
        engine = NullSpaceEngine(_net(), threshold=0.97, gram=torch.float64, **options)
        engine.build(batches)
        return engine

    merged = build()
    with monkeypatch.context() as patch:
        patch.setattr(basis_pass, "MERGE_SAMPLES", 1)
        separate = build()
    assert merged.report is not None and separate.report is not None
    assert merged.report.samples == separate.report.samples
    assert merged.report.passes == separate.report.passes
    if "memory_budget" in options:
        assert separate.report.passes > 1
    for key, basis in separate.bases.items():
        assert merged.bases[key].shape == basis.shape, key
        assert _gap(merged.bases[key], basis) < 1e-6, key  # float32 bases


def test_merged_inputs_keep_class_blocks_contiguous():
    forwarded: list[tuple[Tensor, Tensor]] = []
    merged = MergedBatches(lambda x, s: forwarded.append((x, s)), torch.device("cpu"))
    first = torch.arange(4.0).reshape(4, 1)
    merged.push(first, torch.tensor([0, 0, 2, 3]), row_bytes_per_sample=4.0)
    merged.push(first + 10, torch.tensor([0, 1, 1, 3]), row_bytes_per_sample=4.0)
    assert forwarded == [] and merged.count == 8
    merged.flush()
    ((inputs, slot),) = forwarded
    assert slot.tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    # stable: within a class, the earlier batch's samples first
    assert inputs.flatten().tolist() == [0.0, 1.0, 10.0, 11.0, 12.0, 2.0, 3.0, 13.0]
    assert merged.parts == [] and merged.count == 0
    merged.flush()  # nothing held: nothing forwarded
    assert len(forwarded) == 1


def test_merge_limit_is_the_least_of_samples_row_bytes_and_input_bytes():
    assert MergedBatches.limit(0.0, 4.0) == 1  # no rows seen yet: no merging
    assert MergedBatches.limit(1.0, 1.0) == basis_pass.MERGE_SAMPLES
    assert MergedBatches.limit(basis_pass.MERGE_ROW_BYTES // 10, 1.0) == 10
    # 224 x 224 RGB images in float32 (602,112 bytes): 27 samples, however small the rows
    assert MergedBatches.limit(1.0, 3 * 224 * 224 * 4) == 27
    assert MergedBatches.limit(float(basis_pass.MERGE_ROW_BYTES) * 2, 1.0) == 1
