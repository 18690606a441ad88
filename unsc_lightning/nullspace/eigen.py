"""Eigendecompositions of symmetric PSD covariances, and the energy cut on their eigenvalues.

For a covariance ``C = R Rᵀ`` of representation rows, the eigenvectors are the left singular
vectors of ``R`` and the eigenvalues are ``σ²``. Three ways to the leading eigenpairs:

- :func:`eigh_descending`: a dense ``eigh`` on a trace-normalised copy (an SVD where ``eigh``
  fails to converge), or, given a rank bound well below ``d`` (:func:`low_rank_pays`), a small
  eigenproblem on a sample of the range;
- :func:`top_vectors`: on the CPU, only the eigenvectors the energy rule keeps, from one
  tridiagonal reduction (SciPy's LAPACK);
- :func:`energy_rank`: how many leading eigenvalues reach a fraction of the energy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unsc_lightning.nullspace.context import torch_threads

#: Eigenvalues below ``RELATIVE_TOLERANCE * trace`` are numerically zero: ``threshold=1.0`` keeps
#: every direction above it, not all ``d``. Float32 rows accumulated in float64 leave spurious
#: eigenvalues near ``1e-14 * trace``; genuine directions of real data sit far above ``1e-10``.
RELATIVE_TOLERANCE = 1e-10

#: the low-rank path samples the range of a covariance of rank at most ``n`` with ``n`` plus
#: this many Gaussian columns
LOW_RANK_OVERSAMPLE = 8


def low_rank_pays(rank_bound: int | None, dim: int) -> bool:
    """Whether a ``dim x dim`` covariance of rank at most ``rank_bound`` is decomposed from a
    sample of its range (:func:`eigh_descending`): when the sample is under a third of ``dim``
    wide, its small eigenproblem costs ``O(d² n)`` instead of ``O(d³)``."""
    return rank_bound is not None and 3 * (rank_bound + LOW_RANK_OVERSAMPLE) < dim


#: the tile of :func:`symmetrize`'s transposed addition above which tiles are used
_SYMMETRIC_TILE = 512


def symmetrize(cov: Tensor) -> Tensor:
    """``(C + Cᵀ) / 2`` in float64, into one new ``d x d`` tensor."""
    # A wide matrix is added tile by tile: the transposed operand is read a cache-sized tile at
    # a time, with the same arithmetic, so the result is bitwise the untiled one
    cov = cov.detach().to(dtype=torch.float64)
    dim = cov.shape[0]
    tile = _SYMMETRIC_TILE
    if dim <= 2 * tile:
        return torch.add(cov, cov.T).mul_(0.5)
    out = torch.empty_like(cov)
    for i in range(0, dim, tile):
        for j in range(0, dim, tile):
            torch.add(
                cov[i : i + tile, j : j + tile],
                cov[j : j + tile, i : i + tile].T,
                out=out[i : i + tile, j : j + tile],
            )
    return out.mul_(0.5)


def _residual(cov: Tensor, basis: Tensor | None) -> Tensor:
    # (I - UUᵀ) C (I - UUᵀ) in O(d² r), never forming the dense d x d projector
    if basis is None or not basis.shape[1]:
        return cov
    cu = cov @ basis
    inner = basis.T @ cu
    return cov - basis @ cu.T - cu @ basis.T + basis @ inner @ basis.T


def _residual_symmetric(cov: Tensor, basis: Tensor, product: Tensor | None = None) -> Tensor:
    # the same residual in 4 d² r flops, exactly symmetric: with A = C U (``product``, when the
    # caller has it) and B = A - U (Uᵀ A) / 2, (I - UUᵀ) C (I - UUᵀ) = C - (U Bᵀ + B Uᵀ) since
    # Uᵀ A = Uᵀ C U
    if not basis.shape[1]:
        return cov
    product = cov @ basis if product is None else product
    half = product - basis @ ((basis.T @ product) / 2)
    outer = basis @ half.T
    return cov - (outer + outer.T)


def eigh_descending(
    cov: Tensor,
    rank_bound: int | None = None,
    basis: Tensor | None = None,
    tolerance: float = RELATIVE_TOLERANCE,
    symmetric: bool = False,
    product: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix.

    Works in float64 on a trace-normalised copy. ``torch.linalg.eigh`` can fail to converge on
    covariances with many exactly-zero eigenvalues (dead ReLU channels); the SVD of a symmetric
    PSD matrix gives the same decomposition, so it is the fallback.

    Args:
        cov: ``d x d`` symmetric PSD matrix.
        rank_bound: an upper bound on ``rank(cov)`` (e.g. the number of rows it was summed
            from). When it is well below ``d``, the range of ``cov`` is found exactly from
            ``cov Ω`` with a Gaussian ``Ω`` of ``rank_bound + LOW_RANK_OVERSAMPLE`` columns and only a small
            eigenproblem is solved: ``O(d² m)`` instead of ``O(d³)``. Only the eigenpairs in
            that range are returned (the others are zero).
        basis: orthonormal ``U``: decompose the residual ``(I - UUᵀ) cov (I - UUᵀ)`` instead.
        tolerance: energy fraction the low-rank range may miss before the dense decomposition
            runs instead (see :func:`~unsc_lightning.nullspace.rules.range_tolerance`).
        symmetric: ``cov`` is already an exactly symmetric float64 matrix (no copy is made).
        product: ``cov @ basis``, when the caller has it.
    """
    if not symmetric:
        cov = symmetrize(cov)
    dim = cov.shape[0]
    if low_rank_pays(rank_bound, dim):
        assert rank_bound is not None
        found = _low_rank_eigh(cov, rank_bound + LOW_RANK_OVERSAMPLE, basis, tolerance, product)
        if found is not None:
            return found
    cov = symmetrize(_residual(cov, basis))
    # For PSD ``cov`` the trace bounds every entry, so this is the trace; a residual covariance
    # that is pure rounding noise can have trace <= 0, and dividing by ``tiny`` would overflow.
    scale = torch.maximum(torch.trace(cov), cov.abs().max())
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)
    normalised = cov / scale
    try:
        values, vectors = torch.linalg.eigh(normalised)
        values, vectors = values.flip(0), vectors.flip(1)
    except (torch.linalg.LinAlgError, RuntimeError):
        vectors, values, _ = torch.linalg.svd(normalised)
    return values.clamp_min(0) * scale, vectors


def _low_rank_eigh(
    cov: Tensor,
    columns: int,
    basis: Tensor | None,
    tolerance: float = RELATIVE_TOLERANCE,
    product: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    # rank(cov) < columns: range(cov Ω) = range(cov) for a Gaussian Ω (with probability one),
    # so the eigenpairs of the small matrix Qᵀ cov Q are those of cov. Directions whose
    # eigenvalues are many orders below the largest are resolved less accurately from cov Ω
    # than by a dense eigh: when Q misses more energy than the tolerance allows, the caller
    # falls back to the dense decomposition (``None``).
    def project_out(matrix: Tensor) -> Tensor:
        if basis is None or not basis.shape[1]:
            return matrix
        return matrix - basis @ (basis.T @ matrix)

    generator = torch.Generator().manual_seed(0)
    omega = torch.randn(cov.shape[0], columns, generator=generator, dtype=torch.float64)
    sample = project_out(cov @ project_out(omega.to(cov.device)))
    # an orthonormal basis of the sample's range, re-projected (rounding in the factorisation
    # leaves a trace of the old basis) and cut at its numerical rank: with fewer free
    # dimensions than columns, the surplus columns are noise that must not be normalised up
    q = _numerical_range(sample)
    # trace((I - UUᵀ) C (I - UUᵀ)) = trace(C) - trace(Uᵀ C U) for orthonormal U: O(d² r) at
    # most (nothing when the caller has C U), no d x d residual
    residual_trace = torch.trace(cov)
    if basis is not None and basis.shape[1]:
        q = _outside(q, basis)
        product = cov @ basis if product is None else product
        residual_trace = residual_trace - (product * basis).sum()
    small = symmetrize(q.T @ cov @ q)
    missed = abs(float(residual_trace - torch.trace(small)))
    if missed > tolerance * float(torch.trace(cov)):
        return None
    scale = torch.trace(small).abs().clamp_min(torch.finfo(torch.float64).tiny)
    try:
        values, vectors = torch.linalg.eigh(small / scale)
        values, vectors = values.flip(0), vectors.flip(1)
    except (torch.linalg.LinAlgError, RuntimeError):
        vectors, values, _ = torch.linalg.svd(small / scale)
    return values.clamp_min(0) * scale, q @ vectors


def _numerical_range(sample: Tensor) -> Tensor:
    # orthonormal columns spanning ``sample``'s range, cut at its numerical rank
    left, singular, _ = torch.linalg.svd(sample, full_matrices=False)
    keep = singular > singular.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-12
    return left[:, keep]


def _outside(columns: Tensor, basis: Tensor) -> Tensor:
    # Orthonormal columns spanning ``(I - UUᵀ) columns`` for orthonormal ``columns`` that lie
    # outside span(U) up to rounding (which the projection removes): a QR re-orthonormalises
    # them. A column that loses over half its norm to the projection was not outside span(U);
    # an SVD then cuts the projected columns at their numerical rank instead, so that no
    # rounding noise is normalised up into a direction.
    def project_out(matrix: Tensor) -> Tensor:
        return matrix - basis @ (basis.T @ matrix)

    projected = project_out(columns)
    reduced, upper = torch.linalg.qr(projected)
    if bool((upper.diagonal().abs() > 0.5).all()):
        return project_out(reduced)
    return project_out(_numerical_range(projected))


def energy_rank(values: Tensor, threshold: float, total: float, captured: float = 0.0) -> int:
    """Smallest ``r`` with ``captured + Σ_{i<r} values[i] >= threshold * total``.

    Only numerically non-zero values (above ``RELATIVE_TOLERANCE * total``) count, so
    ``threshold=1.0`` keeps every non-zero direction.

    Args:
        values: eigenvalues in descending order.
        threshold: energy fraction in ``(0, 1]``.
        total: the energy the fraction refers to.
        captured: energy already captured by an existing basis.
    """
    if total <= 0:
        return 0
    significant = int((values > RELATIVE_TOLERANCE * total).sum())
    needed = threshold * total - captured
    if needed <= RELATIVE_TOLERANCE * total:
        return 0
    cumulative = torch.cumsum(values[:significant], 0)
    reached = torch.nonzero(cumulative >= needed * (1 - 1e-12))
    return int(reached[0]) + 1 if reached.numel() else significant


#: Below this dimension a dense ``eigh`` is as cheap as the partial (tridiagonal) one.
_PARTIAL_MIN_DIM = 32


def partial_pays(cov: Tensor, rank_bound: int | None) -> bool:
    """Whether :func:`top_vectors` should decompose ``cov``: on the CPU, above a small
    dimension, unless a rank bound allows the small eigenproblem of :func:`eigh_descending`."""
    dim = cov.shape[0]
    low_rank = low_rank_pays(rank_bound, dim)
    return cov.device.type == "cpu" and dim >= _PARTIAL_MIN_DIM and not low_rank


def _complement_cheaper(dim: int, width: int) -> bool:
    # flop estimates: the d x d residual (4 d² r + 4 d r²) and its tridiagonal reduction, against
    # an orthonormal complement Q (QR of U, then Q = H [0; I]: 2 d r² + 4 d n r), Qᵀ C Q
    # (2 d² n + 2 d n²) and the reduction of that n x n matrix; the reduction (half of it
    # matrix-vector work) counts about four flops per flop of a matrix product
    free = dim - width
    residual = 4 * dim * dim * width + 4 * dim * width * width + 4 * dim**3
    complement = 2 * dim * width * width + 4 * dim * free * width
    complement += 2 * dim * dim * free + 2 * dim * free * free + 4 * free**3
    return complement < residual


@torch_threads()  # SciPy's LAPACK on torch's thread count
def top_vectors(
    cov: Tensor,
    threshold: float,
    total: float | None = None,
    captured: float = 0.0,
    basis: Tensor | None = None,
    product: Tensor | None = None,
    all_vectors_above: float = 1.0,
) -> tuple[Tensor, Tensor] | None:
    """The leading eigenvectors the energy rule keeps, without a full ``eigh``.

    The matrix decomposed is ``cov`` (symmetric float64), or with an orthonormal ``basis`` ``U``
    the residual ``(I - UUᵀ) C (I - UUᵀ)``. Its nonzero eigenpairs are those of ``Qᵀ C Q`` for an
    orthonormal complement ``Q`` (``d x (d - r)``) of ``U``, mapped by ``Q``: once ``U`` holds a
    good part of the dimensions, the smaller matrix is decomposed instead. Either matrix is
    reduced to tridiagonal form once (LAPACK ``dsytrd``, a fraction of a full ``eigh``); its
    eigenvalues alone (``dsterf``, ``O(d²)``) decide the rank (:func:`energy_rank` of
    ``threshold`` with ``total`` and ``captured``; ``total=None`` is the sum of the eigenvalues),
    and only that many eigenvectors are computed (``dstemr``) and transformed back. When the rank
    exceeds ``all_vectors_above`` times the size, every eigenvector of the tridiagonal matrix is
    computed by divide and conquer (``dstevd``, then cheaper than ``dstemr``) and only the kept
    ones are transformed back. The eigenvalues and the kept subspace are those of
    :func:`eigh_descending` up to rounding.

    Returns:
        ``(vectors, values)``: the kept ``d x rank`` eigenvectors and every eigenvalue of the
        decomposed matrix (descending, clamped at 0); ``None`` (the caller decomposes densely)
        when LAPACK reports a failure or the matrix is smaller than 3 x 3. CPU float64 only.
    """
    import numpy as np
    from scipy.linalg import lapack

    dim = cov.shape[0]
    width = 0 if basis is None else basis.shape[1]
    complement: Tensor | None = None
    if basis is not None and width and _complement_cheaper(dim, width):
        reflectors, tau = torch.geqrf(basis)
        corner = torch.zeros(dim, dim - width, dtype=cov.dtype)
        corner[width:].fill_diagonal_(1.0)
        complement = torch.ormqr(reflectors, tau, corner)  # columns r.. of the full Q of U
        projected = complement.T @ (cov @ complement)
        matrix = (projected + projected.T) / 2
    elif basis is not None:
        matrix = _residual_symmetric(cov, basis, product)
    else:
        matrix = cov
    size = matrix.shape[0]
    if size < 3:
        return None
    largest = torch.maximum(torch.trace(matrix), matrix.abs().max())
    scale = float(largest.clamp_min(torch.finfo(torch.float64).tiny))
    # a new C-contiguous symmetric array: its transpose is the same matrix in Fortran order (no
    # copy), and LAPACK may overwrite it
    normalised = (matrix / scale).numpy().T
    work, info = lapack.dsytrd_lwork(size, lower=1)
    if info:
        return None
    packed, diagonal, off, tau_t, info = lapack.dsytrd(
        normalised, lower=1, lwork=max(int(work), size), overwrite_a=1
    )
    if info:
        return None
    ascending, info = lapack.dsterf(diagonal, off)  # every eigenvalue, no vector: O(d²)
    if info:
        return None
    values = torch.from_numpy(ascending[::-1].copy()).clamp_min(0) * scale
    total = float(values.sum()) if total is None else total
    rank = min(energy_rank(values, threshold, total, captured), dim - width)
    if rank == 0:
        return cov.new_zeros(dim, 0), values
    if rank > all_vectors_above * size:
        _, vectors, info = lapack.dstevd(diagonal, off)  # ascending: the kept ones are the last
        if info:
            return None
        vectors = vectors[:, size - rank :]
    else:
        padded = np.concatenate([off, [0.0]])
        found, _, vectors, info = lapack.dstemr(
            diagonal, padded, 2, 0.0, 0.0, size - rank + 1, size
        )
        if info or found != rank:
            return None
        vectors = vectors[:, :rank]
    small = torch.from_numpy(vectors[:, ::-1].copy(order="C"))
    # Q = diag(1, H_1 ... H_{n-1}): the reflectors below the subdiagonal, in QR (geqrf) layout
    below = torch.from_numpy(np.ascontiguousarray(packed[1:, :-1]))
    rotated = torch.ormqr(below, torch.from_numpy(tau_t.copy()), small[1:])
    directions = torch.cat([small[:1], rotated])
    return (directions if complement is None else complement @ directions), values
