"""Data modules and forget specifications."""

from unsc_lightning.data.base import EVAL_LOADERS, DatasetBundle, UnlearningDataModule, dataset_targets
from unsc_lightning.data.embedded import DigitsDataModule, MNIST1DDataModule, digits_bundle, mnist1d_bundle
from unsc_lightning.data.forget import ForgetSpec, validate_forget_classes

__all__ = [
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
