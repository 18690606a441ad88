"""Rows of ``nn.Linear`` (``unsc_lightning.nullspace.representations.linear``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers.representations import (
    BATCH,
    DTYPE,
    Case,
    HandlerProperties,
    first_input,
    low_rank_features,
)
from torch import nn

from unsc_lightning.nullspace import layer_rows, representation_dim, weight_as_matrix

CASES = [
    Case(
        "linear-2d", lambda: nn.Linear(6, 5), first_input(lambda g: low_rank_features(g, BATCH, 6))
    ),
    Case(
        "linear-3d",
        lambda: nn.Linear(6, 5),
        first_input(lambda g: low_rank_features(g, BATCH, 4, 6, rank=3)),
    ),
    Case(
        "linear-4d-no-bias",
        lambda: nn.Linear(6, 5, bias=False),
        first_input(lambda g: low_rank_features(g, BATCH, 2, 3, 6)),
    ),
]


class TestLinearHandler(HandlerProperties):
    CASES = CASES


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 6), (2, 3, 2, 6)], ids=["2d", "3d", "4d"])
def test_linear_rows_are_flattened_inputs_and_reproduce_layer(shape):
    torch.manual_seed(0)
    layer = nn.Linear(6, 4, bias=False).to(DTYPE)
    x = torch.randn(*shape, dtype=DTYPE)
    rows = layer_rows(layer, x)
    # explicit loop over every leading index, in row-major order
    manual = torch.stack([x[index] for index in itertools.product(*map(range, shape[:-1]))])
    torch.testing.assert_close(rows, manual, rtol=0, atol=0)
    assert rows.shape == (math.prod(shape[:-1]), representation_dim(layer))
    out = layer(x)
    torch.testing.assert_close((rows @ weight_as_matrix(layer.weight).T).reshape(out.shape), out)
