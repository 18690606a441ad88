"""Rows of ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells.

* ``RNN``, ``GRU``, ``LSTM``: for ``weight_ih`` of each layer and direction every step of that
  layer's input, for ``weight_hh`` the hidden state each step starts from (see
  :func:`recurrent_representation`); tensors or ``PackedSequence`` (zero rows at padding). The
  rows are rebuilt in the pre-hook by running the layer's own kernel one layer at a time, once
  per call for all the weights of the call (:func:`recurrent_run`).
* ``RNNCell``, ``GRUCell``, ``LSTMCell``: each call's input for ``weight_ih`` and the state it
  was given for ``weight_hh`` (zeros when none).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from unsc_lightning.nullspace.representations.registry import (
    RowsFn,
    WeightRows,
    forward_signature,
    register_representation,
    same_matrix,
    write_same_,
)

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
    bound = forward_signature(type(layer)).bind(layer, *args, **kwargs)
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
#: bidirectional LSTM has eight), so that no weight's rows run the layers below it again
RECURRENT_RUNS: weakref.WeakKeyDictionary[
    nn.Module, tuple[tuple[Any, ...], list[Any], _RecurrentRun]
] = weakref.WeakKeyDictionary()


def _tensors_of(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):  # PackedSequence is a tuple too
        return [t for item in value for t in _tensors_of(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_of(item)]
    return []


def recurrent_run(
    layer: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], last: bool = False
) -> _RecurrentRun:
    """The run of this call: the cached one when the call's tensors and the layer's weights are
    the same objects, unchanged (``_version``), else a new one; ``last`` drops it from the
    cache (the call's last weight)."""
    tensors = [*_tensors_of((args, kwargs)), *_tensors_of(layer._flat_weights)]
    versions = tuple((t._version, t.data_ptr()) for t in tensors)
    cached = RECURRENT_RUNS.get(layer)
    if (
        cached is not None
        and cached[0] == versions
        and len(cached[1]) == len(tensors)
        and all(ref() is t for ref, t in zip(cached[1], tensors))  # the same objects
    ):
        run = cached[2]
    else:
        run = _RecurrentRun(layer, _recurrent_call(layer, args, kwargs))
        RECURRENT_RUNS[layer] = (versions, [weakref.ref(t) for t in tensors], run)
    if last:
        RECURRENT_RUNS.pop(layer, None)
    return run


def _recurrent_input_rows(index: int) -> RowsFn:
    """Rows of ``weight_ih_l{index}`` (either direction): every step of the layer's input,
    sample by sample (zero at padding, see :func:`_real_steps`)."""

    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        run = recurrent_run(cast(nn.RNNBase, layer), args, kwargs)
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
        run = recurrent_run(recurrent, args, kwargs, final)
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
                    same_matrix,
                    write_same_,
                    in_dim,
                )
            )
            representations.append(
                WeightRows(
                    f"weight_hh_{tag}",
                    f"hh_{tag}",
                    _recurrent_hidden_rows(k, reverse),
                    same_matrix,
                    write_same_,
                    hidden,
                )
            )
    return representations


def _cell_rows(hidden: bool) -> RowsFn:
    """Rows of a recurrent cell's ``weight_ih`` (the step's input) or ``weight_hh`` (the state
    it starts from: ``hx``, an LSTM cell's ``h`` of ``(h, c)``, zeros when not given)."""

    def rows(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        cell = cast(nn.RNNCellBase, layer)
        bound = forward_signature(type(layer)).bind(layer, *args, **kwargs)
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
        WeightRows("weight_ih", "ih", _cell_rows(False), same_matrix, write_same_, cell.input_size),
        WeightRows("weight_hh", "hh", _cell_rows(True), same_matrix, write_same_, cell.hidden_size),
    ]
