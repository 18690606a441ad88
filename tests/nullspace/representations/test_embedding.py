"""Rows of ``nn.Embedding`` (``unsc_lightning.nullspace.representations.embedding``)."""

from __future__ import annotations

import torch
from helpers.representations import BATCH, Case, HandlerProperties, first_input
from torch import nn

from unsc_lightning.nullspace.representations import layer_rows

CASES = [
    Case(
        "embedding-2d",
        lambda: nn.Embedding(20, 5),
        first_input(lambda g: torch.randint(0, 10, (BATCH, 4), generator=g)),
    ),
    Case(
        "embedding-1d-padding-idx",
        lambda: nn.Embedding(20, 5, padding_idx=0),
        first_input(lambda g: torch.randint(0, 10, (BATCH,), generator=g)),
    ),
    Case(
        "embedding-max-norm",
        lambda: nn.Embedding(20, 5, max_norm=1.0),
        first_input(lambda g: torch.randint(0, 10, (BATCH, 2), generator=g)),
    ),
]


class TestEmbeddingHandler(HandlerProperties):
    CASES = CASES


def test_unbatched_embedding_input_gives_the_rows_of_a_batch_of_one():
    layer, unbatched = nn.Embedding(7, 3), torch.tensor([1, 5, 5])
    torch.testing.assert_close(layer_rows(layer, unbatched), layer_rows(layer, unbatched[None]))
