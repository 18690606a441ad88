"""On a CUDA GPU: the engine's bases equal the CPU's, and projected steps stay exact whatever the
user's TF32 setting.

The rest of the callback's properties run on CUDA through the same tests as on the CPU: on a GPU
machine, ``UNSC_TEST_ACCELERATOR=gpu python -m pytest tests/lightning/test_callback.py ...``
makes every ``quiet_trainer`` and ``plain_trainer`` fit run on the GPU (``docs/performance.md``,
"GPU"). This file holds what only a GPU can check: CPU against CUDA, and cuBLAS's TF32 mode,
which rounds float32 products to 10 mantissa bits (relative error ~1e-3) when a user opts in with
``torch.set_float32_matmul_precision("high")`` -- as Lightning suggests on tensor-core GPUs.
Skipped on machines without CUDA (CI).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    SubspaceProblem,
    logits_of,
    max_relative_change,
    mean_relative_change,
    mlp,
    quiet_trainer,
)
from helpers.zoo import TinyViT, zoo_tensors
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.models import DigitsConvNet
from unsc_lightning.nullspace import NullSpaceEngine

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)"
)

EXACT = 1e-5  # relative change of remaining logits allowed (float32 rounding), as on the CPU
MOVED = 0.3
# CPU and CUDA bases from the same float32 inputs: float32 products summed in float64 in another
# order, eigendecompositions by other libraries. Observed on an H200: see the test.
PROJECTOR_CPU_CUDA = 1e-4


@contextmanager
def users_tf32(on: bool) -> Iterator[None]:
    """TF32 for float32 matrix products and cuDNN convolutions, as a user would set it."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn


def projector(basis: Tensor) -> Tensor:
    basis = basis.double().cpu()
    return basis @ basis.T


def digits_loader(batch_size: int = 128) -> DataLoader:
    x_train, y_train, _, _ = zoo_tensors("digits")
    keep = y_train != FORGET_CLASS
    return DataLoader(TensorDataset(x_train[keep], y_train[keep]), batch_size=batch_size)


def build(model: nn.Module, rule: str, device: str) -> NullSpaceEngine:
    engine = NullSpaceEngine(copy.deepcopy(model).to(device).eval(), threshold=0.97, rule=rule)
    engine.build(digits_loader(), device=device)
    return engine


@pytest.mark.parametrize("factory", [DigitsConvNet, TinyViT], ids=["conv", "vit"])
@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_cuda_bases_equal_the_cpu_bases(factory, rule):
    torch.manual_seed(0)
    model = factory()
    with users_tf32(False):  # the forward itself in IEEE float32 on both devices
        cpu, cuda = build(model, rule, "cpu"), build(model, rule, "cuda")
    assert cuda.bases.keys() == cpu.bases.keys()
    for key, basis in cuda.bases.items():
        assert basis.shape == cpu.bases[key].shape, key  # same ranks
        difference = projector(basis) - projector(cpu.bases[key])
        assert float(torch.linalg.matrix_norm(difference, 2)) <= PROJECTOR_CPU_CUDA, key


@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_tf32_on_does_not_reach_the_gram_products(rule):
    # The first layer's rows are the data: its bases cannot depend on the forward's precision,
    # only on the Gram products, which must stay IEEE float32 with the user's TF32 on.
    torch.manual_seed(0)
    model = DigitsConvNet()
    with users_tf32(False):
        reference = build(model, rule, "cpu")
    with users_tf32(True):
        engine = build(model, rule, "cuda")
        assert torch.get_float32_matmul_precision() == "high"  # the user's setting is back
        assert torch.backends.cuda.matmul.allow_tf32
    first = next(iter(reference.bases))
    assert engine.bases[first].shape == reference.bases[first].shape
    difference = projector(engine.bases[first]) - projector(reference.bases[first])
    assert float(torch.linalg.matrix_norm(difference, 2)) <= PROJECTOR_CPU_CUDA


def unlearn(
    problem: SubspaceProblem, mode: str, optimizer: str, **trainer: Any
) -> tuple[float, float]:
    torch.manual_seed(0)
    module = UnlearningModule(
        mlp(),
        NUM_CLASSES,
        [FORGET_CLASS],
        lr=0.02 if optimizer == "sgd" else 2e-3,
        optimizer=optimizer,
        stop_at_target=False,
    )
    callback = NullSpaceCalibration(
        threshold=1.0, mode=mode, retain_dataloader=problem.retain_loader()
    )
    retain_before = logits_of(module, problem.retain_x)
    forget_before = logits_of(module, problem.forget_x)
    quiet_trainer(30, [callback], accelerator="gpu", devices=1, **trainer).fit(
        module, train_dataloaders=problem.forget_loader(8)
    )
    assert next(module.parameters()).device.type == "cpu"  # Lightning moved it back
    return (
        max_relative_change(retain_before, logits_of(module, problem.retain_x)),
        mean_relative_change(forget_before, logits_of(module, problem.forget_x)),
    )


@pytest.mark.parametrize(
    ("mode", "optimizer"), [("gradient", "sgd"), ("update", "adam"), ("auto", "adamw")]
)
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_projected_fit_on_cuda_is_exact_with_or_without_tf32(problem, mode, optimizer, tf32):
    # With TF32 the projection G - (G U) Uᵀ would leave ~1e-3 of every step in the remaining
    # directions; the engine runs its products in IEEE float32 whatever the user set.
    with users_tf32(tf32):
        retain_change, forget_change = unlearn(problem, mode, optimizer)
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    assert retain_change <= EXACT
    assert forget_change >= MOVED


def test_bf16_mixed_on_cuda_keeps_remaining_outputs_within_the_cpu_bound(problem):
    # the bound and its reasoning: tests/lightning/test_precision.py (BF16_RETAIN_CHANGE)
    retain_change, forget_change = unlearn(problem, "auto", "sgd", precision="bf16-mixed")
    assert retain_change <= 0.02
    assert forget_change >= MOVED


def test_16_mixed_relative_steps_move_the_weights_on_cuda(problem):
    # precision="16-mixed" on CUDA runs a GradScaler: the raw gradient norms that decide which
    # projected gradients are only rounding are taken while the gradients are still scaled
    # (`module._gradient_scale`); misread, every weight would hold still. Relative steps are
    # UnlearningModule's default (lr=None with SGD). Written after the H200 runs: not yet run.
    torch.manual_seed(0)
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    retain_before = logits_of(module, problem.retain_x)
    forget_before = logits_of(module, problem.forget_x)
    trainer = quiet_trainer(30, [callback], accelerator="gpu", devices=1, precision="16-mixed")
    assert getattr(trainer.precision_plugin, "scaler", None) is not None
    trainer.fit(module, train_dataloaders=problem.forget_loader(8))
    assert mean_relative_change(forget_before, logits_of(module, problem.forget_x)) >= MOVED
    # float16 activations in the basis pass: the bf16 bound of test_precision.py holds a fortiori
    assert max_relative_change(retain_before, logits_of(module, problem.retain_x)) <= 0.02
