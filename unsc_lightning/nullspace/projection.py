"""Null-space projection of weight gradients or updates, in low-rank form.

With ``U`` (``d x r``) an orthonormal basis of the remaining subspace, the projected matrix
``G' = G (I - U Uᵀ)`` satisfies ``G' x = 0`` for every remaining row ``x`` (the paper's
Theorem 1). It is computed as ``G - (G U) Uᵀ`` when ``r <= d/2`` and as ``(G Q) Qᵀ`` with ``Q``
the orthonormal complement otherwise — ``2·out·d·min(r, d-r)`` flops, and never a dense
``d x d`` projector.

On a CUDA GPU with TF32 tensor cores (compute capability 8.0 and up), the float32 products of
large layers run as *split* TF32 products: each operand ``x`` is written exactly as
``hi + lo``, ``hi`` rounded to TF32's 10 mantissa bits and ``lo = x - hi`` (:func:`split_tf32`),
and ``a b`` as ``a_hi b_hi + a_hi b_lo + a_lo b_hi``, three TF32 products with float32
accumulation ("3xTF32"). ``hi`` passes the tensor cores unchanged, ``lo`` loses at most its
own 2⁻¹⁰, and the dropped ``a_lo b_lo`` is 2⁻²² of the product: per element the error is a
few units of 2⁻²² of ``|a| |b|``, as close as IEEE float32's accumulation over long sums, where
plain TF32 is ~1e-3 off (:func:`split_products` and ``tests/nullspace/test_split_tf32.py``
bound it). Three tensor-core products cost less than one IEEE float32 product on such GPUs,
but three times the kernel launches: only layers of at least :data:`SPLIT_TF32_MIN_MACS`
multiply-adds per product use them.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext

import torch
from torch import Tensor

from unsc_lightning.nullspace.gram import tf32_float32

#: split TF32 products (above) for CUDA projections of float32 layers (``False``: IEEE float32)
SPLIT_TF32 = True
#: ...for products of at least this many multiply-adds (``out · d · min(r, d - r)``); below it,
#: kernel launches, not arithmetic, bound a product on a GPU
SPLIT_TF32_MIN_MACS = 1 << 24

_TF32_DROPPED_BITS = 0x1FFF  # float32 keeps 23 mantissa bits, TF32 10: the low 13 go
_TF32_HALF = 0x1000


def split_tf32(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi + lo == tensor`` exactly (float32): ``hi`` rounded to nearest on
    TF32's 10 mantissa bits (ties away from zero), ``lo = tensor - hi`` (exact: ``|lo|`` is at
    most 2⁻¹¹ of ``|tensor|``, so the subtraction rounds nothing)."""
    bits = tensor.contiguous().view(torch.int32)
    hi = bits.add(_TF32_HALF).bitwise_and_(~_TF32_DROPPED_BITS).view(torch.float32)
    return hi, tensor - hi


def split_products(
    a: tuple[Tensor, Tensor],
    b: tuple[Tensor, Tensor],
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``out + alpha · a b`` (or ``a b`` without ``out``) from split operands ``(hi, lo)``:
    ``a_hi b_hi + a_hi b_lo + a_lo b_hi``, the small terms first. Each product runs in the
    precision set around it (TF32 in the projector; IEEE float32 elsewhere gives the same
    result up to float32 rounding)."""
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    if out is None:
        out = torch.mm(a_lo, b_hi)
        if alpha != 1.0:
            out.mul_(alpha)
    else:
        out.addmm_(a_lo, b_hi, alpha=alpha)
    out.addmm_(a_hi, b_lo, alpha=alpha)
    return out.addmm_(a_hi, b_hi, alpha=alpha)


def _transposed(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return pair[0].T, pair[1].T


def _tf32_cores(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device.index) >= (8, 0)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def null_space_complement(basis: Tensor) -> Tensor:
    """Orthonormal basis ``Q`` (``d x (d - r)``) of the complement of ``basis``'s span."""
    dim, rank = basis.shape
    if rank == 0:
        return torch.eye(dim, dtype=basis.dtype, device=basis.device)
    full, _ = torch.linalg.qr(basis.to(torch.float64), mode="complete")
    return full[:, rank:].to(basis.dtype).contiguous()


def project_to_null_space(matrix: Tensor, basis: Tensor) -> Tensor:
    """``matrix (I - U Uᵀ)`` for ``matrix`` of shape ``(out, d)`` (functional reference form)."""
    basis = basis.to(dtype=matrix.dtype, device=matrix.device)
    return matrix - (matrix @ basis) @ basis.T


class NullSpaceProjector:
    """Projects ``out x d`` matrices (or weight-shaped tensors) onto one layer's null space.

    Args:
        basis: orthonormal ``U`` of the remaining subspace, ``d x r``.
        device: where the projection runs (the weight's device).
        dtype: dtype of the stored factor (float32 by default).

    Example:
        >>> import torch
        >>> U, _ = torch.linalg.qr(torch.randn(6, 2))
        >>> projector = NullSpaceProjector(U)
        >>> G = torch.randn(3, 6)
        >>> torch.allclose(projector.project(G) @ U, torch.zeros(3, 2), atol=1e-6)
        True
    """

    def __init__(
        self,
        basis: Tensor,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.dim, self.rank = basis.shape
        self.use_complement = self.rank > self.dim / 2
        #: the basis this projector was made from (:meth:`to` reuses the complement for it)
        self.source = basis
        # the complement's QR on the projector's device (a GPU factors 4608 x 4608 in a blink)
        factor = (
            null_space_complement(basis.to(device=device, dtype=torch.float64))
            if self.use_complement
            else basis
        )
        self.factor = factor.to(device=device, dtype=dtype).contiguous()
        #: split TF32 products for large CUDA float32 products (``None``: :data:`SPLIT_TF32`)
        self.split: bool | None = None
        self._factor_split: tuple[Tensor, Tensor] | None = None  # (hi, lo), made on first use
        self._split_of: Tensor | None = None  # the factor they split

    def to(self, device: torch.device | str) -> NullSpaceProjector:
        """This projector with its factor on ``device`` (``self`` when it is there already):
        no new QR of the complement."""
        if self.factor.device == torch.device(device):
            return self
        moved = copy.copy(self)
        moved.factor = self.factor.to(device)
        moved._factor_split = moved._split_of = None
        return moved

    def _use_split(self, matrix: Tensor) -> bool:
        """Split TF32 products for this ``matrix``: CUDA with TF32 cores, float32, and a product
        of at least :data:`SPLIT_TF32_MIN_MACS` (``split=True`` forces them on any device, as
        the tests do on the CPU, where each product stays IEEE float32)."""
        split = SPLIT_TF32 if self.split is None else self.split
        if not split or matrix.dtype != torch.float32 or self.factor.dtype != torch.float32:
            return False
        if self.split:
            return True
        macs = matrix.shape[0] * self.dim * min(self.rank, self.dim - self.rank)
        return macs >= SPLIT_TF32_MIN_MACS and _tf32_cores(matrix.device)

    def _split_factor(self) -> tuple[Tensor, Tensor]:
        split = self._factor_split
        if split is None or self._split_of is not self.factor:  # first use, or a new factor
            split = self._factor_split = split_tf32(self.factor)
            self._split_of = self.factor
        return split

    def _split_project_(self, matrix: Tensor, remaining: Tensor | None = None) -> Tensor:
        """:meth:`project_matrix_` (``remaining`` None) or :meth:`restore_remaining_` with
        split products; ``matrix`` contiguous."""
        factor = self._split_factor()
        with tf32_float32() if matrix.is_cuda else nullcontext():
            reduced = split_products(split_tf32(matrix), factor)
            if self.use_complement:  # M = (M Q) Qᵀ (+ M₀ U Uᵀ)
                if remaining is None:
                    matrix.zero_()
                else:
                    matrix.copy_(remaining)
                return split_products(split_tf32(reduced), _transposed(factor), out=matrix)
            if remaining is not None:  # M U formed as M₀ U was: unchanged M, zero change
                reduced.sub_(remaining)
            return split_products(split_tf32(reduced), _transposed(factor), out=matrix, alpha=-1)

    def _split_product(self, matrix: Tensor) -> Tensor:
        """``matrix @ factor`` with split products."""
        with tf32_float32() if matrix.is_cuda else nullcontext():
            return split_products(split_tf32(matrix), self._split_factor())

    def project(self, matrix: Tensor) -> Tensor:
        """Return the projection of an ``out x d`` matrix (new tensor)."""
        if self.rank and self._use_split(matrix):
            return self._split_project_(matrix.clone(memory_format=torch.contiguous_format))
        factor = self.factor.to(device=matrix.device, dtype=matrix.dtype)
        if self.use_complement:
            return (matrix @ factor) @ factor.T
        if self.rank == 0:
            return matrix.clone()
        return matrix - (matrix @ factor) @ factor.T

    @torch.no_grad()
    def project_matrix_(self, matrix: Tensor) -> Tensor:
        """Project an ``out x d`` matrix (or a view of a weight) in place and return it.

        One ``out x min(r, d - r)`` temporary: ``G -= (G U) Uᵀ`` as one ``addmm_``, or
        ``G = (G Q) Qᵀ`` written back into ``G``.
        """
        if self.rank and self._use_split(matrix):
            if matrix.is_contiguous():
                return self._split_project_(matrix)
            return matrix.copy_(self._split_project_(matrix.contiguous()))
        factor = self.factor.to(device=matrix.device, dtype=matrix.dtype)
        if self.use_complement:
            reduced = matrix @ factor
            if matrix.is_contiguous():
                torch.mm(reduced, factor.T, out=matrix)
            else:
                matrix.copy_(reduced @ factor.T)
        elif self.rank:
            matrix.addmm_(matrix @ factor, factor.T, alpha=-1)
        return matrix

    @torch.no_grad()
    def remaining_part(self, matrix: Tensor) -> Tensor:
        """What the projection removes from ``matrix``, compactly: ``M U`` (``out x r``) when
        ``r <= d/2``, else ``M U Uᵀ`` (``out x d``). See :meth:`restore_remaining_`."""
        if self.rank and self._use_split(matrix):
            if self.use_complement:
                return matrix - self._split_project_(
                    matrix.clone(memory_format=torch.contiguous_format)
                )
            return self._split_product(matrix)
        factor = self.factor.to(device=matrix.device, dtype=matrix.dtype)
        if self.use_complement:
            return matrix - (matrix @ factor) @ factor.T
        return matrix @ factor

    @torch.no_grad()
    def restore_remaining_(self, matrix: Tensor, remaining: Tensor) -> Tensor:
        """``M <- M (I - U Uᵀ) + M₀ U Uᵀ`` in place, ``remaining`` = :meth:`remaining_part` of
        ``M₀``: the change ``M - M₀`` projected, with as many passes over ``M`` as
        :meth:`project_matrix_` (no ``M - M₀`` temporary, no full copy of ``M₀`` when r <= d/2).
        """
        if self.rank and self._use_split(matrix):
            remaining = remaining.to(device=matrix.device, dtype=matrix.dtype)
            if matrix.is_contiguous():
                return self._split_project_(matrix, remaining)
            return matrix.copy_(self._split_project_(matrix.contiguous(), remaining))
        factor = self.factor.to(device=matrix.device, dtype=matrix.dtype)
        remaining = remaining.to(device=matrix.device, dtype=matrix.dtype)
        if self.use_complement:
            reduced = matrix @ factor
            if matrix.is_contiguous():
                torch.addmm(remaining, reduced, factor.T, out=matrix)
            else:
                matrix.copy_(torch.addmm(remaining, reduced, factor.T))
        elif self.rank:  # M U formed as M₀ U was: an unchanged M gives an exact zero change
            matrix.addmm_(matrix @ factor - remaining, factor.T, alpha=-1)
        return matrix

    @torch.no_grad()
    def project_(self, tensor: Tensor) -> Tensor:
        """Project a weight-shaped tensor (gradient or update) in place and return it."""
        matrix = tensor.view(tensor.shape[0], -1) if tensor.is_contiguous() else None
        if matrix is None:
            tensor.copy_(self.project(tensor.reshape(tensor.shape[0], -1)).reshape_as(tensor))
        else:
            self.project_matrix_(matrix)
        return tensor

    @property
    def flops_per_row(self) -> int:
        """Multiply-adds per output row: ``2 d min(r, d - r)``."""
        return 2 * self.dim * min(self.rank, self.dim - self.rank)
