"""Small synthetic models and data shared by the tests (imported as ``helpers.problems``).

In the spirit of Lightning's ``BoringModel``: a tiny MLP classifier and a synthetic problem whose
remaining inputs span a *proper* subspace (``x = z @ A`` with ``A`` a fixed ``5 x 20`` matrix), so
every layer's remaining inputs are rank-deficient and the null space is non-trivial. Forget
samples are drawn from the full 20-dimensional space, so the constrained updates can still move
their outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import ClassifierModule, UnlearningDataModule
from unsc_lightning.data import MNIST1DDataModule
from unsc_lightning.lab.runs import make_trainer
from unsc_lightning.models import MNIST1DConvNet

IN_FEATURES = 20
SUBSPACE_DIM = 5
NUM_CLASSES = 5
FORGET_CLASS = 4
NUM_RETAIN = 32
NUM_FORGET = 16


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from more and slow a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_accelerator() -> str:
    """The accelerator the tests' trainers use: ``cpu`` unless ``UNSC_TEST_ACCELERATOR`` says
    otherwise (on a GPU machine, ``UNSC_TEST_ACCELERATOR=gpu`` reruns the fits on CUDA)."""
    return os.environ.get("UNSC_TEST_ACCELERATOR", "cpu")


def quiet_trainer(
    max_epochs: int = 1, callbacks: list[L.Callback] | None = None, **kwargs: Any
) -> L.Trainer:
    """The demo's quiet trainer (no logger, checkpoints, progress bar or sanity check), on the CPU
    unless ``UNSC_TEST_ACCELERATOR`` names another accelerator (``gpu``: the same tests on CUDA)."""
    options: dict[str, Any] = {
        "deterministic": None,
        "log_every_n_steps": 1,
        "accelerator": test_accelerator(),
        **kwargs,
    }
    return make_trainer(max_epochs, callbacks, **options)


def mlp(hidden: int = 64, batch_norm: bool = False, dropout: float = 0.0) -> nn.Sequential:
    """``20 -> hidden -> hidden -> 5`` ReLU MLP (names ``0``, ``2``, ``4`` without extras)."""
    layers: list[nn.Module] = []
    widths = [IN_FEATURES, hidden, hidden]
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(width_in, width_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, NUM_CLASSES))
    return nn.Sequential(*layers)


@dataclass
class SubspaceProblem:
    """Remaining inputs in ``span(A)`` (rank 5 of 20), forget inputs anywhere in ``R^20``."""

    basis: Tensor  # A, 5 x 20
    retain_x: Tensor
    retain_y: Tensor
    forget_x: Tensor
    forget_y: Tensor

    def retain_loader(self, batch_size: int = 8, labels: bool = True) -> DataLoader:
        tensors = (self.retain_x, self.retain_y) if labels else (self.retain_x,)
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)

    def forget_loader(self, batch_size: int = 8, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        dataset = TensorDataset(self.forget_x, self.forget_y)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def make_subspace_problem(seed: int = 0) -> SubspaceProblem:
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(SUBSPACE_DIM, IN_FEATURES, generator=generator)
    latent = torch.randn(NUM_RETAIN, SUBSPACE_DIM, generator=generator)
    retain_x = latent @ basis
    retain_y = torch.arange(NUM_RETAIN) % FORGET_CLASS  # classes 0..3 remain
    forget_x = 2.0 * torch.randn(NUM_FORGET, IN_FEATURES, generator=generator)
    forget_y = torch.full((NUM_FORGET,), FORGET_CLASS)
    return SubspaceProblem(basis, retain_x, retain_y, forget_x, forget_y)


class SubspaceDataModule(L.LightningDataModule):
    """Forget data for training, remaining data through ``retain_dataloader()``."""

    def __init__(self, problem: SubspaceProblem, with_retain: bool = True) -> None:
        super().__init__()
        self.problem = problem
        if with_retain:
            self.retain_dataloader = problem.retain_loader  # type: ignore[method-assign]

    def train_dataloader(self) -> DataLoader:
        return self.problem.forget_loader()


class BoringClassifier(L.LightningModule):
    """Minimal LightningModule around ``model``: cross-entropy, SGD; ``num_classes`` for per-class rules."""

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 0.1,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else mlp()
        self.num_classes = NUM_CLASSES
        self.lr = lr
        self.optimizer_factory = optimizer
        self.fail_at_step = fail_at_step

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError(f"boom at step {self.global_step}")
        inputs, targets = batch[0], batch[1]
        return nn.functional.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.SGD(params, lr=self.lr)


class RaisingLoader:
    """An iterable whose iteration fails: proves a code path never reads the data."""

    def __iter__(self) -> Iterator[Any]:
        raise AssertionError("the retain data must not be read")
        yield  # pragma: no cover - makes this a generator, so `iter()` itself succeeds


def max_relative_change(before: Tensor, after: Tensor) -> float:
    """``max_i ||after_i - before_i|| / ||before_i||`` over samples (rows)."""
    return float(((after - before).norm(dim=1) / before.norm(dim=1)).max())


def mean_relative_change(before: Tensor, after: Tensor) -> float:
    return float(((after - before).norm(dim=1) / before.norm(dim=1)).mean())


@torch.no_grad()
def logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    """``model``'s eval-mode logits on ``inputs`` (moved to the model's device), on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return model(inputs.to(device)).detach().cpu().clone()
    finally:
        model.train(was_training)


def forward_hook_count(module: nn.Module) -> int:
    """Forward and forward-pre hooks registered on ``module`` and all its submodules."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# --------------------------------------------------------------------------------------------
# MNIST-1D original model, trained once per session
# --------------------------------------------------------------------------------------------
MNIST1D_SAMPLES = 4000
MNIST1D_FORGET = 3


@dataclass
class TrainedMNIST1D:
    model: nn.Module
    seconds: float


def tensor_datamodule(
    num_train: int = 200, num_test: int = 100, num_classes: int = 4, **kwargs: Any
) -> UnlearningDataModule:
    """``UnlearningDataModule`` over explicit ``TensorDataset``s (labels cycle through classes)."""
    generator = torch.Generator().manual_seed(0)
    train = TensorDataset(
        torch.randn(num_train, 6, generator=generator), torch.arange(num_train) % num_classes
    )
    test = TensorDataset(
        torch.randn(num_test, 6, generator=generator), torch.arange(num_test) % num_classes
    )
    return UnlearningDataModule(
        train_dataset=train, test_dataset=test, num_classes=num_classes, **kwargs
    )


def train_mnist1d_original() -> TrainedMNIST1D:
    """``MNIST1DConvNet`` trained on all of MNIST-1D (4,000 samples) for 15 epochs (~5 s)."""
    import time

    with single_thread():
        L.seed_everything(0, verbose=False)
        dm = MNIST1DDataModule(
            num_samples=MNIST1D_SAMPLES,
            forget_classes=[MNIST1D_FORGET],
            train_on="all",
            batch_size=64,
        )
        model = MNIST1DConvNet()
        module = ClassifierModule(
            model, num_classes=10, forget_classes=[MNIST1D_FORGET], lr=0.1, milestones=[12]
        )
        start = time.perf_counter()
        quiet_trainer(15, deterministic=True).fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
    model.eval()
    return TrainedMNIST1D(model=model, seconds=seconds)
