"""`NullSpaceDrift`: zero under exact null-space training, equal to the change of layer outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.metrics import NullSpaceDrift
from unsc_lightning.metrics.drift import relative_output_change, subsample_rows
from unsc_lightning.nullspace import (
    CovarianceAccumulator,
    NullSpaceProjector,
    accumulate_covariances,
    layer_dims,
    layer_rows,
    per_class_basis,
    pooled_basis,
)

# --------------------------------------------------------------------------------------------
# Exact null-space training (the engine exactness setting) vs unprojected training
# --------------------------------------------------------------------------------------------


def _mlp(dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 5, bias=False),
    ).to(dtype)


def _projectors(model: nn.Module, layers, x_remain: Tensor, y_remain: Tensor, rule: str, dtype):
    num_classes = 4 if rule == "per_class" else None
    accumulator = CovarianceAccumulator(layer_dims(layers), num_classes=num_classes)
    batches = [(x_remain[:12], y_remain[:12]), (x_remain[12:], y_remain[12:])]
    if rule == "pooled":
        batches = [(x, None) for x, _ in batches]
    accumulate_covariances(model, layers, batches, accumulator)
    projectors = {}
    for name in layers:
        if rule == "pooled":
            basis, info = pooled_basis(accumulator.sums[name], 1.0)
        else:
            basis, info = per_class_basis(accumulator.class_covariances(name, range(4)), 1.0)
        assert 0 < info.rank < info.dim  # a proper subspace: the null space is non-trivial
        projectors[name] = NullSpaceProjector(basis, dtype=dtype)
    return projectors


def _train(
    model: nn.Module, x_forget: Tensor, targets: Tensor, projectors, steps: int = 100
) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x_forget), targets).backward()
        for name, projector in (projectors or {}).items():
            projector.project_(model.get_submodule(name).weight.grad)
        optimizer.step()


@pytest.mark.parametrize("rule", ["pooled", "per_class"])
@pytest.mark.parametrize(
    "dtype,tolerance",
    # float32: the SGD steps themselves round W in every direction (~1e-7 relative per step),
    # which after 100 steps leaves a drift of a few 1e-7; float64 shows the projection is exact
    [(torch.float32, 1e-5), (torch.float64, 1e-10)],
    ids=["float32", "float64"],
)
def test_drift_is_zero_under_null_space_training_and_large_without(rule, dtype, tolerance):
    torch.manual_seed(0)
    model = _mlp(dtype)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    subspace = torch.randn(5, 20, dtype=dtype)
    x_remain = torch.randn(32, 5, dtype=dtype) @ subspace  # remaining inputs span 5 of 20 dims
    y_remain = torch.arange(32) % 4
    x_forget = 2 * torch.randn(16, 20, dtype=dtype)
    with torch.no_grad():
        targets = (model(x_forget).argmax(1) + 1) % 5
    projectors = _projectors(model, layers, x_remain, y_remain, rule, dtype)

    vanilla = _mlp(dtype)
    vanilla.load_state_dict(model.state_dict())
    vanilla_layers = {name: vanilla.get_submodule(name) for name in layers}
    drift = NullSpaceDrift.from_probe(model, layers, x_remain)
    vanilla_drift = NullSpaceDrift.from_probe(vanilla, vanilla_layers, x_remain)
    assert drift.max() == 0.0

    _train(model, x_forget, targets, projectors)
    _train(vanilla, x_forget, targets, None)

    values = drift.compute()
    assert set(values) == set(layers)
    assert drift.max() <= tolerance, values
    assert min(vanilla_drift.compute().values()) > 1e-2
    # the constrained model did move: forget outputs changed
    with torch.no_grad():
        assert (model(x_forget).argmax(1) == targets).float().mean() > 0.5


# --------------------------------------------------------------------------------------------
# Equal to a direct computation from the bias-free layer outputs
# --------------------------------------------------------------------------------------------


def _perturb(layer: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(layer.weight.shape, generator=generator))


def _direct(layer: nn.Module, inputs: Tensor, before: Tensor) -> float:
    if isinstance(layer, nn.Linear):
        output = lambda w: F.linear(inputs, w)  # noqa: E731
    else:
        output = lambda w: F.conv2d(  # noqa: E731
            F.pad(inputs, layer._reversed_padding_repeated_twice),
            w,
            None,
            layer.stride,
            0,
            layer.dilation,
            layer.groups,
        )
    with torch.no_grad():
        reference = output(before)
        return float((output(layer.weight) - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    "make_layer,input_shape",
    [
        (lambda: nn.Linear(7, 5), (6, 7)),
        (lambda: nn.Linear(7, 5), (3, 4, 7)),  # tokens flattened
        (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 8, 8)),
        (lambda: nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2)), (2, 4, 9, 9)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 6, 6)),  # per-group products
    ],
    ids=["linear", "linear-3d", "conv2d", "conv2d-strided", "conv2d-grouped"],
)
def test_drift_equals_relative_change_of_layer_outputs(make_layer, input_shape):
    torch.manual_seed(0)
    layer = make_layer()
    inputs = torch.randn(*input_shape)
    before = layer.weight.detach().clone()
    drift = NullSpaceDrift({"layer": layer}, {"layer": layer_rows(layer, inputs)})
    _perturb(layer, seed=1)

    expected = _direct(layer, inputs, before)
    assert expected > 0.05
    assert drift.compute()["layer"] == pytest.approx(expected, rel=1e-5)
    assert relative_output_change(
        layer.weight, before, layer_rows(layer, inputs), layer_groups(layer)
    ) == (pytest.approx(expected, rel=1e-5))


def layer_groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def test_from_probe_equals_explicit_rows_and_removes_hooks():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )
    layers = {"0": net[0], "3": net[3]}
    inputs = torch.randn(4, 2, 5, 5)
    drift = NullSpaceDrift.from_probe(net, layers, inputs)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules()) == 0
    hidden = torch.relu(net[0](inputs)).flatten(1)
    explicit = NullSpaceDrift(layers, {"0": layer_rows(net[0], inputs), "3": hidden})
    assert drift.num_rows == {"0": 4 * 25, "3": 4}
    for layer in layers.values():
        _perturb(layer, seed=2)
    assert drift.compute() == pytest.approx(explicit.compute(), rel=1e-6)
    assert drift.max() == max(drift.compute().values()) > 0


def test_weight_shared_layer_records_every_call():
    layer = nn.Linear(3, 3)
    drift = NullSpaceDrift.from_probe(
        lambda x: layer(layer(x)), {"shared": layer}, torch.randn(5, 3)
    )
    assert drift.num_rows == {"shared": 10}


# --------------------------------------------------------------------------------------------
# Bounded, deterministic row storage
# --------------------------------------------------------------------------------------------


def test_rows_are_subsampled_deterministically_to_max_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(8, 3, 16, 16)  # 2048 patches
    first = NullSpaceDrift.from_probe(conv, {"conv": conv}, inputs, max_rows=100)
    second = NullSpaceDrift({"conv": conv}, {"conv": layer_rows(conv, inputs)}, max_rows=100)
    assert first.num_rows == second.num_rows == {"conv": 100}
    _perturb(conv, seed=3)
    assert first.compute() == second.compute()
    assert 0 < first.compute()["conv"] < float("inf")


def test_subsample_rows_keeps_whole_group_blocks_evenly_spaced():
    rows = torch.arange(20.0).repeat_interleave(3).reshape(-1, 1).expand(-1, 2)  # 20 blocks of 3
    kept = subsample_rows(rows.reshape(60, 2), max_rows=15, groups=3)
    assert kept.shape == (15, 2)
    blocks = kept[:, 0].reshape(5, 3)
    assert (blocks == blocks[:, :1]).all()  # every block kept whole
    assert blocks[:, 0].tolist() == [
        0.0,
        5.0,
        10.0,
        14.0,
        19.0,
    ]  # first and last kept, evenly spaced
    small = torch.randn(4, 2)
    assert subsample_rows(small, max_rows=10) is small


def test_rows_are_stored_on_the_weight_device_in_float32():
    layer = nn.Linear(4, 2).to(torch.bfloat16)
    rows = torch.randn(6, 4, dtype=torch.float64)
    drift = NullSpaceDrift({"l": layer}, {"l": rows})
    probe = drift._probes["l"]
    assert probe.rows.dtype == probe.reference.dtype == torch.float32
    assert probe.rows.device == layer.weight.device
    assert drift.compute() == {"l": 0.0}


def test_zero_reference_output_reports_zero_then_inf():
    layer = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(layer.weight)
    drift = NullSpaceDrift({"l": layer}, {"l": torch.randn(4, 3)})
    assert drift.compute() == {"l": 0.0}
    with torch.no_grad():
        layer.weight.fill_(1.0)
    assert drift.compute() == {"l": float("inf")}


def test_no_layers_gives_empty_results():
    drift = NullSpaceDrift({}, {})
    assert drift.compute() == {} and drift.max() == 0.0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_LINEAR = nn.Linear(3, 2)


@pytest.mark.parametrize(
    "layers,rows,max_rows,error,match",
    [
        ({"l": _LINEAR}, {"l": torch.randn(4, 3)}, 0, ValueError, "`max_rows`"),
        ({"l": _LINEAR}, {"l": torch.randn(4, 3)}, 2.5, ValueError, "`max_rows`"),
        ({"l": _LINEAR}, {}, 16, ValueError, r"missing \['l'\]"),
        (
            {"l": _LINEAR},
            {"l": torch.randn(4, 3), "x": torch.randn(1, 3)},
            16,
            ValueError,
            r"extra \['x'\]",
        ),
        ({"l": _LINEAR}, {"l": torch.randn(4, 5)}, 16, ValueError, r"shape \(N, 3\)"),
        ({"l": _LINEAR}, {"l": torch.randn(0, 3)}, 16, ValueError, r"N >= 1"),
        (
            {"n": nn.BatchNorm1d(3)},
            {"n": torch.randn(4, 3)},
            16,
            ValueError,
            r"unsupported: \['n'\]",
        ),
        ({"l": _LINEAR}, {"l": torch.full((4, 3), float("nan"))}, 16, RuntimeError, "NaN or inf"),
    ],
)
def test_invalid_arguments_raise(layers, rows, max_rows, error, match):
    with pytest.raises(error, match=match):
        NullSpaceDrift(layers, rows, max_rows=max_rows)


def test_from_probe_reports_layers_without_input_and_removes_hooks():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    unused = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match=r"\['unused'\] received no input"):
        NullSpaceDrift.from_probe(net, {"0": net[0], "unused": unused}, torch.randn(2, 3))
    with pytest.raises(ValueError, match="`max_rows`"):
        NullSpaceDrift.from_probe(net, {"0": net[0]}, torch.randn(2, 3), max_rows=0)
    assert all(not m._forward_pre_hooks for m in [*net.modules(), unused])
