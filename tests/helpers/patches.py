"""Reference patch extraction for convolutions: explicit loops over every output position.

Oracles for the convolution rows of ``unsc_lightning.nullspace.representations``: each patch is
cut out of the input padded from the layer's arguments (not from torch's own padding helper)
and flattened as ``(channel, *kernel)``, like the weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace import weight_as_matrix


def _reference_padding(layer: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, computed from the layer's arguments."""
    amounts = []
    for i, (k, d) in enumerate(zip(layer.kernel_size, layer.dilation)):
        if layer.padding == "same":
            total = d * (k - 1)
            amounts.append((total // 2, total - total // 2))
        elif layer.padding == "valid":
            amounts.append((0, 0))
        else:
            amounts.append((layer.padding[i], layer.padding[i]))
    return amounts


def _reference_pad(layer: nn.Module, x: Tensor) -> Tensor:
    pad: list[int] = []
    for left, right in reversed(_reference_padding(layer)):
        pad += [left, right]
    if not any(pad):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pad, mode=mode)


def manual_conv2d_rows(layer: nn.Conv2d, x: Tensor) -> Tensor:
    """Rows ordered (batch, out_h, out_w, group), each patch flattened as (channel, kh, kw)."""
    padded = _reference_pad(layer, x)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    groups, per_group = layer.groups, layer.in_channels // layer.groups
    out_h = (padded.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(x.shape[0]):
        for oh in range(out_h):
            for ow in range(out_w):
                for g in range(groups):
                    patch = padded[
                        b,
                        g * per_group : (g + 1) * per_group,
                        oh * sh : oh * sh + dh * (kh - 1) + 1 : dh,
                        ow * sw : ow * sw + dw * (kw - 1) + 1 : dw,
                    ]
                    assert patch.shape == (per_group, kh, kw)
                    rows.append(patch.reshape(-1))
    return torch.stack(rows)


def manual_conv1d_rows(layer: nn.Conv1d, x: Tensor) -> Tensor:
    """Rows ordered (batch, out_l, group), each patch flattened as (channel, k)."""
    padded = _reference_pad(layer, x)
    (k,), (s,), (d,) = layer.kernel_size, layer.stride, layer.dilation
    groups, per_group = layer.groups, layer.in_channels // layer.groups
    out_l = (padded.shape[-1] - d * (k - 1) - 1) // s + 1
    rows = []
    for b in range(x.shape[0]):
        for ol in range(out_l):
            for g in range(groups):
                patch = padded[
                    b, g * per_group : (g + 1) * per_group, ol * s : ol * s + d * (k - 1) + 1 : d
                ]
                assert patch.shape == (per_group, k)
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


def outputs_from_rows(layer: nn.Module, rows: Tensor, out_shape: Sequence[int]) -> Tensor:
    """Rebuild ``layer(x)`` (no bias) from rows ordered (batch, *spatial, group) and the weight."""
    weight = weight_as_matrix(layer.weight)
    out_channels, groups = weight.shape[0], layer.groups
    batch, spatial = out_shape[0], list(out_shape[2:])
    full = (rows @ weight.T).reshape(batch, *spatial, groups, out_channels)
    channel = torch.arange(out_channels)
    picked = full[..., channel // (out_channels // groups), channel]  # each channel's own group
    return picked.movedim(-1, 1)
