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
from unsc_lightning.nullspace import NullSpaceEngine, projection
from unsc_lightning.nullspace.gram import ieee_float32
from unsc_lightning.nullspace.projection import NullSpaceProjector

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
@pytest.mark.parametrize("split", [False, True], ids=["default", "split_everywhere"])
def test_projected_fit_on_cuda_is_exact_with_or_without_tf32(
    problem, mode, optimizer, tf32, split, monkeypatch
):
    # With TF32 the projection G - (G U) Uᵀ would leave ~1e-3 of every step in the remaining
    # directions; the engine runs its products in IEEE float32 whatever the user set, or as
    # split TF32 products (large layers; `split_everywhere`: every layer of this small model)
    if split:
        monkeypatch.setattr(projection, "SPLIT_TF32_MIN_MACS", 0)
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


TENSOR_CORES = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="TF32 tensor cores need compute capability 8.0 (Ampere) or later",
)


@TENSOR_CORES
@pytest.mark.parametrize("rank", [2304, 3600], ids=["direct", "complement"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_split_tf32_projection_keeps_float32_accuracy_on_tensor_cores(rank, tf32):
    # ResNet-18's widest layer (512 x 4608): split TF32 products (three tensor-core products of
    # hi/lo parts) against the float64 reference, next to the IEEE float32 path and to what one
    # plain TF32 product would give (~1e-3: what the split must not be)
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(4608, rank, dtype=torch.float64, generator=generator))[0]
    matrix = torch.randn(512, 4608, generator=generator)
    reference = matrix.double() - (matrix.double() @ basis) @ basis.T
    split = NullSpaceProjector(basis, device="cuda")
    ieee = NullSpaceProjector(basis, device="cuda")
    ieee.split = False
    grad = matrix.cuda()
    assert split._use_split(grad) and not ieee._use_split(grad)
    norm = float(matrix.norm())

    def errors(got: Tensor) -> tuple[float, float]:
        got = got.double().cpu()
        return float((got - reference).norm()) / norm, float((got @ basis).norm()) / norm

    with users_tf32(tf32):
        flags = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
        with ieee_float32():  # as the engine calls it
            split_error, split_leak = errors(split.project_matrix_(grad.clone()))
            ieee_error, _ = errors(ieee.project_matrix_(grad.clone()))
            anchor = grad.clone()
            unchanged = split.restore_remaining_(anchor.clone(), split.remaining_part(anchor))
        assert (
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.fp32_precision,
        ) == flags
    with users_tf32(True):
        factor = basis.float().cuda()
        _, plain_leak = errors(grad - (grad @ factor) @ factor.T)
    assert split_error <= 1e-6 and split_leak <= 1e-6, (split_error, split_leak, ieee_error)
    assert split_error <= 4 * ieee_error + 1e-7
    assert plain_leak >= 1e-5  # one TF32 product: the bound above has teeth
    if rank <= 2304:  # direct form: an unchanged weight stays bit for bit
        assert torch.equal(unchanged, anchor)
