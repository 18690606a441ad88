"""Rows of ``nn.Conv1d/2d/3d``: every receptive-field patch, and its channels-last forms.

The rows are the patches under the layer's own padding (``"same"``, reflect, replicate,
circular), stride and dilation, flattened like ``weight.reshape(out, -1)``. Grouped convolutions
share one weight layout ``(out, in/groups, k...)``; the patches of every group are stacked as
extra rows (order: sample, output position, group), so one basis of dimension
``in/groups * prod(k)`` covers every group and the projected update leaves each group's outputs
unchanged.

The covariance recorder forms the same patches channels-last (:func:`conv_rows_channels_last`:
``(*kernel, channel)`` columns), which copies contiguous runs of channels; the sums or bases are
brought back to the weight's order by :func:`channels_last_gram_to_weight_order` or
:func:`channels_last_weight_index`. :func:`conv_shift_borders` gives the patches the shifted
Gram of a strided convolution needs.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace.representations.registry import (
    WeightRows,
    forward_input,
    register_representation,
    weight_as_matrix,
    write_reshaped_,
)


def _padded(layer: Any, inputs: Tensor) -> Tensor:
    # ``_reversed_padding_repeated_twice`` is how torch itself pads for every padding mode and for
    # ``padding="same"``; padding here and windowing without padding reproduces the layer exactly.
    pad = layer._reversed_padding_repeated_twice
    if not any(pad):
        return inputs
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(inputs, pad, mode=mode)


def conv_windows(
    inputs: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """The windows a kernel reads: ``(B, C, *S) -> (B, C, *L, *k)``, a view of ``inputs``.

    Used by convolutions (on the padded input) and transposed convolutions (on the zero-inserted
    one); :func:`patch_rows` turns the windows into rows.
    """
    # a strided view per spatial dim (each appends its window as a new last dim), then every
    # dilation-th element of the window: exactly the taps a dilated kernel reads. A strided
    # view plus one copy, not im2col (F.unfold): see docs/performance.md.
    windows = inputs
    for axis, (size, step, spacing) in enumerate(zip(kernel, stride, dilation)):
        windows = windows.unfold(2 + axis, (size - 1) * spacing + 1, step)
        if spacing > 1:
            windows = windows[..., ::spacing]
    return windows


def patch_rows(windows: Tensor, groups: int) -> Tensor:
    """Windows ``(B, C, *L, *k)`` of :func:`conv_windows` as rows.

    Returns:
        Tensor ``(B * prod(L) * groups, C/groups * prod(k))`` ordered sample, position, group
        (sample-major), each patch flattened as ``(channel, *k)`` like the weight.
    """
    spatial = (windows.dim() - 2) // 2
    batch, channels = windows.shape[:2]
    per_group = channels // groups
    windows = windows.reshape(batch, groups, per_group, *windows.shape[2:])
    positions = range(3, 3 + spatial)
    taps = range(3 + spatial, 3 + 2 * spatial)
    windows = windows.permute(0, *positions, 1, 2, *taps)
    return windows.reshape(-1, per_group * math.prod(windows.shape[-spatial:]))


def conv_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv1d/2d/3d layer: every receptive-field patch under the layer's settings.

    Returns:
        Tensor ``(B * L * groups, in_channels / groups * prod(kernel_size))``, ``L`` the number
        of output positions.
    """
    conv = cast(nn.modules.conv._ConvNd, layer)
    if inputs.dim() == len(conv.kernel_size) + 1:  # unbatched input
        inputs = inputs.unsqueeze(0)
    windows = conv_windows(_padded(conv, inputs), conv.kernel_size, conv.stride, conv.dilation)
    return patch_rows(windows, conv.groups)


def _buffer(
    workspace: dict[str, Tensor] | None, name: str, shape: tuple[int, ...], like: Tensor
) -> Tensor | None:
    # a reusable buffer of at least ``shape`` (zeros when first made), ``None`` without workspace
    if workspace is None:
        return None
    found = workspace.get(name)
    if (
        found is None
        or found.dtype != like.dtype
        or found.device != like.device
        or found.shape[1:] != shape[1:]
        or found.shape[0] < shape[0]
    ):
        found = workspace[name] = like.new_zeros(shape)
    return found[: shape[0]]


def channels_last_padded(
    layer: nn.Module, inputs: Tensor, workspace: dict[str, Tensor] | None = None
) -> Tensor:
    """A convolution's input padded as the layer pads it, channels last: ``(B, *S, C)``.

    Zero padding is written straight into a zeroed channels-last buffer (one copy of the
    input); other modes pad first and then move the channels. With a ``workspace`` (a dict the
    caller keeps) that buffer is reused from call to call: its zero border is never written,
    and no fresh memory is touched per batch.
    """
    conv = cast(nn.modules.conv._ConvNd, layer)
    if inputs.dim() == len(conv.kernel_size) + 1:  # unbatched input
        inputs = inputs.unsqueeze(0)
    pad = conv._reversed_padding_repeated_twice
    if conv.padding_mode != "zeros" or any(p < 0 for p in pad):
        return _padded(conv, inputs).movedim(1, -1).contiguous()
    spatial = len(conv.kernel_size)
    # ``pad`` lists (left, right) per dimension, last dimension first
    before = [pad[2 * (spatial - 1 - i)] for i in range(spatial)]
    after = [pad[2 * (spatial - 1 - i) + 1] for i in range(spatial)]
    sizes = [size + b + a for size, b, a in zip(inputs.shape[2:], before, after)]
    shape = (inputs.shape[0], *sizes, inputs.shape[1])
    reused = _buffer(workspace, "padded", shape, inputs)
    padded = inputs.new_zeros(shape) if reused is None else reused
    interior = (slice(None), *(slice(b, b + n) for b, n in zip(before, inputs.shape[2:])))
    padded[interior] = inputs.movedim(1, -1)
    return padded


def conv_rows_channels_last(
    layer: nn.Module,
    inputs: Tensor,
    fraction: float | None = None,
    generator: torch.Generator | None = None,
    padded: Tensor | None = None,
    workspace: dict[str, Tensor] | None = None,
) -> Tensor:
    """The rows of :func:`conv_rows` with each patch's entries in ``(*kernel, channel)`` order.

    The same patches, with columns permuted: channels vary fastest, then the kernel taps. The
    input is copied once channels-last (``k / stride`` times smaller than the rows), after which
    each row gathers contiguous runs of channels, cheaper to copy than :func:`conv_rows`' runs
    of taps. A Gram ``Σ x xᵀ`` of these rows is brought to the weight's
    ``(channel, *kernel)`` order by :func:`channels_last_gram_to_weight_order`.

    Args:
        layer: the convolution.
        inputs: its input, batched or not.
        fraction: keep only every ``round(1 / fraction)``-th output row along the first
            spatial dimension, from an offset drawn from ``generator`` (one draw per call); only
            those rows are copied. ``None``: every position.
        generator: the CPU generator of the draws.
        padded: :func:`channels_last_padded` of ``inputs``, if already at hand.
        workspace: a dict the caller keeps: the rows are copied into a buffer reused from call
            to call (valid until the next call with the same workspace).

    Returns:
        Tensor ``(B * L * groups, prod(kernel_size) * in_channels / groups)``, ordered like
        :func:`conv_rows` (sample, position, group); ``L`` reduced as ``fraction`` says.
    """
    conv = cast(nn.modules.conv._ConvNd, layer)
    if padded is None:
        padded = channels_last_padded(conv, inputs)  # (B, *S, C)
    spatial = len(conv.kernel_size)
    batch, sizes, channels = padded.shape[0], padded.shape[1:-1], padded.shape[-1]
    groups = int(conv.groups)
    per_group = channels // groups
    positions = [
        (size - spacing * (k - 1) - 1) // step + 1
        for size, k, step, spacing in zip(sizes, conv.kernel_size, conv.stride, conv.dilation)
    ]
    strides = padded.stride()
    view = padded.as_strided(
        (batch, *positions, groups, *conv.kernel_size, per_group),
        (
            strides[0],
            *(strides[1 + i] * conv.stride[i] for i in range(spatial)),
            per_group,
            *(strides[1 + i] * conv.dilation[i] for i in range(spatial)),
            1,
        ),
    )
    width = per_group * math.prod(conv.kernel_size)
    step = 1 if fraction is None else max(1, round(1 / fraction))
    if step > 1:
        # every ``step``-th output row along the first spatial dimension, from a random offset:
        # a strided view, so only the kept rows are copied
        offset = int(torch.randint(min(step, positions[0]), (1,), generator=generator))
        view = view[:, offset::step]
    if workspace is None:
        return view.reshape(-1, width)
    count = view.numel()
    flat = _buffer(workspace, "rows", (count,), padded)
    assert flat is not None
    flat.view(view.shape).copy_(view)
    return flat.view(-1, width)


def conv_shift_borders(
    layer: nn.Module, inputs: Tensor, padded: Tensor | None = None, dim: int = 0
) -> tuple[Tensor, Tensor]:
    """The patches just inside and just past the range of outputs along spatial dimension ``dim``.

    For a convolution with stride ``s`` and dilation 1 along that dimension, tap ``a >= s`` at
    output index ``i`` reads what tap ``a - s`` reads at index ``i + 1``. So the Gram blocks of
    the taps ``>= s`` are those of the taps ``< k - s`` over the outputs ``1 .. L``: the same
    sums minus the index ``0`` terms plus the (virtual) index ``L`` terms. This returns those
    two slices' patches, restricted to the taps ``< k - s`` along ``dim``, in the channels-last
    column order of :func:`conv_rows_channels_last` (ungrouped layers only).

    Args:
        layer: the convolution.
        inputs: its input, batched or not.
        padded: :func:`channels_last_padded` of ``inputs``, if already at hand.
        dim: the spatial dimension (0 = the first).

    Returns:
        ``(first, last)``, each ``(B * L_rest, (k - s) * prod(other kernel dims) * C)``, where
        ``L_rest`` counts the output positions of the other spatial dimensions (sample-major,
        in their order).
    """
    conv = cast(nn.modules.conv._ConvNd, layer)
    if padded is None:
        padded = channels_last_padded(conv, inputs)  # (B, *S, C)
    batch, sizes, channels = padded.shape[0], padded.shape[1:-1], padded.shape[-1]
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    positions = [
        (size - spacing * (k - 1) - 1) // step + 1
        for size, k, step, spacing in zip(sizes, kernel, stride, dilation)
    ]
    strides = padded.stride()
    others = [i for i in range(len(kernel)) if i != dim]
    taps = [k - stride[dim] if i == dim else k for i, k in enumerate(kernel)]
    size = (batch, *(positions[i] for i in others), *taps, channels)
    layout = (
        strides[0],
        *(strides[1 + i] * stride[i] for i in others),
        *(strides[1 + i] * dilation[i] for i in range(len(kernel))),
        1,
    )
    width = math.prod(taps) * channels
    offset = padded.storage_offset()
    first = padded.as_strided(size, layout, offset).reshape(-1, width)
    past = offset + stride[dim] * positions[dim] * strides[1 + dim]
    last = padded.as_strided(size, layout, past).reshape(-1, width)
    return first, last


def channels_last_gram_to_weight_order(
    gram: Tensor, kernel_size: tuple[int, ...], per_group: int
) -> Tensor:
    """A ``(..., d, d)`` Gram of :func:`conv_rows_channels_last` rows in the weight's order.

    Returns:
        ``G[..., (c, *a), (c', *a')] = gram[..., (*a, c), (*a', c')]`` (a copy).
    """
    spatial = len(kernel_size)
    taps = tuple(range(spatial))
    lead = gram.shape[:-2]
    grid = gram.reshape(*lead, *kernel_size, per_group, *kernel_size, per_group)
    skip = len(lead)
    first = [skip + spatial, *(skip + i for i in taps)]
    second = [skip + 2 * spatial + 1, *(skip + spatial + 1 + i for i in taps)]
    grid = grid.permute(*range(skip), *first, *second)
    return grid.reshape(gram.shape)


def channels_last_weight_index(kernel_size: tuple[int, ...], per_group: int) -> Tensor:
    """Row index that takes :func:`conv_rows_channels_last` coordinates to the weight's order.

    ``index[c * K + a] = a * C + c`` (``K`` taps, ``C`` channels per group): a basis ``U`` of the
    channels-last Gram is ``U[index]`` in weight order, and the Gram itself
    ``gram[..., index][..., index, :]`` (:func:`channels_last_gram_to_weight_order`). The
    eigenvectors of a permuted matrix are the permuted eigenvectors, so a basis can be built
    from the channels-last sums and only its ``d x r`` rows permuted, instead of the
    ``d x d`` sums of every class.

    Example:
        >>> channels_last_weight_index((3,), 2).tolist()
        [0, 2, 4, 1, 3, 5]
    """
    taps = math.prod(kernel_size)
    channel = torch.arange(per_group).repeat_interleave(taps)
    tap = torch.arange(taps).repeat(per_group)
    return tap * per_group + channel


def conv1d_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv1d layer, ``(B * L * groups, in_channels / groups * k)``."""
    return conv_rows(layer, inputs)


def conv2d_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv2d layer, ``(B * L * groups, in_channels / groups * kh * kw)``."""
    return conv_rows(layer, inputs)


def conv_forward_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """:func:`conv_rows` of a forward call (the ``rows`` of a convolution's :class:`WeightRows`)."""
    return conv_rows(layer, forward_input(args, kwargs))


@register_representation(nn.Conv1d)
@register_representation(nn.Conv2d)
@register_representation(nn.Conv3d)
def conv_representation(layer: nn.Module) -> list[WeightRows]:
    """The weight ``(out, in/groups, k...)`` of a convolution multiplies each patch."""
    conv = cast(nn.modules.conv._ConvNd, layer)
    dim = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return [WeightRows("weight", "", conv_forward_rows, weight_as_matrix, write_reshaped_, dim)]
