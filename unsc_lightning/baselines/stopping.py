"""A stopping rule for sample-level forgetting: stop once forgotten samples look like unseen ones."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from unsc_lightning.arguments import integer, number
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.context import eval_mode


@torch.no_grad()
def loader_accuracy(module: torch.nn.Module, loader: Any, device: torch.device) -> float:
    """Share of correctly classified samples of ``loader`` (batches ``(x, y, ...)``), in ``[0, 1]``."""
    correct = total = 0
    with eval_mode(module):
        for batch in loader:
            inputs, labels = batch[0].to(device), batch[1].to(device)
            correct += int((module(inputs).argmax(dim=1) == labels).sum())
            total += int(labels.numel())
    if total == 0:
        raise RuntimeError("Cannot measure accuracy on an empty loader.")
    return correct / total


class StopAtHeldOutAccuracy(Callback):
    """Stop training once accuracy on the forgotten samples falls to held-out accuracy.

    When the forgotten samples' classes remain (random-sample forgetting), a model retrained
    without them classifies them about as well as data it never saw, not at 0 %. Methods that
    push forget samples away from their labels (UNSC's pseudo-labels, random labels, gradient
    ascent, ...) overshoot if run for a fixed number of epochs; this rule stops them when
    ``acc(forget) <= target``. The target defaults to the model's accuracy on held-out data,
    measured at the start of training: the DataModule's first validation loader (held-out
    samples of the remaining classes), never the test set.

    Args:
        target: accuracy in ``[0, 1]`` to stop at; ``None`` measures it on ``held_out_dataloader``.
        check_every_n_steps: how often to measure the forget accuracy.
        forget_dataloader: forgotten samples; defaults to the DataModule's ``forget_dataloader()``.
        held_out_dataloader: held-out samples; defaults to ``val_dataloader()[0]``.

    Example:
        >>> StopAtHeldOutAccuracy(target=0.9).target
        0.9
    """

    def __init__(
        self,
        target: float | None = None,
        check_every_n_steps: int = 1,
        forget_dataloader: Any = None,
        held_out_dataloader: Any = None,
    ) -> None:
        number("target", target, 0.0, 1.0, low_open=False, optional=True)
        integer("check_every_n_steps", check_every_n_steps, 1)
        self.target = target
        self.check_every_n_steps = check_every_n_steps
        self.forget_dataloader = forget_dataloader
        self.held_out_dataloader = held_out_dataloader
        self.stopped_at_step: int | None = None
        self._target: float | None = None
        self._batches = 0

    def _loader(self, trainer: L.Trainer, which: str) -> Any:
        given = self.forget_dataloader if which == "forget" else self.held_out_dataloader
        if given is not None:
            return given
        datamodule: Any = getattr(trainer, "datamodule", None)
        if which == "forget" and callable(getattr(datamodule, "forget_dataloader", None)):
            return datamodule.forget_dataloader()
        if which == "held_out" and callable(getattr(datamodule, "val_dataloader", None)):
            loaders = datamodule.val_dataloader()
            return loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        raise UnlearningConfigError(
            f"StopAtHeldOutAccuracy needs a {which} loader: pass `{which}_dataloader=` or use a "
            f"DataModule with `{'forget_dataloader' if which == 'forget' else 'val_dataloader'}()`."
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stopped_at_step = None
        self._batches = 0
        self._target = self.target
        if self._target is None:
            self._target = loader_accuracy(
                pl_module, self._loader(trainer, "held_out"), pl_module.device
            )
        self._forget = self._loader(trainer, "forget")

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batches += 1
        if self.stopped_at_step is not None or self._batches % self.check_every_n_steps:
            return
        accuracy = loader_accuracy(pl_module, self._forget, pl_module.device)
        if self._target is not None and accuracy <= self._target:
            self.stopped_at_step = self._batches
            trainer.should_stop = True
            rank_zero_info(
                f"StopAtHeldOutAccuracy: forget accuracy {accuracy:.4f} <= held-out {self._target:.4f} "
                f"after {self._batches} steps; stopping."
            )
