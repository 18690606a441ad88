"""Remaining-subspace bases from covariances: eigendecomposition and the energy rule.

For a covariance ``C = R Rᵀ`` of representation rows, the eigenvectors are the left singular
vectors of ``R`` and the eigenvalues are ``σ²``; keeping the top ``r`` eigenvectors whose
eigenvalues reach a fraction ``ε`` of ``trace(C)`` is the SVD energy rule of GPM (Saha et al.,
ICLR 2021) used by UNSC (Chen et al., IJCAI 2024, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from unsc_lightning.nullspace.context import torch_threads
from unsc_lightning.nullspace.covariance import FLOAT32_GRAM_MAX_THRESHOLD

#: Eigenvalues below ``RELATIVE_TOLERANCE * trace`` are numerically zero: ``threshold=1.0`` keeps
#: every direction above it, not all ``d``. Float32 rows accumulated in float64 leave spurious
#: eigenvalues near ``1e-14 * trace``; genuine directions of real data sit far above ``1e-10``.
RELATIVE_TOLERANCE = 1e-10

Threshold = float | Callable[[int], float]

#: Energy the range found by the low-rank path (:func:`eigh_descending` with ``rank_bound``) may
#: miss where the energy cut decides the rank (threshold at most
#: :data:`~unsc_lightning.nullspace.covariance.FLOAT32_GRAM_MAX_THRESHOLD`): float32 Gram
#: products leave rounding noise (measured near 1e-9 of the trace) outside the data's range,
#: which the strict :data:`RELATIVE_TOLERANCE` would send to a dense ``d x d`` decomposition.
ENERGY_CUT_RANGE_TOLERANCE = 1e-6


def range_tolerance(threshold: float) -> float:
    """Energy fraction the low-rank range may miss for a basis kept at ``threshold``."""
    return (
        ENERGY_CUT_RANGE_TOLERANCE
        if threshold <= FLOAT32_GRAM_MAX_THRESHOLD
        else RELATIVE_TOLERANCE
    )


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


#: the tile of :func:`_symmetric`'s transposed addition above which tiles are used
_SYMMETRIC_TILE = 512


def _symmetric(cov: Tensor) -> Tensor:
    # (C + Cᵀ) / 2 into one new d x d tensor. A wide matrix is added tile by tile: the
    # transposed operand is read a cache-sized tile at a time (1.7x faster at d = 4608 on CPU,
    # one thread), with the same arithmetic, so the result is bitwise the untiled one
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
            ``cov Ω`` with a Gaussian ``Ω`` of ``rank_bound + 8`` columns and only a small
            eigenproblem is solved: ``O(d² m)`` instead of ``O(d³)``. Only the eigenpairs in
            that range are returned (the others are zero).
        basis: orthonormal ``U``: decompose the residual ``(I - UUᵀ) cov (I - UUᵀ)`` instead.
        tolerance: energy fraction the low-rank range may miss before the dense decomposition
            runs instead (see :func:`range_tolerance`).
        symmetric: ``cov`` is already an exactly symmetric float64 matrix (no copy is made).
        product: ``cov @ basis``, when the caller has it.
    """
    if not symmetric:
        cov = _symmetric(cov)
    dim = cov.shape[0]
    if rank_bound is not None and 3 * (rank_bound + 8) < dim:
        found = _low_rank_eigh(cov, rank_bound + 8, basis, tolerance, product)
        if found is not None:
            return found
    cov = _symmetric(_residual(cov, basis))
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
    small = _symmetric(q.T @ cov @ q)
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


def pooled_basis(
    cov: Tensor, threshold: float, rank_bound: int | None = None
) -> tuple[Tensor, BasisInfo]:
    """Top eigenvectors of one covariance reaching ``threshold`` of its energy.

    On the CPU only the kept eigenvectors are computed (see :func:`_top_vectors`) unless
    ``rank_bound`` allows the small eigenproblem of :func:`eigh_descending`.

    Args:
        cov: the covariance.
        threshold: energy fraction.
        rank_bound: upper bound on ``rank(cov)`` (see :func:`eigh_descending`).

    Returns:
        ``(U, info)`` with ``U`` float64 ``d x r`` orthonormal.
    """
    cov = _symmetric(cov)
    found = None
    if _partial_pays(cov, rank_bound):
        found = _top_vectors(cov, threshold, all_vectors_above=_ALL_VECTORS_ABOVE)
    if found is None:
        return _dense_pooled_basis(cov, threshold, rank_bound)
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


def _dense_pooled_basis(
    cov: Tensor, threshold: float, rank_bound: int | None = None
) -> tuple[Tensor, BasisInfo]:
    # The former implementation (every eigenpair from `eigh_descending`): the fallback of
    # :func:`pooled_basis` and the reference the tests and benchmarks compare it with.
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


#: Below this dimension a dense ``eigh`` is as cheap as the partial (tridiagonal) one.
_PARTIAL_MIN_DIM = 32


#: :func:`pooled_basis` computes every eigenvector of the tridiagonal matrix (divide and conquer)
#: when it keeps more than this fraction of them: measured (``benchmarks/bench_resnet_bases.py``,
#: d = 576 to 4608), ``dstevd`` for all is as fast as ``dstemr`` for a third of them, and up to
#: twice as fast for all of them.
_ALL_VECTORS_ABOVE = 0.3


def _partial_pays(cov: Tensor, rank_bound: int | None) -> bool:
    # the partial decomposition (:func:`_top_vectors`) runs on the CPU, above a small dimension,
    # unless a rank bound well below ``d`` allows the small eigenproblem of `eigh_descending`
    dim = cov.shape[0]
    low_rank = rank_bound is not None and 3 * (rank_bound + 8) < dim
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
def _top_vectors(
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
    if _partial_pays(cov, bound):
        # all the tridiagonal eigenvectors by divide and conquer once many are kept, as in
        # the pooled rule (measured on AllCNN's per-class bases: 2.70 -> 2.49 s)
        found = _top_vectors(
            cov, threshold, total, captured, basis, product, all_vectors_above=_ALL_VECTORS_ABOVE
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
    return _extend(basis, _symmetric(cov.to(basis.device)), threshold, rank_bound)


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
    small = _symmetric(residual @ residual.T)
    scale = float(torch.trace(small).clamp_min(torch.finfo(torch.float64).tiny))
    try:
        values, vectors = torch.linalg.eigh(small / scale)
    except (torch.linalg.LinAlgError, RuntimeError):  # the covariance's decomposition instead
        return _extend(basis, _symmetric(rows.T @ rows), threshold, rows.shape[0])
    values, vectors = values.flip(0).clamp_min(0) * scale, vectors.flip(1)
    rank = min(energy_rank(values, eps, total, captured), dim - width)
    if not rank:
        return basis
    directions = (residual.T @ vectors[:, :rank]) / values[:rank].sqrt()
    return _orthonormal_extension(basis, directions)


def per_class_basis(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: Threshold,
    basis: Tensor | None = None,
    rank_bounds: Mapping[int, int] | None = None,
) -> tuple[Tensor, BasisInfo]:
    """The paper's Algorithm 1: grow one basis class by class, in ascending class id.

    For each class ``k`` the basis ``U`` is extended with the top eigenvectors of the residual
    ``(I - UUᵀ) C_k (I - UUᵀ)`` until the energy of class ``k`` captured by ``U`` reaches
    ``threshold(k)`` (a float applies to every class; the authors use ``0.97 + 0.003 k``).

    A class whose energy ``U`` already captures needs no eigendecomposition; on the CPU only the
    kept eigenvectors of the residual are computed (see :func:`_top_vectors`).

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
    return _class_by_class(class_covariances, threshold, basis, rank_bounds, _extend, _extend_rows)


def _dense_per_class_basis(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: Threshold,
    basis: Tensor | None = None,
    rank_bounds: Mapping[int, int] | None = None,
) -> tuple[Tensor, BasisInfo]:
    # The former rule (a full ``eigh`` of every class's d x d residual): the reference the tests
    # and benchmarks compare :func:`per_class_basis` with.
    return _class_by_class(class_covariances, threshold, basis, rank_bounds, _dense_extend)


def _dense_extend(basis: Tensor, cov: Tensor, threshold: float, rank_bound: int | None) -> Tensor:
    # one class of the former rule, on a symmetric float64 ``cov``
    total = float(torch.trace(cov))
    captured = float(torch.trace(basis.T @ cov @ basis)) if basis.shape[1] else 0.0
    values, vectors = eigh_descending(cov, rank_bound, basis)
    rank = energy_rank(values, min(threshold, 1.0), total, captured)
    rank = min(rank, cov.shape[0] - basis.shape[1])
    return _orthonormal_extension(basis, vectors[:, :rank]) if rank else basis


def _class_by_class(
    class_covariances: Mapping[int, Tensor | ClassRows],
    threshold: Threshold,
    basis: Tensor | None,
    rank_bounds: Mapping[int, int] | None,
    extend: Callable[[Tensor, Tensor, float, int | None], Tensor],
    extend_rows: Callable[[Tensor, Tensor, float], Tensor] | None = None,
) -> tuple[Tensor, BasisInfo]:
    # Algorithm 1's loop: ``extend`` grows the basis for one class, in ascending class id; a
    # class held as rows takes ``extend_rows`` (without it, ``extend`` on its covariance)
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
        if isinstance(item, ClassRows) and extend_rows is not None:
            rows = item.rows.to(device=basis.device, dtype=torch.float64)
            held.append(rows)
            basis = extend_rows(basis, rows, eps)
            continue
        matrix = item.covariance() if isinstance(item, ClassRows) else item
        cov = _symmetric(matrix.to(basis.device))
        summed = cov.clone() if summed is None else summed.add_(cov)
        bound = None if rank_bounds is None else rank_bounds.get(k)
        basis = extend(basis, cov, eps, bound)
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
