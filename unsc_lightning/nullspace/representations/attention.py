"""Rows of ``nn.MultiheadAttention``: the inputs of its four projections.

The query, key and value inputs are the rows of the three input projections (packed
``in_proj_weight`` blocks or separate ``q/k/v_proj_weight``); for ``out_proj.weight`` they are
the attention output *before* the output projection, recomputed in the pre-hook because
``out_proj``'s own forward is never called. Sequence-first (``batch_first=False``) tokens are
made sample-major.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace.representations.registry import (
    RowsFn,
    WeightRows,
    forward_signature,
    register_representation,
    same_matrix,
    write_same_,
)


def _attention_arguments(
    layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    # Bind like the call itself did, so positional and keyword masks/flags are read alike.
    bound = forward_signature(type(layer)).bind(layer, *args, **kwargs)
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
                same_matrix,
                write_same_,
                int(dim),
            )
        representations.append(representation)
    representations.append(
        WeightRows(
            "out_proj.weight", "out", attention_output_rows, same_matrix, write_same_, embed_dim
        )
    )
    return representations
