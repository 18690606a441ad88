"""Batches of any layout: split into inputs and labels, call the model, take its logits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from unsc_lightning.nullspace.settings import NullSpaceEngineError

#: ``batch -> (inputs, labels)``: inputs are a tensor (``model(x)``), a tuple (``model(*x)``) or
#: a mapping (``model(**x)``); labels a 1-D integer tensor, or ``None`` for unlabelled data.
BatchAdapter = Callable[[Any], tuple[Any, Tensor | None]]
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def default_batch_adapter(batch: Any) -> tuple[Any, Tensor | None]:
    """Split a batch into model inputs and labels.

    ``x`` -> ``(x, None)``; ``(x, y, ...)`` -> ``(x, y)``; a mapping -> (every entry but the
    labels, as keyword inputs; the labels under ``labels``/``label``/``targets``/``target``/``y``).

    Raises:
        NullSpaceEngineError: for any other batch type.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if isinstance(batch, Mapping):
        label_key = next((k for k in _LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
        inputs = {k: v for k, v in batch.items() if k != label_key}
        return inputs, None if label_key is None else batch[label_key]
    raise NullSpaceEngineError(
        f"Cannot split a batch of type {type(batch).__name__} into inputs and labels; batches "
        "must be a tensor `x`, a tuple `(x, y, ...)` or a dict with a `labels` entry, or pass "
        "`batch_adapter=` (a callable `batch -> (inputs, labels)`)."
    )


def call_model(forward: Callable[..., Any], inputs: Any) -> Any:
    """``forward(x)``, ``forward(*x)`` for a tuple/list or ``forward(**x)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return forward(**inputs)
    if isinstance(inputs, (tuple, list)):
        return forward(*inputs)
    return forward(inputs)


def output_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, the first tensor of a tuple, ``output["logits"]``
    or ``output.logits`` (Hugging Face style).

    Raises:
        NullSpaceEngineError: when no tensor can be found.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        first = next((item for item in output if isinstance(item, Tensor)), None)
        if first is not None:
            return first
    raise NullSpaceEngineError(
        f"The model returned {type(output).__name__}, from which no logits tensor can be taken; "
        "return a tensor, a tuple whose first tensor is the logits, or an object with `.logits`."
    )


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and mappings."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def batch_size_of(inputs: Any, labels: Tensor | None) -> int:
    """Samples in a batch: the labels' count, else the leading size of the first input tensor."""
    if labels is not None:
        return int(labels.reshape(-1).shape[0])
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for value in values if isinstance(values, Iterable) else ():
        size = batch_size_of(value, None)
        if size:
            return size
    return 0


def select_samples(inputs: Any, index: Tensor, batch: int) -> Any:
    # samples of a batch: every tensor whose leading dimension is the batch
    return map_tensors(
        inputs, lambda t: t.index_select(0, index.to(t.device)) if t.shape[:1] == (batch,) else t
    )
