"""Remaining (retain) data for the callback: where it comes from, each rank's share, its shape."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.engine import BatchAdapter


def find_retain_loader(given: Any, trainer: L.Trainer) -> Any:
    """``given``, else the DataModule's ``retain_dataloader()``; a clear error otherwise."""
    if given is not None:
        return given
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "retain_dataloader", None)):
        return datamodule.retain_dataloader()
    raise UnlearningConfigError(
        "NullSpaceCalibration needs remaining (retain) data to build its bases: pass "
        "`retain_dataloader=` to the callback or give your DataModule a `retain_dataloader()` method."
    )


class RankShare:
    """The retain batches this rank reads: every ``world_size``-th, up to ``max_batches``, each
    converted as the Trainer converts its own batches (``precision_plugin.convert_input``: under
    ``"bf16-true"``, ``"16-true"`` or ``"64-true"`` floating tensors to the model's dtype; the
    identity otherwise)."""

    def __init__(self, loader: Any, trainer: L.Trainer, max_batches: int | None) -> None:
        self.loader = loader
        self.rank, self.world = trainer.global_rank, trainer.world_size
        self.max_batches = max_batches
        self.convert = trainer.precision_plugin.convert_input

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            if index % self.world == self.rank:  # sums are all-reduced afterwards
                yield self.convert(batch)


class RowGather:
    """Every rank's ``n_r x d`` rows concatenated in rank order (``NullSpaceEngine.build``'s
    ``gather``): two ``Strategy.all_gather`` calls, the counts and the rows padded to the most."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.strategy = trainer.strategy

    def __call__(self, rows: Tensor) -> Tensor:
        count = torch.tensor([rows.shape[0]], device=rows.device)
        counts = [int(n) for n in self.strategy.all_gather(count).reshape(-1).tolist()]
        padded = rows.new_zeros(max(counts), rows.shape[1])
        padded[: rows.shape[0]] = rows
        everything = self.strategy.all_gather(padded).reshape(len(counts), -1, rows.shape[1])
        return torch.cat([everything[rank, :n] for rank, n in enumerate(counts)])


class ShapeRecorder:
    """Passes batches through and records the inputs' per-sample shape (``None`` if several)."""

    def __init__(self, batches: Iterable[Any], adapter: BatchAdapter) -> None:
        self.batches = batches
        self.adapter = adapter
        self.shape: tuple[int, ...] | None = None

    def __iter__(self) -> Iterator[Any]:
        shapes: set[tuple[int, ...]] = set()
        for batch in self.batches:
            inputs, _ = self.adapter(batch)
            if isinstance(inputs, Tensor):
                shapes.add(tuple(inputs.shape[1:]))
            yield batch
        self.shape = next(iter(shapes)) if len(shapes) == 1 else None


def check_input_shape(adapter: BatchAdapter, batch: Any, retain_shape: tuple[int, ...]) -> None:
    """Refuse training batches whose per-sample shape differs from the retain inputs'."""
    try:
        inputs, _ = adapter(batch)
    except Exception:
        return  # the training batches may have another layout than the retain batches
    if isinstance(inputs, Tensor) and tuple(inputs.shape[1:]) != retain_shape:
        raise UnlearningConfigError(
            f"The remaining (retain) data have per-sample input shape {retain_shape} but "
            f"the training batches have {tuple(inputs.shape[1:])}: the bases were built from inputs "
            "other than those the model is trained on. Pass a `retain_dataloader` (or give the "
            "DataModule a `retain_dataloader()`) that yields inputs like the training data's."
        )


class RetainForward:
    """``pl_module(...)`` on retain inputs; a failure says the retain data could not be run."""

    def __init__(self, pl_module: L.LightningModule) -> None:
        self.pl_module = pl_module
        if type(pl_module).forward is L.LightningModule.forward:
            raise UnlearningConfigError(
                f"{type(pl_module).__name__} does not define `forward`; NullSpaceCalibration runs "
                "remaining data through `pl_module(x)`. Add `def forward(self, x): return self.model(x)`."
            )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.pl_module(*args, **kwargs)
        except (UnlearningConfigError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            tensors = [a for a in args if isinstance(a, Tensor)]
            shape = (
                tuple(tensors[0].shape) if len(tensors) == 1 else [tuple(t.shape) for t in tensors]
            )
            dtype = tensors[0].dtype if len(tensors) == 1 else [t.dtype for t in tensors]
            raise RuntimeError(
                f"The remaining (retain) data could not be run through "
                f"`{type(self.pl_module).__name__}.forward` (a batch of inputs of shape "
                f"{shape}, {dtype}); check that the retain dataloader yields "
                f"inputs like the training data's. The error was {type(error).__name__}: {error}"
            ) from error
