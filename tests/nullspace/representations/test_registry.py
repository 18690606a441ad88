"""The table of handlers and its lookups (``unsc_lightning.nullspace.representations.registry``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unsc_lightning.nullspace.representations import (
    REPRESENTATIONS,
    is_supported,
    layer_rows,
    linear_representation,
    register_representation,
    representation_dim,
    representations_of,
    supported_layer_types,
)


@pytest.mark.parametrize(
    "layer", [nn.LayerNorm(4), nn.PReLU(4), nn.Bilinear(2, 3, 4), nn.ReLU()], ids=str
)
def test_unsupported_layers_have_no_representation(layer: nn.Module):
    assert representations_of(layer) is None
    assert not is_supported(layer)
    with pytest.raises(TypeError, match="No representation for layer type"):
        layer_rows(layer, torch.randn(2, 4))


def test_register_representation_fills_exact_types_and_subclasses_inherit():
    class Scaled(nn.Linear):
        pass

    class ScaledTwice(Scaled):
        pass

    assert representations_of(Scaled(3, 2))[0].dim == 3  # type: ignore[index]  # via nn.Linear
    try:
        handler = register_representation(Scaled)(linear_representation)
        assert REPRESENTATIONS[Scaled] is handler is linear_representation
        assert ScaledTwice not in REPRESENTATIONS
        assert is_supported(ScaledTwice(3, 2))
        assert "Scaled" in supported_layer_types().split(", ")
    finally:
        del REPRESENTATIONS[Scaled]


def test_layer_without_the_named_weight_is_unsupported():
    layer = nn.Linear(3, 2)
    del layer.weight
    layer.weight = None  # type: ignore[assignment]
    assert representations_of(layer) is None


def test_table_lists_every_handler():
    names = supported_layer_types().split(", ")
    for expected in (
        "Linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Embedding",
        "MultiheadAttention",
        "RNN",
        "GRU",
        "LSTM",
        "RNNCell",
        "GRUCell",
        "LSTMCell",
    ):
        assert expected in names


def test_single_weight_helpers():
    assert representation_dim(nn.Embedding(11, 3)) == 11
    assert representation_dim(nn.ConvTranspose2d(4, 6, (2, 3), groups=2)) == 2 * 6
    assert representation_dim(nn.Conv3d(4, 8, 2, groups=4)) == 8
    with pytest.raises(TypeError, match="several constrained weights"):
        representation_dim(nn.MultiheadAttention(4, 2))
