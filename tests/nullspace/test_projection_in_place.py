"""In-place forms of the null-space projection against the dense reference ``M (I - U Uᵀ)``,
on both sides of ``r = d/2`` (low-rank and complement factors), contiguous or not."""

from __future__ import annotations

import pytest
import torch

from unsc_lightning.nullspace.projection import NullSpaceProjector, project_to_null_space

DIM = 8


def basis(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.linalg.qr(torch.randn(DIM, DIM, generator=generator))[0][:, :rank]


def matrices(seed: int, transposed: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if transposed:  # a non-contiguous (out x d) view
        return torch.randn(DIM, 5, generator=generator).T
    return torch.randn(5, DIM, generator=generator)


@pytest.mark.parametrize("rank", [0, 2, 4, 5, 7, 8])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_project_matrix_in_place_equals_the_reference(rank, transposed):
    projector = NullSpaceProjector(basis(rank))
    matrix = matrices(0, transposed)
    expected = project_to_null_space(matrix.clone(), basis(rank))

    result = projector.project_matrix_(matrix)

    assert result is matrix
    assert torch.allclose(matrix, expected, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 2, 4, 5, 7, 8])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_restore_remaining_projects_the_change_since_the_reference(rank, transposed):
    projector = NullSpaceProjector(basis(rank))
    start = matrices(1, False)
    moved = matrices(2, transposed)
    expected = start + project_to_null_space(moved - start, basis(rank))

    remaining = projector.remaining_part(start)
    projector.restore_remaining_(moved, remaining)

    assert remaining.shape == ((5, rank) if rank <= DIM / 2 else (5, DIM))
    assert torch.allclose(moved, expected, atol=1e-5)
    if rank:  # the remaining outputs of the reference are back
        assert torch.allclose(moved @ basis(rank), start @ basis(rank), atol=1e-5)
    # the change in the null space stays (none is left when the basis spans everything)
    assert torch.allclose(moved, start, atol=1e-5) == (rank == DIM)
