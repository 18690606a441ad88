"""Forward-hook recorder and streaming (uncentered) covariance accumulator.

The covariance ``C = Σ x xᵀ`` over representation rows is all the basis needs: its eigenvectors
are the left singular vectors of the stacked rows (``σ² = λ``), memory is ``O(d²)`` however many
samples are seen, and sums from different batches, workers or DDP ranks merge by addition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unsc_lightning.nullspace.representation import layer_rows, representation_dim

RowsCallback = Callable[[str, Tensor], None]


class ActivationRecorder:
    """Attach forward pre-hooks to named layers and hand each layer's rows to a callback.

    The recorder owns its hook handles: they are removed when the ``with`` block ends, whether
    it ends normally or by an exception, so nothing is left registered on the user's model.

    Args:
        layers: mapping ``name -> module`` (names from ``named_modules()``).
        on_rows: called as ``on_rows(name, rows)`` with the detached rows of every forward call.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> seen = {}
        >>> with ActivationRecorder({"0": net[0]}, lambda n, r: seen.setdefault(n, r.shape)):
        ...     _ = net(torch.randn(5, 4))
        >>> seen["0"], len(net[0]._forward_pre_hooks)
        (torch.Size([5, 4]), 0)
    """

    def __init__(self, layers: Mapping[str, nn.Module], on_rows: RowsCallback) -> None:
        self.layers = dict(layers)
        self.on_rows = on_rows
        self.seen: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.seen.add(name)
            self.on_rows(name, layer_rows(module, args[0].detach()))

        return hook

    def __enter__(self) -> ActivationRecorder:
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


class CovarianceAccumulator:
    """Streaming sums ``Σ x xᵀ`` per layer, pooled or split by class label.

    Rows are cast to ``dtype`` (float64 by default) *before* the product, so low-precision
    activations (bf16/fp16 autocast) lose nothing beyond their own rounding.

    Args:
        dims: mapping ``layer name -> row dimension d``.
        num_classes: if given, keep one covariance per class (shape ``(num_classes, d, d)``);
            labels must then be set with :meth:`set_labels` before each forward pass.
        device: where the sums live (the model's device for speed).
        dtype: accumulation dtype.

    Raises:
        RuntimeError: from :meth:`add` when a layer's inputs contain NaN or inf.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.dims = dict(dims)
        self.num_classes = num_classes
        self.dtype = dtype
        shape = (num_classes,) if num_classes is not None else ()
        self.sums: dict[str, Tensor] = {
            name: torch.zeros(*shape, d, d, dtype=dtype, device=device) for name, d in self.dims.items()
        }
        self.rows_seen: dict[str, int] = dict.fromkeys(self.dims, 0)
        self.samples_per_class = torch.zeros(num_classes or 1, dtype=torch.long)
        self._labels: Tensor | None = None

    @property
    def per_class(self) -> bool:
        return self.num_classes is not None

    def set_labels(self, labels: Tensor | None) -> None:
        """Labels of the batch about to be forwarded (required when split by class)."""
        if self.per_class:
            if labels is None:
                raise RuntimeError("Per-class covariance needs labels: the retain batches must be `(x, y)`.")
            labels = labels.reshape(-1).long()
            self.samples_per_class += torch.bincount(labels.cpu(), minlength=self.num_classes)[: self.num_classes]
        elif labels is not None:
            self.samples_per_class[0] += labels.numel()
        self._labels = labels

    def add(self, name: str, rows: Tensor) -> None:
        """Add the rows of one forward call of layer ``name``."""
        if not torch.isfinite(rows).all():
            raise RuntimeError(
                f"Layer `{name}` received NaN or inf inputs while building the remaining-data bases; "
                "check the retain data and the model (e.g. with `torch.autograd.set_detect_anomaly`)."
            )
        target = self.sums[name]
        rows = rows.to(device=target.device, dtype=self.dtype)
        self.rows_seen[name] += rows.shape[0]
        if not self.per_class:
            target.addmm_(rows.T, rows)
            return
        labels = self._labels
        assert labels is not None  # set_labels raised otherwise
        rows_per_sample = rows.shape[0] // labels.numel()
        row_labels = labels.to(rows.device).repeat_interleave(rows_per_sample)
        for cls in torch.unique(row_labels).tolist():
            class_rows = rows[row_labels == cls]
            target[cls].addmm_(class_rows.T, class_rows)

    def merge_(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's sums into this one (same layers and layout)."""
        for name, total in self.sums.items():
            total += other.sums[name].to(total.device)
            self.rows_seen[name] += other.rows_seen[name]
        self.samples_per_class += other.samples_per_class
        return self

    def reduce_(self, reduce_fn: Callable[[Tensor], Tensor]) -> CovarianceAccumulator:
        """Apply a cross-process sum (e.g. a DDP all-reduce) to every sum in place."""
        for name in self.sums:
            self.sums[name] = reduce_fn(self.sums[name])
        self.samples_per_class = reduce_fn(self.samples_per_class)
        return self

    def class_covariances(self, name: str, classes: Iterable[int]) -> dict[int, Tensor]:
        """Per-class covariances of layer ``name`` for the given class ids."""
        if not self.per_class:
            raise RuntimeError("This accumulator was built pooled; per-class covariances are not available.")
        return {int(k): self.sums[name][int(k)] for k in classes}

    def pooled_covariance(self, name: str, classes: Iterable[int] | None = None) -> Tensor:
        """Covariance of layer ``name`` summed over ``classes`` (all classes when ``None``)."""
        total = self.sums[name]
        if not self.per_class:
            return total
        if classes is None:
            return total.sum(0)
        index = torch.as_tensor(sorted(int(k) for k in classes), device=total.device, dtype=torch.long)
        return total.index_select(0, index).sum(0)


def layer_dims(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """Row dimension of each layer."""
    return {name: representation_dim(layer) for name, layer in layers.items()}


@contextmanager
def recording(layers: Mapping[str, nn.Module], accumulator: CovarianceAccumulator) -> Iterator[ActivationRecorder]:
    """Context in which every forward call through ``layers`` feeds ``accumulator``."""
    with ActivationRecorder(layers, accumulator.add) as recorder:
        yield recorder


@torch.no_grad()
def accumulate_covariances(
    forward: Callable[[Tensor], Any],
    layers: Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor | None]],
    accumulator: CovarianceAccumulator,
) -> set[str]:
    """Run ``forward`` on every ``(x, y)`` batch and accumulate the layers' input covariances.

    Returns:
        The names of the layers that received input at least once.
    """
    with recording(layers, accumulator) as recorder:
        for inputs, labels in batches:
            accumulator.set_labels(labels)
            forward(inputs)
    return recorder.seen
