"""Rows of ``nn.Embedding``: one-hot vectors of the looked-up indices.

``d = num_embeddings`` and ``M = W.T``, so the null space is spanned by the tokens never seen in
remaining data: an update projected onto it changes only the embeddings of those tokens.
"""

from __future__ import annotations

from typing import Any, cast

import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace.representations.registry import (
    WeightRows,
    forward_input,
    register_representation,
)


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
    return embedding_rows(layer, forward_input(args, kwargs))


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
