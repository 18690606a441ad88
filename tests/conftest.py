"""Shared fixtures; the models, data and helpers they use live in ``tests/helpers/``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from helpers.problems import (
    SubspaceProblem,
    TrainedMNIST1D,
    make_subspace_problem,
    single_thread,
    train_mnist1d_original,
)
from torch import nn


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture
def problem() -> SubspaceProblem:
    return make_subspace_problem()


@pytest.fixture(scope="session")
def mnist1d_original() -> TrainedMNIST1D:
    """``MNIST1DConvNet`` trained on all of MNIST-1D (4,000 samples) for 15 epochs (~5 s)."""
    return train_mnist1d_original()


@pytest.fixture
def mnist1d_model(mnist1d_original: TrainedMNIST1D) -> nn.Module:
    """A fresh copy of the trained original (tests may modify it)."""
    return copy.deepcopy(mnist1d_original.model)
