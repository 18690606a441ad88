"""Rows of ``nn.ConvTranspose1d/2d/3d``
(``unsc_lightning.nullspace.representations.conv_transpose``)."""

from __future__ import annotations

import torch
from helpers.representations import (
    BATCH,
    DTYPE,
    Case,
    HandlerProperties,
    conv_case,
    low_rank_channels,
    run,
)
from torch import nn

from unsc_lightning.nullspace.representations import conv_transpose_rows, layer_rows

CASES = [
    conv_case(
        "convT1d-strided-dilated-grouped",
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2
        ),
        2,
        *(4, 7),
    ),
    conv_case(
        "convT1d-padding-over-kernel",
        lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=4, bias=False),
        1,
        *(3, 6),
    ),
    Case(
        "convT1d-output-size-kwarg",
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1),
        lambda g: ((low_rank_channels(g, 2, 1, 5),), {"output_size": [15]}),
    ),
    conv_case(
        "convT2d-strided-dilated-grouped",
        lambda: nn.ConvTranspose2d(
            4,
            6,
            (3, 2),
            stride=(2, 3),
            padding=(1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
            groups=2,
        ),
        2,
        *(4, 3, 4),
    ),
    Case(
        "convT2d-output-size-positional",
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
        lambda g: ((low_rank_channels(g, 2, 1, 4, 3), [BATCH, 3, 8, 6]), {}),
    ),
    conv_case(
        "convT3d-grouped",
        lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, padding=1, output_padding=1, groups=2),
        2,
        *(4, 3, 2, 3),
    ),
]


class TestConvTransposeHandler(HandlerProperties):
    CASES = CASES


def test_conv_transpose_rows_equal_gathered_inputs():
    # the definition: y[o, p] = Σ_{c,a} W[c, o, a] x[c, (p + pad - a·dil) / stride]
    layer = nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2)
    x = torch.randn(1, 2, 4, dtype=DTYPE)
    rows = conv_transpose_rows(layer.to(DTYPE), x)
    length = run(layer, ((x,), {})).shape[-1]
    expected = torch.zeros(length, 2, 3, dtype=DTYPE)
    for p in range(length):
        for c in range(2):
            for a in range(3):
                offset = p + 1 - a * 2
                if offset % 2 == 0 and 0 <= offset // 2 < 4:
                    expected[p, c, a] = x[0, c, offset // 2]
    assert torch.equal(rows, expected.reshape(length, 6))


def test_unbatched_conv_transpose_input_gives_the_rows_of_a_batch_of_one():
    layer, unbatched = nn.ConvTranspose2d(2, 3, 3, stride=2), torch.randn(2, 3, 4)
    torch.testing.assert_close(layer_rows(layer, unbatched), layer_rows(layer, unbatched[None]))
