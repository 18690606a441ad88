"""Rows of ``nn.Linear``: every input vector.

Tokens of ``(B, ..., in)`` inputs are flattened in order, so the rows are sample-major for
batch-first inputs. A Linear fed sequence-first ``(L, B, in)`` tensors is not sample-major
(nothing in the layer says so).
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor, nn

from unsc_lightning.nullspace.representations.registry import (
    WeightRows,
    forward_input,
    register_representation,
    same_matrix,
    write_same_,
)


def linear_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Linear layer: every input vector, tokens of 3-D (or higher) inputs flattened.

    Returns:
        Tensor ``(N, in_features)`` where ``N`` is the product of the leading dimensions.
    """
    return inputs.reshape(-1, inputs.shape[-1])


def linear_forward_rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """:func:`linear_rows` of a forward call (the ``rows`` of a Linear's :class:`WeightRows`)."""
    return linear_rows(layer, forward_input(args, kwargs))


@register_representation(nn.Linear)
def linear_representation(layer: nn.Module) -> list[WeightRows]:
    """The weight of a Linear layer multiplies each input vector."""
    dim = int(cast(nn.Linear, layer).in_features)
    return [WeightRows("weight", "", linear_forward_rows, same_matrix, write_same_, dim)]
