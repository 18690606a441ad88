"""Rows of ``nn.Conv1d/2d/3d`` (``unsc_lightning.nullspace.representations.conv``).

The channels-last rows, shift borders and order conversions are tested with the Gram products
that use them (``tests/nullspace/test_gram_precision.py``).
"""

from __future__ import annotations

import pytest
import torch
from helpers.patches import manual_conv1d_rows, manual_conv2d_rows, outputs_from_rows
from helpers.representations import DTYPE, HandlerProperties, conv_case
from torch import nn

from unsc_lightning.nullspace import layer_rows, representation_dim

CASES = [
    conv_case(
        "conv1d-strided-dilated-grouped",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        2,
        *(4, 11),
    ),
    conv_case(
        "conv1d-same-reflect",
        lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"),
        1,
        *(3, 9),
    ),
    conv_case(
        "conv1d-circular", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), 1, 2, 7
    ),
    conv_case(
        "conv2d-strided-dilated-grouped",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        2,
        *(4, 6, 5),
    ),
    conv_case(
        "conv2d-same-replicate",
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="replicate"),
        1,
        *(3, 5, 4),
    ),
    conv_case(
        "conv2d-circular-grouped",
        lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=2, bias=False),
        2,
        *(4, 4, 4),
    ),
    conv_case(
        "conv3d-strided-dilated-grouped",
        lambda: nn.Conv3d(
            4, 6, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2
        ),
        2,
        *(4, 5, 6, 4),
    ),
    conv_case(
        "conv3d-same-reflect",
        lambda: nn.Conv3d(2, 3, 3, padding="same", padding_mode="reflect"),
        1,
        *(2, 4, 3, 4),
    ),
    conv_case(
        "conv3d-circular",
        lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="circular"),
        1,
        2,
        3,
        3,
        3,
    ),
]


class TestConvHandler(HandlerProperties):
    CASES = CASES


def test_unbatched_conv3d_input_gives_the_rows_of_a_batch_of_one():
    layer, unbatched = nn.Conv3d(2, 3, 2, padding=1), torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(layer_rows(layer, unbatched), layer_rows(layer, unbatched[None]))


CONV2D_CASES = {
    "pad-stride-dilation-nonsquare": dict(
        in_channels=3,
        out_channels=4,
        kernel_size=(3, 2),
        padding=(1, 2),
        stride=(2, 1),
        dilation=(1, 2),
    ),
    "valid-stride": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2),
    "same-even-kernel": dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same"),
    "same-dilated": dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", dilation=2),
    "reflect": dict(
        in_channels=3, out_channels=2, kernel_size=3, padding=1, stride=2, padding_mode="reflect"
    ),
    "circular": dict(
        in_channels=2,
        out_channels=3,
        kernel_size=(3, 2),
        padding=(2, 1),
        dilation=(2, 1),
        padding_mode="circular",
    ),
    "groups-2": dict(
        in_channels=4, out_channels=6, kernel_size=3, padding=1, stride=(1, 2), groups=2
    ),
    "depthwise": dict(
        in_channels=3, out_channels=6, kernel_size=(2, 3), padding=1, dilation=(2, 1), groups=3
    ),
    "depthwise-reflect-same": dict(
        in_channels=3,
        out_channels=3,
        kernel_size=3,
        padding="same",
        groups=3,
        padding_mode="reflect",
    ),
}

CONV1D_CASES = {
    "pad-stride-dilation": dict(
        in_channels=3, out_channels=4, kernel_size=3, padding=2, stride=2, dilation=2
    ),
    "same-even-kernel": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "reflect": dict(
        in_channels=2, out_channels=3, kernel_size=3, padding=2, padding_mode="reflect"
    ),
    "circular-stride": dict(
        in_channels=2, out_channels=2, kernel_size=2, padding=1, stride=3, padding_mode="circular"
    ),
    "groups-2": dict(in_channels=4, out_channels=2, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(
        in_channels=3, out_channels=6, kernel_size=3, dilation=2, padding=2, groups=3
    ),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kwargs", CONV2D_CASES.values(), ids=CONV2D_CASES.keys())
def test_conv2d_rows_equal_manual_patches_and_reproduce_layer(kwargs):
    torch.manual_seed(0)
    layer = nn.Conv2d(bias=False, **kwargs).to(DTYPE)
    x = torch.randn(2, layer.in_channels, 7, 6, dtype=DTYPE)
    rows = layer_rows(layer, x)
    torch.testing.assert_close(rows, manual_conv2d_rows(layer, x), rtol=0, atol=0)
    assert rows.shape[1] == representation_dim(layer) == layer.weight[0].numel()
    out = layer(x)
    torch.testing.assert_close(
        outputs_from_rows(layer, rows, out.shape), out, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("kwargs", CONV1D_CASES.values(), ids=CONV1D_CASES.keys())
def test_conv1d_rows_equal_manual_patches_and_reproduce_layer(kwargs):
    torch.manual_seed(0)
    layer = nn.Conv1d(bias=False, **kwargs).to(DTYPE)
    x = torch.randn(3, layer.in_channels, 11, dtype=DTYPE)
    rows = layer_rows(layer, x)
    torch.testing.assert_close(rows, manual_conv1d_rows(layer, x), rtol=0, atol=0)
    assert rows.shape[1] == representation_dim(layer)
    out = layer(x)
    torch.testing.assert_close(
        outputs_from_rows(layer, rows, out.shape), out, rtol=1e-12, atol=1e-12
    )


def test_unbatched_conv_inputs_give_the_rows_of_a_batch_of_one():
    torch.manual_seed(0)
    conv2d = nn.Conv2d(2, 3, 3, padding=1, stride=2, padding_mode="reflect").to(DTYPE)
    conv1d = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular").to(DTYPE)
    image, signal = torch.randn(2, 5, 6, dtype=DTYPE), torch.randn(2, 9, dtype=DTYPE)
    torch.testing.assert_close(layer_rows(conv2d, image), layer_rows(conv2d, image[None]))
    torch.testing.assert_close(layer_rows(conv1d, signal), layer_rows(conv1d, signal[None]))
