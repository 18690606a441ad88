"""The energy rules that turn covariances into remaining-subspace bases.

Keeping the top ``r`` eigenvectors of ``C`` whose eigenvalues reach a fraction ``ε`` of
``trace(C)`` is the SVD energy rule of GPM (Saha et al., ICLR 2021) used by UNSC (Chen et al.,
IJCAI 2024). Two rules:

- :func:`pooled_basis`: one covariance of all remaining data;
- :func:`per_class_basis`: the paper's Algorithm 1, one basis grown class by class in ascending
  class id (:func:`extend_by_class` is one step), from each class's covariance or, for a class
  with few rows, from the rows themselves (:class:`ClassRows`).

The basis pass and the covariance cache both build their bases through these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from unsc_lightning.nullspace.eigen import (
    RELATIVE_TOLERANCE,
    eigh_descending,
    energy_rank,
    partial_pays,
    symmetrize,
    top_vectors,
)
from unsc_lightning.nullspace.gram import FLOAT32_GRAM_MAX_THRESHOLD

#: Energy the range found by the low-rank path (:func:`~unsc_lightning.nullspace.eigen.eigh_descending` with ``rank_bound``) may
#: miss where the energy cut decides the rank (threshold at most
#: :data:`~unsc_lightning.nullspace.gram.FLOAT32_GRAM_MAX_THRESHOLD`): float32 Gram
#: products leave rounding noise (far below ``1e-6`` of the trace) outside the data's range,
#: which the strict :data:`RELATIVE_TOLERANCE` would send to a dense ``d x d`` decomposition.
ENERGY_CUT_RANGE_TOLERANCE = 1e-6


def range_tolerance(threshold: float) -> float:
    """Energy fraction the low-rank range may miss for a basis kept at ``threshold``."""
    return (
        ENERGY_CUT_RANGE_TOLERANCE
        if threshold <= FLOAT32_GRAM_MAX_THRESHOLD
        else RELATIVE_TOLERANCE
    )


#: a threshold per class: one fraction for every class, or ``class id -> fraction``
ClassThreshold = float | Callable[[int], float]

#: the rules compute every eigenvector of the tridiagonal matrix (divide and conquer) when they
#: keep more than this fraction of them: then ``dstevd`` for all is as fast as ``dstemr`` for
#: the kept ones (``benchmarks/bench_resnet_bases.py``)
ALL_VECTORS_ABOVE = 0.3


@dataclass(frozen=True)
class ClassRows:
    """One class's covariance ``Rᵀ R`` held as its rows ``R`` (``n x d``, ``n`` well below
    ``d``; see :func:`~unsc_lightning.nullspace.gram.held_rows`): :func:`per_class_basis` then
    works on the rows, never on a ``d x d`` matrix."""

    rows: Tensor

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def trace(self) -> float:
        """``trace(Rᵀ R) = ‖R‖²``."""
        return float(self.rows.to(torch.float64).square().sum())

    def covariance(self) -> Tensor:
        """``Rᵀ R`` in float64 (``d x d``)."""
        rows = self.rows.to(torch.float64)
        return rows.T @ rows


@dataclass(frozen=True)
class BasisInfo:
    """What a basis keeps: row dimension, rank and the fraction of remaining energy captured."""

    dim: int
    rank: int
    energy: float


def pooled_basis(
    cov: Tensor, threshold: float, rank_bound: int | None = None
) -> tuple[Tensor, BasisInfo]:
    """Top eigenvectors of one covariance reaching ``threshold`` of its energy.

    On the CPU only the kept eigenvectors are computed (see :func:`top_vectors`) unless
    ``rank_bound`` allows the small eigenproblem of :func:`eigh_descending`.

    Args:
        cov: the covariance.
        threshold: energy fraction.
        rank_bound: upper bound on ``rank(cov)`` (see :func:`eigh_descending`).

    Returns:
        ``(U, info)`` with ``U`` float64 ``d x r`` orthonormal.
    """
    cov = symmetrize(cov)
    found = None
    if partial_pays(cov, rank_bound):
        found = top_vectors(cov, threshold, all_vectors_above=ALL_VECTORS_ABOVE)
    if found is None:
        return pooled_basis_from_all_eigenpairs(cov, threshold, rank_bound)
    vectors, values = found
    return vectors, _pooled_info(cov.shape[0], values, vectors.shape[1])


def pooled_rows_basis(held: ClassRows, threshold: float) -> tuple[Tensor, BasisInfo]:
    """:func:`pooled_basis` of the covariance ``Rᵀ R`` of rows held as rows (``n`` well below
    ``d``): the top right singular vectors of ``R``, from its ``n x n`` Gram, no ``d x d`` matrix."""
    rows = held.rows.to(torch.float64)
    basis = _extend_rows(rows.new_zeros(held.dim, 0), rows, threshold)
    total = float(rows.square().sum())
    kept = float((rows @ basis).square().sum()) if basis.shape[1] else 0.0
    return basis, BasisInfo(
        dim=held.dim, rank=basis.shape[1], energy=kept / total if total > 0 else 1.0
    )


def _pooled_info(dim: int, values: Tensor, rank: int) -> BasisInfo:
    # the kept fraction of the eigenvalues' sum (`values` may be fewer than `dim`: the others
    # are zero)
    total = float(values.sum())
    energy = float(values[:rank].sum() / total) if total > 0 else 1.0
    return BasisInfo(dim=dim, rank=rank, energy=energy)


def pooled_basis_from_all_eigenpairs(
    cov: Tensor, threshold: float, rank_bound: int | None = None
) -> tuple[Tensor, BasisInfo]:
    """:func:`pooled_basis` from every eigenpair of :func:`eigh_descending`: its fallback off
    the CPU or where LAPACK fails, and the reference its partial decomposition must match."""
    values, vectors = eigh_descending(cov, rank_bound, tolerance=range_tolerance(threshold))
    rank = energy_rank(values, threshold, float(values.sum()))
    return vectors[:, :rank].contiguous(), _pooled_info(cov.shape[0], values, rank)


def _orthonormal_extension(basis: Tensor, new: Tensor) -> Tensor:
    # Residual eigenvectors are orthogonal to ``basis`` up to rounding; re-orthogonalise so the
    # projector stays exact after many classes.
    if basis.shape[1]:
        new = new - basis @ (basis.T @ new)
    new, _ = torch.linalg.qr(new)
    return torch.cat([basis, new], dim=1)


def _class_directions(
    cov: Tensor,
    basis: Tensor,
    threshold: float,
    total: float,
    captured: float,
    bound: int | None,
    product: Tensor | None = None,
) -> Tensor:
    # the residual eigenvectors that extend ``basis`` for one class (the energy rule's rank);
    # ``product`` is ``cov @ basis`` when the caller has it
    dim = cov.shape[0]
    if partial_pays(cov, bound):
        # all the tridiagonal eigenvectors by divide and conquer once many are kept, as in
        # the pooled rule
        found = top_vectors(
            cov, threshold, total, captured, basis, product, all_vectors_above=ALL_VECTORS_ABOVE
        )
        if found is not None:
            return found[0]
    values, vectors = eigh_descending(
        cov, bound, basis, range_tolerance(threshold), symmetric=True, product=product
    )
    rank = energy_rank(values, threshold, total, captured)
    return vectors[:, : min(rank, dim - basis.shape[1])]


def extend_by_class(
    basis: Tensor, cov: Tensor, threshold: float, rank_bound: int | None = None
) -> Tensor:
    """One step of :func:`per_class_basis`: ``basis`` extended for one class's covariance.

    Args:
        basis: orthonormal float64 ``d x r`` (possibly ``r = 0``), on ``cov``'s device.
        cov: the class's ``d x d`` covariance.
        threshold: the class's energy fraction (values above 1 count as 1).
        rank_bound: upper bound on ``rank(cov)`` (see :func:`eigh_descending`).

    Returns:
        ``basis`` with the new directions appended (the same tensor when none is needed).
    """
    return _extend(basis, symmetrize(cov.to(basis.device)), threshold, rank_bound)


def _extend(basis: Tensor, cov: Tensor, threshold: float, rank_bound: int | None) -> Tensor:
    # :func:`extend_by_class` on a symmetric float64 ``cov``
    dim = cov.shape[0]
    total = float(torch.trace(cov))
    width = basis.shape[1]
    product = cov @ basis if width else None
    captured = float((product * basis).sum()) if product is not None else 0.0  # trace(Uᵀ C U)
    eps = min(threshold, 1.0)
    # what `energy_rank` decides without any eigenvalue: nothing (more) to capture
    if total <= 0 or eps * total - captured <= RELATIVE_TOLERANCE * total or width >= dim:
        return basis
    vectors = _class_directions(cov, basis, eps, total, captured, rank_bound, product)
    return _orthonormal_extension(basis, vectors) if vectors.shape[1] else basis


def _extend_rows(basis: Tensor, rows: Tensor, threshold: float) -> Tensor:
    # :func:`_extend` for the covariance ``Rᵀ R`` of float64 rows ``R`` (``n x d``): the energy
    # ``U`` captures is ``‖R U‖²`` and the residual ``(I - UUᵀ) Rᵀ R (I - UUᵀ)`` has the right
    # singular vectors of ``R - (R U) Uᵀ`` as eigenvectors and their squared singular values
    # as eigenvalues: ``O(n d (n + r))``, no ``d x d`` matrix
    dim = rows.shape[1]
    width = basis.shape[1]
    total = float(rows.square().sum())
    product = rows @ basis if width else None
    captured = float(product.square().sum()) if product is not None else 0.0
    eps = min(threshold, 1.0)
    if total <= 0 or eps * total - captured <= RELATIVE_TOLERANCE * total or width >= dim:
        return basis
    residual = rows if product is None else rows - product @ basis.T
    # the residual's n x n Gram E Eᵀ = W Λ Wᵀ gives the eigenpairs (Λ, Eᵀ W Λ^-½): no ``d x d``
    # matrix, and float64 products (the covariances' own precision is that of their sums)
    small = symmetrize(residual @ residual.T)
    scale = float(torch.trace(small).clamp_min(torch.finfo(torch.float64).tiny))
    try:
        values, vectors = torch.linalg.eigh(small / scale)
    except (torch.linalg.LinAlgError, RuntimeError):  # the covariance's decomposition instead
        return _extend(basis, symmetrize(rows.T @ rows), threshold, rows.shape[0])
    values, vectors = values.flip(0).clamp_min(0) * scale, vectors.flip(1)
    rank = min(energy_rank(values, eps, total, captured), dim - width)
    if not rank:
        return basis
    directions = (residual.T @ vectors[:, :rank]) / values[:rank].sqrt()
    return _orthonormal_extension(basis, directions)


def per_class_basis(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: ClassThreshold,
    basis: Tensor | None = None,
    rank_bounds: Mapping[int, int] | None = None,
) -> tuple[Tensor, BasisInfo]:
    """The paper's Algorithm 1: grow one basis class by class, in ascending class id.

    For each class ``k`` the basis ``U`` is extended with the top eigenvectors of the residual
    ``(I - UUᵀ) C_k (I - UUᵀ)`` until the energy of class ``k`` captured by ``U`` reaches
    ``threshold(k)`` (a float applies to every class; the authors use ``0.97 + 0.003 k``).

    A class whose energy ``U`` already captures needs no eigendecomposition; on the CPU only the
    kept eigenvectors of the residual are computed (see :func:`top_vectors`).

    Args:
        class_covariances: ``class id -> d x d`` covariance of the class's rows, or
            :class:`ClassRows` (the rows themselves, when they are few).
        threshold: energy fraction per class, a float or ``k -> fraction``.
        basis: an orthonormal ``d x r`` basis from earlier (lower) classes to extend; classes
            can then be processed in ascending groups, one group's covariances at a time.
        rank_bounds: ``class id -> upper bound on rank(C_k)`` (rows summed into it): classes
            with fewer rows than ``d`` then need only a small eigenproblem each.

    Returns:
        ``(U, info)`` where ``info.energy`` is the captured fraction of the given classes' energy.
    """
    return _class_by_class(class_covariances, threshold, basis, rank_bounds)


def _class_by_class(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: ClassThreshold,
    basis: Tensor | None,
    rank_bounds: Mapping[int, int] | None,
) -> tuple[Tensor, BasisInfo]:
    # Algorithm 1's loop: the basis grows for one class at a time, in ascending class id
    classes = sorted(class_covariances)
    if not classes:
        raise ValueError(
            "`class_covariances` is empty: there is no remaining class to build a basis from."
        )
    first = class_covariances[classes[0]]
    dim = first.dim if isinstance(first, ClassRows) else first.shape[0]
    device = first.rows.device if isinstance(first, ClassRows) else first.device
    if basis is None:
        basis = torch.zeros(dim, 0, dtype=torch.float64, device=device)
    basis = basis.to(device=device, dtype=torch.float64)
    summed: Tensor | None = None
    held: list[Tensor] = []  # float64 rows of the classes held as rows
    for k in classes:
        item = class_covariances[k]
        eps = threshold(k) if callable(threshold) else threshold
        if isinstance(item, ClassRows):
            rows = item.rows.to(device=basis.device, dtype=torch.float64)
            held.append(rows)
            basis = _extend_rows(basis, rows, eps)
            continue
        cov = symmetrize(item.to(basis.device))
        summed = cov.clone() if summed is None else summed.add_(cov)
        bound = None if rank_bounds is None else rank_bounds.get(k)
        basis = _extend(basis, cov, eps, bound)
    total_energy = sum(float(rows.square().sum()) for rows in held)
    kept = sum(float((rows @ basis).square().sum()) for rows in held) if basis.shape[1] else 0.0
    if summed is not None:
        total_energy += float(torch.trace(summed))
        kept += float(((summed @ basis) * basis).sum()) if basis.shape[1] else 0.0
    energy = kept / total_energy if total_energy > 0 else 1.0
    return basis, BasisInfo(dim=dim, rank=basis.shape[1], energy=energy)


def class_threshold_schedule(threshold: float, step: float) -> Callable[[int], float]:
    """``k -> min(threshold + step * k, 1.0)``; the authors use ``threshold=0.97, step=0.003``."""

    def schedule(k: int) -> float:
        return min(threshold + step * k, 1.0)

    return schedule
