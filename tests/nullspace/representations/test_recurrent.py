"""Rows of ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells
(``unsc_lightning.nullspace.representations.recurrent``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.representations import (
    BATCH,
    DTYPE,
    Call,
    Case,
    HandlerProperties,
    capture,
    first_input,
    low_rank_features,
    random_updates,
    run,
    sample_of,
    updated_layer,
)
from torch import Tensor, nn

from unsc_lightning.nullspace.representations import recurrent, representations_of


def _recurrent_with_state(gen: torch.Generator) -> Call:
    # 2 steps of 3 samples: 6 hidden-state rows of dimension 8 leave a null space
    tokens = low_rank_features(gen, BATCH, 2, 6)
    return (tokens, torch.randn(4, BATCH, 8, generator=gen, dtype=DTYPE)), {}


CASES = [
    Case(
        "gru-2-layers-bidirectional-initial-state",
        lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, batch_first=True),
        _recurrent_with_state,
        sample_of({0: 0, 1: 1}),
    ),
    Case(
        "lstm-sequence-first",
        lambda: nn.LSTM(6, 8),
        first_input(lambda g: low_rank_features(g, 2, BATCH, 6)),
        sample_of({0: 1}),
    ),
    Case(
        "lstm-2-layers-bidirectional",
        lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True),
        first_input(lambda g: low_rank_features(g, BATCH, 2, 6)),
    ),
    Case(
        "rnn-relu-2-layers",
        lambda: nn.RNN(6, 8, num_layers=2, nonlinearity="relu", batch_first=True),
        first_input(lambda g: low_rank_features(g, BATCH, 2, 6)),
    ),
]


def _cell_with_state(gen: torch.Generator) -> Call:
    return (low_rank_features(gen, BATCH, 6), low_rank_features(gen, BATCH, 8)), {}


CASES += [
    Case(
        "gru-cell-with-state", lambda: nn.GRUCell(6, 8), _cell_with_state, sample_of({0: 0, 1: 0})
    ),
    Case(
        "rnn-cell-with-state", lambda: nn.RNNCell(6, 8), _cell_with_state, sample_of({0: 0, 1: 0})
    ),
    Case(
        "lstm-cell-without-state",
        lambda: nn.LSTMCell(6, 8),
        first_input(lambda g: low_rank_features(g, BATCH, 6)),
    ),
]


class TestRecurrentHandler(HandlerProperties):
    CASES = CASES


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_unbatched_recurrent_rows_match_a_batch_of_one(cell: type[nn.RNNBase]):
    layer = cell(4, 5, num_layers=2, bidirectional=True, batch_first=True).to(DTYPE)
    steps = torch.randn(3, 4, dtype=DTYPE)
    _, single, _ = capture(layer, ((steps,), {}))
    _, batched, _ = capture(layer, ((steps[None],), {}))
    assert len(single) == 8  # 2 layers x 2 directions x (input, hidden)
    for a, b in zip(single, batched):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lstm_projection_constrains_input_and_hidden_weights_only():
    # proj_size: h is projected (weight_hr), so weight_hh multiplies the projected states; the
    # projection's own input (o * tanh(c)) is not observable: weight_hr stays unconstrained
    torch.manual_seed(0)
    layer = nn.LSTM(6, 8, num_layers=2, proj_size=4, batch_first=True).to(DTYPE).eval()
    call = ((low_rank_features(torch.Generator().manual_seed(1), 1, 3, 6),), {})
    representations, rows, output = capture(layer, call)
    assert [r.parameter for r in representations] == [
        "weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1",
    ]  # fmt: skip
    assert [r.dim for r in representations] == [6, 4, 4, 4]
    _, projected = random_updates(layer, representations, rows, seed=2)
    unchanged = run(updated_layer(layer, representations, projected), call)
    assert (unchanged - output).abs().max() <= 1e-10


def _packed_call(gen: torch.Generator, cell: type[nn.RNNBase]) -> tuple[nn.Module, Call]:
    # three samples of 4, 2 and 3 steps, not sorted by length, and initial states; low-rank
    # inputs and 9 real steps against 12 units leave every weight a null space
    layer = cell(6, 12, num_layers=2, bidirectional=True).to(DTYPE).eval()
    lengths = torch.tensor([4, 2, 3])
    padded = low_rank_features(gen, 3, 4, 6)
    packed = nn.utils.rnn.pack_padded_sequence(
        padded, lengths, batch_first=True, enforce_sorted=False
    )
    state = torch.randn(4, 3, 12, generator=gen, dtype=DTYPE)
    hx: Any = (
        (state, torch.randn(4, 3, 12, generator=gen, dtype=DTYPE)) if cell is nn.LSTM else state
    )
    return layer, ((packed, hx), {})


def _sequence_outputs(layer: nn.Module, call: Call) -> Tensor:
    """Every real step's output and the final states, flattened: all a packed call returns."""
    args, kwargs = call
    with torch.no_grad():
        output, final = layer(*args, **kwargs)
    padded, lengths = nn.utils.rnn.pad_packed_sequence(output, batch_first=True)
    real = torch.cat([padded[b, : int(n)] for b, n in enumerate(lengths)])
    finals = torch.cat([f.flatten() for f in final]) if isinstance(final, tuple) else final
    return torch.cat([real.flatten(), finals.flatten()])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_packed_sequences_rows_keep_every_real_step_and_state(cell: type[nn.RNNBase]):
    torch.manual_seed(0)
    layer, call = _packed_call(torch.Generator().manual_seed(1), cell)
    representations, rows, _ = capture(layer, call)
    # 4 rows per sample (the longest), zero at the padding steps (4 + 2 + 3 real ones)
    (packed, hx), _ = call
    padded, lengths = nn.utils.rnn.pad_packed_sequence(packed, batch_first=True)
    real = (torch.arange(4) < lengths[:, None]).flatten()
    assert all(block.shape[0] == 12 and not block[~real].any() for block in rows)
    rows = [block[real] for block in rows]
    # sample-major and the same rows as each sample run alone (unpacked, its own length)
    alone = []
    for b, n in enumerate(lengths):
        state = tuple(h[:, b : b + 1] for h in hx) if isinstance(hx, tuple) else hx[:, b : b + 1]
        alone.append(capture(layer, ((padded[b : b + 1, : int(n)].transpose(0, 1), state), {}))[1])
    for block, block_rows in enumerate(rows):
        expected = torch.cat([sample[block] for sample in alone])
        torch.testing.assert_close(block_rows, expected, rtol=1e-10, atol=1e-12)
    # an update in every weight's null space leaves every real output and final state unchanged
    before = _sequence_outputs(layer, call)
    raw, projected = random_updates(layer, representations, rows, seed=2)
    after = _sequence_outputs(updated_layer(layer, representations, projected), call)
    assert (after - before).abs().max() <= 1e-10
    moved = _sequence_outputs(updated_layer(layer, representations, raw), call)
    assert (moved - before).abs().max() > 1e-3


def test_other_recurrent_inputs_get_a_clear_error():
    layer = nn.GRU(3, 4)
    representations = representations_of(layer)
    assert representations is not None
    with pytest.raises(NotImplementedError, match=r"called with a list.*`exclude_layers=`"):
        representations[0].rows(layer, ([torch.randn(2, 3)],), {})


def test_recurrent_rows_of_one_call_run_each_layer_once(monkeypatch):
    # the eight weights of a two-layer bidirectional LSTM share one run of its layers per call
    # (no weight's rows run the layers below it again), the rows are those of separate runs,
    # a weight changed in place between two calls on the same input gives new rows, and
    # nothing of the call stays cached after its last weight
    torch.manual_seed(0)
    layer = nn.LSTM(6, 12, num_layers=2, bidirectional=True, batch_first=True).to(DTYPE).eval()
    call = ((low_rank_features(torch.Generator().manual_seed(1), BATCH, 4, 6),), {})
    runs = []
    lstm = torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda *a: runs.append(1) or lstm(*a))
    representations, rows, _ = capture(layer, call)
    assert len(rows) == 8 and len(runs) == 1 + 2  # the call itself (all layers), one per layer
    assert layer not in recurrent.RECURRENT_RUNS
    for representation, block in zip(representations, rows):
        recurrent.RECURRENT_RUNS.clear()  # no sharing: a run of its own
        torch.testing.assert_close(representation.rows(layer, *call), block, rtol=0, atol=0)
    recurrent.RECURRENT_RUNS.clear()
    with torch.no_grad():
        layer.weight_ih_l0.mul_(2.0)  # same objects, new values (_version)
    assert not torch.equal(capture(layer, call)[1][1], rows[1])  # weight_hh_l0's rows moved
