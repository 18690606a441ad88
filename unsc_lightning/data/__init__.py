"""Data modules and forget specifications."""

from unsc_lightning.data.base import (
    EVAL_LOADERS,
    DatasetBundle,
    UnlearningDataModule,
    dataset_targets,
)
from unsc_lightning.data.embedded import (
    DigitsDataModule,
    MNIST1DDataModule,
    digits_bundle,
    mnist1d_bundle,
)
from unsc_lightning.data.forget import ForgetSpec, validate_forget_classes
from unsc_lightning.data.torchvision_data import (
    PAPER_DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    SVHNDataModule,
)

__all__ = [
    "PAPER_DATAMODULES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetNotFoundError",
    "FashionMNISTDataModule",
    "SVHNDataModule",
    "EVAL_LOADERS",
    "DatasetBundle",
    "DigitsDataModule",
    "ForgetSpec",
    "MNIST1DDataModule",
    "UnlearningDataModule",
    "dataset_targets",
    "digits_bundle",
    "mnist1d_bundle",
    "validate_forget_classes",
]
