"""Rows of ``nn.MultiheadAttention`` (``unsc_lightning.nullspace.representations.attention``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from helpers.representations import (
    BATCH,
    DTYPE,
    Call,
    Case,
    HandlerProperties,
    build,
    capture,
    low_rank_features,
    null_space_projection,
    run,
    sample_of,
    updated_layer,
    weight_of,
)
from torch import nn


def _attention(*args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: nn.MultiheadAttention(*args, **kwargs)


def _self_attention(gen: torch.Generator) -> Call:
    tokens = low_rank_features(gen, BATCH, 4, 8)
    return (tokens, tokens, tokens), {}


def _cross_attention_seq_first(gen: torch.Generator) -> Call:
    query = low_rank_features(gen, 2, BATCH, 8)
    memory = low_rank_features(gen, 5, BATCH, 8)
    padding = torch.zeros(BATCH, 5, dtype=DTYPE)
    padding[0, -2:] = float("-inf")
    bias = torch.randn(2, 5, generator=gen, dtype=DTYPE)
    kwargs = {"key_padding_mask": padding, "attn_mask": bias, "need_weights": False}
    return (query, memory, memory), kwargs


def _separate_weights(gen: torch.Generator) -> Call:
    query = low_rank_features(gen, BATCH, 3, 12)
    key = low_rank_features(gen, BATCH, 4, 5)
    value = low_rank_features(gen, BATCH, 4, 7)
    return (query, key, value), {}


def _causal(gen: torch.Generator) -> Call:
    tokens = low_rank_features(gen, BATCH, 4, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=DTYPE)
    return (tokens,), {
        "key": tokens,
        "value": tokens,
        "attn_mask": mask,
        "is_causal": True,
        "need_weights": False,
    }


def _positional_masks(gen: torch.Generator) -> Call:
    tokens = low_rank_features(gen, BATCH, 4, 8)
    padding = torch.zeros(BATCH, 4, dtype=torch.bool)
    padding[1, 0] = True
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = True
    return (tokens, tokens, tokens, padding, True, mask), {}


CASES = [
    Case(
        "mha-packed-self-batch-first",
        _attention(8, 2, batch_first=True),
        _self_attention,
        sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-packed-cross-seq-first-masks",
        _attention(8, 2),
        _cross_attention_seq_first,
        sample_of({0: 1, 1: 1, 2: 1, "key_padding_mask": 0}),
    ),
    Case(
        "mha-separate-bias-kv-zero-attn",
        _attention(12, 2, kdim=5, vdim=7, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        _separate_weights,
        sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-causal-kwargs",
        _attention(8, 2, batch_first=True, bias=False),
        _causal,
        sample_of({0: 0, "key": 0, "value": 0}),
    ),
    Case(
        "mha-causal-hint-without-mask",  # the fast path ignores the hint; the rows must too
        _attention(8, 2, batch_first=True),
        lambda g: ((low_rank_features(g, BATCH, 4, 8),) * 3, {"is_causal": True}),
        sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-positional-masks",
        _attention(8, 2, batch_first=True),
        _positional_masks,
        sample_of({0: 0, 1: 0, 2: 0, 3: 0}),
    ),
]


class TestAttentionHandler(HandlerProperties):
    CASES = CASES


def test_each_attention_weight_is_constrained_by_its_own_rows():
    # one block at a time: a wrong block of the packed weight would pass the joint test only if
    # the errors cancelled
    case = next(c for c in CASES if c.name == "mha-packed-cross-seq-first-masks")
    layer, call = build(case)
    representations, rows, output = capture(layer, call)
    gen = torch.Generator().manual_seed(3)
    for index, representation in enumerate(representations):
        matrix = representation.to_matrix(weight_of(layer, representation))
        update = torch.randn(matrix.shape, generator=gen, dtype=DTYPE)
        projected = null_space_projection(rows[index], update)
        moved = run(updated_layer(layer, [representation], [projected]), call)
        torch.testing.assert_close(moved, output, rtol=0, atol=1e-10)
        changed = run(updated_layer(layer, [representation], [update]), call)
        assert (changed - output).abs().max() > 1e-3, representation.suffix


def test_packed_attention_blocks_select_query_key_value_rows():
    layer = nn.MultiheadAttention(4, 2).to(DTYPE)
    query, key = torch.randn(2, BATCH, 4, dtype=DTYPE), torch.randn(3, BATCH, 4, dtype=DTYPE)
    value = torch.randn(3, BATCH, 4, dtype=DTYPE)
    representations, rows, _ = capture(layer, ((query, key, value), {}))
    assert [(r.parameter, r.suffix) for r in representations] == [
        ("in_proj_weight", "q"),
        ("in_proj_weight", "k"),
        ("in_proj_weight", "v"),
        ("out_proj.weight", "out"),
    ]
    for tokens, block_rows in zip((query, key, value), rows):
        torch.testing.assert_close(block_rows, tokens.transpose(0, 1).reshape(-1, 4))
    weight = layer.in_proj_weight.detach()
    for block, representation in enumerate(representations[:3]):
        assert torch.equal(representation.to_matrix(weight), weight[4 * block : 4 * block + 4])


def test_unbatched_attention_rows_match_a_batch_of_one():
    layer = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE)
    tokens = torch.randn(3, 4, dtype=DTYPE)
    _, single, _ = capture(layer, ((tokens, tokens, tokens), {}))
    _, batched, _ = capture(layer, ((tokens[None], tokens[None], tokens[None]), {}))
    for a, b in zip(single, batched):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
