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


@pytest.mark.parametrize("rank", [24, 40])
def test_only_the_direct_form_leaves_cancellation_error_along_the_remaining_subspace(rank):
    # A gradient almost wholly in the remaining subspace (float32). The direct form
    # G - (G U) Uᵀ leaves rounding of order u ||G|| along U: large next to what it keeps, and what
    # a relative step would blow up, so UnlearningModule projects it a second time. The
    # complement form (G Q) Qᵀ (r > d/2) lies in the span of Q up to u ||(G Q) Qᵀ||.
    dim = 64
    generator = torch.Generator().manual_seed(rank)
    full = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    remaining = full[:, :rank]
    gradient = torch.randn(16, rank, generator=generator, dtype=torch.float64) @ remaining.T
    gradient += 1e-4 * torch.randn(16, dim, generator=generator, dtype=torch.float64)
    projector = NullSpaceProjector(remaining)
    assert projector.use_complement == (rank > dim / 2)

    once = projector.project_matrix_(gradient.float().clone())
    leak = float((once.double() @ remaining).norm() / once.double().norm())
    twice = projector.project_matrix_(once.clone())
    leak_twice = float((twice.double() @ remaining).norm() / twice.double().norm())

    if projector.use_complement:
        assert leak < 1e-5  # u = 6e-8 times a small factor: no second projection needed
    else:
        assert leak > 1e-4  # the cancellation: ~u ||G|| / ||G - (G U) Uᵀ|| ≈ 6e-8 / 1e-4 · √r
        assert leak_twice < 1e-5


def test_project_step_projects_again_only_mostly_cancelled_direct_form_gradients():
    from torch import nn

    from unsc_lightning.nullspace import NullSpaceEngine

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 6),
        nn.ReLU(),
        nn.Linear(6, 4),
        nn.ReLU(),
        nn.Linear(4, 3),
    )
    engine = NullSpaceEngine(model, threshold=0.97, rule="pooled")
    # direct form (twice: a gradient mostly cancelled, one not), complement form, nothing kept
    ranks = {"0": 2, "2": 3, "4": 4, "6": 0}
    dims = {"0": 8, "2": 6, "4": 6, "6": 4}
    assert sorted(engine.keys) == sorted(ranks)
    bases = {k: torch.linalg.qr(torch.randn(dims[k], dims[k]))[0][:, :r] for k, r in ranks.items()}
    engine.make_projectors({key: NullSpaceProjector(basis) for key, basis in bases.items()})
    layers = {key: model[int(key)] for key in ranks}
    for key, layer in layers.items():
        inside = torch.randn(layer.weight.shape[0], ranks[key]) @ bases[key].T if ranks[key] else 0
        small = 0.01 if key == "0" else 1.0  # key "0": 1 % of the gradient outside the span
        layer.weight.grad = inside + small * torch.randn_like(layer.weight)
    raw = {id(layer.weight): layer.weight.grad.norm() for layer in layers.values()}
    engine.project_gradients_()
    once = {key: layer.weight.grad.clone() for key, layer in layers.items()}
    assert float(once["0"].norm() / raw[id(layers["0"].weight)]) < 0.05
    assert float(once["2"].norm() / raw[id(layers["2"].weight)]) > 0.05
    assert engine._projectors["4"].use_complement

    engine.project_step_(raw)

    changed = {
        key for key, layer in layers.items() if not torch.equal(layer.weight.grad, once[key])
    }
    assert changed == {"0"}
    leak = layers["0"].weight.grad @ bases["0"]
    assert float(leak.norm() / layers["0"].weight.grad.norm()) < 1e-5


@pytest.mark.parametrize("rank", [0, 2, 4])
def test_restore_remaining_leaves_an_unchanged_matrix_bitwise_unchanged(rank):
    # The direct form (r <= d/2) projects a matrix that never moved back to itself bit for bit,
    # as long as M U is formed exactly as M₀ U was (a fused `addmm(M₀ U, M, U, beta=-1)` rounds
    # differently). The complement form does not (M - (M Q) Qᵀ + (M Q) Qᵀ is rounded), which is
    # why the engine projects no weights when no optimizer step ran since the last projection.
    projector = NullSpaceProjector(basis(rank))
    matrix = matrices(3, False) * 1e3
    remaining = projector.remaining_part(matrix)
    before = matrix.clone()

    projector.restore_remaining_(matrix, remaining)

    assert torch.equal(matrix, before)
