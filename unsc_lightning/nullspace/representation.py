"""Layer inputs to rows of the layer's representation matrix.

A weight layer computes ``y = W x`` for every *row* ``x`` of its representation: the input
vector of a Linear layer, or every receptive-field patch of a convolution, flattened in the same
order as ``weight.reshape(out_channels, -1)``. The null-space guarantee ``ΔW x = 0`` is therefore
stated on these rows, so they are what the covariance is built from.

Supported layers live in :data:`REPRESENTATIONS`, a table from layer type to handler (no
``isinstance`` chains elsewhere). Grouped convolutions share one weight layout
``(out, in/groups, k...)``; the patches of every group are stacked as extra rows, so one basis of
dimension ``in/groups * prod(k)`` covers every group and the projected update leaves each group's
outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

RowsFn = Callable[[nn.Module, Tensor], Tensor]


def linear_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Linear layer: every input vector, tokens of 3-D (or higher) inputs flattened.

    Returns:
        Tensor ``(N, in_features)`` where ``N`` is the product of the leading dimensions.
    """
    return inputs.reshape(-1, inputs.shape[-1])


def _padded(layer: Any, inputs: Tensor) -> Tensor:
    # ``_reversed_padding_repeated_twice`` is how torch itself pads for every padding mode and for
    # ``padding="same"``; padding here and unfolding without padding reproduces the layer exactly.
    pad = layer._reversed_padding_repeated_twice  # type: ignore[attr-defined]
    if not any(pad):
        return inputs
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode  # type: ignore[attr-defined]
    return F.pad(inputs, pad, mode=mode)


def _group_rows(patches: Tensor, groups: int) -> Tensor:
    # patches: (B, C*K, L) with channel-major layout -> rows (B*L*groups, C/groups*K)
    batch, features, locations = patches.shape
    per_group = features // groups
    patches = patches.reshape(batch, groups, per_group, locations)
    return patches.permute(0, 3, 1, 2).reshape(-1, per_group)


def conv2d_rows(layer: Any, inputs: Tensor) -> Tensor:
    """Rows of a Conv2d layer: every receptive-field patch (layer's kernel/stride/padding/dilation).

    Returns:
        Tensor ``(B * L * groups, in_channels / groups * kh * kw)``.
    """
    if inputs.dim() == 3:  # unbatched input
        inputs = inputs.unsqueeze(0)
    patches = F.unfold(
        _padded(layer, inputs),
        kernel_size=layer.kernel_size,  # type: ignore[arg-type]
        dilation=layer.dilation,  # type: ignore[arg-type]
        stride=layer.stride,  # type: ignore[arg-type]
    )
    return _group_rows(patches, layer.groups)  # type: ignore[arg-type]


def conv1d_rows(layer: Any, inputs: Tensor) -> Tensor:
    """Rows of a Conv1d layer, via a 2-D unfold over a height-1 image.

    Returns:
        Tensor ``(B * L * groups, in_channels / groups * k)``.
    """
    if inputs.dim() == 2:  # unbatched input
        inputs = inputs.unsqueeze(0)
    padded = _padded(layer, inputs).unsqueeze(2)
    patches = F.unfold(
        padded,
        kernel_size=(1, layer.kernel_size[0]),  # type: ignore[index]
        dilation=(1, layer.dilation[0]),  # type: ignore[index]
        stride=(1, layer.stride[0]),  # type: ignore[index]
    )
    return _group_rows(patches, layer.groups)  # type: ignore[arg-type]


#: Layer type -> function turning the layer's input into representation rows.
REPRESENTATIONS: dict[type[nn.Module], RowsFn] = {
    nn.Linear: linear_rows,
    nn.Conv1d: conv1d_rows,
    nn.Conv2d: conv2d_rows,
}


def rows_fn_for(layer: nn.Module) -> RowsFn | None:
    """The representation handler for ``layer``'s exact type or nearest supported base class."""
    for cls in type(layer).__mro__:
        if cls in REPRESENTATIONS:
            return REPRESENTATIONS[cls]
    return None


def is_supported(layer: nn.Module) -> bool:
    """Whether ``layer`` has a representation handler and a weight."""
    return rows_fn_for(layer) is not None and isinstance(getattr(layer, "weight", None), Tensor)


def layer_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Representation rows of ``layer`` for the given input batch.

    Raises:
        TypeError: if the layer type has no handler in :data:`REPRESENTATIONS`.
    """
    fn = rows_fn_for(layer)
    if fn is None:
        supported = ", ".join(cls.__name__ for cls in REPRESENTATIONS)
        raise TypeError(
            f"No representation for layer type {type(layer).__name__}; supported: {supported}."
        )
    return fn(layer, inputs)


def representation_dim(layer: nn.Module) -> int:
    """Dimension ``d`` of the layer's rows, equal to ``weight[0].numel()``."""
    return int(layer.weight[0].numel())  # type: ignore[index]


def weight_as_matrix(weight: Tensor) -> Tensor:
    """View a weight (or its gradient) as ``out x d``, matching the order of the rows."""
    return weight.reshape(weight.shape[0], -1)


# -- weight-level interface (the engine's view of a layer) ------------------------------------
@dataclass(frozen=True)
class WeightRows:
    """One constrained weight of a layer and the input rows it multiplies.

    Attributes:
        parameter: attribute path of the weight relative to the layer (``"weight"``).
        suffix: ``""`` for a layer's single weight (its basis is keyed by the layer name), else
            a short tag appended to the layer name (``"q"``, ``"out"``).
        rows: ``(layer, args, kwargs) -> (N, d)`` rows from a forward pre-hook, sample-major.
        to_matrix: weight-shaped tensor -> ``(out, d)`` matrix ``M`` with ``output = rows @ Mᵀ``.
        write_matrix_: writes an ``(out, d)`` matrix back into a weight-shaped tensor in place.
        dim: row dimension ``d``.
    """

    parameter: str
    suffix: str
    rows: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Tensor]
    to_matrix: Callable[[Tensor], Tensor]
    write_matrix_: Callable[[Tensor, Tensor], None]
    dim: int


Handler = Callable[[nn.Module], list[WeightRows]]


def _write_reshaped_(tensor: Tensor, matrix: Tensor) -> None:
    tensor.copy_(matrix.reshape_as(tensor))


def _single_weight(layer: nn.Module) -> list[WeightRows]:
    fn = rows_fn_for(layer)
    assert fn is not None

    def rows(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return fn(module, args[0] if args else next(iter(kwargs.values())))

    return [
        WeightRows(
            "weight", "", rows, weight_as_matrix, _write_reshaped_, representation_dim(layer)
        )
    ]


def representations_of(layer: nn.Module) -> list[WeightRows] | None:
    """The weights of ``layer`` with their rows, or ``None`` for an unsupported layer."""
    if not is_supported(layer):
        return None
    return _single_weight(layer)
