r"""Null-space drift: how far weight updates move each layer's outputs on remaining data.

UNSC's Theorem 1 (Chen et al., IJCAI 2024) says that an update ``ΔW`` kept in the null space of
the remaining representation rows ``X`` leaves the layer's output ``W Xᵀ`` on those rows
unchanged. :class:`NullSpaceDrift` measures how well that holds during a fit: for every layer,

.. math:: \mathrm{drift}_l = \frac{\lVert (W_l - W_{l,0}) X_l^\top \rVert_F}{\lVert W_{l,0} X_l^\top \rVert_F}

on a fixed probe batch of remaining inputs, with ``W_{l,0}`` the weights when the object is
created (the fit start). It is about ``1 - threshold`` or less for a calibrated layer and of the
order of the relative weight change for an unconstrained one. Biases are left out: the update rule
constrains weights, and a bias shift is visible directly.

Pure torch: usable from any training loop. The rows are kept (not their covariance ``XᵀX``):
the quadratic form ``tr(ΔW XᵀX ΔWᵀ)`` loses about half the significant digits, which would hide
drifts below ``1e-4`` in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from unsc_lightning.nullspace import ActivationRecorder, is_supported, representation_dim

#: Default bound on the stored representation rows per layer.
DEFAULT_MAX_ROWS = 4096


def _groups(layer: nn.Module) -> int:
    # Grouped convolutions apply each group's weight rows to that group's patches only.
    return int(getattr(layer, "groups", 1))


def _weight(layer: nn.Module) -> Tensor:
    return cast(Tensor, layer.weight).detach()


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 weights are compared in float32; float64 models keep float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def subsample_rows(rows: Tensor, max_rows: int, groups: int = 1) -> Tensor:
    """At most ``max_rows`` evenly spaced rows (deterministic, first and last row kept).

    Rows of a grouped convolution come in consecutive blocks of ``groups`` (one per group, see
    :func:`~unsc_lightning.nullspace.conv2d_rows`); whole blocks are kept so every group keeps
    the same receptive fields.

    Args:
        rows: representation rows ``(N, d)``, ``N`` a multiple of ``groups``.
        max_rows: upper bound on the rows returned.
        groups: rows per block.

    Returns:
        ``rows`` itself when small enough, else a new ``(n, d)`` tensor with ``n <= max_rows``.
    """
    blocks = rows.shape[0] // groups
    keep = max(1, max_rows // groups)
    if blocks <= keep:
        return rows
    index = torch.linspace(0, blocks - 1, keep, device=rows.device).round().long()
    return rows.reshape(blocks, groups, -1).index_select(0, index).reshape(-1, rows.shape[1])


def grouped_output_norm(weight: Tensor, rows: Tensor) -> Tensor:
    """``||W Xᵀ||_F`` per group: ``weight`` ``(groups, out/groups, d)``, ``rows`` ``(groups, n, d)``."""
    return torch.linalg.vector_norm(torch.bmm(weight, rows.transpose(1, 2)))


def relative_output_change(
    weight: Tensor, reference_weight: Tensor, rows: Tensor, groups: int = 1
) -> float:
    """``||(W - W0) Xᵀ||_F / ||W0 Xᵀ||_F`` for one layer (functional form of the drift).

    Args:
        weight: current weight, any layer shape ``(out, ...)``.
        reference_weight: weight ``W0`` of the same shape.
        rows: representation rows ``(N, d)`` of the layer, e.g. from
            :func:`~unsc_lightning.nullspace.layer_rows`.
        groups: the layer's ``groups`` (convolutions); ``1`` for Linear.

    Returns:
        The relative change; ``0.0`` if neither norm is positive, ``inf`` if only the change is.
    """
    dtype = _storage_dtype(weight.dtype)
    grouped_rows = rows.to(dtype).reshape(-1, groups, rows.shape[1]).transpose(0, 1)
    reference = (
        reference_weight.detach().to(dtype).reshape(groups, reference_weight.shape[0] // groups, -1)
    )
    current = weight.detach().to(dtype).reshape_as(reference)
    change = float(grouped_output_norm(current - reference, grouped_rows))
    return _ratio(change, float(grouped_output_norm(reference, grouped_rows)))


def _ratio(change: float, reference: float) -> float:
    if reference > 0:
        return change / reference
    return 0.0 if change == 0 else float("inf")


@dataclass
class _Probe:
    layer: nn.Module
    reference: Tensor  # W0, (groups, out/groups, d)
    rows: Tensor  # X, (groups, n, d)
    reference_norm: float  # ||W0 Xᵀ||_F


class NullSpaceDrift:
    """Per-layer relative output change on a fixed probe batch of remaining inputs.

    ``compute()`` returns ``||(W - W0) Xᵀ||_F / ||W0 Xᵀ||_F`` per layer, with ``W0`` the weights
    when this object was created and ``X`` the layer's representation rows (input vectors for
    Linear, receptive-field patches for convolutions) recorded on the probe batch. Under exact
    null-space training it stays at rounding level; for unconstrained training it grows with the
    update. Grouped convolutions are measured group by group, so the value equals the relative
    change of the bias-free layer output.

    Memory: a copy of every tracked weight and at most ``max_rows`` rows per layer (evenly spaced,
    deterministic), stored in float32 (float64 for float64 weights) on the weight's device.
    :meth:`compute` costs one ``out x d x rows`` product per layer.

    Args:
        layers: ``name -> module`` of the tracked layers (Linear, Conv1d, Conv2d); their current
            weights become ``W0``.
        probe_rows: ``name -> rows (N, d)`` of every layer, e.g. from
            :func:`~unsc_lightning.nullspace.layer_rows`; see :meth:`from_probe`.
        max_rows: keep at most this many rows per layer.

    Raises:
        ValueError: if ``max_rows`` < 1, a layer is unsupported, ``probe_rows`` misses a layer or
            has extra names, or rows are not ``(N, d)`` with ``N >= 1`` and the layer's ``d``.
        RuntimeError: if rows contain NaN or inf.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> layers = {"0": net[0], "2": net[2]}
        >>> drift = NullSpaceDrift.from_probe(net, layers, torch.randn(16, 4))
        >>> drift.compute()
        {'0': 0.0, '2': 0.0}
        >>> with torch.no_grad():
        ...     _ = net[2].weight.mul_(1.5)
        >>> round(drift.compute()["2"], 4), round(drift.max(), 4)
        (0.5, 0.5)
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        probe_rows: Mapping[str, Tensor],
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        _validate(layers, probe_rows, max_rows)
        self.max_rows = int(max_rows)
        self._probes: dict[str, _Probe] = {}
        for name, layer in layers.items():
            self._probes[name] = self._make_probe(name, layer, probe_rows[name])

    @classmethod
    @torch.no_grad()
    def from_probe(
        cls,
        forward: Callable[[Tensor], Any],
        layers: Mapping[str, nn.Module],
        probe_inputs: Tensor,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> NullSpaceDrift:
        """Record the rows of ``layers`` in one no-grad ``forward(probe_inputs)``.

        The forward runs in whatever mode the model is in (use eval mode so dropout and batch
        statistics do not depend on the probe). Hooks are removed afterwards, also on error.

        Args:
            forward: callable running the model, e.g. the ``nn.Module`` or ``LightningModule``.
            layers: ``name -> module`` of the tracked layers.
            probe_inputs: a batch of remaining inputs, on the model's device.
            max_rows: keep at most this many rows per layer.

        Raises:
            RuntimeError: if a layer receives no input during the forward pass.
        """
        _check_max_rows(max_rows)
        recorded: dict[str, list[Tensor]] = {name: [] for name in layers}

        def keep(name: str, rows: Tensor) -> None:  # subsample per call: bounded memory
            recorded[name].append(subsample_rows(rows, max_rows, _groups(layers[name])))

        with ActivationRecorder(layers, keep):
            forward(probe_inputs)
        unseen = [name for name, chunks in recorded.items() if not chunks]
        if unseen:
            raise RuntimeError(
                f"Layers {unseen} received no input while running the probe batch through "
                "`forward`; track only layers the forward pass uses."
            )
        rows = {name: torch.cat(chunks) for name, chunks in recorded.items()}
        return cls(layers, rows, max_rows=max_rows)

    @property
    def layer_names(self) -> list[str]:
        """Names of the tracked layers, in construction order."""
        return list(self._probes)

    @property
    def num_rows(self) -> dict[str, int]:
        """Stored probe rows per layer (all groups together)."""
        return {
            name: probe.rows.shape[0] * probe.rows.shape[1] for name, probe in self._probes.items()
        }

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """``name -> ||(W - W0) Xᵀ||_F / ||W0 Xᵀ||_F`` for every tracked layer.

        A layer whose reference output norm is zero reports ``0.0`` if its output did not
        change and ``inf`` otherwise.
        """
        return {name: self._drift(probe) for name, probe in self._probes.items()}

    def max(self) -> float:
        """The largest drift over layers (``0.0`` when no layer is tracked)."""
        return max(self.compute().values(), default=0.0)

    def _make_probe(self, name: str, layer: nn.Module, rows: Tensor) -> _Probe:
        weight = _weight(layer)
        dtype, groups = _storage_dtype(weight.dtype), _groups(layer)
        rows = subsample_rows(rows.detach(), self.max_rows, groups)
        rows = rows.to(device=weight.device, dtype=dtype)
        if not torch.isfinite(rows).all():
            raise RuntimeError(f"The probe rows of layer `{name}` contain NaN or inf.")
        grouped_rows = rows.reshape(-1, groups, rows.shape[1]).transpose(0, 1).contiguous()
        reference = weight.to(dtype).reshape(groups, weight.shape[0] // groups, -1).clone()
        norm = float(grouped_output_norm(reference, grouped_rows))
        return _Probe(layer=layer, reference=reference, rows=grouped_rows, reference_norm=norm)

    def _drift(self, probe: _Probe) -> float:
        weight = _weight(probe.layer)
        if probe.rows.device != weight.device:  # the model moved after construction
            probe.rows = probe.rows.to(weight.device)
            probe.reference = probe.reference.to(weight.device)
        change = weight.to(probe.reference.dtype).reshape_as(probe.reference) - probe.reference
        return _ratio(float(grouped_output_norm(change, probe.rows)), probe.reference_norm)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layer_names}, max_rows={self.max_rows})"


def _check_max_rows(max_rows: int) -> None:
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise ValueError(f"Expected `max_rows` to be an integer >= 1, got {max_rows!r}.")


def _validate(
    layers: Mapping[str, nn.Module], probe_rows: Mapping[str, Tensor], max_rows: int
) -> None:
    _check_max_rows(max_rows)
    unsupported = [name for name, layer in layers.items() if not is_supported(layer)]
    if unsupported:
        raise ValueError(
            f"Expected `layers` of type Linear, Conv1d or Conv2d with a weight; unsupported: {unsupported}."
        )
    missing = [name for name in layers if name not in probe_rows]
    extra = [name for name in probe_rows if name not in layers]
    if missing or extra:
        raise ValueError(
            f"Expected `probe_rows` for exactly the names of `layers`; missing {missing}, extra {extra}."
        )
    for name, layer in layers.items():
        rows, dim, groups = probe_rows[name], representation_dim(layer), _groups(layer)
        if rows.ndim != 2 or rows.shape[1] != dim or rows.shape[0] < 1 or rows.shape[0] % groups:
            raise ValueError(
                f"Expected `probe_rows['{name}']` of shape (N, {dim}) with N >= 1 a multiple of "
                f"groups={groups}, got {tuple(rows.shape)}."
            )
