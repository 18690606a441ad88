"""Embedded data sets that need no download: MNIST-1D and scikit-learn's digits."""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import TensorDataset

from unsc_lightning.data.base import DatasetBundle, UnlearningDataModule
from unsc_lightning.data.forget import ForgetSpec
from unsc_lightning.errors import UnlearningConfigError


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


def mnist1d_bundle(num_samples: int = 10_000, seed: int = 42) -> DatasetBundle:
    """MNIST-1D (Greydanus 2020) generated offline: 40-step signals, 10 classes, 80/20 split.

    Inputs have shape ``(1, 40)`` (one channel) so that Conv1d models apply directly.
    """
    x, y, x_test, y_test = _mnist1d_arrays(num_samples, seed)
    train = TensorDataset(torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y).long())
    test = TensorDataset(torch.tensor(x_test, dtype=torch.float32).unsqueeze(1), torch.tensor(y_test).long())
    return DatasetBundle(train=train, test=test, num_classes=10, class_names=[str(k) for k in range(10)])


def digits_bundle(test_fraction: float = 0.25, seed: int = 0) -> DatasetBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    train = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train).long())
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test).long())
    return DatasetBundle(train=train, test=test, num_classes=10, class_names=[str(k) for k in range(10)])


class MNIST1DDataModule(UnlearningDataModule):
    """MNIST-1D forget/retain splits, generated offline with a fixed seed.

    Args:
        num_samples: total samples generated (80 % train, 20 % test).
        data_seed: seed of the generator (42 is the MNIST-1D reference set).
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

    def build_datasets(self) -> DatasetBundle:
        return mnist1d_bundle(self.num_samples, self.data_seed)


class DigitsDataModule(UnlearningDataModule):
    """scikit-learn digits forget/retain splits (8x8 images, one channel).

    Args:
        test_fraction: share of the 1,797 images held out as the test set.
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

    def build_datasets(self) -> DatasetBundle:
        return digits_bundle(self.test_fraction)


EMBEDDED_DATAMODULES: dict[str, type[UnlearningDataModule]] = {
    "mnist1d": MNIST1DDataModule,
    "digits": DigitsDataModule,
}
