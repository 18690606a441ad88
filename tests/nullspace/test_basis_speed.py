"""The faster per-class rule equals the former dense one: same ranks, same subspaces, same energy.

``per_class_basis`` skips classes whose energy the basis already captures and, on the CPU,
computes only the kept eigenvectors of each residual (tridiagonal reduction, eigenvalues alone,
then the selected vectors). ``dense_per_class_basis`` is the former implementation (a full
``eigh`` of every d x d residual): the reference here.
"""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import dense_per_class_basis, dense_pooled_basis
from torch import Tensor

from unsc_lightning.nullspace import eigen, rules
from unsc_lightning.nullspace.rules import (
    class_threshold_schedule,
    extend_by_class,
    per_class_basis,
)

DTYPE = torch.float64
SAME = 1e-9


def projector(basis: Tensor) -> Tensor:
    return basis @ basis.T


def random_covariances(
    dim: int, classes: int, rows: int, seed: int = 0, shared: int = 0
) -> dict[int, Tensor]:
    """``classes`` covariances ``R_kᵀ R_k`` of ``rows`` rows each (rank ``min(rows, dim)``).

    The rows have a decaying spectrum; ``shared`` directions are common to every class, so later
    classes find part of their energy already in the basis.
    """
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(shared, dim, generator=generator, dtype=DTYPE) * 3
    covariances = {}
    for k in range(classes):
        scales = torch.logspace(0, -3, dim, dtype=DTYPE)
        rows_k = torch.randn(rows, dim, generator=generator, dtype=DTYPE) * scales
        rows_k = (
            rows_k @ torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))[0]
        )
        if shared:
            rows_k[:shared] += common
        covariances[k] = rows_k.T @ rows_k
    return covariances


def assert_equal_bases(
    covariances: dict[int, Tensor], threshold: object, **kwargs: object
) -> tuple[Tensor, Tensor]:
    basis, info = per_class_basis(covariances, threshold, **kwargs)  # type: ignore[arg-type]
    reference, reference_info = dense_per_class_basis(covariances, threshold, **kwargs)  # type: ignore[arg-type]
    assert info.rank == reference_info.rank == basis.shape[1] == reference.shape[1]
    assert info.dim == reference_info.dim
    assert info.energy == pytest.approx(reference_info.energy, abs=1e-12)
    torch.testing.assert_close(projector(basis), projector(reference), atol=SAME, rtol=0)
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(basis.shape[1], dtype=DTYPE), atol=1e-12, rtol=0
    )
    return basis, reference


@pytest.mark.parametrize("dim", [40, 96])
@pytest.mark.parametrize("threshold", [0.9, 0.97, 0.999, 1.0])
def test_full_rank_classes_equal_the_dense_rule(dim, threshold):
    covariances = random_covariances(dim, classes=6, rows=2 * dim, shared=dim // 4)
    basis, _ = assert_equal_bases(covariances, threshold)
    assert 0 < basis.shape[1] <= dim


def test_the_authors_schedule_equals_the_dense_rule():
    covariances = random_covariances(64, classes=10, rows=100, seed=1, shared=10)
    basis, _ = assert_equal_bases(covariances, class_threshold_schedule(0.97, 0.003))
    assert basis.shape[1] > 0


@pytest.mark.parametrize("threshold", [0.95, 1.0])
def test_low_rank_classes_equal_the_dense_rule(threshold):
    # 6 classes of 7 rows each in d = 80: the residuals have many exactly-zero eigenvalues
    covariances = random_covariances(80, classes=6, rows=7, seed=2)
    basis, _ = assert_equal_bases(covariances, threshold)
    if threshold == 1.0:
        assert basis.shape[1] == 6 * 7  # every row direction, none of the zero ones


def test_rank_bounds_take_the_low_rank_path_and_equal_the_dense_rule():
    covariances = random_covariances(120, classes=4, rows=6, seed=3)
    bounds = dict.fromkeys(covariances, 6)  # 3 * (6 + 8) < 120: the small eigenproblem
    assert_equal_bases(covariances, 0.99, rank_bounds=bounds)
    # loose bounds (dense in d) give the same subspaces too
    assert_equal_bases(covariances, 0.99, rank_bounds=dict.fromkeys(covariances, 500))


def test_group_by_group_extension_equals_one_call():
    covariances = random_covariances(72, classes=7, rows=90, seed=4, shared=12)
    schedule = class_threshold_schedule(0.97, 0.003)
    whole, _ = per_class_basis(covariances, schedule)
    first, _ = per_class_basis({k: covariances[k] for k in (0, 1, 2)}, schedule)
    grouped, _ = per_class_basis({k: covariances[k] for k in (3, 4, 5, 6)}, schedule, first)
    assert torch.equal(grouped, whole)  # the same operations in the same order
    stepped = torch.zeros(72, 0, dtype=DTYPE)
    for k in sorted(covariances):
        stepped = extend_by_class(stepped, covariances[k], schedule(k))
    assert torch.equal(stepped, whole)
    # and an initial basis in the dense reference spans the same space
    dense_first, _ = dense_per_class_basis({k: covariances[k] for k in (0, 1, 2)}, schedule)
    dense, _ = dense_per_class_basis(
        {k: covariances[k] for k in (3, 4, 5, 6)}, schedule, dense_first
    )
    torch.testing.assert_close(projector(grouped), projector(dense), atol=SAME, rtol=0)


def test_no_full_eigendecomposition_on_the_cpu(monkeypatch):
    covariances = random_covariances(64, classes=4, rows=80, seed=5, shared=8)
    expected, _ = dense_per_class_basis(covariances, 0.97)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dense eigh was computed")

    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    basis, _ = per_class_basis(covariances, 0.97)
    torch.testing.assert_close(projector(basis), projector(expected), atol=SAME, rtol=0)


def test_a_class_the_basis_already_captures_needs_no_decomposition(monkeypatch):
    generator = torch.Generator().manual_seed(6)
    rows = torch.randn(50, 48, generator=generator, dtype=DTYPE)
    inside = torch.randn(30, 50, generator=generator, dtype=DTYPE) @ rows  # in the span of rows
    covariances = {0: rows.T @ rows, 1: inside.T @ inside, 2: 2 * rows.T @ rows}
    calls: list[int] = []
    directions = rules._class_directions

    def counting(cov: Tensor, *args: object) -> Tensor:
        calls.append(cov.shape[0])
        return directions(cov, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rules, "_class_directions", counting)
    basis, info = per_class_basis(covariances, 1.0)
    assert calls == [48]  # class 0 only: classes 1 and 2 lie inside its span
    assert basis.shape[1] == 48 and info.energy == pytest.approx(1.0, abs=1e-12)


def test_a_lapack_failure_falls_back_to_the_dense_decomposition(monkeypatch):
    from scipy.linalg import lapack

    covariances = random_covariances(48, classes=3, rows=60, seed=7)
    expected, _ = dense_per_class_basis(covariances, 0.97)
    failures: list[int] = []

    def failing_sterf(diagonal: object, off: object) -> tuple[object, int]:
        failures.append(1)
        return diagonal, 1  # LAPACK's "did not converge"

    monkeypatch.setattr(lapack, "dsterf", failing_sterf)
    basis, _ = per_class_basis(covariances, 0.97)
    assert failures  # the partial path was tried ...
    torch.testing.assert_close(
        projector(basis), projector(expected), atol=SAME, rtol=0
    )  # ... and fell back


def test_threshold_one_on_a_full_basis_adds_nothing():
    covariances = random_covariances(36, classes=3, rows=80, seed=8)
    basis, info = per_class_basis(covariances, 1.0)
    assert basis.shape[1] == 36 and info.rank == 36
    again, _ = per_class_basis(covariances, 1.0, basis)
    assert torch.equal(again, basis)


def test_the_cheaper_residual_equals_the_projected_covariance():
    covariance = random_covariances(50, classes=1, rows=70, seed=9)[0]
    generator = torch.Generator().manual_seed(9)
    basis = torch.linalg.qr(torch.randn(50, 12, generator=generator, dtype=DTYPE))[0]
    projection = torch.eye(50, dtype=DTYPE) - basis @ basis.T
    residual = eigen._residual_symmetric(covariance, basis)
    expected = projection @ covariance @ projection
    torch.testing.assert_close(residual, expected, atol=1e-10 * float(expected.abs().max()), rtol=0)
    assert torch.equal(residual, residual.T)  # exactly symmetric: LAPACK reads one triangle
    assert eigen._residual_symmetric(covariance, basis[:, :0]) is covariance


@pytest.mark.parametrize("complement", [True, False])
def test_the_complement_and_the_residual_give_the_dense_rule(monkeypatch, complement):
    # the complement Q of U (d x (d - r)): Qᵀ C Q has the residual's nonzero eigenpairs
    chosen: list[bool] = []

    def choose(dim: int, width: int) -> bool:
        chosen.append(complement)
        return complement

    monkeypatch.setattr(eigen, "_complement_cheaper", choose)
    covariances = random_covariances(60, classes=6, rows=90, seed=10, shared=15)
    assert_equal_bases(covariances, class_threshold_schedule(0.97, 0.005))
    assert_equal_bases(covariances, 1.0)
    assert chosen  # classes after the first were decomposed this way


def test_the_complement_is_chosen_once_the_basis_holds_much_of_the_space():
    assert not eigen._complement_cheaper(320, 20)
    assert eigen._complement_cheaper(320, 200)
    assert eigen._complement_cheaper(864, 600)


@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_float32_products_of_few_rows_keep_the_low_rank_path(monkeypatch, rule):
    # float32 Gram products leave rounding noise outside the rows' span; where the energy cut
    # decides the rank it must not send a covariance of few rows to a dense d x d eigh

    dim, rows = 512, 40
    generator = torch.Generator().manual_seed(0)
    covariances = {}
    for k in range(3):
        x = torch.relu(torch.randn(rows, dim, generator=generator)) * torch.rand(
            dim, generator=generator
        )
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        for block in x.split(8):
            gram += torch.mm(block.T, block).double()  # float32 products, float64 sums
        covariances[k] = gram
    sizes: list[int] = []
    eigh = torch.linalg.eigh

    def counting_eigh(matrix, *args, **kwargs):
        sizes.append(matrix.shape[-1])
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    if rule == "per_class":
        found, _ = rules.per_class_basis(
            covariances, 0.97, rank_bounds=dict.fromkeys(covariances, rows)
        )
    else:
        found, _ = rules.pooled_basis(sum(covariances.values()), 0.97, 3 * rows)
    assert sizes and max(sizes) < dim  # only the small eigenproblems
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    if rule == "per_class":
        dense, _ = rules.per_class_basis(covariances, 0.97)
    else:
        dense, _ = rules.pooled_basis(sum(covariances.values()), 0.97)
    assert found.shape == dense.shape
    assert float((found @ found.T - dense @ dense.T).abs().max()) < 1e-6
    # at threshold 1.0 the strict tolerance holds: float64 products are required there
    assert rules.range_tolerance(1.0) == eigen.RELATIVE_TOLERANCE


# --------------------------------------------------------------------------------------------
# The pooled rule: only the kept eigenvectors on the CPU, the same basis as the dense `eigh`
# --------------------------------------------------------------------------------------------


def assert_equal_pooled(cov: Tensor, threshold: float, **kwargs: object) -> tuple[Tensor, int]:
    basis, info = rules.pooled_basis(cov, threshold, **kwargs)  # type: ignore[arg-type]
    reference, reference_info = dense_pooled_basis(cov, threshold, **kwargs)  # type: ignore[arg-type]
    assert info.rank == reference_info.rank == basis.shape[1] == reference.shape[1]
    assert info.dim == reference_info.dim == cov.shape[0]
    assert info.energy == pytest.approx(reference_info.energy, abs=1e-12)
    assert basis.dtype == DTYPE
    torch.testing.assert_close(projector(basis), projector(reference), atol=SAME, rtol=0)
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(basis.shape[1], dtype=DTYPE), atol=1e-12, rtol=0
    )
    return basis, info.rank


def dead_direction_covariance(dim: int, seed: int) -> Tensor:
    # ReLU rows with dead channels (exact zero rows and columns) and a duplicated channel
    generator = torch.Generator().manual_seed(seed)
    rows = torch.relu(torch.randn(3 * dim, dim, generator=generator, dtype=DTYPE))
    rows[:, ::3] = 0.0
    rows[:, 1] = rows[:, 4]
    return rows.T @ rows


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(owner, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.mark.parametrize("dim", [40, 150])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.97, 0.999, 1.0])
def test_pooled_basis_equals_the_dense_rule(monkeypatch, dim, threshold):
    eigh = count_calls(monkeypatch, torch.linalg, "eigh")
    cov = random_covariances(dim, classes=1, rows=2 * dim, seed=11)[0]
    basis, rank = assert_equal_pooled(cov, threshold)
    assert len(eigh) == 1  # the reference's only: the pooled rule took the partial path
    assert 0 < rank <= dim
    if threshold == 1.0:
        assert rank == dim


@pytest.mark.parametrize("threshold", [0.9, 1.0])
def test_pooled_basis_of_a_low_rank_covariance_equals_the_dense_rule(threshold):
    cov = random_covariances(90, classes=1, rows=17, seed=12)[0]  # rank 17, 73 zero eigenvalues
    _, rank = assert_equal_pooled(cov, threshold)
    assert rank == 17 if threshold == 1.0 else 0 < rank < 17


@pytest.mark.parametrize("threshold", [0.8, 0.97, 1.0])
def test_pooled_basis_with_dead_directions_equals_the_dense_rule(threshold):
    cov = dead_direction_covariance(60, seed=13)
    assert (cov[::3] == 0).all()  # exact zeros
    basis, rank = assert_equal_pooled(cov, threshold)
    assert basis[::3].abs().max() < 1e-12  # no dead channel in the kept directions
    if threshold == 1.0:
        assert rank == 60 - 20 - 1  # every live channel, the duplicate counted once


def test_pooled_basis_of_tiny_and_degenerate_matrices():
    assert_equal_pooled(torch.tensor([[4.0]], dtype=DTYPE), 0.97)
    assert_equal_pooled(torch.zeros(1, 1, dtype=DTYPE), 1.0)
    for dim in (2, 3, 5):
        cov = random_covariances(dim, classes=1, rows=dim + 2, seed=14)[0]
        for threshold in (0.5, 1.0):
            assert_equal_pooled(cov, threshold)
    basis, info = rules.pooled_basis(torch.zeros(48, 48, dtype=DTYPE), 0.97)
    assert basis.shape == (48, 0) and info.rank == 0 and info.energy == 1.0
    # float32 input, 3 x 3 (the smallest the partial path takes) and a scalar multiple of I
    cov = random_covariances(64, classes=1, rows=80, seed=15)[0]
    assert_equal_pooled(cov.float(), 0.97)
    small = cov[:3, :3].contiguous()
    found = eigen.top_vectors(small, 1.0)
    assert found is not None
    vectors, values = found
    torch.testing.assert_close(values, torch.linalg.eigvalsh(small).flip(0), atol=1e-9, rtol=0)
    torch.testing.assert_close(projector(vectors), torch.eye(3, dtype=DTYPE), atol=SAME, rtol=0)
    _, rank = assert_equal_pooled(3 * torch.eye(40, dtype=DTYPE), 0.5)
    assert rank == 20


def test_pooled_basis_with_a_small_rank_bound_takes_the_small_eigenproblem(monkeypatch):
    cov = random_covariances(120, classes=1, rows=6, seed=16)[0]
    partial = count_calls(monkeypatch, rules, "top_vectors")
    _, rank = assert_equal_pooled(cov, 0.99, rank_bound=6)  # 3 * (6 + 8) < 120
    assert not partial and 0 < rank <= 6
    assert_equal_pooled(cov, 0.99, rank_bound=500)  # loose: the partial path
    assert len(partial) == 1


def test_pooled_basis_computes_no_dense_eigh_on_the_cpu(monkeypatch):
    cov = random_covariances(64, classes=1, rows=80, seed=17)[0]
    expected = {t: dense_pooled_basis(cov, t) for t in (0.97, 1.0)}

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dense eigh was computed")

    monkeypatch.setattr(torch.linalg, "eigh", forbidden)
    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    for threshold, (reference, reference_info) in expected.items():
        basis, info = rules.pooled_basis(cov, threshold)
        assert info.rank == reference_info.rank
        torch.testing.assert_close(projector(basis), projector(reference), atol=SAME, rtol=0)


@pytest.mark.parametrize("routine", ["dsterf", "dstemr", "dstevd"])
def test_a_lapack_failure_in_pooled_basis_falls_back_to_the_dense_rule(monkeypatch, routine):
    from scipy.linalg import lapack

    cov = random_covariances(48, classes=1, rows=60, seed=18)[0]
    threshold = 1.0 if routine == "dstevd" else 0.9  # dstevd: most of the vectors kept
    expected, expected_info = dense_pooled_basis(cov, threshold)
    original = getattr(lapack, routine)
    failures: list[int] = []

    def failing(*args: object, **kwargs: object) -> tuple[object, ...]:
        failures.append(1)
        return (*original(*args, **kwargs)[:-1], 1)  # LAPACK's "did not converge"

    monkeypatch.setattr(lapack, routine, failing)
    eigh = count_calls(monkeypatch, torch.linalg, "eigh")
    basis, info = rules.pooled_basis(cov, threshold)
    assert failures and eigh  # the partial path was tried, then the dense one
    assert info == expected_info
    assert torch.equal(basis, expected)


@pytest.mark.parametrize("threshold", [0.9, 1.0])
def test_pooled_basis_chooses_the_tridiagonal_solver_by_the_kept_fraction(monkeypatch, threshold):
    # few kept vectors: MRRR (dstemr) for those only; most of them: divide and conquer
    # (dstevd) for all, then only the kept ones transformed back. Both equal the dense rule.
    from scipy.linalg import lapack

    mrrr = count_calls(monkeypatch, lapack, "dstemr")
    divide = count_calls(monkeypatch, lapack, "dstevd")
    cov = random_covariances(100, classes=1, rows=150, seed=19)[0]
    _, rank = assert_equal_pooled(cov, threshold)
    many = rank > rules.ALL_VECTORS_ABOVE * 100
    assert many == (threshold == 1.0)
    assert (len(divide), len(mrrr)) == ((1, 0) if many else (0, 1))
    # the other solver on the same case gives the same basis
    monkeypatch.setattr(rules, "ALL_VECTORS_ABOVE", 0.0 if not many else 1.0)
    assert_equal_pooled(cov, threshold)
    assert (len(divide), len(mrrr)) == (1, 1)


@pytest.mark.parametrize("threshold", [0.6, 1.0])
def test_the_per_class_rule_chooses_the_tridiagonal_solver_by_the_kept_fraction(
    monkeypatch, threshold
):
    # as the pooled rule: divide and conquer (dstevd) once a class keeps over 30 % of its
    # residual's size, MRRR (dstemr) below; both equal the dense rule
    from scipy.linalg import lapack

    mrrr = count_calls(monkeypatch, lapack, "dstemr")
    divide = count_calls(monkeypatch, lapack, "dstevd")
    covariances = random_covariances(50, classes=3, rows=70, seed=20)
    assert_equal_bases(covariances, threshold)
    if threshold == 1.0:
        assert divide  # the first class keeps all 50 directions
    else:
        assert mrrr and not divide
    monkeypatch.setattr(rules, "ALL_VECTORS_ABOVE", 1.0)  # MRRR only: the same bases
    before = len(divide)
    assert_equal_bases(covariances, threshold)
    assert len(divide) == before


def test_columns_outside_a_basis_are_reorthonormalised_and_inside_ones_dropped():
    generator = torch.Generator().manual_seed(0)
    dim = 40
    full, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    basis, outside = full[:, :10], full[:, 10:16]
    noisy = outside + 1e-15 * torch.randn(dim, 6, generator=generator, dtype=torch.float64)
    found = eigen._outside(noisy, basis)
    assert found.shape == (dim, 6)
    assert torch.allclose(found.T @ found, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert float((basis.T @ found).abs().max()) < 1e-12
    assert torch.allclose(found @ found.T, outside @ outside.T, atol=1e-12)
    # a column inside span(U) (up to rounding) is not normalised up into a direction
    mixed = torch.cat([outside[:, :3], basis[:, :1] + 1e-14 * outside[:, 3:4]], dim=1)
    kept = eigen._outside(mixed, basis)
    assert kept.shape[1] == 3
    assert torch.allclose(kept @ kept.T, outside[:, :3] @ outside[:, :3].T, atol=1e-10)


def test_tiled_symmetrisation_is_bitwise_the_untiled_one(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    cov = torch.randn(300, 300, generator=generator, dtype=torch.float64)
    expected = (cov + cov.T) / 2
    monkeypatch.setattr(eigen, "_SYMMETRIC_TILE", 64)  # 300 > 2 x 64: tiles, ragged edge
    found = eigen.symmetrize(cov)
    assert torch.equal(found, expected)
    assert torch.equal(found, found.T)
