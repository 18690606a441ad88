"""Strict validation of the callback's arguments: every mistake named, nothing coerced silently."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.accounting import Accounting
from unsc_lightning.nullspace.representations import supported_layer_types
from unsc_lightning.nullspace.settings import (
    NullSpaceEngineError,
    check_bool,
    check_engine_settings,
    check_gram,
    is_int,
    is_number,
)
from unsc_lightning.nullspace.settings import patterns as engine_patterns


@contextmanager
def config_errors() -> Iterator[None]:
    """Turn the engine's :class:`NullSpaceEngineError` into :class:`UnlearningConfigError`."""
    try:
        yield
    except NullSpaceEngineError as error:
        raise UnlearningConfigError(str(error)) from error


def patterns(name: str, value: Any) -> list[str] | None:
    """``None``, a single pattern string, or a list of strings -> list of patterns."""
    with config_errors():
        return engine_patterns(name, value)


def _shown(value: Any) -> str:
    """``repr`` of a value, with its type when a string or bool could pass for a number."""
    if isinstance(value, (str, bool)):
        return f"{value!r} (a {type(value).__name__})"
    return repr(value)


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    with config_errors():
        check_bool(name, value)
    return bool(value)


def integer(name: str, value: Any, minimum: int) -> int:
    """An ``int`` (not a bool, not a string) >= ``minimum``."""
    if not is_int(value) or value < minimum:
        hint = "; write it without quotes" if isinstance(value, str) else ""
        raise UnlearningConfigError(
            f"Expected `{name}` to be an integer >= {minimum}, got {_shown(value)}{hint}."
        )
    return int(value)


def number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = True,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """A real number (not a bool, not a string) in the interval ``low .. high``."""
    if optional and value is None:
        return None
    if low is not None and high is not None:
        interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        interval = f"{'>' if low_open else '>='} {low:g}"
    else:
        interval = "a number"
    inside = (
        is_number(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not inside:
        hint = "; write the number without quotes" if isinstance(value, str) else ""
        raise UnlearningConfigError(
            f"Expected `{name}` {interval}{' or None' if optional and high is not None else ''}, "
            f"got {_shown(value)}{hint}."
        )
    return None if value is None else float(value)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise UnlearningConfigError(f"Expected `{name}` in {listed}, got {value!r}.")
    return value


def class_ids(name: str, value: Any, allow_empty: bool = False) -> list[int]:
    """A list of class ids (ints >= 0, not bools, not strings), sorted and deduplicated."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or is_int(value):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a list of class ids (integers >= 0), got {_shown(value)}"
            + (f"; write `[{value}]` for one class." if is_int(value) else ".")
        )
    items = list(value)
    if (not items and not allow_empty) or not all(is_int(k) and k >= 0 for k in items):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a non-empty list of class ids (integers >= 0), got {value!r}."
        )
    return sorted({int(k) for k in items})


def class_list(name: str, value: Any) -> list[int]:
    """A list of class ids as given (order and duplicates kept for the range checks that follow).

    ``None`` is ``[]``. Refuses a single int (``write [3]``), strings (``"12"`` is not
    ``[1, 2]``), floats and bools.
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or is_int(value):
        raise UnlearningConfigError(
            f"Expected `{name}` to be a list of class ids (integers >= 0), got {_shown(value)}"
            + (f"; write `[{value}]` for one class." if is_int(value) else ".")
        )
    items = list(value)
    wrong = [k for k in items if not is_int(k)]
    if wrong:
        raise UnlearningConfigError(
            f"Expected `{name}` to be a list of integer class ids, got {items!r} "
            f"({', '.join(_shown(k) for k in wrong)} not an integer)."
        )
    return [int(k) for k in items]


def validate_callback_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``NullSpaceCalibration``'s arguments; return the normalised ones.

    Raises:
        UnlearningConfigError: naming the argument, the value and what is expected.
    """
    with config_errors():
        settings = check_engine_settings(
            arguments["threshold"],
            arguments["rule"],
            arguments["class_threshold_step"],
            arguments["layers"],
            arguments["exclude_layers"],
            flags={
                name: arguments[name]
                for name in ("freeze_bias_and_norm", "freeze_unconstrained", "norm_eval")
            },
            limits={
                name: arguments[name]
                for name in ("max_retain_batches", "max_samples_per_class", "memory_budget")
            },
        )
    with config_errors():
        check_gram(arguments.get("gram", "auto"))
    if arguments["mode"] not in ("auto", "gradient", "update"):
        raise UnlearningConfigError(
            f"Expected `mode` to be 'auto', 'gradient' or 'update', got {arguments['mode']!r}."
        )
    project_every = arguments.get("project_every")
    if project_every is not None:
        integer("project_every", project_every, 1)
        if arguments["mode"] == "gradient":
            raise UnlearningConfigError(
                "`project_every` projects weight updates every K optimizer steps and cannot be "
                "combined with `mode='gradient'`; use `mode='update'` or `mode='auto'`."
            )
    every = arguments["drift_every_n_steps"]
    if not is_int(every) or every < 0:
        raise UnlearningConfigError(
            f"Expected `drift_every_n_steps` >= 0 (0 disables it), got {every!r}."
        )
    with config_errors():
        check_bool("log_drift", arguments["log_drift"])
        check_bool("keep_forgotten_statistics", arguments.get("keep_forgotten_statistics", False))
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
        **settings,
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


def validate_forget_classes(classes: Any, num_classes: int) -> list[int]:
    """Check forgotten class ids: non-empty, unique, in range, and not every class.

    Raises:
        UnlearningConfigError: naming `forget_classes` and the value received.
    """
    values = class_list("forget_classes", classes)
    if not values:
        raise UnlearningConfigError(
            f"Expected `forget_classes` to name at least one class, got {classes!r}; "
            "pass e.g. `forget_classes=[3]` (or use `ForgetSpec(kind='random')` for sample-level forgetting)."
        )
    if len(set(values)) != len(values):
        raise UnlearningConfigError(
            f"Expected `forget_classes` without duplicates, got {list(classes)}."
        )
    outside = [k for k in values if not 0 <= k < num_classes]
    if outside:
        raise UnlearningConfigError(
            f"Expected `forget_classes` in [0, {num_classes - 1}] for `num_classes={num_classes}`, "
            f"got {list(classes)} ({outside} out of range)."
        )
    if len(values) == num_classes:
        raise UnlearningConfigError(
            f"`forget_classes={list(classes)}` names every one of the {num_classes} classes; at least "
            "one class must remain for the null space and the pseudo-labels."
        )
    return sorted(values)


def classifier_arguments(
    model: Any, num_classes: Any, forget_classes: Any, momentum: Any, weight_decay: Any
) -> list[int]:
    """Checks shared by the modules and baselines; returns the sorted forgotten classes."""
    if not isinstance(model, nn.Module):
        raise UnlearningConfigError(
            f"Expected `model` to be a torch `nn.Module` classifier, got {type(model).__name__}."
        )
    integer("num_classes", num_classes, 2)
    number("momentum", momentum, 0.0, low_open=False)
    number("weight_decay", weight_decay, 0.0, low_open=False)
    given = class_list("forget_classes", forget_classes)
    return validate_forget_classes(given, num_classes) if given else []
