"""Layer inputs to rows of the layer's representation matrices: the table of layer handlers.

UNSC constrains every weight update ``ΔM`` of a layer to ``ΔM x = 0`` for every *row* ``x`` the
weight multiplies on remaining data, so the layer's output on that data does not move. A handler
says, for one layer type, which weights are constrained and what their rows are, as a list of
:class:`WeightRows`: the parameter, a function from the layer's forward-call arguments (seen by a
forward *pre*-hook) to rows ``(N, d)``, and the reshaping between the parameter and the matrix
``M`` (``out x d``) with ``output_without_bias = rows @ M.T``.

Handlers are registered with :func:`register_representation` in :data:`REPRESENTATIONS`, a table
keyed by exact layer type; :func:`representations_of` falls back to the nearest registered base
class, so users' subclasses work. No ``isinstance`` chains elsewhere.

Row definitions (every handler's rows are *sample-major*: all rows of batch sample 0, then of
sample 1, ...; per-class statistics rely on it):

* ``Linear``: every input vector; tokens of ``(B, ..., in)`` inputs flattened in order. A Linear
  fed sequence-first ``(L, B, in)`` tensors is not sample-major (nothing in the layer says so).
* ``Conv1d/2d/3d``: every receptive-field patch under the layer's own padding (``"same"``,
  reflect, replicate, circular), stride and dilation, flattened like ``weight.reshape(out, -1)``.
  Grouped convolutions share one weight layout ``(out, in/groups, k...)``; the patches of every
  group are stacked as extra rows (order: sample, output position, group), so one basis of
  dimension ``in/groups * prod(k)`` covers every group and the projected update leaves each
  group's outputs unchanged.
* ``ConvTranspose1d/2d/3d``: output ``y[o, p] = Σ_{c, a} W[c, o, a] x[c, (p + pad - a·dil) /
  stride]`` (terms where the index is fractional or out of range are zero), so the row at output
  position ``p`` is the gathered inputs ``x[c, (p + pad - a·dil) / stride]`` (zeros elsewhere)
  and ``M[o, (c, a)] = W[c, o, a]``. Built as the patches of the zero-inserted, padded input
  read with a flipped kernel; stride, padding, dilation, output padding (also from the
  ``output_size`` forward argument) and groups (stacked like convolutions) are honoured.
* ``Embedding``: one-hot vectors of the looked-up indices (``d = num_embeddings``) and
  ``M = W.T``, so the null space is spanned by the tokens never seen in remaining data.
* ``RNN``, ``GRU``, ``LSTM``: for ``weight_ih`` of each layer and direction every step of that
  layer's input, for ``weight_hh`` the hidden state each step starts from (see
  :func:`recurrent_representation`); tensors or ``PackedSequence`` (zero rows at padding).
* ``RNNCell``, ``GRUCell``, ``LSTMCell``: each call's input for ``weight_ih`` and the state it
  was given for ``weight_hh`` (zeros when none).
* ``MultiheadAttention``: the query, key and value inputs for the three input projections
  (packed ``in_proj_weight`` blocks or separate ``q/k/v_proj_weight``), and for
  ``out_proj.weight`` the attention output *before* the output projection, recomputed in the
  pre-hook because ``out_proj``'s own forward is never called.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

RowsFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Tensor]


@dataclass(frozen=True)
class WeightRows:
    """One constrained weight of a layer and the input rows it multiplies.

    Attributes:
        parameter: attribute path of the weight relative to the layer, e.g. ``"weight"``,
            ``"in_proj_weight"``, ``"out_proj.weight"``.
        suffix: ``""`` for a layer's single weight (its basis is keyed by the layer name), else a
            short tag such as ``"q"``, ``"k"``, ``"v"``, ``"out"``.
        rows: ``(layer, args, kwargs) -> rows (N, d)``, detached and sample-major; meant to be
            called from a forward pre-hook registered with ``with_kwargs=True``.
        to_matrix: weight-shaped tensor (the parameter, its gradient, an update) -> ``(out, d)``
            matrix ``M`` with ``output_without_bias = rows @ M.T``. May return a view of its
            argument: do not modify the result in place.
        write_matrix_: ``(weight-shaped tensor, (out, d) matrix)`` -> writes the matrix into the
            tensor in place (the inverse of ``to_matrix``; a block of a packed weight writes only
            that block).
        dim: ``d``, the length of a row.
    """

    parameter: str
    suffix: str
    rows: RowsFn
    to_matrix: Callable[[Tensor], Tensor]
    write_matrix_: Callable[[Tensor, Tensor], None]
    dim: int


Handler = Callable[[nn.Module], list[WeightRows]]

#: Exact layer type -> handler returning the layer's constrained weights and their rows.
REPRESENTATIONS: dict[type[nn.Module], Handler] = {}


def register_representation(layer_type: type[nn.Module]) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` for exactly ``layer_type`` in :data:`REPRESENTATIONS`.

    Subclasses without their own entry use the nearest registered base class (see
    :func:`representations_of`); register a subclass whose forward computes something else.

    Example:
        >>> class Scale(nn.Linear): ...
        >>> @register_representation(Scale)
        ... def scale_representation(layer):
        ...     return linear_representation(layer)
        >>> REPRESENTATIONS[Scale] is scale_representation
        True
        >>> del REPRESENTATIONS[Scale]
    """

    def decorator(handler: Handler) -> Handler:
        REPRESENTATIONS[layer_type] = handler
        return handler

    return decorator


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _forward_input(args: tuple[Any, ...], kwargs: dict[str, Any], name: str = "input") -> Tensor:
    return cast(Tensor, args[0] if args else kwargs[name]).detach()


def _same_matrix(weight: Tensor) -> Tensor:
    return weight


def _write_same_(weight: Tensor, matrix: Tensor) -> None:
    weight.copy_(matrix)


def _write_reshaped_(weight: Tensor, matrix: Tensor) -> None:
    weight.copy_(matrix.reshape(weight.shape))


def weight_as_matrix(weight: Tensor) -> Tensor:
    """View a Linear or convolution weight (or its gradient) as ``out x d`` (rows' order).

    Other layers (transposed convolutions, embeddings, attention) use their
    :attr:`WeightRows.to_matrix`.
    """
    return weight.reshape(weight.shape[0], -1)


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


def linear_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Linear layer: every input vector, tokens of 3-D (or higher) inputs flattened.

    Returns:
        Tensor ``(N, in_features)`` where ``N`` is the product of the leading dimensions.
    """
    return inputs.reshape(-1, inputs.shape[-1])


def _linear_forward_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return linear_rows(layer, _forward_input(args, kwargs))


@register_representation(nn.Linear)
def linear_representation(layer: nn.Module) -> list[WeightRows]:
    """The weight of a Linear layer multiplies each input vector."""
    dim = int(cast(nn.Linear, layer).in_features)
    return [WeightRows("weight", "", _linear_forward_rows, _same_matrix, _write_same_, dim)]


# --------------------------------------------------------------------------------------------
# Convolutions
# --------------------------------------------------------------------------------------------


def _padded(layer: Any, inputs: Tensor) -> Tensor:
    # ``_reversed_padding_repeated_twice`` is how torch itself pads for every padding mode and for
    # ``padding="same"``; padding here and windowing without padding reproduces the layer exactly.
    pad = layer._reversed_padding_repeated_twice
    if not any(pad):
        return inputs
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(inputs, pad, mode=mode)


def _windows(
    inputs: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    # (B, C, *S) -> (B, C, *L, *k): a strided view per spatial dim (each appends its window as a
    # new last dim), then every dilation-th element of the window: exactly the taps a dilated
    # kernel reads. A strided view plus one copy is much faster on CPU than im2col (F.unfold).
    windows = inputs
    for axis, (size, step, spacing) in enumerate(zip(kernel, stride, dilation)):
        windows = windows.unfold(2 + axis, (size - 1) * spacing + 1, step)
        if spacing > 1:
            windows = windows[..., ::spacing]
    return windows


def _patch_rows(windows: Tensor, groups: int) -> Tensor:
    # (B, C, *L, *k) -> rows (B * prod(L) * groups, C/groups * prod(k)), ordered sample,
    # position, group: sample-major, and each patch flattened as (channel, *k) like the weight.
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
    windows = _windows(_padded(conv, inputs), conv.kernel_size, conv.stride, conv.dilation)
    return _patch_rows(windows, conv.groups)


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
    each row gathers contiguous runs of channels, which copies several times faster than
    :func:`conv_rows`' runs of taps. A Gram ``Σ x xᵀ`` of these rows is brought to the weight's
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


def conv3d_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv3d layer, ``(B * L * groups, in_channels / groups * kd * kh * kw)``."""
    return conv_rows(layer, inputs)


def _conv_forward_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return conv_rows(layer, _forward_input(args, kwargs))


@register_representation(nn.Conv1d)
@register_representation(nn.Conv2d)
@register_representation(nn.Conv3d)
def conv_representation(layer: nn.Module) -> list[WeightRows]:
    """The weight ``(out, in/groups, k...)`` of a convolution multiplies each patch."""
    conv = cast(nn.modules.conv._ConvNd, layer)
    dim = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    return [WeightRows("weight", "", _conv_forward_rows, weight_as_matrix, _write_reshaped_, dim)]


# --------------------------------------------------------------------------------------------
# Transposed convolutions
# --------------------------------------------------------------------------------------------


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
    windows = _windows(F.pad(inserted, pad), conv.kernel_size, (1,) * spatial, conv.dilation)
    # window tap j reads input offset a = k - 1 - j: flip so rows follow the weight's tap order
    windows = windows.flip(tuple(range(-spatial, 0)))
    return _patch_rows(windows, conv.groups)


def _conv_transpose_forward_rows(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    return conv_transpose_rows(layer, _forward_input(args, kwargs), output_size)


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


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


def embedding_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of an Embedding: one-hot vectors of the looked-up indices, in input order.

    Returns:
        Tensor ``(N, num_embeddings)`` in the weight's dtype, ``N = inputs.numel()``.
    """
    embedding = cast(nn.Embedding, layer)
    one_hot = F.one_hot(inputs.reshape(-1), embedding.num_embeddings)
    return one_hot.to(embedding.weight.dtype)


def _embedding_forward_rows(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    return embedding_rows(layer, _forward_input(args, kwargs))


def _transpose(weight: Tensor) -> Tensor:
    return weight.t()


def _write_transpose_(weight: Tensor, matrix: Tensor) -> None:
    weight.copy_(matrix.t())


@register_representation(nn.Embedding)
def embedding_representation(layer: nn.Module) -> list[WeightRows]:
    """An Embedding's output is ``one_hot(index) @ W``, so ``M = W.T`` and ``d = num_embeddings``.

    With ``max_norm`` the layer renormalises the looked-up weight rows in place during forward;
    the rows stay exact for the weight as renormalised. Sparse gradients cannot be written back
    in place.
    """
    embedding = cast(nn.Embedding, layer)
    return [
        WeightRows(
            "weight",
            "",
            _embedding_forward_rows,
            _transpose,
            _write_transpose_,
            int(embedding.num_embeddings),
        )
    ]


# --------------------------------------------------------------------------------------------
# Multi-head attention
# --------------------------------------------------------------------------------------------


_FORWARD_SIGNATURES: dict[type[nn.Module], inspect.Signature] = {}


def _forward_signature(layer_type: type[nn.Module]) -> inspect.Signature:
    # binding runs on every forward of the remaining-data pass: inspect each type once
    if layer_type not in _FORWARD_SIGNATURES:
        _FORWARD_SIGNATURES[layer_type] = inspect.signature(layer_type.forward)
    return _FORWARD_SIGNATURES[layer_type]


def _attention_arguments(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    # Bind like the call itself did, so positional and keyword masks/flags are read alike.
    bound = _forward_signature(type(layer)).bind(layer, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _sample_major_tokens(layer: nn.MultiheadAttention, tokens: Tensor) -> Tensor:
    # batch_first=False gives (L, B, E): samples must come first for per-sample row blocks
    if tokens.dim() == 3 and not layer.batch_first:
        tokens = tokens.transpose(0, 1)
    return tokens.reshape(-1, tokens.shape[-1])


def _attention_input_rows(name: str) -> RowsFn:
    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        tokens = cast(Tensor, _attention_arguments(layer, args, kwargs)[name]).detach()
        return _sample_major_tokens(cast(nn.MultiheadAttention, layer), tokens)

    return rows


def attention_output_rows(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """Rows of ``out_proj.weight``: the attention output before the output projection.

    Recomputes the attention of the call ``layer(*args, **kwargs)`` with the layer's own
    projections, ``bias_k``/``bias_v``, ``add_zero_attn`` and masks (``key_padding_mask``,
    ``attn_mask``, ``is_causal``, ``need_weights`` as passed), an identity output projection
    without bias, and dropout off (the remaining-data pass runs in eval mode).

    Returns:
        Tensor ``(B * L, embed_dim)``, sample-major.
    """
    attention = cast(nn.MultiheadAttention, layer)
    call = _attention_arguments(layer, args, kwargs)
    query, key, value = (cast(Tensor, call[name]) for name in ("query", "key", "value"))
    batched = query.dim() == 3
    if batched and attention.batch_first:
        query, key, value = (tokens.transpose(0, 1) for tokens in (query, key, value))
    embed_dim = attention.embed_dim
    identity = torch.eye(embed_dim, dtype=query.dtype, device=query.device)
    with torch.no_grad():
        output, _ = F.multi_head_attention_forward(
            query,
            key,
            value,
            embed_dim,
            attention.num_heads,
            attention.in_proj_weight,
            attention.in_proj_bias,
            attention.bias_k,
            attention.bias_v,
            attention.add_zero_attn,
            0.0,
            identity,
            None,
            training=False,
            key_padding_mask=call["key_padding_mask"],
            need_weights=call["need_weights"],
            attn_mask=call["attn_mask"],
            use_separate_proj_weight=not attention._qkv_same_embed_dim,
            q_proj_weight=attention.q_proj_weight,
            k_proj_weight=attention.k_proj_weight,
            v_proj_weight=attention.v_proj_weight,
            average_attn_weights=call["average_attn_weights"],
            # the layer's fast path (eval, no grad, self-attention) ignores `is_causal` without
            # `attn_mask`, where the slow path raises: follow the path that did not raise
            is_causal=call["is_causal"] and call["attn_mask"] is not None,
        )
    if batched:
        output = output.transpose(0, 1)
    return output.reshape(-1, embed_dim)


def _block(start: int, stop: int, weight: Tensor) -> Tensor:
    return weight[start:stop]


def _write_block_(start: int, stop: int, weight: Tensor, matrix: Tensor) -> None:
    weight[start:stop].copy_(matrix)


@register_representation(nn.MultiheadAttention)
def attention_representation(layer: nn.Module) -> list[WeightRows]:
    """Query/key/value projections (packed blocks or separate weights) and the output projection.

    The q/k/v rows are the inputs to the projections, exact also with ``bias_k``/``bias_v`` and
    ``add_zero_attn``: those append key/value tokens *after* the projection, from raw parameters
    that are frozen rather than projected. The output projection's rows are
    :func:`attention_output_rows`.
    """
    attention = cast(nn.MultiheadAttention, layer)
    embed_dim = attention.embed_dim
    inputs = (
        ("q", "query", embed_dim),
        ("k", "key", attention.kdim),
        ("v", "value", attention.vdim),
    )
    representations = []
    for block, (suffix, name, dim) in enumerate(inputs):
        if attention._qkv_same_embed_dim:
            start, stop = block * embed_dim, (block + 1) * embed_dim
            representation = WeightRows(
                "in_proj_weight",
                suffix,
                _attention_input_rows(name),
                functools.partial(_block, start, stop),
                functools.partial(_write_block_, start, stop),
                int(dim),
            )
        else:
            representation = WeightRows(
                f"{suffix}_proj_weight",
                suffix,
                _attention_input_rows(name),
                _same_matrix,
                _write_same_,
                int(dim),
            )
        representations.append(representation)
    representations.append(
        WeightRows(
            "out_proj.weight", "out", attention_output_rows, _same_matrix, _write_same_, embed_dim
        )
    )
    return representations


# --------------------------------------------------------------------------------------------
# Recurrent layers (RNN, GRU, LSTM)
# --------------------------------------------------------------------------------------------

#: ``RNNBase.mode`` -> the ``torch._VF`` function the layer's own forward calls
_RECURRENT_KERNELS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


@dataclass(frozen=True)
class _Sequences:
    """A recurrent layer's call: its input batch first in the caller's sample order (padded
    when it came packed), how many steps of each sample are real, the packed form when it came
    packed, and the initial state(s) ``(layers * dirs, B, H)`` in the caller's order."""

    inputs: Tensor
    steps: Tensor  # (B, T) bool: the real steps
    packed: PackedSequence | None
    state: Tensor | tuple[Tensor, Tensor]


def _recurrent_call(layer: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Sequences:
    bound = _forward_signature(type(layer)).bind(layer, *args, **kwargs)
    inputs, hx = bound.arguments["input"], bound.arguments.get("hx")
    packed = inputs if isinstance(inputs, PackedSequence) else None
    if packed is not None:
        padded, lengths = pad_packed_sequence(packed, batch_first=True)
        steps = torch.arange(padded.shape[1]) < lengths[:, None]
        inputs = padded
    elif not isinstance(inputs, Tensor):
        raise NotImplementedError(
            f"{type(layer).__name__} was called with a {type(inputs).__name__}: null-space rows "
            "are built for tensors and PackedSequence. Exclude the layer with "
            "`exclude_layers=` (it is then frozen)."
        )
    else:
        unbatched = inputs.dim() == 2
        if unbatched:
            inputs = inputs.unsqueeze(0)
            if hx is not None:
                hx = _each(hx, lambda h: h.unsqueeze(1))
        elif not layer.batch_first:
            inputs = inputs.transpose(0, 1)
        steps = torch.ones(inputs.shape[:2], dtype=torch.bool)
    batch = inputs.shape[0]
    dirs = 2 if layer.bidirectional else 1
    zeros = inputs.new_zeros(layer.num_layers * dirs, batch, layer.proj_size or layer.hidden_size)
    if hx is None:
        hx = zeros
        if layer.mode == "LSTM":
            hx = (zeros, inputs.new_zeros(layer.num_layers * dirs, batch, layer.hidden_size))
    return _Sequences(inputs.detach(), steps.to(inputs.device), packed, hx)


def _each(state: Any, change: Callable[[Tensor], Tensor]) -> Any:
    """``change`` applied to a recurrent state: a tensor, or an LSTM's ``(h, c)``."""
    return tuple(change(h) for h in state) if isinstance(state, tuple) else change(state)


class _RecurrentRun:
    """One call of a recurrent layer, run one layer at a time with the layer's own kernel (eval:
    no dropout between layers), each layer's batch-first output ``(B, T, dirs * H)`` in the
    caller's sample order kept for the other weights' rows of the same call."""

    def __init__(self, layer: nn.RNNBase, call: _Sequences) -> None:
        self.layer, self.call = layer, call
        self.outputs: list[Tensor] = []
        packed = call.packed
        self._data = call.inputs if packed is None else packed.data  # the next layer's input

    def output(self, index: int) -> Tensor:
        layer, call, packed = self.layer, self.call, self.call.packed
        dirs = 2 if layer.bidirectional else 1
        kernel = getattr(torch._VF, _RECURRENT_KERNELS[layer.mode])
        options = (layer.bias, 1, 0.0, False, layer.bidirectional)
        with torch.no_grad():
            for k in range(len(self.outputs), index + 1):
                states = _each(call.state, lambda h: h[k * dirs : (k + 1) * dirs])  # noqa: B023
                suffixes = (f"_l{k}", f"_l{k}_reverse")
                weights = [
                    weight
                    for name, weight in zip(layer._flat_weights_names, layer._flat_weights)
                    if name.endswith(suffixes)
                ]
                if packed is None:
                    self._data = kernel(self._data, states, weights, *options, True)[0]
                    self.outputs.append(self._data)
                    continue
                order = packed.sorted_indices
                if order is not None:  # the kernel takes states in the packed (sorted) order
                    states = _each(states, lambda h: h.index_select(1, order))  # noqa: B023
                self._data = kernel(self._data, packed.batch_sizes, states, weights, *options)[0]
                step = PackedSequence(
                    self._data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
                )
                length = call.inputs.shape[1]
                self.outputs.append(
                    pad_packed_sequence(step, batch_first=True, total_length=length)[0]
                )
        return self.outputs[index]


#: the last call's run per recurrent layer, shared by the rows of its weights (a two-layer
#: bidirectional LSTM has eight): without it each weight ran the layers below it again
_RUNS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], list[Any], _RecurrentRun]] = (
    weakref.WeakKeyDictionary()
)


def _tensors_of(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):  # PackedSequence is a tuple too
        return [t for item in value for t in _tensors_of(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_of(item)]
    return []


def _recurrent_run(
    layer: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], last: bool = False
) -> _RecurrentRun:
    """The run of this call: the cached one when the call's tensors and the layer's weights are
    the same objects, unchanged (``_version``), else a new one; ``last`` drops it from the
    cache (the call's last weight)."""
    tensors = [*_tensors_of((args, kwargs)), *_tensors_of(layer._flat_weights)]
    versions = tuple((t._version, t.data_ptr()) for t in tensors)
    cached = _RUNS.get(layer)
    if (
        cached is not None
        and cached[0] == versions
        and len(cached[1]) == len(tensors)
        and all(ref() is t for ref, t in zip(cached[1], tensors))  # the same objects
    ):
        run = cached[2]
    else:
        run = _RecurrentRun(layer, _recurrent_call(layer, args, kwargs))
        _RUNS[layer] = (versions, [weakref.ref(t) for t in tensors], run)
    if last:
        _RUNS.pop(layer, None)
    return run


def _recurrent_input_rows(index: int) -> RowsFn:
    """Rows of ``weight_ih_l{index}`` (either direction): every step of the layer's input,
    sample by sample (zero at padding, see :func:`_real_steps`)."""

    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        run = _recurrent_run(cast(nn.RNNBase, layer), args, kwargs)
        inputs = run.call.inputs if index == 0 else run.output(index - 1)
        return _real_steps(inputs, run.call.steps)

    return rows


def _recurrent_hidden_rows(index: int, reverse: bool) -> RowsFn:
    """Rows of ``weight_hh_l{index}`` (``_reverse``): the hidden state each real step starts
    from, ``h₀, h₁ … h_{T-1}`` (the reverse direction: its ``h₀`` at the last real step, then
    back)."""

    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        recurrent = cast(nn.RNNBase, layer)
        dirs = 2 if recurrent.bidirectional else 1
        # the call's last weight (representation order): its run leaves the cache
        final = index == recurrent.num_layers - 1 and reverse == recurrent.bidirectional
        run = _recurrent_run(recurrent, args, kwargs, final)
        call, output = run.call, run.output(index)
        size = recurrent.proj_size or recurrent.hidden_size
        first = call.state[0] if isinstance(call.state, tuple) else call.state
        start = first[index * dirs + int(reverse)].unsqueeze(1)  # (B, 1, H)
        if reverse:
            hidden = output[..., size:]
            previous = torch.cat([hidden[:, 1:], torch.zeros_like(start)], dim=1)
            ends = call.steps.sum(1) - 1  # each sample's last real step starts from h₀
            rows_at = torch.arange(previous.shape[0], device=previous.device)
            previous[rows_at, ends] = start[:, 0]
        else:
            hidden = output[..., :size]
            previous = torch.cat([start, hidden[:, :-1]], dim=1)
        return _real_steps(previous, call.steps)

    return rows


def _real_steps(sequences: Tensor, steps: Tensor) -> Tensor:
    """``(B * T, d)`` rows, sample-major, zero at the padding steps of packed sequences: every
    sample keeps ``T`` rows (the per-class sums split a batch's rows evenly by sample), and a
    zero row adds nothing to a covariance."""
    real = torch.where(steps[..., None], sequences, sequences.new_zeros(()))
    return real.reshape(-1, sequences.shape[-1])


@register_representation(nn.RNN)
@register_representation(nn.GRU)
@register_representation(nn.LSTM)
def recurrent_representation(layer: nn.Module) -> list[WeightRows]:
    """Every layer's and direction's input and hidden-to-hidden weights.

    The gates of step ``t`` add ``W_ih x_t`` and ``W_hh h_{t-1}`` (GRU: ``r ⊙ (W_hn h_{t-1} +
    b_hn)``, still a product with ``h_{t-1}``): a change of ``W_ih`` orthogonal to every input
    step and of ``W_hh`` orthogonal to every hidden state it starts from leaves every gate, so
    every state, unchanged by induction over the steps and layers. The rows are rebuilt in the
    pre-hook by running the layer's own kernel one layer at a time. Biases (and an LSTM's
    ``weight_hr`` projection, whose input is not observable) stay unconstrained: frozen by
    default.
    """
    recurrent = cast(nn.RNNBase, layer)
    dirs = 2 if recurrent.bidirectional else 1
    hidden = recurrent.proj_size or recurrent.hidden_size
    representations = []
    for k in range(recurrent.num_layers):
        in_dim = recurrent.input_size if k == 0 else dirs * hidden
        for reverse in (False, True)[:dirs]:
            tag = f"l{k}" + ("_reverse" if reverse else "")
            representations.append(
                WeightRows(
                    f"weight_ih_{tag}",
                    f"ih_{tag}",
                    _recurrent_input_rows(k),
                    _same_matrix,
                    _write_same_,
                    in_dim,
                )
            )
            representations.append(
                WeightRows(
                    f"weight_hh_{tag}",
                    f"hh_{tag}",
                    _recurrent_hidden_rows(k, reverse),
                    _same_matrix,
                    _write_same_,
                    hidden,
                )
            )
    return representations


def _cell_rows(hidden: bool) -> RowsFn:
    """Rows of a recurrent cell's ``weight_ih`` (the step's input) or ``weight_hh`` (the state
    it starts from: ``hx``, an LSTM cell's ``h`` of ``(h, c)``, zeros when not given)."""

    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        cell = cast(nn.RNNCellBase, layer)
        bound = _forward_signature(type(layer)).bind(layer, *args, **kwargs)
        inputs, hx = cast(Tensor, bound.arguments["input"]), bound.arguments.get("hx")
        inputs = inputs.detach().reshape(-1, cell.input_size)
        if not hidden:
            return inputs
        if hx is None:
            return inputs.new_zeros(inputs.shape[0], cell.hidden_size)
        state = hx[0] if isinstance(hx, tuple) else hx
        return cast(Tensor, state).detach().reshape(-1, cell.hidden_size)

    return rows


@register_representation(nn.RNNCell)
@register_representation(nn.GRUCell)
@register_representation(nn.LSTMCell)
def recurrent_cell_representation(layer: nn.Module) -> list[WeightRows]:
    """A cell's ``weight_ih`` and ``weight_hh``, each onto the null space of what it multiplies
    in every call: a loop of calls over remaining sequences keeps every state, as for
    :func:`recurrent_representation`. Biases stay unconstrained (frozen by default)."""
    cell = cast(nn.RNNCellBase, layer)
    return [
        WeightRows(
            "weight_ih", "ih", _cell_rows(False), _same_matrix, _write_same_, cell.input_size
        ),
        WeightRows(
            "weight_hh", "hh", _cell_rows(True), _same_matrix, _write_same_, cell.hidden_size
        ),
    ]


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------


def resolve_parameter(layer: nn.Module, path: str) -> Tensor | None:
    """The tensor at ``path`` (e.g. ``"out_proj.weight"``) below ``layer``, or ``None``."""
    target: Any = layer
    for attribute in path.split("."):
        target = getattr(target, attribute, None)
    return target if isinstance(target, Tensor) else None


def representations_of(layer: nn.Module) -> list[WeightRows] | None:
    """The constrained weights of ``layer`` and their rows.

    Uses the handler of the layer's exact type, else of its nearest registered base class.

    Returns:
        The list of :class:`WeightRows`, or ``None`` when no handler applies or a weight it names
        is missing (e.g. a subclass that set ``weight = None``).
    """
    for cls in type(layer).__mro__:
        if cls in REPRESENTATIONS:
            representations = REPRESENTATIONS[cls](layer)
            if all(resolve_parameter(layer, r.parameter) is not None for r in representations):
                return representations
            return None
    return None


def is_supported(layer: nn.Module) -> bool:
    """Whether ``layer`` has a representation handler and the weights it names."""
    return representations_of(layer) is not None


def supported_layer_types() -> str:
    """Comma-separated names of the layer types with a handler."""
    return ", ".join(cls.__name__ for cls in REPRESENTATIONS)


def _single_representation(layer: nn.Module) -> WeightRows:
    representations = representations_of(layer)
    if representations is None:
        raise TypeError(
            f"No representation for layer type {type(layer).__name__}; supported: "
            f"{supported_layer_types()}."
        )
    if len(representations) != 1:
        weights = ", ".join(r.parameter for r in representations)
        raise TypeError(
            f"Layer type {type(layer).__name__} has several constrained weights ({weights}); "
            "use `representations_of(layer)` for their rows."
        )
    return representations[0]


def layer_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Representation rows of a single-weight ``layer`` for the input batch ``inputs``.

    Raises:
        TypeError: if the layer type has no handler, or has several constrained weights.
    """
    return _single_representation(layer).rows(layer, (inputs,), {})


def representation_dim(layer: nn.Module) -> int:
    """Dimension ``d`` of the rows of a single-weight ``layer`` (``weight[0].numel()`` for
    Linear and convolutions, ``num_embeddings`` for an Embedding).

    Raises:
        TypeError: if the layer type has no handler, or has several constrained weights.
    """
    return _single_representation(layer).dim
