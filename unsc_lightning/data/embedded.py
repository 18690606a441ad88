"""Embedded data sets that need no download: MNIST-1D and scikit-learn's digits.

Both have the ten digit classes. For sub-class forgetting they also come with a documented
coarse grouping, :data:`DIGIT_GROUPS`: five pairs of digits that look alike when handwritten
(MNIST-1D's templates are drawn from the same digit shapes). With ``coarse_labels=True`` (the
default for ``ForgetSpec(kind="subclass")``) the model learns the five group ids and the bundle
keeps the digits as ``fine_targets``, so "forget digit 3" removes one fine class while its
coarse class (3 and 8) remains.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from unsc_lightning.data.base import DatasetBundle, UnlearningDataModule
from unsc_lightning.data.forget import ForgetSpec
from unsc_lightning.data.registry import register_datamodule
from unsc_lightning.errors import UnlearningConfigError

#: Coarse classes of the embedded digit data sets: coarse class ``i`` holds the digits
#: ``DIGIT_GROUPS[i]`` (pairs that look alike: 0/6, 1/7, 2/5, 3/8, 4/9).
DIGIT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 6), (1, 7), (2, 5), (3, 8), (4, 9))


def coarse_of(fine: Tensor, groups: tuple[tuple[int, ...], ...] = DIGIT_GROUPS) -> Tensor:
    """Map fine labels to the index of their group in ``groups``.

    Raises:
        UnlearningConfigError: if a fine label belongs to no group.
    """
    fine = fine.long()
    size = max(max(max(g) for g in groups), int(fine.max()) if fine.numel() else 0) + 1
    table = torch.full((size,), -1, dtype=torch.long)
    for index, group in enumerate(groups):
        table[list(group)] = index
    coarse = table[fine]
    if bool((coarse < 0).any()):
        missing = sorted(set(fine[coarse < 0].tolist()))
        raise UnlearningConfigError(
            f"`groups={groups}` leave fine labels {missing} without a group."
        )
    return coarse


def _digit_bundle(
    x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, coarse_labels: bool
) -> DatasetBundle:
    """A bundle with digit labels, or with :data:`DIGIT_GROUPS` ids and the digits as fine labels."""
    if not coarse_labels:
        train, test = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)
        return DatasetBundle(
            train=train, test=test, num_classes=10, class_names=[str(k) for k in range(10)]
        )
    train = TensorDataset(x_train, coarse_of(y_train))
    test = TensorDataset(x_test, coarse_of(y_test))
    names = ["/".join(str(k) for k in group) for group in DIGIT_GROUPS]
    return DatasetBundle(
        train=train,
        test=test,
        num_classes=len(DIGIT_GROUPS),
        class_names=names,
        fine_targets=(y_train, y_test),
    )


def _wants_coarse(coarse_labels: bool | None, forget: ForgetSpec | None) -> bool:
    return (
        bool(coarse_labels)
        if coarse_labels is not None
        else forget is not None and forget.kind == "subclass"
    )


@lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # mnist1d seeds the global `random` and NumPy generators; the user's state is restored.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def mnist1d_bundle(
    num_samples: int = 10_000, seed: int = 42, coarse_labels: bool = False
) -> DatasetBundle:
    """MNIST-1D (Greydanus 2020) generated offline: 40-step signals, 10 classes, 80/20 split.

    Inputs have shape ``(1, 40)`` (one channel) so that Conv1d models apply directly.

    Args:
        num_samples: total samples generated.
        seed: generator seed.
        coarse_labels: label samples with their :data:`DIGIT_GROUPS` id (5 classes) and keep the
            digits as ``fine_targets``.
    """
    x, y, x_test, y_test = _mnist1d_arrays(num_samples, seed)
    return _digit_bundle(
        torch.tensor(x, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y).long(),
        torch.tensor(x_test, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y_test).long(),
        coarse_labels,
    )


def digits_bundle(
    test_fraction: float = 0.25, seed: int = 0, coarse_labels: bool = False
) -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], stratified split.

    Args:
        test_fraction: share of the images held out as the test set.
        seed: seed of the split.
        coarse_labels: label samples with their :data:`DIGIT_GROUPS` id (5 classes) and keep the
            digits as ``fine_targets``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return _digit_bundle(
        torch.from_numpy(x_train),
        torch.from_numpy(y_train).long(),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test).long(),
        coarse_labels,
    )


@register_datamodule("mnist1d")
class MNIST1DDataModule(UnlearningDataModule):
    """MNIST-1D forget/retain splits, generated offline with a fixed seed.

    Args:
        num_samples: total samples generated (80 % train, 20 % test).
        data_seed: seed of the generator (42 is the MNIST-1D reference set).
        coarse_labels: learn the :data:`DIGIT_GROUPS` ids instead of the digits; ``None`` (default)
            means "only for a sub-class forget spec".
        **kwargs: see :class:`UnlearningDataModule`.
    """

    def __init__(
        self,
        forget_classes: list[int] | None = None,
        forget: ForgetSpec | None = None,
        num_samples: int = 10_000,
        data_seed: int = 42,
        train_on: str = "forget",
        val_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        coarse_labels: bool | None = None,
    ) -> None:
        if num_samples < 100:
            raise UnlearningConfigError(f"Expected `num_samples` >= 100, got {num_samples}.")
        super().__init__(
            forget_classes=forget_classes,
            forget=forget,
            train_on=train_on,  # type: ignore[arg-type]
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.num_samples = num_samples
        self.data_seed = data_seed
        self.coarse_labels = _wants_coarse(coarse_labels, self.forget)

    def build_datasets(self) -> DatasetBundle:
        return mnist1d_bundle(self.num_samples, self.data_seed, coarse_labels=self.coarse_labels)


@register_datamodule("digits")
class DigitsDataModule(UnlearningDataModule):
    """scikit-learn digits forget/retain splits (8x8 images, one channel).

    Args:
        test_fraction: share of the 1,797 images held out as the test set.
        coarse_labels: learn the :data:`DIGIT_GROUPS` ids instead of the digits; ``None`` (default)
            means "only for a sub-class forget spec".
        **kwargs: see :class:`UnlearningDataModule`.
    """

    def __init__(
        self,
        forget_classes: list[int] | None = None,
        forget: ForgetSpec | None = None,
        test_fraction: float = 0.25,
        train_on: str = "forget",
        val_fraction: float = 0.1,
        batch_size: int = 64,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        coarse_labels: bool | None = None,
    ) -> None:
        super().__init__(
            forget_classes=forget_classes,
            forget=forget,
            train_on=train_on,  # type: ignore[arg-type]
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.test_fraction = test_fraction
        self.coarse_labels = _wants_coarse(coarse_labels, self.forget)

    def build_datasets(self) -> DatasetBundle:
        return digits_bundle(self.test_fraction, coarse_labels=self.coarse_labels)
