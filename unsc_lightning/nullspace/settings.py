"""Strict checks of the engine's settings: every mistake named, nothing coerced silently.

The one place these checks live: :class:`~unsc_lightning.nullspace.NullSpaceEngine` calls
:func:`check_engine_settings` at construction and the Lightning callback calls the same function
for its arguments (turning :class:`NullSpaceEngineError` into its configuration error).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, cast

import torch

from unsc_lightning.nullspace.gram import GramDtype, GramOptions


class NullSpaceEngineError(ValueError):
    """A setting or an input the engine cannot work with (the message says what to change)."""


def is_int(value: Any) -> bool:
    """An integer (``int``, NumPy integer) that is not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (strings are refused, never parsed)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (not is_int(value) or value < 1):
        raise NullSpaceEngineError(
            f"Expected `{name}` >= 1 or None, got {value!r}; it must be an integer."
        )


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise NullSpaceEngineError(f"Expected `{name}` to be True or False, got {value!r}.")


def patterns(name: str, value: Any) -> list[str] | None:
    """``None``, a single pattern string, or a list of strings -> list of patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise NullSpaceEngineError(
        f"Expected `{name}` to be a layer-name pattern or a list of patterns (strings), got "
        f"{value!r}."
    )


def check_threshold(threshold: Any) -> float | dict[str, float]:
    """A fraction in ``(0, 1]`` or a mapping ``layer pattern -> fraction``."""
    values = threshold.values() if isinstance(threshold, Mapping) else [threshold]
    for value in values:
        if not is_number(value) or not 0.0 < float(value) <= 1.0:
            raise NullSpaceEngineError(f"Expected `threshold` in (0, 1], got {threshold!r}.")
    if isinstance(threshold, Mapping):
        if not all(isinstance(k, str) for k in threshold):
            raise NullSpaceEngineError(
                f"Expected `threshold` mapping keys to be layer-name patterns, got {threshold!r}."
            )
        return {k: float(v) for k, v in threshold.items()}
    return float(threshold)


def check_gram(value: Any) -> GramOptions:
    """``None``, ``"auto"``, ``"float32"``/``"float64"`` (or the torch dtypes) or :class:`GramOptions`.

    Raises:
        NullSpaceEngineError: naming the value and what is expected.
    """
    if value is None:
        return GramOptions()
    if isinstance(value, str) and value in ("float32", "float64"):
        value = getattr(torch, value)  # the spelling of a YAML config or the command line
    if isinstance(value, (str, torch.dtype)):
        value = GramOptions(dtype=cast(GramDtype, value))
    if not isinstance(value, GramOptions):
        raise NullSpaceEngineError(
            f"Expected `gram` to be 'auto', 'float32', 'float64' (or the torch dtypes) or a "
            f"GramOptions, got "
            f"{value!r}."
        )
    if value.dtype != "auto" and value.dtype not in (torch.float32, torch.float64):
        raise NullSpaceEngineError(
            f"Expected `gram` (the Gram products' dtype) to be 'auto', 'float32' or 'float64', "
            f"got {value.dtype!r}; 'auto' keeps float64 wherever float32 rounding could matter."
        )
    fraction = value.row_fraction
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 < float(fraction) <= 1.0
    ):
        raise NullSpaceEngineError(
            f"Expected `gram.row_fraction` in (0, 1] or None, got {fraction!r}."
        )
    if isinstance(value.seed, bool) or not isinstance(value.seed, int):
        raise NullSpaceEngineError(
            f"Expected the subsampling seed `gram.seed` to be an integer, got {value.seed!r}."
        )
    return value


def check_engine_settings(
    threshold: Any,
    rule: Any,
    class_threshold_step: Any,
    layers: Any,
    exclude_layers: Any,
    flags: Mapping[str, Any],
    limits: Mapping[str, Any],
) -> dict[str, Any]:
    """Check the engine's settings; return the normalised threshold and layer patterns.

    Args:
        flags: ``name -> value`` of settings that must be ``True`` or ``False``.
        limits: ``name -> value`` of settings that must be an integer >= 1 or ``None``.

    Raises:
        NullSpaceEngineError: naming the setting, the value and what is expected.
    """
    normalised = check_threshold(threshold)
    if rule not in ("per_class", "pooled"):
        raise NullSpaceEngineError(f"Expected `rule` to be 'per_class' or 'pooled', got {rule!r}.")
    step = class_threshold_step
    if not is_number(step) or not 0.0 <= step < 1.0:
        raise NullSpaceEngineError(f"Expected `class_threshold_step` in [0, 1), got {step!r}.")
    for name, value in limits.items():
        optional_positive_int(name, value)
    for name, value in flags.items():
        check_bool(name, value)
    return {
        "threshold": normalised,
        "layers": patterns("layers", layers),
        "exclude_layers": patterns("exclude_layers", exclude_layers),
    }
