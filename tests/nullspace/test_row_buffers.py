"""Row buffers of wide layers (``buffer_rows``): a class's small blocks are gathered before their
Gram product; the sums must equal the unbuffered ones, a NaN in a buffered row must still be
reported, and the bases of convolutions built from channels-last sums must equal those built
from the sums in weight order."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from unsc_lightning.nullspace import NullSpaceEngine, basis_pass, covariance
from unsc_lightning.nullspace.basis_pass import BasisPass, _Slots
from unsc_lightning.nullspace.batches import default_batch_adapter
from unsc_lightning.nullspace.covariance import (
    CovarianceAccumulator,
    accumulate_covariances,
    buffer_rows,
    layer_dims,
)


@pytest.fixture(autouse=True)
def _one_forward_per_batch(monkeypatch):
    # these tests are about how rows arrive batch by batch: no merging of small batches
    # (``basis_pass.MERGE_SAMPLES``; merging is tested in test_merged_batches.py)
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", 1)


def _wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(640, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _data(n: int = 150) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 640, generator=generator), torch.arange(n) % 3


def _pass_sums(model: nn.Module, x: Tensor, y: Tensor, batch: int, **kwargs: object) -> dict:
    engine = NullSpaceEngine(model, threshold=0.97, **kwargs)  # type: ignore[arg-type]
    runner = BasisPass(engine, torch.device("cpu"), default_batch_adapter, model, None)
    slots = _Slots(10, fixed=None)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
    with torch.no_grad():
        accumulator = runner._pass(batches, slots, pooled_labels=False).weight_order_()
    return {k: {c: s[i] for i, c in enumerate(slots.classes)} for k, s in accumulator.sums.items()}


def test_wide_layers_buffer_their_rows_and_the_sums_are_complete():
    model, (x, y) = _wide_model(), _data()
    assert buffer_rows(640) == 80 and buffer_rows(16) == 0
    # batches of 9 samples: 3 rows per class and batch, far below the buffer
    exact = _pass_sums(model, x, y, batch=9, gram=torch.float64)
    single = _pass_sums(model, x, y, batch=9, gram=torch.float32)
    for label in range(3):
        rows = x[y == label].double()
        expected = rows.T @ rows
        scale = float(expected.abs().max())
        assert torch.allclose(exact["1"][label], expected, rtol=0, atol=1e-12 * scale)
        assert torch.allclose(single["1"][label], expected, rtol=0, atol=1e-6 * scale)


def test_buffered_sums_do_not_depend_on_the_batch_size():
    model, (x, y) = _wide_model(), _data()
    small = _pass_sums(model, x, y, batch=9, gram=torch.float64)
    whole = _pass_sums(model, x, y, batch=150, gram=torch.float64)  # 50 rows per class
    for label in range(3):
        scale = float(whole["1"][label].abs().max())
        assert torch.allclose(small["1"][label], whole["1"][label], rtol=0, atol=1e-12 * scale)


def test_a_nan_waiting_in_a_row_buffer_is_reported_naming_the_layer():
    model, (x, y) = _wide_model(), _data()
    x = x.clone()
    x[4, 7] = float("nan")  # the second batch's class-1 block, three rows: buffered
    layers = {"1": model[1]}
    accumulator = CovarianceAccumulator(layer_dims(layers), num_classes=3)
    batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 30, 3)]
    with pytest.raises(RuntimeError, match="`1`"):
        accumulate_covariances(model, layers, batches, accumulator)
    engine = NullSpaceEngine(model, threshold=0.97)
    with pytest.raises(RuntimeError, match="`1`"):
        engine.build([(x[i : i + 3], y[i : i + 3]) for i in range(0, 30, 3)])


def test_peak_memory_counts_the_row_buffers(monkeypatch):
    model, (x, y) = _wide_model(), _data()
    batches = [(x[i : i + 9], y[i : i + 9]) for i in range(0, len(x), 9)]
    buffers = 3 * buffer_rows(640) * 640 * 4  # float32 rows, three classes
    sums = 3 * (640**2 + 16**2) * 8
    # 50 rows per class: held as rows, the wide layer's d x d sums are never allocated
    engine = NullSpaceEngine(model, threshold=0.97)
    engine.build(batches)
    assert engine.report is not None
    assert buffers <= engine.report.peak_bytes < 3 * 640**2 * 8
    assert engine.report.peak_bytes <= engine.report.estimate_bytes
    # every class's sums formed (``held_rows`` off): the sums and the buffers, counted
    monkeypatch.setattr(covariance, "held_rows", lambda dim: 0)
    engine = NullSpaceEngine(model, threshold=0.97)
    engine.build(batches)
    assert engine.report is not None
    assert engine.report.peak_bytes >= sums + buffers
    assert engine.report.peak_bytes <= engine.report.estimate_bytes


@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_conv_bases_from_channels_last_sums_equal_those_from_weight_order(rule, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, (3, 2), stride=2), nn.Flatten()
    ).eval()
    x = torch.randn(60, 3, 9, 9)
    y = torch.arange(60) % 3
    batches = [(x[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    engine = NullSpaceEngine(model, threshold=0.95, rule=rule, gram=torch.float64)
    engine.build(batches)
    original = BasisPass._pass

    def weight_ordered(self, *args, **kwargs):  # the sums permuted before the rule runs
        accumulator = original(self, *args, **kwargs).weight_order_()
        self.column_orders = {}
        return accumulator

    monkeypatch.setattr(BasisPass, "_pass", weight_ordered)
    reference = NullSpaceEngine(model, threshold=0.95, rule=rule, gram=torch.float64)
    reference.build(batches)
    for key in ("0", "2"):
        found, expected = engine.bases[key].double(), reference.bases[key].double()
        assert 0 < found.shape[1] < found.shape[0], key
        assert found.shape == expected.shape, key
        assert torch.allclose(found @ found.T, expected @ expected.T, atol=1e-6), key


def test_convolutions_of_one_forward_share_one_rows_buffer_and_keep_exact_sums():
    # The channels-last rows of every convolution are copied into one buffer that the next layer
    # overwrites (a forward holds one rows buffer, sized for the largest layer, not one per
    # layer): each layer's sums must still be those of its own rows, per class.
    from unsc_lightning.nullspace.covariance import SiteRecorder
    from unsc_lightning.nullspace.representations import conv_representation, conv_rows

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),
    ).double()
    convs = {"a": model[0], "b": model[2], "c": model[4]}
    accumulator = CovarianceAccumulator(
        {key: conv.weight[0].numel() for key, conv in convs.items()}, num_classes=2
    )
    recorder = SiteRecorder(
        [(key, conv, conv_representation(conv)[0]) for key, conv in convs.items()],
        accumulator.add,
        channels_last=True,
    )
    accumulator.column_orders = dict(recorder.column_orders)
    inputs = {}
    hooks = [
        conv.register_forward_pre_hook(
            lambda m, a, key=key: inputs.setdefault(key, []).append(a[0])
        )
        for key, conv in convs.items()
    ]
    batches = [torch.randn(5, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    labels = [torch.tensor([0, 1, 1, 0, 1]), torch.tensor([1, 0, 0, 0, 1])]
    with recorder, torch.no_grad():
        for x, y in zip(batches, labels):
            accumulator.set_labels(y)
            model(x)
    for hook in hooks:
        hook.remove()
    assert len(recorder._rows_workspaces) == 1  # one dtype and device: one rows buffer
    (workspace,) = recorder._rows_workspaces.values()
    largest = max(conv_rows(conv, inputs[key][0]).numel() for key, conv in convs.items())
    assert workspace["rows"].numel() == largest
    accumulator.weight_order_()
    for key, conv in convs.items():
        for label in range(2):
            rows = torch.cat([conv_rows(conv, x[y == label]) for x, y in zip(inputs[key], labels)])
            expected = rows.T @ rows
            found = accumulator.sums[key][label]
            assert torch.allclose(found, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
