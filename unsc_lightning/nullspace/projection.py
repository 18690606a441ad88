"""Null-space projection of weight gradients or updates, in low-rank form.

With ``U`` (``d x r``) an orthonormal basis of the remaining subspace, the projected matrix
``G' = G (I - U Uᵀ)`` satisfies ``G' x = 0`` for every remaining row ``x`` (the paper's
Theorem 1). It is computed as ``G - (G U) Uᵀ`` when ``r <= d/2`` and as ``(G Q) Qᵀ`` with ``Q``
the orthonormal complement otherwise — ``2·out·d·min(r, d-r)`` flops, and never a dense
``d x d`` projector.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor


def null_space_complement(basis: Tensor) -> Tensor:
    """Orthonormal basis ``Q`` (``d x (d - r)``) of the complement of ``basis``'s span."""
    dim, rank = basis.shape
    if rank == 0:
        return torch.eye(dim, dtype=basis.dtype, device=basis.device)
    if rank >= dim:  # the whole space (a layer kept unchanged): no QR of a d x d identity
        return basis.new_zeros(dim, 0)
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

    def to(self, device: torch.device | str) -> NullSpaceProjector:
        """This projector with its factor on ``device`` (``self`` when it is there already):
        no new QR of the complement."""
        if self.factor.device == torch.device(device):
            return self
        moved = copy.copy(self)
        moved.factor = self.factor.to(device)
        return moved

    def project(self, matrix: Tensor) -> Tensor:
        """Return the projection of an ``out x d`` matrix (new tensor)."""
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
