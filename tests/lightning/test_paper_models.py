"""The paper's architectures: parameter counts from the architecture description, output shapes,
documented feature-map sizes, and that every weight layer gets a non-empty remaining basis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unsc_lightning.models.paper import (
    PAPER_MODELS,
    VGG11BN,
    AlexNetFMNIST,
    AllCNN,
    ResNet18CIFAR,
)
from unsc_lightning.nullspace import (
    ActivationRecorder,
    CovarianceAccumulator,
    layer_dims,
    pooled_basis,
)


# Parameter counts written out from the layer descriptions (weights + biases + BN affine).
def conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(f_in: int, f_out: int, bias: bool) -> int:
    return f_in * f_out + (f_out if bias else 0)


def bn(channels: int) -> int:
    return 2 * channels  # gamma and beta


def alexnet_count(num_classes: int, c: int) -> int:
    convs = conv(c, 64, 4, False) + bn(64) + conv(64, 128, 3, False) + bn(128)
    convs += conv(128, 256, 2, False) + bn(256)
    # 32 -conv4-> 29 -pool-> 14 -conv3-> 12 -pool-> 6 -conv2-> 5 -pool-> 2: 256 * 2 * 2 features
    head = linear(256 * 2 * 2, 2048, False) + bn(2048) + linear(2048, 2048, False) + bn(2048)
    return convs + head + linear(2048, num_classes, False)


def allcnn_count(num_classes: int, c: int, n1: int, n2: int) -> int:
    total = conv(c, n1, 3, False) + conv(n1, n1, 3, False) + conv(n1, n2, 3, False)
    total += 4 * conv(n2, n2, 3, False) + conv(n2, n2, 1, False)
    total += bn(n1) * 2 + bn(n2) * 6
    return total + linear(n2, num_classes, True)


def vgg11_count(num_classes: int, c: int) -> int:
    widths = [
        (c, 64),
        (64, 128),
        (128, 256),
        (256, 256),
        (256, 512),
        (512, 512),
        (512, 512),
        (512, 512),
    ]
    convs = sum(conv(a, b, 3, True) + bn(b) for a, b in widths)
    return (
        convs + linear(512, 4096, True) + linear(4096, 4096, True) + linear(4096, num_classes, True)
    )


def resnet18_count(num_classes: int, c: int) -> int:
    def block(c_in: int, c_out: int) -> int:
        body = conv(c_in, c_out, 3, False) + bn(c_out) + conv(c_out, c_out, 3, False) + bn(c_out)
        shortcut = conv(c_in, c_out, 1, False) + bn(c_out) if c_in != c_out else 0
        return body + shortcut

    stages = sum(
        block(a, b) + block(b, b) for a, b in [(64, 64), (64, 128), (128, 256), (256, 512)]
    )
    return conv(c, 64, 3, False) + bn(64) + stages + linear(512, num_classes, True)


CASES = [
    (AlexNetFMNIST, {"num_classes": 10}, 1, alexnet_count(10, 1)),
    (AlexNetFMNIST, {"num_classes": 7, "in_channels": 3}, 3, alexnet_count(7, 3)),
    (AllCNN, {"num_classes": 10}, 3, allcnn_count(10, 3, 48, 96)),
    (AllCNN, {"num_classes": 10, "filters_percentage": 1.0}, 3, allcnn_count(10, 3, 96, 192)),
    (VGG11BN, {"num_classes": 10}, 3, vgg11_count(10, 3)),
    (ResNet18CIFAR, {"num_classes": 100}, 3, resnet18_count(100, 3)),
]


@pytest.mark.parametrize(("cls", "kwargs", "channels", "expected"), CASES)
def test_parameter_count_and_output_shape(cls, kwargs, channels, expected):
    model = cls(**kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) == expected
    with torch.no_grad():
        logits = model(torch.randn(2, channels, 32, 32))
    assert logits.shape == (2, kwargs["num_classes"])


def test_known_totals():
    # Sanity anchors: CIFAR ResNet-18 is 11,173,962 parameters with 10 classes.
    assert resnet18_count(10, 3) == 11_173_962
    assert resnet18_count(100, 3) == 11_220_132


def test_alexnet_has_no_biases_and_documented_feature_maps():
    model = AlexNetFMNIST().eval()
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 and all(m.bias is None for m in weighted)
    sizes = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
        for m in model.features
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
    ]
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32))
    for handle in handles:
        handle.remove()
    assert sizes == [
        (64, 29, 29),
        (64, 14, 14),
        (128, 12, 12),
        (128, 6, 6),
        (256, 5, 5),
        (256, 2, 2),
    ]


def test_layout_matches_authors_checkpoints():
    # Keys of the UNSC authors' released state dicts (models/*.py in their code).
    assert {
        "features.0.weight",
        "features.5.weight",
        "features.10.weight",
        "fc.0.weight",
        "fc.8.weight",
    } <= set(AlexNetFMNIST().state_dict())
    assert {
        "features.0.0.weight",
        "features.9.0.weight",
        "features.9.1.running_mean",
        "fc.0.bias",
    } <= set(AllCNN().state_dict())
    assert {"features.0.weight", "features.25.weight", "fc.6.weight"} <= set(VGG11BN().state_dict())
    assert {
        "features.0.weight",
        "features.4.0.residual_function.0.weight",
        "features.4.0.shortcut.0.weight",
        "features.6.1.residual_function.4.running_var",
        "fc.weight",
    } <= set(ResNet18CIFAR().state_dict())


def test_allcnn_without_batch_norm_uses_conv_biases():
    model = AllCNN(batch_norm=False, dropout=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(m.bias is not None for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2


def test_paper_models_table():
    assert {
        "fmnist": AlexNetFMNIST,
        "cifar10": AllCNN,
        "svhn": VGG11BN,
        "cifar100": ResNet18CIFAR,
    } == PAPER_MODELS


#: Layers with ``d`` above this are checked through ``trace(C) > 0`` instead of ``pooled_basis``:
#: float64 eigendecompositions cost ~0.5 s at d=1152 and ~20 s at d=4608 (VGG/ResNet 512-channel
#: 3x3 convs) on two CPU cores, and the 4608x4608 float64 sums alone take 170 MB each. For a PSD
#: covariance the 0.97 energy rule keeps at least one direction exactly when the trace is positive,
#: so both checks assert the same thing. The trace of ``C = sum x x^T`` is ``sum ||x||^2``, taken
#: from the same rows the recorder hands over. Every model still runs ``pooled_basis`` on its small
#: layers (stem convs, 576-dim 3x3x64 convs, 1x1 shortcut convs, heads).
EIGH_MAX_DIM = 600


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (AlexNetFMNIST, (3, 1, 32, 32)),
        (AllCNN, (3, 3, 32, 32)),
        (VGG11BN, (2, 3, 32, 32)),
        (ResNet18CIFAR, (2, 3, 32, 32)),
    ],
    ids=["alexnet", "allcnn", "vgg11bn", "resnet18"],
)
def test_every_weight_layer_gets_a_nonempty_basis(cls, shape):
    torch.manual_seed(0)
    model = cls().eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    dims = layer_dims(layers)
    small = {name: d for name, d in dims.items() if d <= EIGH_MAX_DIM}
    accumulator = CovarianceAccumulator(small)
    large_traces: dict[str, float] = {}
    rows_seen: dict[str, int] = {}

    def on_rows(name: str, rows: torch.Tensor) -> None:
        assert rows.shape[1] == dims[name]
        rows_seen[name] = rows_seen.get(name, 0) + rows.shape[0]
        if name in small:
            accumulator.add(name, rows)
        else:
            large_traces[name] = large_traces.get(name, 0.0) + float(rows.double().square().sum())

    out_positions: dict[str, int] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, out, name=name: out_positions.__setitem__(
                name, out[0].numel() // out.shape[1]
            )
        )
        for name, m in layers.items()
    ]
    with ActivationRecorder(layers, on_rows) as recorder, torch.no_grad():
        model(torch.randn(*shape))
    for handle in handles:
        handle.remove()

    assert recorder.seen == set(layers)
    assert small and set(large_traces) == set(dims) - set(small)
    for name in layers:
        # One row per output position and sample: the patches follow the layer's real padding
        # and stride, so no output location (and no layer) is left unconstrained.
        assert rows_seen[name] == shape[0] * out_positions[name], name
        if name in small:
            basis, info = pooled_basis(accumulator.sums[name], 0.97)
            assert info.rank >= 1 and basis.shape == (dims[name], info.rank), name
        else:
            assert large_traces[name] > 0, name
