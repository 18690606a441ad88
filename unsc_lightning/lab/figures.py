"""The paper's Figure 3b: remaining-data loss in the plane of an update's two parts.

An unlearning update ``ΔW = W_unlearned - W_original`` of every constrained weight splits, with
the remaining-subspace basis ``U`` of its layer, into an in-subspace part ``ΔW U Uᵀ`` (it moves
remaining outputs) and a null-space part ``ΔW (I - U Uᵀ)`` (it does not: the paper's Eq. 5
``ΔW x = 0`` for remaining inputs ``x``). :func:`loss_contour` evaluates the remaining test loss
of ``W_original + a · in-subspace + b · null-space`` on a grid; along ``b`` the loss stays flat
where the bases capture the remaining data, along ``a`` it does not.

A projected run (UNSC) has no in-subspace part, so the ``a`` direction is then taken from a
``contrast`` model: the same original unlearned without the projection (the no-null-space
ablation), whose in-subspace part is what the projection removes.

Plots use matplotlib's object API, as in :mod:`unsc_lightning.lab.render`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import functional_call

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.files import atomic_write
from unsc_lightning.nullspace import NullSpaceEngine
from unsc_lightning.nullspace.accounting import Constraint


@dataclass
class UpdatePlane:
    """Two weight-space directions by parameter name (names of the user's model).

    Attributes:
        in_subspace: ``ΔW U Uᵀ`` of constrained weights, plus the whole change of trainable
            parameters without a basis (nothing confines them to a null space).
        null_space: ``ΔW (I - U Uᵀ)`` of constrained weights.
        unlearned_at: the unlearned model's coordinates ``(a, b)`` in the plane.
        in_norm / null_norm: Euclidean norms of the two directions over all parameters.
    """

    in_subspace: dict[str, Tensor]
    null_space: dict[str, Tensor]
    unlearned_at: tuple[float, float]
    in_norm: float
    null_norm: float


@dataclass
class LossContour:
    """Remaining test loss on the grid ``loss[i, j]`` at ``(a[j], b[i])``."""

    a: list[float]
    b: list[float]
    loss: list[list[float]]
    unlearned_at: tuple[float, float]
    in_norm: float
    null_norm: float
    a_source: str

    def at(self, a: float, b: float) -> float:
        """The grid value at ``(a, b)``; both must be grid points."""
        return self.loss[_index(self.b, b, "b")][_index(self.a, a, "a")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "loss": self.loss,
            "unlearned_at": list(self.unlearned_at),
            "in_norm": self.in_norm,
            "null_norm": self.null_norm,
            "a_source": self.a_source,
        }


def _index(values: list[float], value: float, axis: str) -> int:
    for i, v in enumerate(values):
        if abs(v - value) <= 1e-9 * max(1.0, abs(value)):
            return i
    raise ValueError(f"Expected `{axis}` to be a grid point of {values}, got {value}.")


def _engine_of(calibration: NullSpaceCalibration | NullSpaceEngine) -> NullSpaceEngine:
    engine = calibration.engine if isinstance(calibration, NullSpaceCalibration) else calibration
    if engine is None or not engine.bases:
        raise UnlearningConfigError(
            "Expected `calibration` to hold bases, got none: pass the `NullSpaceCalibration` "
            "(or its engine) of a finished `Trainer.fit`."
        )
    return engine


def _parameter_names(model: nn.Module, engine: NullSpaceEngine) -> dict[str, list[Constraint]]:
    """``name in model -> constraints on it`` (several for packed or twice-read weights)."""
    names = {id(p): n for n, p in model.named_parameters()}
    by_name: dict[str, list[Constraint]] = {}
    for constraint in engine.accounting.constraints.values():
        name = names.get(id(constraint.parameter))
        if name is None:
            raise UnlearningConfigError(
                f"Expected `unlearned` to be the model the `calibration` constrained; its "
                f"parameter `{constraint.parameter_name}` is not one of the model's."
            )
        by_name.setdefault(name, []).append(constraint)
    return by_name


@torch.no_grad()
def _split(
    delta: Tensor, constraints: list[Constraint], bases: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(in-subspace, null-space)`` parts of one parameter's change."""
    null = delta.clone()
    for constraint in constraints:  # in turn, as the engine projects them
        basis = bases.get(constraint.key)
        if basis is None:
            continue
        basis = basis.to(device=delta.device, dtype=delta.dtype)
        matrix = constraint.spec.to_matrix(null)
        constraint.spec.write_matrix_(null, matrix - (matrix @ basis) @ basis.T)
    return delta - null, null


@torch.no_grad()
def _parts(
    original: nn.Module,
    updated: nn.Module,
    constrained: dict[str, list[Constraint]],
    bases: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    before = dict(original.named_parameters())
    in_subspace: dict[str, Tensor] = {}
    null_space: dict[str, Tensor] = {}
    for name, after in updated.named_parameters():
        delta = after.detach() - before[name].detach()
        if name in constrained:
            in_subspace[name], null_space[name] = _split(delta, constrained[name], bases)
        elif delta.any():
            in_subspace[name] = delta
    return in_subspace, null_space


def _dot(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> float:
    return float(sum((x[n].double() * y[n].double()).sum() for n in x.keys() & y.keys()))


def update_plane(
    original: nn.Module,
    unlearned: nn.Module,
    calibration: NullSpaceCalibration | NullSpaceEngine,
    contrast: nn.Module | None = None,
) -> UpdatePlane:
    """The in-subspace and null-space parts of ``unlearned - original``.

    Args:
        original: the model before unlearning.
        unlearned: the model the ``calibration`` trained (its parameters are the constrained ones).
        calibration: the run's :class:`~unsc_lightning.NullSpaceCalibration` or its engine.
        contrast: another model unlearned from ``original`` whose in-subspace part gives the
            ``a`` direction, for a projected ``unlearned`` that has none (e.g. the no-null-space
            ablation). The ``b`` direction is always ``unlearned``'s null-space part.

    Returns:
        The two directions; ``unlearned`` sits at ``(1, 1)``, or with ``contrast`` at
        ``(α, 1)``, ``α`` its own in-subspace part's coefficient along the ``a`` direction
        (0 for a projected run).

    Raises:
        UnlearningConfigError: for a calibration without bases, or a model it did not constrain.
    """
    engine = _engine_of(calibration)
    constrained = _parameter_names(unlearned, engine)
    in_subspace, null_space = _parts(original, unlearned, constrained, engine.bases)
    in_norm, null_norm = _dot(in_subspace, in_subspace) ** 0.5, _dot(null_space, null_space) ** 0.5
    if contrast is None:
        return UpdatePlane(in_subspace, null_space, (1.0, 1.0), in_norm, null_norm)
    direction, _ = _parts(original, contrast, constrained, engine.bases)
    norm = _dot(direction, direction) ** 0.5
    if norm == 0.0:
        raise UnlearningConfigError(
            "Expected `contrast` to move the remaining subspace, but its update has no "
            "in-subspace part: pass a model unlearned without the null-space projection."
        )
    alpha = _dot(in_subspace, direction) / norm**2
    return UpdatePlane(direction, null_space, (alpha, 1.0), norm, null_norm)


@torch.no_grad()
def _mean_loss(
    model: nn.Module, state: dict[str, Tensor], batches: list[tuple[Tensor, Tensor]]
) -> float:
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = functional_call(model, state, (inputs,))
        total += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += int(targets.numel())
    return total / count


def _state_at(original: nn.Module, plane: UpdatePlane, a: float, b: float) -> dict[str, Tensor]:
    """Parameters and buffers of ``W_original + a · in-subspace + b · null-space``."""
    state = {n: p.detach() for n, p in original.named_parameters()}
    for name, part in plane.in_subspace.items():
        state[name] = state[name] + a * part
    for name, part in plane.null_space.items():
        state[name] = state[name] + b * part
    return {**state, **dict(original.named_buffers())}


def _grid(span: tuple[float, float], steps: int, name: str) -> list[float]:
    low, high = span
    if not low < high:
        raise UnlearningConfigError(
            f"Expected `{name}` as (low, high) with low < high, got {span}."
        )
    return [float(v) for v in torch.linspace(low, high, steps, dtype=torch.float64)]


@torch.no_grad()
def loss_contour(
    original: nn.Module,
    unlearned: nn.Module,
    calibration: NullSpaceCalibration | NullSpaceEngine,
    remaining_test: Iterable[Any],
    contrast: nn.Module | None = None,
    a_span: tuple[float, float] = (-1.0, 2.0),
    b_span: tuple[float, float] = (-1.0, 2.0),
    steps: int = 13,
) -> LossContour:
    """Remaining test loss (cross-entropy) of ``W_original + a · in-subspace + b · null-space``.

    Args:
        original: the model before unlearning (not modified; evaluated in eval mode).
        unlearned: the model the ``calibration`` trained.
        calibration: the run's :class:`~unsc_lightning.NullSpaceCalibration` or its engine.
        remaining_test: batches ``(inputs, targets, ...)`` of remaining test data.
        contrast: see :func:`update_plane`.
        a_span / b_span: the grid's range along the in-subspace / null-space direction.
        steps: grid points per axis (the default 13 puts 0 and 1 on the default grid).

    Returns:
        The grid and its values; :meth:`LossContour.at` reads one point.

    Example:
        >>> contour = loss_contour(original, unlearned, callback, dm.test_dataloader()[0])  # doctest: +SKIP
        >>> contour.at(0.0, 1.0) - contour.at(0.0, 0.0)  # doctest: +SKIP
        0.0003
    """
    if steps < 2:
        raise UnlearningConfigError(f"Expected `steps` >= 2, got {steps}.")
    a_values, b_values = _grid(a_span, steps, "a_span"), _grid(b_span, steps, "b_span")
    plane = update_plane(original, unlearned, calibration, contrast)
    device = next(original.parameters()).device
    batches = [(batch[0].to(device), batch[1].to(device)) for batch in remaining_test]
    if not batches:
        raise UnlearningConfigError("Expected `remaining_test` to yield batches, got none.")
    was_training = original.training
    original.eval()
    try:
        loss = [
            [_mean_loss(original, _state_at(original, plane, a, b), batches) for a in a_values]
            for b in b_values
        ]
    finally:
        original.train(was_training)
    source = "unlearned" if contrast is None else "contrast"
    return LossContour(
        a_values,
        b_values,
        loss,
        plane.unlearned_at,
        plane.in_norm,
        plane.null_norm,
        source,
    )


def loss_contour_figure(contour: LossContour, title: str | None = None) -> Figure:
    """Filled contours of a :class:`LossContour` with the original and the unlearned marked."""
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    filled = ax.contourf(contour.a, contour.b, contour.loss, levels=20, cmap="viridis")
    ax.contour(contour.a, contour.b, contour.loss, levels=10, colors="white", linewidths=0.4)
    fig.colorbar(filled, ax=ax, label="remaining test loss")
    ax.plot([0.0], [0.0], "o", color="white", markeredgecolor="black", label="original")
    ax.plot(*contour.unlearned_at, "*", color="red", markersize=13, label="unlearned")
    source = "" if contour.a_source == "unlearned" else " (of the contrast run)"
    ax.set_xlabel(f"a: in-subspace part{source}, ‖·‖ = {contour.in_norm:.3g}")
    ax.set_ylabel(f"b: null-space part, ‖·‖ = {contour.null_norm:.3g}")
    ax.set_title(title or "Remaining test loss in the update's plane", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def plot_loss_contour(contour: LossContour, path: Path, title: str | None = None) -> None:
    """Write :func:`loss_contour_figure` to ``path`` (PNG)."""
    fig = loss_contour_figure(contour, title)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))
