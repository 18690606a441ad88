"""Properties of the representation handlers (``unsc_lightning.nullspace.representation``).

For every handler and several configurations of its layer: the rows reproduce the layer's output
without bias; an update projected off the rows' span, written back with the handler's
``write_matrix_``, leaves the layer's output unchanged while an unprojected one changes it;
``to_matrix``/``write_matrix_`` round-trip and touch only their own block; rows are sample-major.
Inputs are built low rank so that every null space is non-trivial.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from unsc_lightning.nullspace.representations import (
    REPRESENTATIONS,
    WeightRows,
    conv_transpose_rows,
    is_supported,
    layer_rows,
    linear_representation,
    register_representation,
    representation_dim,
    representations_of,
    resolve_parameter,
    supported_layer_types,
)

DTYPE = torch.float64
BATCH = 3
Call = tuple[tuple[Any, ...], dict[str, Any]]


@pytest.fixture(autouse=True)
def _single_thread():
    # tiny tensors: intra-op threads only add contention on a busy runner
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Inputs and cases
# --------------------------------------------------------------------------------------------


def low_rank_features(gen: torch.Generator, *shape: int, rank: int = 2) -> Tensor:
    """Tensor whose last-dimension vectors span only ``rank`` directions."""
    basis = torch.randn(rank, shape[-1], generator=gen, dtype=DTYPE)
    return torch.randn(*shape[:-1], rank, generator=gen, dtype=DTYPE) @ basis


def low_rank_channels(gen: torch.Generator, channels: int, groups: int, *spatial: int) -> Tensor:
    """``(BATCH, channels, *spatial)`` input whose channels of each group are linearly dependent.

    The dependence holds at every position, so it survives any padding, zero insertion and
    patch extraction: every convolution's patch rows then have a non-trivial null space.
    """
    per_group = channels // groups
    sources = torch.randn(BATCH, groups, per_group - 1, *spatial, generator=gen, dtype=DTYPE)
    # one mixing for every group: grouped layers share one basis, so the null space is common
    mixing = torch.randn(per_group, per_group - 1, generator=gen, dtype=DTYPE)
    mixed = torch.einsum("cr,bgr...->bgc...", mixing, sources)
    return mixed.reshape(BATCH, channels, *spatial)


def first_input(make: Callable[[torch.Generator], Tensor]) -> Callable[[torch.Generator], Call]:
    return lambda gen: ((make(gen),), {})


def slice_first(call: Call, index: int) -> Call:
    args, kwargs = call
    return (args[0][index : index + 1], *args[1:]), kwargs


@dataclass
class Case:
    """A layer, a batch of ``BATCH`` samples for it, and how to cut out one sample's call."""

    name: str
    layer: Callable[[], nn.Module]
    call: Callable[[torch.Generator], Call]
    sample: Callable[[Call, int], Call] = slice_first


def _conv_case(name: str, layer: Callable[[], nn.Module], groups: int, *shape: int) -> Case:
    channels, *spatial = shape
    return Case(
        name, layer, first_input(lambda g: low_rank_channels(g, channels, groups, *spatial))
    )


def _sample_of(axes: dict[str | int, int]) -> Callable[[Call, int], Call]:
    # cut sample `index` out of every batched argument (axis given per position or keyword)
    def cut(value: Any, axis: int | None, index: int) -> Any:
        if axis is None or not isinstance(value, Tensor):
            return value
        return value.narrow(axis, index, 1)

    def sample(call: Call, index: int) -> Call:
        args, kwargs = call
        # one slice per tensor: self-attention (query is key is value) must stay self-attention
        cuts: dict[int, Any] = {}

        def cut_once(value: Any, axis: int | None) -> Any:
            return cuts.setdefault(id(value), cut(value, axis, index))

        new_args = tuple(cut_once(a, axes.get(i)) for i, a in enumerate(args))
        new_kwargs = {k: cut_once(v, axes.get(k)) for k, v in kwargs.items()}
        return new_args, new_kwargs

    return sample


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


def _recurrent_with_state(gen: torch.Generator) -> Call:
    # 2 steps of 3 samples: 6 hidden-state rows of dimension 8 leave a null space
    tokens = low_rank_features(gen, BATCH, 2, 6)
    return (tokens, torch.randn(4, BATCH, 8, generator=gen, dtype=DTYPE)), {}


RECURRENT_CASES = [
    Case(
        "gru-2-layers-bidirectional-initial-state",
        lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, batch_first=True),
        _recurrent_with_state,
        _sample_of({0: 0, 1: 1}),
    ),
    Case(
        "lstm-sequence-first",
        lambda: nn.LSTM(6, 8),
        first_input(lambda g: low_rank_features(g, 2, BATCH, 6)),
        _sample_of({0: 1}),
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


RECURRENT_CASES += [
    Case(
        "gru-cell-with-state", lambda: nn.GRUCell(6, 8), _cell_with_state, _sample_of({0: 0, 1: 0})
    ),
    Case(
        "rnn-cell-with-state", lambda: nn.RNNCell(6, 8), _cell_with_state, _sample_of({0: 0, 1: 0})
    ),
    Case(
        "lstm-cell-without-state",
        lambda: nn.LSTMCell(6, 8),
        first_input(lambda g: low_rank_features(g, BATCH, 6)),
    ),
]

CASES = [
    *RECURRENT_CASES,
    Case(
        "linear-2d", lambda: nn.Linear(6, 5), first_input(lambda g: low_rank_features(g, BATCH, 6))
    ),
    Case(
        "linear-3d",
        lambda: nn.Linear(6, 5),
        first_input(lambda g: low_rank_features(g, BATCH, 4, 6, rank=3)),
    ),
    Case(
        "linear-4d-no-bias",
        lambda: nn.Linear(6, 5, bias=False),
        first_input(lambda g: low_rank_features(g, BATCH, 2, 3, 6)),
    ),
    _conv_case(
        "conv1d-strided-dilated-grouped",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        2,
        *(4, 11),
    ),
    _conv_case(
        "conv1d-same-reflect",
        lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="reflect"),
        1,
        *(3, 9),
    ),
    _conv_case(
        "conv1d-circular", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular"), 1, 2, 7
    ),
    _conv_case(
        "conv2d-strided-dilated-grouped",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        2,
        *(4, 6, 5),
    ),
    _conv_case(
        "conv2d-same-replicate",
        lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="replicate"),
        1,
        *(3, 5, 4),
    ),
    _conv_case(
        "conv2d-circular-grouped",
        lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=2, bias=False),
        2,
        *(4, 4, 4),
    ),
    _conv_case(
        "conv3d-strided-dilated-grouped",
        lambda: nn.Conv3d(
            4, 6, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2
        ),
        2,
        *(4, 5, 6, 4),
    ),
    _conv_case(
        "conv3d-same-reflect",
        lambda: nn.Conv3d(2, 3, 3, padding="same", padding_mode="reflect"),
        1,
        *(2, 4, 3, 4),
    ),
    _conv_case(
        "conv3d-circular",
        lambda: nn.Conv3d(2, 2, 2, padding=1, padding_mode="circular"),
        1,
        2,
        3,
        3,
        3,
    ),
    _conv_case(
        "convT1d-strided-dilated-grouped",
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2
        ),
        2,
        *(4, 7),
    ),
    _conv_case(
        "convT1d-padding-over-kernel",
        lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=4, bias=False),
        1,
        *(3, 6),
    ),
    Case(
        "convT1d-output-size-kwarg",
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=3, padding=1),
        lambda g: ((low_rank_channels(g, 2, 1, 5),), {"output_size": [15]}),
    ),
    _conv_case(
        "convT2d-strided-dilated-grouped",
        lambda: nn.ConvTranspose2d(
            4,
            6,
            (3, 2),
            stride=(2, 3),
            padding=(1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
            groups=2,
        ),
        2,
        *(4, 3, 4),
    ),
    Case(
        "convT2d-output-size-positional",
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1),
        lambda g: ((low_rank_channels(g, 2, 1, 4, 3), [BATCH, 3, 8, 6]), {}),
    ),
    _conv_case(
        "convT3d-grouped",
        lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, padding=1, output_padding=1, groups=2),
        2,
        *(4, 3, 2, 3),
    ),
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
    Case(
        "mha-packed-self-batch-first",
        _attention(8, 2, batch_first=True),
        _self_attention,
        _sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-packed-cross-seq-first-masks",
        _attention(8, 2),
        _cross_attention_seq_first,
        _sample_of({0: 1, 1: 1, 2: 1, "key_padding_mask": 0}),
    ),
    Case(
        "mha-separate-bias-kv-zero-attn",
        _attention(12, 2, kdim=5, vdim=7, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        _separate_weights,
        _sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-causal-kwargs",
        _attention(8, 2, batch_first=True, bias=False),
        _causal,
        _sample_of({0: 0, "key": 0, "value": 0}),
    ),
    Case(
        "mha-causal-hint-without-mask",  # the fast path ignores the hint; the rows must too
        _attention(8, 2, batch_first=True),
        lambda g: ((low_rank_features(g, BATCH, 4, 8),) * 3, {"is_causal": True}),
        _sample_of({0: 0, 1: 0, 2: 0}),
    ),
    Case(
        "mha-positional-masks",
        _attention(8, 2, batch_first=True),
        _positional_masks,
        _sample_of({0: 0, 1: 0, 2: 0, 3: 0}),
    ),
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def build(case: Case, seed: int = 0) -> tuple[nn.Module, Call]:
    torch.manual_seed(seed)
    layer = case.layer().to(DTYPE).eval()
    return layer, case.call(torch.Generator().manual_seed(seed + 1))


def run(layer: nn.Module, call: Call) -> Tensor:
    args, kwargs = call
    with torch.no_grad():
        output = layer(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def capture(layer: nn.Module, call: Call) -> tuple[list[WeightRows], list[Tensor], Tensor]:
    """Rows of every constrained weight, taken by a pre-hook as the engine does, and the output."""
    representations = representations_of(layer)
    assert representations is not None
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.extend(r.rows(module, args, kwargs) for r in representations)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        output = run(layer, call)
    finally:
        handle.remove()
    return representations, captured, output


def weight_of(layer: nn.Module, representation: WeightRows) -> Tensor:
    weight = resolve_parameter(layer, representation.parameter)
    assert weight is not None
    return weight.detach()


def outputs_per_position(layer: nn.Module, output: Tensor) -> Tensor:
    """Layer output as ``(N, out)`` in the rows' order (sample, position)."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        output = output.movedim(1, -1)
    if isinstance(layer, nn.MultiheadAttention) and not layer.batch_first and output.dim() == 3:
        output = output.transpose(0, 1)
    return output.reshape(-1, output.shape[-1])


def grouped_product(rows: Tensor, matrix: Tensor, groups: int) -> Tensor:
    """``rows @ M.T`` where each group's rows meet only that group's output channels."""
    per_position = rows.reshape(-1, groups, rows.shape[1])
    blocks = matrix.reshape(groups, -1, matrix.shape[1])
    return torch.einsum("ngd,god->ngo", per_position, blocks).reshape(per_position.shape[0], -1)


def null_space_projection(rows: Tensor, update: Tensor) -> Tensor:
    """``ΔM - (ΔM U) Uᵀ`` with ``U`` every non-zero right singular direction of ``rows``."""
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    basis = vh[singular > singular.max() * 1e-10].T
    return update - (update @ basis) @ basis.T


def random_updates(
    layer: nn.Module, representations: list[WeightRows], rows: list[Tensor], seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """A random update of each constrained weight's matrix, and the same projected onto the null
    space of that weight's rows; the null spaces must be non-trivial, or a test proves nothing."""
    gen = torch.Generator().manual_seed(seed)
    raw, projected = [], []
    for representation, block_rows in zip(representations, rows):
        matrix = representation.to_matrix(weight_of(layer, representation))
        update = torch.randn(matrix.shape, generator=gen, dtype=DTYPE)
        raw.append(update)
        projected.append(null_space_projection(block_rows, update))
        assert projected[-1].abs().max() > 1e-3, representation.suffix or representation.parameter
    return raw, projected


def updated_layer(
    layer: nn.Module, representations: list[WeightRows], updates: list[Tensor]
) -> nn.Module:
    """A copy of ``layer`` with ``update`` added to each constrained weight's matrix."""
    new_layer = copy.deepcopy(layer)
    with torch.no_grad():
        for representation, update in zip(representations, updates):
            weight = resolve_parameter(new_layer, representation.parameter)
            assert weight is not None
            new = weight.detach().clone()
            representation.write_matrix_(new, representation.to_matrix(new) + update)
            weight.copy_(new)
    return new_layer


def remove_biases(layer: nn.Module) -> nn.Module:
    stripped = copy.deepcopy(layer)
    with torch.no_grad():
        for name, parameter in stripped.named_parameters():
            if name.endswith("bias") and name not in ("bias_k", "bias_v"):
                parameter.zero_()
    return stripped


def _ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_rows_reproduce_output_without_bias(case: Case):
    layer, call = build(case)
    layer = remove_biases(layer)
    representations, rows, output = capture(layer, call)
    for representation, block_rows in zip(representations, rows):
        assert block_rows.shape[1] == representation.dim
        assert not block_rows.requires_grad
        matrix = representation.to_matrix(weight_of(layer, representation))
        if representation.suffix in ("q", "k", "v") or isinstance(
            layer, (nn.RNNBase, nn.RNNCellBase)
        ):
            continue  # internal products (q/k/v, gates): the null-space test covers them
        expected = outputs_per_position(layer, output)
        groups = int(getattr(layer, "groups", 1))
        torch.testing.assert_close(
            grouped_product(block_rows, matrix, groups), expected, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_projected_update_leaves_output_unchanged(case: Case):
    layer, call = build(case)
    representations, rows, output = capture(layer, call)
    raw, projected = random_updates(layer, representations, rows, seed=7)

    unchanged = run(updated_layer(layer, representations, projected), call)
    assert (unchanged - output).abs().max() <= 1e-10 * max(1.0, output.abs().max().item())
    changed = run(updated_layer(layer, representations, raw), call)
    assert (changed - output).abs().max() > 1e-3


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


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_write_matrix_round_trips_and_touches_only_its_block(case: Case):
    layer, _ = build(case)
    representations = representations_of(layer)
    assert representations is not None
    for representation in representations:
        weight = weight_of(layer, representation)
        other = torch.randn_like(weight)
        target = weight.clone()
        representation.write_matrix_(target, representation.to_matrix(other))
        assert torch.equal(representation.to_matrix(target), representation.to_matrix(other))
        for sibling in representations:
            if sibling is not representation and sibling.parameter == representation.parameter:
                assert torch.equal(sibling.to_matrix(target), sibling.to_matrix(weight))
        if representation.parameter != "in_proj_weight":  # a whole weight: bitwise round trip
            blank = torch.zeros_like(weight)
            representation.write_matrix_(blank, representation.to_matrix(weight))
            assert torch.equal(blank, weight)
        matrix = representation.to_matrix(weight)
        assert matrix.shape[1] == representation.dim


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_rows_are_sample_major(case: Case):
    layer, call = build(case)
    _, batch_rows, _ = capture(layer, call)
    per_sample = [capture(layer, case.sample(call, index))[1] for index in range(BATCH)]
    for block, rows in enumerate(batch_rows):
        expected = torch.cat([sample_rows[block] for sample_rows in per_sample])
        torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)


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


def test_conv_transpose_rows_equal_gathered_inputs():
    # the definition: y[o, p] = Σ_{c,a} W[c, o, a] x[c, (p + pad - a·dil) / stride]
    layer = nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1, dilation=2)
    x = torch.randn(1, 2, 4, dtype=DTYPE)
    rows = conv_transpose_rows(layer.to(DTYPE), x)
    length = run(layer, ((x,), {})).shape[-1]
    expected = torch.zeros(length, 2, 3, dtype=DTYPE)
    for p in range(length):
        for c in range(2):
            for a in range(3):
                offset = p + 1 - a * 2
                if offset % 2 == 0 and 0 <= offset // 2 < 4:
                    expected[p, c, a] = x[0, c, offset // 2]
    assert torch.equal(rows, expected.reshape(length, 6))


@pytest.mark.parametrize(
    ("layer", "unbatched"),
    [
        (nn.Conv3d(2, 3, 2, padding=1), torch.randn(2, 3, 3, 3)),
        (nn.ConvTranspose2d(2, 3, 3, stride=2), torch.randn(2, 3, 4)),
        (nn.Embedding(7, 3), torch.tensor([1, 5, 5])),
    ],
    ids=["conv3d", "convT2d", "embedding"],
)
def test_unbatched_input_gives_the_rows_of_a_batch_of_one(layer: nn.Module, unbatched: Tensor):
    torch.testing.assert_close(layer_rows(layer, unbatched), layer_rows(layer, unbatched[None]))


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


def test_unbatched_attention_rows_match_a_batch_of_one():
    layer = nn.MultiheadAttention(4, 2, batch_first=True).to(DTYPE)
    tokens = torch.randn(3, 4, dtype=DTYPE)
    _, single, _ = capture(layer, ((tokens, tokens, tokens), {}))
    _, batched, _ = capture(layer, ((tokens[None], tokens[None], tokens[None]), {}))
    for a, b in zip(single, batched):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer", [nn.LayerNorm(4), nn.PReLU(4), nn.Bilinear(2, 3, 4), nn.ReLU()], ids=str
)
def test_unsupported_layers_have_no_representation(layer: nn.Module):
    assert representations_of(layer) is None
    assert not is_supported(layer)
    with pytest.raises(TypeError, match="No representation for layer type"):
        layer_rows(layer, torch.randn(2, 4))


def test_register_representation_fills_exact_types_and_subclasses_inherit():
    class Scaled(nn.Linear):
        pass

    class ScaledTwice(Scaled):
        pass

    assert representations_of(Scaled(3, 2))[0].dim == 3  # type: ignore[index]  # via nn.Linear
    try:
        handler = register_representation(Scaled)(linear_representation)
        assert REPRESENTATIONS[Scaled] is handler is linear_representation
        assert ScaledTwice not in REPRESENTATIONS
        assert is_supported(ScaledTwice(3, 2))
        assert "Scaled" in supported_layer_types().split(", ")
    finally:
        del REPRESENTATIONS[Scaled]


def test_layer_without_the_named_weight_is_unsupported():
    layer = nn.Linear(3, 2)
    del layer.weight
    layer.weight = None  # type: ignore[assignment]
    assert representations_of(layer) is None


def test_table_lists_every_handler():
    names = supported_layer_types().split(", ")
    for expected in (
        "Linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Embedding",
        "MultiheadAttention",
        "RNN",
        "GRU",
        "LSTM",
        "RNNCell",
        "GRUCell",
        "LSTMCell",
    ):
        assert expected in names


def test_single_weight_helpers():
    assert representation_dim(nn.Embedding(11, 3)) == 11
    assert representation_dim(nn.ConvTranspose2d(4, 6, (2, 3), groups=2)) == 2 * 6
    assert representation_dim(nn.Conv3d(4, 8, 2, groups=4)) == 8
    with pytest.raises(TypeError, match="several constrained weights"):
        representation_dim(nn.MultiheadAttention(4, 2))


def test_recurrent_rows_of_one_call_run_each_layer_once(monkeypatch):
    # the eight weights of a two-layer bidirectional LSTM share one run of its layers per call
    # (before: each weight ran the layers below it again), the rows are those of separate
    # runs, a weight changed in place between two calls on the same input gives new rows, and
    # nothing of the call stays cached after its last weight
    from unsc_lightning.nullspace.representations import recurrent

    torch.manual_seed(0)
    layer = nn.LSTM(6, 12, num_layers=2, bidirectional=True, batch_first=True).to(DTYPE).eval()
    call = ((low_rank_features(torch.Generator().manual_seed(1), BATCH, 4, 6),), {})
    runs = []
    lstm = torch._VF.lstm
    monkeypatch.setattr(torch._VF, "lstm", lambda *a: runs.append(1) or lstm(*a))
    representations, rows, _ = capture(layer, call)
    assert len(rows) == 8 and len(runs) == 1 + 2  # the call itself (all layers), one per layer
    assert layer not in recurrent.RECURRENT_RUNS
    for representation_, block in zip(representations, rows):
        recurrent.RECURRENT_RUNS.clear()  # no sharing: a run of its own
        torch.testing.assert_close(representation_.rows(layer, *call), block, rtol=0, atol=0)
    recurrent.RECURRENT_RUNS.clear()
    with torch.no_grad():
        layer.weight_ih_l0.mul_(2.0)  # same objects, new values (_version)
    assert not torch.equal(capture(layer, call)[1][1], rows[1])  # weight_hh_l0's rows moved
