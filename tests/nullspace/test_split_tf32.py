"""Split TF32 products (``3xTF32``) for CUDA projections: the split is exact, a product of split
operands keeps float32 accuracy even when the tensor cores truncate each part to TF32, and the
projector's split code path (forced here on the CPU, where each product stays IEEE float32)
gives the IEEE projection. On a GPU, ``tests/lightning/test_cuda.py`` checks the tensor cores
themselves against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from unsc_lightning.nullspace import projection
from unsc_lightning.nullspace.gram import ieee_float32, tf32_float32
from unsc_lightning.nullspace.projection import NullSpaceProjector, split_products, split_tf32

TF32_LOW_BITS = 0x1FFF  # the 13 mantissa bits float32 has and TF32 lacks


def tf32_truncated(tensor: torch.Tensor) -> torch.Tensor:
    """What a tensor core that truncates its float32 inputs to TF32 multiplies (worst case)."""
    return (tensor.contiguous().view(torch.int32) & ~TF32_LOW_BITS).view(torch.float32)


def test_split_is_exact_and_its_high_part_has_tf32_precision():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(2000, generator=generator) * 10 ** torch.randint(-30, 30, (2000,)),
            torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.0e38, -1.9999999, 1.0 + 2**-11, 1.0]),
        ]
    ).float()
    hi, lo = split_tf32(values)
    assert torch.equal(hi + lo, values)  # exact, bit for bit
    assert not (hi.view(torch.int32) & TF32_LOW_BITS).any()  # TF32 passes hi unchanged
    assert torch.equal(tf32_truncated(hi), hi)
    # rounded to nearest: lo at most half of TF32's last place, 2⁻¹¹ of |x| (for subnormal
    # floats, whose last place is fixed: half of 2¹³ of the smallest, 2⁻¹³⁷)
    assert bool((lo.abs() <= torch.clamp(values.abs() * 2**-11, min=2.0**-137)).all())
    normal = values.abs() >= torch.finfo(torch.float32).tiny
    assert bool((lo.abs() <= values.abs() * 2**-11)[normal].all())
    assert torch.equal(split_tf32(values.view(8, 251).T)[0], hi.view(8, 251).T)  # any strides


@pytest.mark.parametrize("shape", [(64, 576, 288), (128, 1152, 900)])
def test_split_products_of_tf32_truncated_parts_keep_float32_accuracy(shape):
    # each of the three products as a tensor core forms it from truncated TF32 inputs (hi passes
    # exactly, lo loses 2⁻¹⁰ of itself), summed exactly: per element within a few 2⁻²² of
    # |a| |b|, where one plain TF32 product is ~1e-3 off
    out, inner, cols = shape
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(out, inner, generator=generator)
    b = torch.randn(inner, cols, generator=generator)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    (a_hi, a_lo), (b_hi, b_lo) = split_tf32(a), split_tf32(b)

    def tc(x: torch.Tensor) -> torch.Tensor:
        return tf32_truncated(x).double()

    split = tc(a_hi) @ tc(b_hi) + tc(a_hi) @ tc(b_lo) + tc(a_lo) @ tc(b_hi)
    plain = tc(a) @ tc(b)
    assert float(((split - exact).abs() / scale).max()) < 4 * 2**-22
    assert float(((plain - exact).abs() / scale).max()) > 100 * 2**-22
    # the library's product routine on IEEE float32 products: the float32 product, up to
    # float32 rounding of the sum of three terms
    with ieee_float32():
        got = split_products((a_hi, a_lo), (b_hi, b_lo)).double()
        reference = (a @ b).double()
        accumulated = split_products((a_hi, a_lo), (b_hi, b_lo), out=a @ b, alpha=-1)
    assert float(((got - exact).abs() / scale).max()) < 8 * inner * 2**-24
    assert float(((got - reference).abs() / scale).max()) < 8 * inner * 2**-24
    assert float((accumulated.double().abs() / scale).max()) < 8 * inner * 2**-24


def _problem(dim: int, rank: int, out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, dtype=torch.float64, generator=generator))[0]
    matrix = torch.randn(out, dim, generator=generator)
    return basis, matrix


@pytest.mark.parametrize("rank", [40, 150], ids=["direct", "complement"])
def test_forced_split_projector_equals_the_ieee_projection(rank):
    basis, matrix = _problem(192, rank, 24)
    reference = matrix.double() - (matrix.double() @ basis) @ basis.T
    ieee = NullSpaceProjector(basis)
    split = NullSpaceProjector(basis)
    split.split = True
    assert split._use_split(matrix) and not ieee._use_split(matrix)  # CPU: IEEE by default
    assert ieee.use_complement == split.use_complement == (rank > 96)
    norm = float(matrix.norm())

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return float((got.double() - want.double()).norm()) < 1e-6 * norm

    assert close(split.project(matrix), reference)
    assert close(split.project(matrix), ieee.project(matrix))
    in_place = matrix.clone()
    assert split.project_matrix_(in_place) is in_place and close(in_place, reference)
    strided = matrix.T.contiguous().T  # same values, transposed storage
    assert not strided.is_contiguous()
    assert close(split.project_matrix_(strided), reference)
    assert float((in_place.double() @ basis).norm()) < 1e-6 * norm
    # update mode: the change from M₀ projected, an unchanged matrix left bit for bit
    anchor = matrix.clone()
    remaining = split.remaining_part(anchor)
    assert close(remaining, ieee.remaining_part(anchor))
    unchanged = anchor.clone()
    split.restore_remaining_(unchanged, remaining)
    if not split.use_complement:
        assert torch.equal(unchanged, anchor)
    else:  # (M Q) Qᵀ + M U Uᵀ rounds: why the engine projects only after a step
        assert close(unchanged, anchor)
    moved = anchor + torch.randn(anchor.shape, generator=torch.Generator().manual_seed(3))
    want = anchor.double() + (moved.double() - anchor.double()) @ (
        torch.eye(192, dtype=torch.float64) - basis @ basis.T
    )
    assert close(split.restore_remaining_(moved.clone(), remaining), want)


def test_split_products_only_for_large_float32_products_on_tf32_gpus():
    basis, matrix = _problem(64, 20, 8)
    projector = NullSpaceProjector(basis)
    assert not projector._use_split(matrix)  # the CPU: never by default
    projector.split = True
    assert projector._use_split(matrix)
    assert not projector._use_split(matrix.double())  # float64 layers: plain products
    projector.split = False
    assert not projector._use_split(matrix)
    if torch.cuda.is_available():
        cuda = NullSpaceProjector(basis, device="cuda")
        big = torch.randn(projection.SPLIT_TF32_MIN_MACS // (64 * 20) + 1, 64, device="cuda")
        tf32 = torch.cuda.get_device_capability() >= (8, 0)
        assert cuda._use_split(big) == tf32
        assert not cuda._use_split(big[:1])  # too small: launches, not arithmetic


@pytest.mark.parametrize("user", ["highest", "high", "medium"])
def test_tf32_context_restores_the_users_flags(user):
    def flags() -> tuple[object, ...]:
        return (
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision,
        )

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(user)
    try:
        users = flags()
        with ieee_float32():
            with tf32_float32():
                assert torch.backends.cuda.matmul.fp32_precision == "tf32"
            assert torch.get_float32_matmul_precision() == "highest"
            assert torch.backends.cuda.matmul.fp32_precision in ("none", "ieee")
        assert flags() == users
    finally:
        torch.set_float32_matmul_precision(before)
