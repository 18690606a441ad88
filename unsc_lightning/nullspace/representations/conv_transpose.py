"""Rows of ``nn.ConvTranspose1d/2d/3d``: the inputs each output position gathers.

Output ``y[o, p] = Σ_{c, a} W[c, o, a] x[c, (p + pad - a·dil) / stride]`` (terms where the index
is fractional or out of range are zero), so the row at output position ``p`` is the gathered
inputs ``x[c, (p + pad - a·dil) / stride]`` (zeros elsewhere) and ``M[o, (c, a)] = W[c, o, a]``.
Built as the patches of the zero-inserted, padded input read with a flipped kernel; stride,
padding, dilation, output padding (also from the ``output_size`` forward argument) and groups
(stacked like convolutions) are honoured.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace.representations.conv import conv_windows, patch_rows
from unsc_lightning.nullspace.representations.registry import (
    WeightRows,
    forward_input,
    register_representation,
)


def conv_transpose_rows(
    layer: nn.Module, inputs: Tensor, output_size: list[int] | None = None
) -> Tensor:
    """Rows of a ConvTranspose1d/2d/3d layer: the inputs each output position gathers.

    The layer equals a stride-1 convolution with the flipped kernel over the input with
    ``stride - 1`` zeros inserted between samples, padded by ``dilation * (k - 1) - padding`` on
    each side (plus ``output_padding`` at the end; negative amounts crop). Its patches, read in
    reversed kernel order, are the rows.

    Args:
        layer: the transposed convolution.
        inputs: its input, batched or not.
        output_size: the ``output_size`` the forward was called with, if any.

    Returns:
        Tensor ``(B * L * groups, in_channels / groups * prod(kernel_size))``, ``L`` the number
        of output positions; ``M[o, (c, a)] = W[c, o, a]`` per group.
    """
    conv = cast(nn.modules.conv._ConvTransposeNd, layer)
    spatial = len(conv.kernel_size)
    padding = cast(tuple[int, ...], conv.padding)  # transposed convolutions take no strings
    output_padding = conv._output_padding(
        inputs,
        output_size,
        list(conv.stride),
        list(padding),
        list(conv.kernel_size),
        spatial,
        list(conv.dilation),
    )
    if inputs.dim() == spatial + 1:  # unbatched input
        inputs = inputs.unsqueeze(0)
    inserted = inputs.new_zeros(
        *inputs.shape[:2],
        *((size - 1) * step + 1 for size, step in zip(inputs.shape[2:], conv.stride)),
    )
    inserted[(slice(None), slice(None), *(slice(None, None, step) for step in conv.stride))] = (
        inputs
    )
    pad: list[int] = []
    for size, spacing, amount, extra in reversed(
        list(zip(conv.kernel_size, conv.dilation, padding, output_padding))
    ):
        border = spacing * (size - 1) - amount
        pad += [border, border + extra]
    windows = conv_windows(F.pad(inserted, pad), conv.kernel_size, (1,) * spatial, conv.dilation)
    # window tap j reads input offset a = k - 1 - j: flip so rows follow the weight's tap order
    windows = windows.flip(tuple(range(-spatial, 0)))
    return patch_rows(windows, conv.groups)


def _conv_transpose_forward_rows(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    return conv_transpose_rows(layer, forward_input(args, kwargs), output_size)


def _transposed_as_matrix(groups: int, weight: Tensor) -> Tensor:
    # (in, out/groups, *k) -> (out, in/groups * prod(k)); output channel o of group g
    # multiplies group g's rows, like the convolution layout.
    in_channels, per_group_out = weight.shape[:2]
    blocks = weight.reshape(groups, in_channels // groups, per_group_out, -1).transpose(1, 2)
    return blocks.reshape(groups * per_group_out, -1)


def _write_transposed_(groups: int, weight: Tensor, matrix: Tensor) -> None:
    in_channels, per_group_out = weight.shape[:2]
    blocks = matrix.reshape(groups, per_group_out, in_channels // groups, -1).transpose(1, 2)
    weight.copy_(blocks.reshape(weight.shape))


@register_representation(nn.ConvTranspose1d)
@register_representation(nn.ConvTranspose2d)
@register_representation(nn.ConvTranspose3d)
def conv_transpose_representation(layer: nn.Module) -> list[WeightRows]:
    """The weight ``(in, out/groups, k...)`` of a transposed convolution, as ``(out, d)``."""
    conv = cast(nn.modules.conv._ConvTransposeNd, layer)
    groups = int(conv.groups)
    dim = conv.in_channels // groups * math.prod(conv.kernel_size)
    return [
        WeightRows(
            "weight",
            "",
            _conv_transpose_forward_rows,
            functools.partial(_transposed_as_matrix, groups),
            functools.partial(_write_transposed_, groups),
            dim,
        )
    ]
