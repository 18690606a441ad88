"""Retraining from scratch on the remaining data: the reference every method is compared with."""

from __future__ import annotations

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.module import ClassifierModule


class RetrainFromScratch(ClassifierModule):
    """The gold standard: the original recipe, on remaining data, from a fresh initialisation.

    Identical to :class:`~unsc_lightning.ClassifierModule`; pass a *freshly initialised* model
    and a DataModule built with ``train_on="retain"`` (checked in ``setup``). The bench trains it
    with ``unsc_lightning.lab.runs.train_classifier`` (``train_on="retain"``, cached).

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> RetrainFromScratch(MNIST1DConvNet(), num_classes=10, forget_classes=[3]).train_on
        'retain'
    """

    train_on = "retain"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        theirs = getattr(getattr(self.trainer, "datamodule", None), "train_on", "retain")
        if theirs != "retain":
            raise UnlearningConfigError(
                f"RetrainFromScratch trains on the remaining data, but the DataModule has "
                f"`train_on={theirs!r}`; build it with `train_on='retain'`."
            )
