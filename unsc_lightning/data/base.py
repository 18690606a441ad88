"""`UnlearningDataModule`: split labelled datasets into forget / retain / held-out loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from unsc_lightning.arguments import class_list, integer, number
from unsc_lightning.data.forget import ForgetSpec
from unsc_lightning.data.registry import datamodule_class
from unsc_lightning.errors import UnlearningConfigError

TrainOn = Literal["forget", "retain", "all"]

#: Names of the evaluation loaders, in ``dataloader_idx`` order: held-out remaining data, held-out
#: forgotten data, remaining training samples (MIA members, as many as held-out remaining
#: samples) and the forgotten training samples (what the membership attack is applied to).
EVAL_LOADERS: tuple[str, ...] = ("retain", "forget", "member", "forget_train")


@dataclass
class DatasetBundle:
    """The datasets a data module splits.

    Args:
        train: training samples with training-time transforms (augmentation).
        test: held-out test samples.
        num_classes: number of classes the model predicts.
        train_eval: the same samples as ``train`` with evaluation transforms (no augmentation);
            used for the validation split, the remaining-data bases and MIA members. Defaults
            to ``train``.
        class_names: optional human-readable names.
        fine_targets: ``(train, test)`` fine labels when the labels the model learns are coarse
            groups of them; :class:`ForgetSpec` ``kind="subclass"`` selects by these.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    train_eval: Dataset | None = None
    class_names: list[str] | None = None
    fine_targets: tuple[Tensor, Tensor] | None = None


def dataset_targets(dataset: Dataset) -> Tensor:
    """Integer labels of a dataset (``targets``, ``labels``, ``tensors[1]``, or by iteration)."""
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return torch.as_tensor(values).long().reshape(-1)
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) > 1:
        return tensors[1].long().reshape(-1)
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


class UnlearningDataModule(L.LightningDataModule):
    """Forget / retain / held-out splits of a labelled classification data set.

    ``train_dataloader()`` yields what the current stage trains on (``train_on``): the forget
    split for unlearning (default), the remaining data for a retrained model, everything for the
    original model. ``retain_dataloader()`` yields the remaining training data, which
    :class:`~unsc_lightning.NullSpaceCalibration` reads to build its bases. Validation and test
    loaders are ``[retain, forget, member, forget_train]`` (``dataloader_idx`` 0-3): held-out data
    of the remaining and of the forgotten classes (for sample-level forgetting the forget loader
    holds the forgotten training samples themselves), then remaining training samples and the
    forgotten training samples for the membership-inference attack. A seeded ``val_fraction`` of the training set is
    held out for validation and never trained on.

    Args:
        train_dataset: labelled training set (or override :meth:`build_datasets`).
        test_dataset: labelled test set.
        num_classes: number of classes.
        forget_classes: shorthand for ``forget=ForgetSpec(kind="class", classes=...)``.
        forget: full forget specification (class-wise or random samples).
        train_on: ``"forget"``, ``"retain"`` or ``"all"``.
        val_fraction: share of the training set held out for validation.
        batch_size: training batch size.
        eval_batch_size: batch size of evaluation and retain loaders.
        num_workers: DataLoader workers.
        seed: seed of the validation split and of shuffling.
        train_eval_dataset: the training samples with evaluation transforms.

    Example:
        >>> dm = UnlearningDataModule.from_name("digits", forget_classes=[3])
        >>> dm.setup("fit")
        >>> sorted(set(dm.forget_targets().tolist()))
        [3]
    """

    def __init__(
        self,
        train_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        num_classes: int | None = None,
        forget_classes: list[int] | None = None,
        forget: ForgetSpec | None = None,
        train_on: TrainOn = "forget",
        val_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        train_eval_dataset: Dataset | None = None,
    ) -> None:
        super().__init__()
        if forget_classes is not None:
            forget_classes = class_list("forget_classes", forget_classes)
        if forget is None:
            forget = ForgetSpec(kind="class", classes=list(forget_classes or []))
        elif not isinstance(forget, ForgetSpec):
            raise UnlearningConfigError(
                f"Expected `forget` to be a `ForgetSpec` or None, got {type(forget).__name__} "
                f"{forget!r}; e.g. `forget=ForgetSpec(kind='random', fraction=0.1)`."
            )
        elif forget_classes is not None and sorted(forget_classes) != forget.forgotten_classes:
            raise UnlearningConfigError(
                f"Got both `forget_classes={forget_classes}` and `forget={forget}`; pass only one."
            )
        if train_on not in ("forget", "retain", "all"):
            raise UnlearningConfigError(
                f"Expected `train_on` to be one of 'forget', 'retain', 'all', got {train_on!r}."
            )
        number("val_fraction", val_fraction, 0.0, 1.0, low_open=False, high_open=True)
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            integer(name, value, 1)
        integer("num_workers", num_workers, 0)
        integer("seed", seed, 0)
        if num_classes is not None:
            integer("num_classes", num_classes, 2)
        self.forget = forget
        self.train_on = train_on
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._given = (train_dataset, test_dataset, num_classes, train_eval_dataset)
        if (train_dataset is None) != (test_dataset is None):
            raise UnlearningConfigError(
                "Pass both `train_dataset` and `test_dataset` (or neither and override `build_datasets`)."
            )
        self.eval_loader_names = EVAL_LOADERS
        self._bundle: DatasetBundle | None = None
        self.splits: dict[str, Tensor] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> UnlearningDataModule:
        """A registered data module by name, built with ``kwargs``.

        The embedded, offline data sets are ``"mnist1d"`` and ``"digits"``; the paper's
        ``"fmnist"``, ``"cifar10"``, ``"svhn"`` and ``"cifar100"`` read torchvision files (see
        :mod:`unsc_lightning.data.torchvision_data`). Register more with
        :func:`~unsc_lightning.data.registry.register_datamodule`.

        Raises:
            UnlearningConfigError: for an unknown name, or one whose class is not a ``cls``.
        """
        datamodule_cls = datamodule_class(name)
        if not issubclass(datamodule_cls, cls):
            raise UnlearningConfigError(
                f"`name={name!r}` names {datamodule_cls.__qualname__}, which is not a "
                f"{cls.__qualname__}."
            )
        return datamodule_cls(**kwargs)

    def build_datasets(self) -> DatasetBundle:
        """Return the datasets to split; subclasses load or generate them here."""
        train, test, num_classes, train_eval = self._given
        if train is None or test is None:
            raise UnlearningConfigError(
                "`UnlearningDataModule` needs `train_dataset` and `test_dataset`, or a subclass that "
                "overrides `build_datasets()` (e.g. `UnlearningDataModule.from_name('mnist1d')`)."
            )
        if num_classes is None:
            num_classes = int(torch.cat([dataset_targets(train), dataset_targets(test)]).max()) + 1
        return DatasetBundle(train=train, test=test, num_classes=num_classes, train_eval=train_eval)

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def forget_classes(self) -> list[int]:
        return self.forget.forgotten_classes

    @property
    def bundle(self) -> DatasetBundle:
        if self._bundle is None:
            self._bundle = self.build_datasets()
            self.forget.validate(self._bundle.num_classes, fine_targets=self._bundle.fine_targets)
        return self._bundle

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        bundle = self.bundle
        train_targets = dataset_targets(bundle.train)
        test_targets = dataset_targets(bundle.test)
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(train_targets.numel(), generator=generator)
        n_val = int(round(self.val_fraction * train_targets.numel()))
        val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
        train_keys, test_keys = self.forget.selection_targets(
            train_targets, test_targets, bundle.fine_targets
        )
        forget_mask = self.forget.train_mask(train_keys, train_idx)
        if not forget_mask.any():
            raise RuntimeError(
                f"The forget set is empty: no training sample matches {self.forget}. Check `forget_classes`."
            )
        val_forget = self.forget.test_mask(train_keys[val_idx])
        test_forget = self.forget.test_mask(test_keys)
        self.splits = {
            "train_forget": torch.nonzero(forget_mask).flatten(),
            "train_retain": train_idx[~forget_mask[train_idx]],
            "val_retain": val_idx[~val_forget],
            "val_forget": val_idx[val_forget],
            "test_retain": torch.nonzero(~test_forget).flatten(),
            "test_forget": torch.nonzero(test_forget).flatten(),
        }
        if self.splits["train_retain"].numel() == 0:
            raise RuntimeError(
                "The remaining training data are empty: every training sample is forgotten."
            )
        self._targets = {"train": train_targets, "test": test_targets}

    # -- loaders ------------------------------------------------------------------------------
    def _subset(self, split: str, source: Literal["train", "train_eval", "test"]) -> Subset:
        self.setup()
        bundle = self.bundle
        dataset = {
            "train": bundle.train,
            "train_eval": bundle.train_eval or bundle.train,
            "test": bundle.test,
        }[source]
        return Subset(dataset, self.splits[split].tolist())

    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Forget split (unlearning), remaining data (retrain) or all training data (original)."""
        if self.train_on == "all":
            self.setup()
            everything = (
                torch.cat([self.splits["train_forget"], self.splits["train_retain"]]).sort().values
            )
            dataset: Dataset = Subset(self.bundle.train, everything.tolist())
        else:
            dataset = self._subset(f"train_{self.train_on}", "train")
        return self._loader(dataset, shuffle=True, batch_size=self.batch_size)

    def retain_dataloader(self) -> DataLoader:
        """Remaining training data with evaluation transforms, in a fixed order."""
        return self._loader(self._subset("train_retain", "train_eval"), False, self.eval_batch_size)

    def forget_dataloader(self) -> DataLoader:
        """Forgotten training samples with evaluation transforms, in a fixed order."""
        return self._loader(self._subset("train_forget", "train_eval"), False, self.eval_batch_size)

    def _eval_loaders(self, prefix: str, source: Literal["train_eval", "test"]) -> list[DataLoader]:
        held_out = self._subset(f"{prefix}_retain", source)
        if self.forget.held_out_forget:  # class / sub-class: held-out samples of what is forgotten
            forget = self._subset(f"{prefix}_forget", source)
        else:  # sample-level: the forgotten samples themselves are the forget evaluation set
            forget = self._subset("train_forget", "train_eval")
        members = self._subset("train_retain", "train_eval")
        generator = torch.Generator().manual_seed(self.seed + 1)
        keep = torch.randperm(len(members), generator=generator)[: max(1, len(held_out))]
        members = Subset(members.dataset, [members.indices[i] for i in keep.sort().values.tolist()])
        datasets = [held_out, forget, members, self._subset("train_forget", "train_eval")]
        return [self._loader(dataset, False, self.eval_batch_size) for dataset in datasets]

    def val_dataloader(self) -> list[DataLoader]:
        """``[retain, forget, member, forget_train]`` (see ``EVAL_LOADERS``), validation split."""
        return self._eval_loaders("val", "train_eval")

    def test_dataloader(self) -> list[DataLoader]:
        """``[retain, forget, member, forget_train]`` (see ``EVAL_LOADERS``), test set."""
        return self._eval_loaders("test", "test")

    def forget_targets(self) -> Tensor:
        """Labels of the forgotten training samples."""
        self.setup()
        return self._targets["train"][self.splits["train_forget"]]

    def split_sizes(self) -> dict[str, int]:
        """Number of samples in every split."""
        self.setup()
        return {name: int(index.numel()) for name, index in self.splits.items()}
