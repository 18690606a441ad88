"""The table of layer handlers and the lookups built on it (family-independent).

UNSC constrains every weight update ``ΔM`` of a layer to ``ΔM x = 0`` for every *row* ``x`` the
weight multiplies on remaining data, so the layer's output on that data does not move. A handler
says, for one layer type, which weights are constrained and what their rows are, as a list of
:class:`WeightRows`: the parameter, a function from the layer's forward-call arguments (seen by a
forward *pre*-hook) to rows ``(N, d)``, and the reshaping between the parameter and the matrix
``M`` (``out x d``) with ``output_without_bias = rows @ M.T``.

Handlers are registered with :func:`register_representation` in :data:`REPRESENTATIONS`, a table
keyed by exact layer type; :func:`representations_of` falls back to the nearest registered base
class, so users' subclasses work. No ``isinstance`` chains elsewhere. Each layer family registers
its handlers in its own module of this package (``linear``, ``conv``, ``conv_transpose``,
``embedding``, ``attention``, ``recurrent``); importing the package imports them all.

Every handler's rows are *sample-major*: all rows of batch sample 0, then of sample 1, ...;
per-class statistics rely on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

RowsFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Tensor]


@dataclass(frozen=True)
class WeightRows:
    """One constrained weight of a layer and the input rows it multiplies.

    Attributes:
        parameter: attribute path of the weight relative to the layer, e.g. ``"weight"``,
            ``"in_proj_weight"``, ``"out_proj.weight"``.
        suffix: ``""`` for a layer's single weight (its basis is keyed by the layer name), else a
            short tag such as ``"q"``, ``"k"``, ``"v"``, ``"out"``.
        rows: ``(layer, args, kwargs) -> rows (N, d)``, detached and sample-major; meant to be
            called from a forward pre-hook registered with ``with_kwargs=True``.
        to_matrix: weight-shaped tensor (the parameter, its gradient, an update) -> ``(out, d)``
            matrix ``M`` with ``output_without_bias = rows @ M.T``. May return a view of its
            argument: do not modify the result in place.
        write_matrix_: ``(weight-shaped tensor, (out, d) matrix)`` -> writes the matrix into the
            tensor in place (the inverse of ``to_matrix``; a block of a packed weight writes only
            that block).
        dim: ``d``, the length of a row.
    """

    parameter: str
    suffix: str
    rows: RowsFn
    to_matrix: Callable[[Tensor], Tensor]
    write_matrix_: Callable[[Tensor, Tensor], None]
    dim: int


Handler = Callable[[nn.Module], list[WeightRows]]

#: Exact layer type -> handler returning the layer's constrained weights and their rows.
REPRESENTATIONS: dict[type[nn.Module], Handler] = {}


def register_representation(layer_type: type[nn.Module]) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` for exactly ``layer_type`` in :data:`REPRESENTATIONS`.

    Subclasses without their own entry use the nearest registered base class (see
    :func:`representations_of`); register a subclass whose forward computes something else.

    Example:
        >>> class Scale(nn.Linear): ...
        >>> @register_representation(Scale)
        ... def scale_representation(layer):
        ...     return REPRESENTATIONS[nn.Linear](layer)
        >>> REPRESENTATIONS[Scale] is scale_representation
        True
        >>> del REPRESENTATIONS[Scale]
    """

    def decorator(handler: Handler) -> Handler:
        REPRESENTATIONS[layer_type] = handler
        return handler

    return decorator


# --------------------------------------------------------------------------------------------
# Pieces the handlers share
# --------------------------------------------------------------------------------------------


def forward_input(args: tuple[Any, ...], kwargs: dict[str, Any], name: str = "input") -> Tensor:
    """The first argument of a forward call (positional, else the keyword ``name``), detached."""
    return cast(Tensor, args[0] if args else kwargs[name]).detach()


_FORWARD_SIGNATURES: dict[type[nn.Module], inspect.Signature] = {}


def forward_signature(layer_type: type[nn.Module]) -> inspect.Signature:
    """The signature of ``layer_type.forward``, to bind a call's arguments as the call did."""
    # binding runs on every forward of the remaining-data pass: inspect each type once
    if layer_type not in _FORWARD_SIGNATURES:
        _FORWARD_SIGNATURES[layer_type] = inspect.signature(layer_type.forward)
    return _FORWARD_SIGNATURES[layer_type]


def same_matrix(weight: Tensor) -> Tensor:
    """``to_matrix`` of a weight that already is ``M`` (``out x d``)."""
    return weight


def write_same_(weight: Tensor, matrix: Tensor) -> None:
    """``write_matrix_`` of a weight that already is ``M``."""
    weight.copy_(matrix)


def weight_as_matrix(weight: Tensor) -> Tensor:
    """View a Linear or convolution weight (or its gradient) as ``out x d`` (rows' order).

    Other layers (transposed convolutions, embeddings, attention) use their
    :attr:`WeightRows.to_matrix`.
    """
    return weight.reshape(weight.shape[0], -1)


def write_reshaped_(weight: Tensor, matrix: Tensor) -> None:
    """``write_matrix_`` of :func:`weight_as_matrix`: the matrix reshaped to the weight."""
    weight.copy_(matrix.reshape(weight.shape))


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------


def resolve_parameter(layer: nn.Module, path: str) -> Tensor | None:
    """The tensor at ``path`` (e.g. ``"out_proj.weight"``) below ``layer``, or ``None``."""
    target: Any = layer
    for attribute in path.split("."):
        target = getattr(target, attribute, None)
    return target if isinstance(target, Tensor) else None


def representations_of(layer: nn.Module) -> list[WeightRows] | None:
    """The constrained weights of ``layer`` and their rows.

    Uses the handler of the layer's exact type, else of its nearest registered base class.

    Returns:
        The list of :class:`WeightRows`, or ``None`` when no handler applies or a weight it names
        is missing (e.g. a subclass that set ``weight = None``).
    """
    for cls in type(layer).__mro__:
        if cls in REPRESENTATIONS:
            representations = REPRESENTATIONS[cls](layer)
            if all(resolve_parameter(layer, r.parameter) is not None for r in representations):
                return representations
            return None
    return None


def is_supported(layer: nn.Module) -> bool:
    """Whether ``layer`` has a representation handler and the weights it names."""
    return representations_of(layer) is not None


def supported_layer_types() -> str:
    """Comma-separated names of the layer types with a handler."""
    return ", ".join(cls.__name__ for cls in REPRESENTATIONS)


def _single_representation(layer: nn.Module) -> WeightRows:
    representations = representations_of(layer)
    if representations is None:
        raise TypeError(
            f"No representation for layer type {type(layer).__name__}; supported: "
            f"{supported_layer_types()}."
        )
    if len(representations) != 1:
        weights = ", ".join(r.parameter for r in representations)
        raise TypeError(
            f"Layer type {type(layer).__name__} has several constrained weights ({weights}); "
            "use `representations_of(layer)` for their rows."
        )
    return representations[0]


def layer_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Representation rows of a single-weight ``layer`` for the input batch ``inputs``.

    Raises:
        TypeError: if the layer type has no handler, or has several constrained weights.
    """
    return _single_representation(layer).rows(layer, (inputs,), {})


def representation_dim(layer: nn.Module) -> int:
    """Dimension ``d`` of the rows of a single-weight ``layer`` (``weight[0].numel()`` for
    Linear and convolutions, ``num_embeddings`` for an Embedding).

    Raises:
        TypeError: if the layer type has no handler, or has several constrained weights.
    """
    return _single_representation(layer).dim
