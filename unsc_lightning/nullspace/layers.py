"""Choosing the layers to constrain and building every layer's basis."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from torch import Tensor, nn

from unsc_lightning.nullspace.accounting import NORM_LAYERS
from unsc_lightning.nullspace.covariance import CovarianceAccumulator
from unsc_lightning.nullspace.representations import is_supported
from unsc_lightning.nullspace.rules import (
    BasisInfo,
    class_threshold_schedule,
    per_class_basis,
    pooled_basis,
)

BasisRule = Literal["per_class", "pooled"]


@dataclass
class LayerSelection:
    """Result of :func:`select_layers`.

    Attributes:
        layers: constrained layers, ``name -> module``, in ``named_modules()`` order.
        unsupported: ``name -> type name`` of trainable modules with direct parameters that no
            handler supports (their updates are not constrained).
        unmatched_patterns: include patterns that matched no supported trainable layer.
    """

    layers: dict[str, nn.Module] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    unmatched_patterns: list[str] = field(default_factory=list)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_layers(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> LayerSelection:
    """Supported layers with a trainable weight, filtered by ``fnmatch`` name patterns.

    Args:
        model: the module whose ``named_modules()`` names are matched.
        include: patterns a layer name must match (``None`` = every supported layer).
        exclude: patterns that remove layers.
    """
    selection = LayerSelection()
    used: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        weight = getattr(module, "weight", None)
        trainable = isinstance(weight, Tensor) and weight.requires_grad
        if not is_supported(module):
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own and not isinstance(module, NORM_LAYERS):
                selection.unsupported[name] = type(module).__name__
            continue
        if not trainable or (exclude and _matches(name, exclude)):
            continue
        if include is not None:
            hits = [pattern for pattern in include if fnmatchcase(name, pattern)]
            if not hits:
                continue
            used.update(hits)
        selection.layers[name] = module
    if include is not None:
        selection.unmatched_patterns = [pattern for pattern in include if pattern not in used]
    return selection


def threshold_for(threshold: float | Mapping[str, float], name: str) -> float:
    """The energy threshold of layer ``name``: a float, or the first matching pattern's value."""
    if isinstance(threshold, Mapping):
        for pattern, value in threshold.items():
            if pattern == name or fnmatchcase(name, pattern):
                return float(value)
        raise KeyError(name)
    return float(threshold)


def build_bases(
    accumulator: CovarianceAccumulator,
    threshold: float | Mapping[str, float],
    rule: BasisRule = "per_class",
    classes: Iterable[int] | None = None,
    class_threshold_step: float = 0.0,
) -> dict[str, tuple[Tensor, BasisInfo]]:
    """Every layer's remaining-subspace basis from accumulated covariances.

    Args:
        accumulator: covariances (split per class for ``rule="per_class"``).
        threshold: energy fraction, or per-layer mapping (patterns allowed).
        rule: ``"per_class"`` (the paper's Algorithm 1) or ``"pooled"`` (one covariance).
        classes: remaining class ids to use (default: classes with samples).
        class_threshold_step: per-class schedule ``threshold + step * k`` (``per_class`` only).

    Returns:
        ``name -> (U, info)`` with ``U`` float64 on the accumulator's device.
    """
    if classes is None:
        counts = accumulator.samples_per_class
        classes = (
            [k for k in range(counts.numel()) if counts[k] > 0] if accumulator.per_class else None
        )
    bases: dict[str, tuple[Tensor, BasisInfo]] = {}
    samples = accumulator.samples_per_class.tolist()
    for name in accumulator.sums:
        eps = threshold_for(threshold, name)
        # rank(C_k) <= rows summed into it (see `eigh_descending`)
        per_sample = accumulator.rows_per_sample.get(name, 0)
        bounds = None
        if per_sample and accumulator.per_class:
            bounds = {k: int(samples[k]) * per_sample for k in (classes or range(len(samples)))}
        if rule == "per_class":
            schedule: Callable[[int], float] = class_threshold_schedule(eps, class_threshold_step)
            bases[name] = per_class_basis(
                accumulator.class_covariances(name, classes or []), schedule, rank_bounds=bounds
            )
        else:
            bound = None if bounds is None else sum(bounds.values())
            pooled = accumulator.pooled_covariance(name, classes)
            bases[name] = pooled_basis(pooled, eps, bound)
    return bases
