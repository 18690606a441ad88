"""Cases and checks shared by the representation tests (``tests/nullspace/representations/``).

A :class:`Case` is a layer, a batch of ``BATCH`` samples for it and how to cut out one sample's
call; inputs are built low rank so that every null space is non-trivial. :class:`HandlerProperties`
holds the properties every handler must have, for each of a family's cases: the rows reproduce
the layer's output without bias; an update projected off the rows' span, written back with the
handler's ``write_matrix_``, leaves the layer's output unchanged while an unprojected one changes
it; ``to_matrix``/``write_matrix_`` round-trip and touch only their own block; rows are
sample-major. A family's test module subclasses it with its ``CASES`` (the ``conftest.py`` there
parametrizes ``case`` from them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unsc_lightning.nullspace.representations import (
    WeightRows,
    representations_of,
    resolve_parameter,
)

DTYPE = torch.float64
BATCH = 3
Call = tuple[tuple[Any, ...], dict[str, Any]]


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


def conv_case(name: str, layer: Callable[[], nn.Module], groups: int, *shape: int) -> Case:
    channels, *spatial = shape
    return Case(
        name, layer, first_input(lambda g: low_rank_channels(g, channels, groups, *spatial))
    )


def sample_of(axes: dict[str | int, int]) -> Callable[[Call, int], Call]:
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


# --------------------------------------------------------------------------------------------
# Running a layer, capturing its rows, updating its weights
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


def case_ids(cases: list[Case]) -> list[str]:
    return [case.name for case in cases]


# --------------------------------------------------------------------------------------------
# Properties every handler has
# --------------------------------------------------------------------------------------------


class HandlerProperties:
    """The properties of a handler, tested on every case of ``CASES``.

    Subclass it as ``class TestXHandler(HandlerProperties)`` with ``CASES = [...]`` in a test
    module of ``tests/nullspace/representations/``; its ``conftest.py`` parametrizes ``case``.
    """

    CASES: ClassVar[list[Case]] = []

    def test_rows_reproduce_output_without_bias(self, case: Case) -> None:
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

    def test_projected_update_leaves_output_unchanged(self, case: Case) -> None:
        layer, call = build(case)
        representations, rows, output = capture(layer, call)
        raw, projected = random_updates(layer, representations, rows, seed=7)

        unchanged = run(updated_layer(layer, representations, projected), call)
        assert (unchanged - output).abs().max() <= 1e-10 * max(1.0, output.abs().max().item())
        changed = run(updated_layer(layer, representations, raw), call)
        assert (changed - output).abs().max() > 1e-3

    def test_write_matrix_round_trips_and_touches_only_its_block(self, case: Case) -> None:
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

    def test_rows_are_sample_major(self, case: Case) -> None:
        layer, call = build(case)
        _, batch_rows, _ = capture(layer, call)
        per_sample = [capture(layer, case.sample(call, index))[1] for index in range(BATCH)]
        for block, rows in enumerate(batch_rows):
            expected = torch.cat([sample_rows[block] for sample_rows in per_sample])
            torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)
