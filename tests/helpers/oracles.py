"""Reference implementations the library's fast paths are checked against (tests and benchmarks).

:func:`dense_per_class_basis` is the paper's Algorithm 1 written plainly: for each remaining class
in ascending order, a full ``eigh`` of the class's ``d x d`` residual covariance
``(I - UUᵀ) C_k (I - UUᵀ)`` and the top eigenvectors until the class's captured energy reaches its
threshold. The library reaches the same bases with partial decompositions, small eigenproblems of
low-rank covariances and classes held as rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from unsc_lightning.nullspace.eigen import eigh_descending, energy_rank, symmetrize
from unsc_lightning.nullspace.rules import (
    BasisInfo,
    ClassRows,
    pooled_basis_from_all_eigenpairs,
)

#: the pooled rule from every eigenpair (the reference for the partial decomposition)
dense_pooled_basis = pooled_basis_from_all_eigenpairs


def dense_extend(basis: Tensor, cov: Tensor, threshold: float, rank_bound: int | None) -> Tensor:
    """One class of Algorithm 1 on a symmetric float64 ``cov``, by a full ``eigh``."""
    total = float(torch.trace(cov))
    captured = float(torch.trace(basis.T @ cov @ basis)) if basis.shape[1] else 0.0
    values, vectors = eigh_descending(cov, rank_bound, basis)
    rank = energy_rank(values, min(threshold, 1.0), total, captured)
    rank = min(rank, cov.shape[0] - basis.shape[1])
    if not rank:
        return basis
    new = vectors[:, :rank]
    if basis.shape[1]:
        new = new - basis @ (basis.T @ new)
    new, _ = torch.linalg.qr(new)
    return torch.cat([basis, new], dim=1)


def dense_per_class_basis(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: float | Callable[[int], float],
    basis: Tensor | None = None,
    rank_bounds: Mapping[int, int] | None = None,
) -> tuple[Tensor, BasisInfo]:
    """Algorithm 1 by full eigendecompositions (``ClassRows`` become their covariance)."""
    classes = sorted(class_covariances)
    if not classes:
        raise ValueError("`class_covariances` is empty.")
    covariances = {
        k: (item.covariance() if isinstance(item, ClassRows) else item)
        for k, item in class_covariances.items()
    }
    first = covariances[classes[0]]
    dim, device = first.shape[0], first.device
    if basis is None:
        basis = torch.zeros(dim, 0, dtype=torch.float64, device=device)
    basis = basis.to(device=device, dtype=torch.float64)
    summed: Tensor | None = None
    for k in classes:
        eps = threshold(k) if callable(threshold) else threshold
        cov = symmetrize(covariances[k].to(basis.device))
        summed = cov.clone() if summed is None else summed.add_(cov)
        bound = None if rank_bounds is None else rank_bounds.get(k)
        basis = dense_extend(basis, cov, eps, bound)
    assert summed is not None
    total = float(torch.trace(summed))
    kept = float(((summed @ basis) * basis).sum()) if basis.shape[1] else 0.0
    energy = kept / total if total > 0 else 1.0
    return basis, BasisInfo(dim=dim, rank=basis.shape[1], energy=energy)
