"""`BaselineModule`: what every comparison method shares (data, metrics, optimizer, retain batches)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unsc_lightning.arguments import classifier_arguments, flag, integer, number
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.evaluation import EvaluationMixin
from unsc_lightning.nullspace import NORM_LAYERS


class BaselineModule(EvaluationMixin):
    """Base class of the baselines: one trained classifier, unlearned in place.

    Baselines use the same :class:`~unsc_lightning.UnlearningDataModule` as UNSC: the trainer's
    ``train_dataloader()`` is the forget split (``train_on="forget"``) or, for methods that
    train on what remains (fine-tuning, ℓ1-sparse), the remaining data (``train_on="retain"``,
    see :attr:`train_on`). Methods that also need remaining data at every step draw shuffled
    batches with :meth:`next_retain_batch` from ``retain_dataloader=`` or the DataModule's
    ``retain_dataloader()``. Validation and test log ``retain_acc`` / ``forget_acc`` exactly as
    :class:`~unsc_lightning.UnlearningModule` does.

    Args:
        model: trained classifier returning logits; it is trained in place.
        num_classes: number of classes.
        forget_classes: forgotten classes; ``None`` or ``[]`` for sub-class or sample forgetting.
        lr: learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        norm_eval: keep normalisation layers in eval mode (running statistics of the original
            model). Forget-only batches hold one or a few classes; updating batch statistics on
            them damages every class, which is not what the methods are about.
        retain_batch_size: batch size of the remaining-data batches (``None``: the forget
            loader's batch size, else 128).
        seed: seed of the random parts (retain batch order, random labels).
        retain_dataloader: remaining data; defaults to the DataModule's ``retain_dataloader()``.
    """

    #: Which split the DataModule should train on for this method.
    train_on: str = "forget"

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        forget_classes: list[int] | None = None,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        norm_eval: bool = True,
        retain_batch_size: int | None = None,
        seed: int = 0,
        retain_dataloader: Any = None,
    ) -> None:
        super().__init__()
        forget = classifier_arguments(model, num_classes, forget_classes, momentum, weight_decay)
        number("lr", lr, 0.0)
        if retain_batch_size is not None:
            integer("retain_batch_size", retain_batch_size, 1)
        integer("seed", seed, 0)
        flag("norm_eval", norm_eval)
        self.save_hyperparameters(ignore=["model", "retain_dataloader"])
        self.model = model
        self.num_classes = num_classes
        self.forget_classes = forget
        self.remaining_classes = [k for k in range(num_classes) if k not in forget]
        self._init_evaluation(num_classes, forget)
        self.retain_dataloader = retain_dataloader
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.norm_eval = norm_eval
        self.retain_batch_size = retain_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._retain_iterator: Iterator[Any] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self._classifier_logits(self.model(x))

    def setup(self, stage: str) -> None:
        self._check_forget_classes()
        datamodule = getattr(self.trainer, "datamodule", None)
        ours = getattr(datamodule, "train_on", self.train_on)
        if ours != self.train_on:
            raise UnlearningConfigError(
                f"{type(self).__name__} trains on the {self.train_on!r} split but the DataModule has "
                f"`train_on={ours!r}`; build it with `train_on={self.train_on!r}`."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.norm_eval:
            for module in self.model.modules():
                if isinstance(module, NORM_LAYERS):
                    module.eval()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    # -- remaining data -------------------------------------------------------------------------
    def next_retain_batch(self) -> tuple[Tensor, Tensor]:
        """A shuffled batch of remaining data on the module's device (cycles forever)."""
        if self._retain_iterator is None:
            self._retain_iterator = iter(self._shuffled_retain_loader())
        try:
            batch = next(self._retain_iterator)
        except StopIteration:
            self._retain_iterator = iter(self._shuffled_retain_loader())
            batch = next(self._retain_iterator)
        return batch[0].to(self.device), batch[1].to(self.device)

    def _shuffled_retain_loader(self) -> Any:
        source = self.retain_dataloader
        if source is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or not callable(getattr(datamodule, "retain_dataloader", None)):
                raise UnlearningConfigError(
                    f"{type(self).__name__} needs remaining (retain) data: pass `retain_dataloader=` "
                    "or give your DataModule a `retain_dataloader()` method."
                )
            source = datamodule.retain_dataloader()
        dataset = getattr(source, "dataset", None)
        if dataset is None:  # a plain iterable of batches: use it as it comes
            return source
        batch_size = (
            self.retain_batch_size or getattr(self._forget_loader(), "batch_size", None) or 128
        )
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=self.generator)

    def _forget_loader(self) -> Any:
        trainer = self._trainer
        return None if trainer is None else trainer.train_dataloader

    def on_fit_end(self) -> None:
        super().on_fit_end()  # the validation limits an interrupted epoch left at zero
        self._retain_iterator = None
