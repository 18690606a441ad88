"""Strict validation of the callback's arguments: every mistake named, nothing coerced silently."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.accounting import Accounting
from unsc_lightning.nullspace.representation import supported_layer_types


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise UnlearningConfigError(
            f"Expected `{name}` >= 1 or None, got {value!r}; it must be an integer."
        )


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UnlearningConfigError(f"Expected `{name}` to be True or False, got {value!r}.")


def patterns(name: str, value: Any) -> list[str] | None:
    """``None``, a single pattern string, or a list of strings -> list of patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise UnlearningConfigError(
        f"Expected `{name}` to be a layer-name pattern or a list of patterns (strings), got "
        f"{value!r}."
    )


def class_ids(name: str, value: Any, allow_empty: bool = False) -> list[int]:
    """A list of class ids (ints >= 0, not bools, not strings), sorted and deduplicated."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or _is_int(value):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a list of class ids (integers >= 0), got {value!r}"
            + (f"; write `[{value}]` for one class." if _is_int(value) else ".")
        )
    items = list(value)
    if (not items and not allow_empty) or not all(_is_int(k) and k >= 0 for k in items):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a non-empty list of class ids (integers >= 0), got {value!r}."
        )
    return sorted(set(items))


def validate_callback_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``NullSpaceCalibration``'s arguments; return the normalised ones.

    Raises:
        UnlearningConfigError: naming the argument, the value and what is expected.
    """
    threshold = arguments["threshold"]
    values = threshold.values() if isinstance(threshold, Mapping) else [threshold]
    for value in values:
        if not _is_number(value) or not 0.0 < float(value) <= 1.0:
            raise UnlearningConfigError(f"Expected `threshold` in (0, 1], got {threshold!r}.")
    if isinstance(threshold, Mapping) and not all(isinstance(k, str) for k in threshold):
        raise UnlearningConfigError(
            f"Expected `threshold` mapping keys to be layer-name patterns, got {threshold!r}."
        )
    if arguments["rule"] not in ("per_class", "pooled"):
        raise UnlearningConfigError(
            f"Expected `rule` to be 'per_class' or 'pooled', got {arguments['rule']!r}."
        )
    step = arguments["class_threshold_step"]
    if not _is_number(step) or not 0.0 <= step < 1.0:
        raise UnlearningConfigError(f"Expected `class_threshold_step` in [0, 1), got {step!r}.")
    for name in ("max_retain_batches", "max_samples_per_class", "memory_budget"):
        _optional_positive_int(name, arguments[name])
    if arguments["mode"] not in ("auto", "gradient", "update"):
        raise UnlearningConfigError(
            f"Expected `mode` to be 'auto', 'gradient' or 'update', got {arguments['mode']!r}."
        )
    every = arguments["drift_every_n_steps"]
    if not _is_int(every) or every < 0:
        raise UnlearningConfigError(
            f"Expected `drift_every_n_steps` >= 0 (0 disables it), got {every!r}."
        )
    for name in ("freeze_bias_and_norm", "freeze_unconstrained", "norm_eval", "log_drift"):
        _bool(name, arguments[name])
    _bool("keep_forgotten_statistics", arguments.get("keep_forgotten_statistics", False))
    cache = arguments["covariance_cache"]
    if cache is not None and not isinstance(cache, (str, Path)):
        raise UnlearningConfigError(
            f"Expected `covariance_cache` to be a file path or None, got {cache!r}."
        )
    remaining = arguments["remaining_classes"]
    loader = arguments["retain_dataloader"]
    if loader is not None and not _is_iterable(loader):
        raise UnlearningConfigError(
            "Expected `retain_dataloader` to be an iterable of batches (e.g. a DataLoader), "
            f"got {type(loader).__name__}."
        )
    adapter = arguments["batch_adapter"]
    if adapter is not None and not callable(adapter):
        raise UnlearningConfigError(
            f"Expected `batch_adapter` to be a callable `batch -> (inputs, labels)`, got {adapter!r}."
        )
    return {
        "threshold": dict(threshold) if isinstance(threshold, Mapping) else float(threshold),
        "layers": patterns("layers", arguments["layers"]),
        "exclude_layers": patterns("exclude_layers", arguments["exclude_layers"]),
        "remaining_classes": None
        if remaining is None
        else class_ids("remaining_classes", remaining),
    }


def _is_iterable(value: Any) -> bool:
    # Inspect, never call `iter()`: on a DataLoader with workers that starts worker processes
    # (kept alive with `persistent_workers=True`) when the callback is merely constructed.
    return isinstance(value, Iterable) or callable(getattr(value, "__getitem__", None))


def check_selection(
    accounting: Accounting,
    model_name: str,
    layers: list[str] | None,
    exclude_layers: list[str],
    threshold: float | dict[str, float],
    freeze_unconstrained: bool,
) -> None:
    """Refuse a layer selection that constrains nothing or lacks thresholds; warn (once, by
    full parameter name) about what no basis constrains."""
    if accounting.unmatched_patterns:
        raise UnlearningConfigError(
            f"`layers` patterns {accounting.unmatched_patterns} match no supported layer with a "
            f"trainable weight in {model_name}; supported layer types: "
            f"{supported_layer_types()}. Names come from `named_modules()`."
        )
    if layers is None and not accounting.constraints and not exclude_layers:
        raise UnlearningConfigError(
            f"{model_name} has no supported layer with a trainable weight; there is nothing to "
            "constrain."
        )
    if not accounting.constraints:
        rank_zero_warn("NullSpaceCalibration: no layer selected; training is left unchanged.")
    if isinstance(threshold, dict):
        missing = [
            key
            for key in accounting.constraints
            if not any(p == key or fnmatchcase(key, p) for p in threshold)
        ]
        if missing:
            raise UnlearningConfigError(
                f"`threshold` mapping {threshold} has no entry for layers {missing}; add "
                "them (patterns such as '*' are allowed)."
            )
    others = {n: r for n, r in accounting.frozen.items() if r not in ("bias", "norm", "excluded")}
    if not others or not accounting.constraints:
        return
    listing = ", ".join(f"`{n}` ({r})" for n, r in others.items())
    if freeze_unconstrained:
        rank_zero_warn(
            "NullSpaceCalibration: these trainable parameters have no null-space basis and are "
            f"frozen during unlearning (restored afterwards): {listing}. Pass "
            "`freeze_unconstrained=False` to train them freely (remaining outputs can then move)."
        )
    else:
        rank_zero_warn(
            "NullSpaceCalibration: these trainable parameters are NOT constrained and their "
            f"updates can change remaining outputs: {listing}. Freeze them "
            "(`freeze_unconstrained=True`) or exclude them from the optimizer."
        )
