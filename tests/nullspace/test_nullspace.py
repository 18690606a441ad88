"""Property and reference tests for the pure-torch null-space engine (``unsc_lightning.nullspace``).

Every check compares the engine with an independent reference written here: explicit patch
extraction loops, an SVD of the stacked representation rows, a direct SVD implementation of the
incremental (GPM / UNSC Algorithm 1) rule and a dense projector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unsc_lightning.nullspace import (
    RELATIVE_TOLERANCE,
    ActivationRecorder,
    CovarianceAccumulator,
    NullSpaceProjector,
    accumulate_covariances,
    class_threshold_schedule,
    eigh_descending,
    energy_rank,
    layer_dims,
    layer_rows,
    per_class_basis,
    pooled_basis,
    project_to_null_space,
    representation_dim,
    weight_as_matrix,
)

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _single_thread():
    # tiny tensors: intra-op threads only add contention (and minutes on a busy 2-core runner)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def projector_matrix(basis: Tensor) -> Tensor:
    basis = basis.to(DTYPE)
    return basis @ basis.T


def reference_energy_rank(energies: Tensor, threshold: float, captured: float, total: float) -> int:
    """Smallest r with captured + sum(energies[:r]) >= threshold * total (energies descending)."""
    if captured >= threshold * total:
        return 0
    cumulative = captured + torch.cumsum(energies, 0)
    return int(torch.nonzero(cumulative >= threshold * total * (1 - 1e-12))[0]) + 1


def reference_pooled_basis(rows: Tensor, threshold: float) -> Tensor:
    """Left singular vectors of the stacked rows (``d x N``) under the energy rule."""
    left, singular, _ = torch.linalg.svd(rows.T.to(DTYPE), full_matrices=False)
    energies = singular**2
    rank = reference_energy_rank(energies, threshold, 0.0, float(energies.sum()))
    return left[:, :rank]


def reference_per_class_basis(
    class_rows: dict[int, Tensor], threshold: float | Callable[[int], float]
) -> Tensor:
    """GPM incremental rule with explicit SVDs of the residual activation matrices."""
    dim = next(iter(class_rows.values())).shape[1]
    basis = torch.zeros(dim, 0, dtype=DTYPE)
    for k in sorted(class_rows):
        activations = class_rows[k].T.to(DTYPE)  # d x n_k
        eps = threshold(k) if callable(threshold) else threshold
        total = float((activations**2).sum())
        residual = activations - basis @ (basis.T @ activations)
        captured = float(((basis.T @ activations) ** 2).sum())
        left, singular, _ = torch.linalg.svd(residual, full_matrices=False)
        rank = reference_energy_rank(singular**2, eps, captured, total)
        basis = torch.cat([basis, left[:, :rank]], dim=1)
    return basis


def assert_same_subspace(basis: Tensor, reference: Tensor, atol: float = 1e-6) -> None:
    assert basis.shape == reference.shape
    torch.testing.assert_close(
        projector_matrix(basis), projector_matrix(reference), atol=atol, rtol=0
    )


def assert_orthonormal(basis: Tensor, atol: float = 1e-10) -> None:
    gram = basis.T.to(DTYPE) @ basis.to(DTYPE)
    torch.testing.assert_close(gram, torch.eye(basis.shape[1], dtype=DTYPE), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------
# 2. Streamed eigen-basis == SVD basis of the stacked rows
# --------------------------------------------------------------------------------------------


def _scaled_latent(generator: torch.Generator, shape: Sequence[int], decay: float) -> Tensor:
    # channel/feature scales decay geometrically so the thresholds pick different ranks
    z = torch.randn(*shape, generator=generator, dtype=DTYPE)
    scales = decay ** torch.arange(shape[1], dtype=DTYPE)
    return z * scales.reshape(1, -1, *([1] * (len(shape) - 2)))


def _rank_deficient_batches(layer: nn.Module, latent: int, batches: int = 3) -> list[Tensor]:
    """Inputs whose features/channels are mixtures of ``latent`` sources (true rank known)."""
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (40, latent)
        channels = layer.in_features
    elif isinstance(layer, nn.Conv1d):
        shape, channels = (4, latent, 13), layer.in_channels
    else:
        shape, channels = (3, latent, 8, 7), layer.in_channels
    mixing = torch.randn(latent, channels, generator=generator, dtype=DTYPE)
    out = []
    for _ in range(batches):
        z = _scaled_latent(generator, shape, decay=0.8)
        out.append(torch.einsum("bc...,cd->bd...", z, mixing))
    return out


# (layer, latent sources, true rank of the rows)
BASIS_LAYERS = {
    "linear": (lambda: nn.Linear(14, 5, bias=False), 9, 9),
    "conv1d": (lambda: nn.Conv1d(5, 4, 3, padding=2, stride=2, dilation=2, bias=False), 3, 9),
    "conv2d": (
        lambda: nn.Conv2d(4, 3, (3, 2), padding=1, stride=(2, 1), dilation=(1, 2), bias=False),
        2,
        12,
    ),
}


@pytest.mark.parametrize("threshold", [0.9, 0.97, 1.0])
@pytest.mark.parametrize(
    "make_layer,latent,true_rank", BASIS_LAYERS.values(), ids=BASIS_LAYERS.keys()
)
def test_streamed_pooled_basis_equals_svd_basis(make_layer, latent, true_rank, threshold):
    torch.manual_seed(0)
    layer = make_layer().to(DTYPE)
    model = nn.Sequential(layer)
    layers = {"0": layer}
    batches = _rank_deficient_batches(layer, latent)
    accumulator = CovarianceAccumulator(layer_dims(layers))
    seen = accumulate_covariances(model, layers, [(x, None) for x in batches], accumulator)
    assert seen == {"0"}

    rows = torch.cat([layer_rows(layer, x) for x in batches])
    assert accumulator.rows_seen["0"] == rows.shape[0]
    assert torch.linalg.matrix_rank(rows).item() == true_rank < representation_dim(layer)

    basis, info = pooled_basis(accumulator.sums["0"], threshold)
    reference = reference_pooled_basis(rows, threshold)
    assert info.rank == basis.shape[1] == reference.shape[1]
    assert info.dim == representation_dim(layer)
    if threshold == 1.0:
        assert info.rank == true_rank  # every non-zero direction, not all d
    else:
        assert 0 < info.rank <= true_rank
    assert_orthonormal(basis)
    assert_same_subspace(basis, reference)
    captured = float(((reference.T @ rows.T) ** 2).sum() / (rows**2).sum())
    assert info.energy == pytest.approx(captured, rel=1e-9)
    assert info.energy >= threshold - 1e-9


# --------------------------------------------------------------------------------------------
# 3. Per-class basis (the paper's Algorithm 1)
# --------------------------------------------------------------------------------------------


def _class_data(
    classes: Sequence[int], dim: int, per_class: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Each class has its own (permuted) decaying spectrum and a class-specific rotation."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for k in classes:
        scales = 0.5 ** torch.randperm(dim, generator=generator).to(DTYPE)
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
        x = (torch.randn(per_class, dim, generator=generator, dtype=DTYPE) * scales) @ rotation
        xs.append(x)
        ys.append(torch.full((per_class,), k))
    return torch.cat(xs), torch.cat(ys)


def _per_class_covariances(
    layer: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int
) -> CovarianceAccumulator:
    layers = {"layer": layer}
    accumulator = CovarianceAccumulator(layer_dims(layers), num_classes=num_classes)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    x, y = x[order], y[order]  # batches mix classes
    batches = [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)
    ]
    accumulate_covariances(nn.Sequential(layer), layers, batches, accumulator)
    return accumulator


@pytest.mark.parametrize(
    "threshold",
    [class_threshold_schedule(0.97, 0.003), 0.9, 0.99],
    ids=["schedule-0.97+0.003k", "0.9", "0.99"],
)
def test_per_class_basis_linear_equals_incremental_svd(threshold):
    classes = [0, 2, 5, 7]  # not contiguous: order must be ascending id, not position
    x, y = _class_data(classes, dim=24, per_class=30)
    layer = nn.Linear(24, 3, bias=False).to(DTYPE)
    accumulator = _per_class_covariances(layer, x, y, num_classes=8, batch_size=17)

    basis, info = per_class_basis(accumulator.class_covariances("layer", classes), threshold)
    reference = reference_per_class_basis({k: x[y == k] for k in classes}, threshold)
    assert 0 < info.rank == reference.shape[1] < 24
    assert_orthonormal(basis)
    assert_same_subspace(basis, reference)
    # every class reaches its own threshold
    for k in classes:
        rows = x[y == k]
        eps = threshold(k) if callable(threshold) else threshold
        assert ((basis.T @ rows.T) ** 2).sum() / (rows**2).sum() >= eps - 1e-9


def test_per_class_basis_conv2d_equals_incremental_svd():
    torch.manual_seed(0)
    classes = [1, 3, 4]
    generator = torch.Generator().manual_seed(5)
    layer = nn.Conv2d(3, 4, (2, 3), padding=1, stride=(1, 2), bias=False).to(DTYPE)
    shared = torch.randn(2, 3, generator=generator, dtype=DTYPE)  # rows of rank <= 2 * 6 = 12
    xs, ys = [], []
    for k in classes:  # class-specific mixing of the two sources, and spatial decay
        mixing = torch.randn(2, 2, generator=generator, dtype=DTYPE) @ shared * (0.5 + k)
        z = _scaled_latent(generator, (6, 2, 6, 5), decay=0.1)
        xs.append(torch.einsum("bc...,cd->bd...", z, mixing))
        ys.append(torch.full((6,), k))
    x, y = torch.cat(xs), torch.cat(ys)
    schedule = class_threshold_schedule(0.97, 0.003)
    accumulator = _per_class_covariances(layer, x, y, num_classes=5, batch_size=5)

    basis, info = per_class_basis(accumulator.class_covariances("layer", classes), schedule)
    reference = reference_per_class_basis(
        {k: layer_rows(layer, x[y == k]) for k in classes}, schedule
    )
    assert 0 < info.rank == reference.shape[1] < 12
    assert_same_subspace(basis, reference)


def test_per_class_basis_at_threshold_one_spans_all_remaining_rows():
    # rank-deficient classes: the union of their spans (rank 3 + 4 + 2 = 9 < 15) is kept exactly
    generator = torch.Generator().manual_seed(2)
    class_rows = {
        k: torch.randn(25, r, generator=generator, dtype=DTYPE)
        @ torch.randn(r, 15, generator=generator, dtype=DTYPE)
        for k, r in [(0, 3), (1, 4), (2, 2)]
    }
    covariances = {k: rows.T @ rows for k, rows in class_rows.items()}
    basis, info = per_class_basis(covariances, 1.0)
    all_rows = torch.cat(list(class_rows.values()))
    pooled, pooled_info = pooled_basis(all_rows.T @ all_rows, 1.0)
    assert info.rank == pooled_info.rank == 9
    assert info.energy == pytest.approx(1.0, abs=1e-9)
    assert_same_subspace(basis, pooled)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e12])
def test_per_class_basis_handles_a_class_already_inside_the_basis(scale):
    # class 1 lies in class 0's span: its residual covariance is pure rounding noise whose trace
    # can be negative (here for scale 1e12); it must add nothing and must not break eigh/SVD
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(30, 3, generator=generator, dtype=DTYPE) @ torch.randn(
        3, 10, generator=generator, dtype=DTYPE
    )
    inside = rows[:10] * scale
    basis, info = per_class_basis({0: rows.T @ rows, 1: inside.T @ inside}, 1.0)
    assert info.rank == 3
    assert_same_subspace(basis, reference_pooled_basis(rows, 1.0))


def test_per_class_keeps_more_directions_than_pooled_on_class_shifted_data():
    # class 0 dominates the energy; classes 1..3 live (mostly) in their own 4-dim subspaces
    generator = torch.Generator().manual_seed(0)
    dim, classes = 16, [0, 1, 2, 3]
    directions, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    class_rows = {}
    for k in classes:
        own = directions[:, 4 * k : 4 * k + 4]
        scale = 10.0 if k == 0 else 0.5
        rows = scale * torch.randn(40, 4, generator=generator, dtype=DTYPE) @ own.T
        class_rows[k] = rows + 1e-3 * torch.randn(40, dim, generator=generator, dtype=DTYPE)
    covariances = {k: r.T @ r for k, r in class_rows.items()}
    pooled_cov = sum(covariances.values())

    for threshold in [0.9, 0.97]:
        per_class, per_info = per_class_basis(covariances, threshold)
        pooled, pooled_info = pooled_basis(pooled_cov, threshold)
        assert per_info.rank > pooled_info.rank
        assert pooled_info.rank <= 4  # pooled keeps the dominant class only
        for rows in class_rows.values():  # per-class keeps every class's own directions
            assert ((per_class.T @ rows.T) ** 2).sum() / (rows**2).sum() >= threshold - 1e-9
        minority = class_rows[3]
        assert ((pooled.T @ minority.T) ** 2).sum() / (minority**2).sum() < 0.5


def test_per_class_basis_rejects_empty_input():
    with pytest.raises(ValueError, match="class_covariances"):
        per_class_basis({}, 0.97)


def test_class_threshold_schedule_is_capped_at_one():
    schedule = class_threshold_schedule(0.97, 0.003)
    assert schedule(0) == pytest.approx(0.97)
    assert schedule(5) == pytest.approx(0.985)
    assert schedule(20) == 1.0


# --------------------------------------------------------------------------------------------
# 4. eigh fallback
# --------------------------------------------------------------------------------------------


def _dead_channel_covariance() -> tuple[Tensor, int]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.relu(torch.randn(300, 24, generator=generator, dtype=torch.float32))
    rows[:, ::2] = 0.0  # dead ReLU channels: 12 exactly-zero eigenvalues
    rows[:, 1] = rows[:, 3]  # a duplicated channel: one more
    return rows.to(DTYPE).T @ rows.to(DTYPE), 11


def test_eigh_descending_falls_back_to_svd_on_failure(monkeypatch):
    cov, true_rank = _dead_channel_covariance()
    values, vectors = eigh_descending(cov)
    expected = {t: pooled_basis(cov, t) for t in [0.9, 0.97, 1.0]}

    calls = []

    def failing_eigh(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    fallback_values, fallback_vectors = eigh_descending(cov)
    assert calls

    for vals, vecs in [(values, vectors), (fallback_values, fallback_vectors)]:
        assert vals.dtype == DTYPE
        assert (vals >= 0).all()
        assert (vals[1:] <= vals[:-1]).all()
        assert_orthonormal(vecs, atol=1e-9)
        torch.testing.assert_close(
            vecs @ torch.diag(vals) @ vecs.T, cov, rtol=0, atol=1e-9 * cov.trace().item()
        )
    torch.testing.assert_close(fallback_values, values, rtol=0, atol=1e-10 * cov.trace().item())

    for threshold, (basis, info) in expected.items():
        fallback_basis, fallback_info = pooled_basis(cov, threshold)
        assert fallback_info.rank == info.rank
        assert_same_subspace(fallback_basis, basis)
    assert expected[1.0][1].rank == true_rank


# --------------------------------------------------------------------------------------------
# 5. energy_rank
# --------------------------------------------------------------------------------------------


def test_energy_rank_edge_cases():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DTYPE)
    assert energy_rank(torch.zeros(4, dtype=DTYPE), 0.97, total=0.0) == 0
    assert energy_rank(values, 0.9, total=10.0, captured=9.5) == 0
    assert energy_rank(values, 0.9, total=10.0, captured=9.0) == 0  # exactly reached
    assert energy_rank(values, 0.7, total=10.0) == 2  # 4 + 3 reaches 0.7 (inclusive)
    assert energy_rank(values, 0.71, total=10.0) == 3
    assert energy_rank(values, 0.9, total=10.0, captured=5.0) == 1
    assert energy_rank(values, 1.0, total=10.0) == 4
    with_zeros = torch.tensor([5.0, 3.0, 1.0, 1e-20, 0.0, 0.0], dtype=DTYPE)
    assert energy_rank(with_zeros, 1.0, total=float(with_zeros.sum())) == 3
    # rounding-level eigenvalues (below RELATIVE_TOLERANCE * total) are not directions
    noisy = torch.tensor([5.0, 3.0, 1.0] + [0.5 * RELATIVE_TOLERANCE * 9] * 4, dtype=DTYPE)
    assert energy_rank(noisy, 1.0, total=float(noisy.sum())) == 3
    assert energy_rank(noisy, 0.5, total=float(noisy.sum())) == 1


def test_eigh_descending_on_a_noise_matrix_with_negative_trace():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 6, generator=generator, dtype=DTYPE)
    noise = 1e3 * (noise + noise.T - 3 * torch.eye(6, dtype=DTYPE))  # indefinite, trace < 0
    assert torch.trace(noise) < 0
    values, vectors = eigh_descending(noise)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    assert (values >= 0).all() and (values[1:] <= values[:-1]).all()
    assert_orthonormal(vectors, atol=1e-9)


# --------------------------------------------------------------------------------------------
# 6. Projection
# --------------------------------------------------------------------------------------------


def _random_basis(dim: int, rank: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=DTYPE))[0]


@pytest.mark.parametrize("rank,complement", [(3, False), (6, False), (7, True), (11, True)])
def test_projector_matches_dense_reference(rank, complement):
    dim = 12
    basis = _random_basis(dim, rank)
    gradient = torch.randn(5, dim, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    dense = gradient @ (torch.eye(dim, dtype=DTYPE) - basis @ basis.T)

    projector = NullSpaceProjector(basis, dtype=DTYPE)
    assert projector.use_complement is complement
    assert projector.factor.shape == (dim, dim - rank if complement else rank)
    projected = projector.project(gradient)
    torch.testing.assert_close(projected, dense, rtol=0, atol=1e-6)
    assert (projected @ basis).abs().max() < 1e-10
    torch.testing.assert_close(project_to_null_space(gradient, basis), dense, rtol=0, atol=1e-10)

    float_projected = NullSpaceProjector(basis.float()).project(gradient.float())  # default float32
    torch.testing.assert_close(float_projected.to(DTYPE), dense, rtol=0, atol=1e-5)
    assert (float_projected @ basis.float()).abs().max() < 1e-5


def test_projector_extreme_ranks():
    gradient = torch.randn(4, 9, dtype=DTYPE)
    identity = NullSpaceProjector(torch.zeros(9, 0, dtype=DTYPE), dtype=DTYPE).project(gradient)
    torch.testing.assert_close(identity, gradient, rtol=0, atol=0)
    assert identity.data_ptr() != gradient.data_ptr()
    full = NullSpaceProjector(_random_basis(9, 9), dtype=DTYPE).project(gradient)
    assert full.shape == gradient.shape
    assert full.abs().max() < 1e-12


@pytest.mark.parametrize("rank", [5, 20])  # low-rank and complement forms
def test_project_in_place_on_conv_weight_shape(rank):
    torch.manual_seed(0)
    weight_grad = torch.randn(6, 3, 3, 3, dtype=DTYPE)  # d = 27
    basis = _random_basis(27, rank)
    expected = project_to_null_space(weight_as_matrix(weight_grad), basis).reshape(6, 3, 3, 3)
    pointer = weight_grad.data_ptr()
    returned = NullSpaceProjector(basis, dtype=DTYPE).project_(weight_grad)
    assert returned is weight_grad and weight_grad.data_ptr() == pointer
    torch.testing.assert_close(weight_grad, expected, rtol=0, atol=1e-10)
    assert (weight_as_matrix(weight_grad) @ basis).abs().max() < 1e-10


# --------------------------------------------------------------------------------------------
# 7. ActivationRecorder hook lifetime
# --------------------------------------------------------------------------------------------


class _TwoBranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.unused = nn.Linear(6, 2)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(self.conv(h.unsqueeze(1)).flatten(1))


def _hook_counts(layers: dict[str, nn.Module]) -> list[int]:
    return [len(layer._forward_pre_hooks) for layer in layers.values()]


def test_recorder_removes_hooks_and_records_seen_layers():
    net = _TwoBranchNet()
    layers = {name: module for name, module in net.named_modules() if name}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    with ActivationRecorder(
        layers, lambda n, r: shapes.setdefault(n, []).append(tuple(r.shape))
    ) as rec:
        assert _hook_counts(layers) == [1, 1, 1, 1]
        net(torch.randn(5, 4))
        net(torch.randn(2, 4))
    assert _hook_counts(layers) == [0, 0, 0, 0]
    assert rec.seen == {"fc1", "conv", "fc2"}
    assert shapes == {
        "fc1": [(5, 4), (2, 4)],
        "conv": [(30, 3), (12, 3)],
        "fc2": [(5, 12), (2, 12)],
    }
    rec.remove()  # idempotent


def test_recorder_removes_hooks_after_an_exception():
    net = _TwoBranchNet()
    layers = {"fc1": net.fc1, "fc2": net.fc2}
    with (
        pytest.raises(ValueError, match="boom"),
        ActivationRecorder(layers, lambda n, r: None) as rec,
    ):
        net(torch.randn(3, 4))
        raise ValueError("boom")
    assert _hook_counts(layers) == [0, 0]
    assert rec.seen == {"fc1", "fc2"}

    def failing(name: str, rows: Tensor) -> None:
        if name == "fc2":
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), ActivationRecorder(layers, failing):
        net(torch.randn(3, 4))
    assert _hook_counts(layers) == [0, 0]
    net(torch.randn(3, 4))  # the model still runs without hooks


# --------------------------------------------------------------------------------------------
# 8. CovarianceAccumulator
# --------------------------------------------------------------------------------------------


def _conv_net() -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(DTYPE)
    fc = nn.Linear(3 * 3 * 3, 4).to(DTYPE)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc)
    return net, {"conv": conv, "fc": fc}


def _labelled_batches(n_batches: int = 4) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(5, 2, 6, 5, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (5,), generator=generator),
        )
        for _ in range(n_batches)
    ]


def test_per_class_sums_match_pooled_and_class_rows():
    net, layers = _conv_net()
    batches = _labelled_batches()
    per_class = CovarianceAccumulator(layer_dims(layers), num_classes=3)
    pooled = CovarianceAccumulator(layer_dims(layers))
    accumulate_covariances(net, layers, batches, per_class)
    accumulate_covariances(net, layers, batches, pooled)

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert per_class.samples_per_class.tolist() == torch.bincount(y, minlength=3).tolist()
    for name in layers:
        torch.testing.assert_close(
            per_class.sums[name].sum(0), pooled.sums[name], rtol=1e-12, atol=1e-10
        )
        torch.testing.assert_close(
            per_class.pooled_covariance(name), pooled.sums[name], rtol=1e-12, atol=1e-10
        )
    conv_rows = {k: layer_rows(layers["conv"], x[y == k]) for k in range(3)}
    for k, rows in conv_rows.items():
        torch.testing.assert_close(per_class.sums["conv"][k], rows.T @ rows, rtol=1e-12, atol=1e-10)
    covariances = per_class.class_covariances("conv", [2, 0])
    assert sorted(covariances) == [0, 2]
    subset = conv_rows[0].T @ conv_rows[0] + conv_rows[2].T @ conv_rows[2]
    torch.testing.assert_close(
        per_class.pooled_covariance("conv", [2, 0]), subset, rtol=1e-12, atol=1e-10
    )


def test_per_class_rows_of_3d_linear_inputs_follow_their_sample():
    layer = nn.Linear(3, 2).to(DTYPE)
    x = torch.randn(4, 5, 3, dtype=DTYPE)  # 5 tokens per sample
    y = torch.tensor([1, 0, 1, 2])
    accumulator = CovarianceAccumulator({"fc": 3}, num_classes=3)
    accumulate_covariances(layer, {"fc": layer}, [(x, y)], accumulator)
    for k in range(3):
        rows = x[y == k].reshape(-1, 3)
        torch.testing.assert_close(accumulator.sums["fc"][k], rows.T @ rows)


@pytest.mark.parametrize("num_classes", [None, 3])
def test_merge_of_two_halves_equals_one_pass(num_classes):
    net, layers = _conv_net()
    batches = _labelled_batches()
    whole = CovarianceAccumulator(layer_dims(layers), num_classes=num_classes)
    first = CovarianceAccumulator(layer_dims(layers), num_classes=num_classes)
    second = CovarianceAccumulator(layer_dims(layers), num_classes=num_classes)
    accumulate_covariances(net, layers, batches, whole)
    accumulate_covariances(net, layers, batches[:2], first)
    accumulate_covariances(net, layers, batches[2:], second)
    merged = first.merge_(second)
    assert merged is first
    for name in layers:
        torch.testing.assert_close(merged.sums[name], whole.sums[name], rtol=1e-12, atol=1e-10)
    assert merged.rows_seen == whole.rows_seen
    assert torch.equal(merged.samples_per_class, whole.samples_per_class)


def test_nan_inputs_raise_runtime_error_naming_the_layer():
    net, layers = _conv_net()
    x, y = _labelled_batches(1)[0]
    net[0].weight.data[0, 0, 0, 0] = float("nan")  # NaN appears first at the input of `fc`
    accumulator = CovarianceAccumulator(layer_dims(layers))
    with pytest.raises(RuntimeError, match="`fc`"):
        accumulate_covariances(net, layers, [(x, y)], accumulator)
    assert _hook_counts(layers) == [0, 0]
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="`conv`"):
        accumulate_covariances(net, layers, [(x, y)], CovarianceAccumulator(layer_dims(layers)))


def test_per_class_accumulator_requires_labels():
    accumulator = CovarianceAccumulator({"fc": 3}, num_classes=2)
    with pytest.raises(RuntimeError, match="labels"):
        accumulator.set_labels(None)
    with pytest.raises(RuntimeError, match="pooled"):
        CovarianceAccumulator({"fc": 3}).class_covariances("fc", [0])


def test_bf16_inputs_accumulate_in_float64():
    torch.manual_seed(0)
    layer = nn.Linear(8, 3).to(torch.bfloat16)
    batches = [(1 + torch.rand(512, 8).to(torch.bfloat16), None) for _ in range(8)]
    accumulator = CovarianceAccumulator({"fc": 8})
    accumulate_covariances(layer, {"fc": layer}, batches, accumulator)
    assert accumulator.sums["fc"].dtype == DTYPE
    rows = torch.cat([x for x, _ in batches]).to(DTYPE)  # bf16 -> float64 is exact
    reference = rows.T @ rows
    torch.testing.assert_close(accumulator.sums["fc"], reference, rtol=1e-13, atol=0)
    # a float32 accumulation of the same rows would not meet that bound
    float32 = rows.float().T @ rows.float()
    assert not torch.allclose(float32.to(DTYPE), reference, rtol=1e-13, atol=0)


# --------------------------------------------------------------------------------------------
# 9. Exactness of the projected SGD step (Theorem 1), engine only
# --------------------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 5, bias=False),
    )


def _unlearn(model: nn.Sequential, x_forget: Tensor, targets: Tensor, projectors) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x_forget), targets).backward()
        if projectors is not None:
            for name, projector in projectors.items():
                projector.project_(model.get_submodule(name).weight.grad)
        optimizer.step()


@pytest.mark.parametrize(
    "dtype,tolerance",
    [(torch.float32, 1e-5), (torch.float64, 1e-10)],
    ids=["float32", "float64"],
)
def test_projected_sgd_leaves_remaining_logits_unchanged(dtype, tolerance):
    torch.manual_seed(0)
    model = _mlp().to(dtype)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    subspace = torch.randn(5, 20, dtype=dtype)
    x_remain = torch.randn(32, 5, dtype=dtype) @ subspace  # remaining inputs span 5 of 20 dims
    x_forget = 2 * torch.randn(16, 20, dtype=dtype)  # generic inputs, outside that subspace
    with torch.no_grad():
        remain_before, forget_before = model(x_remain), model(x_forget)
    targets = (forget_before.argmax(1) + 1) % 5  # train toward other labels

    accumulator = CovarianceAccumulator(layer_dims(layers))
    batches = [(x_remain[:12], None), (x_remain[12:], None)]
    assert accumulate_covariances(model, layers, batches, accumulator) == set(layers)
    projectors = {}
    for name in layers:
        basis, info = pooled_basis(accumulator.sums[name], 1.0)
        assert 0 < info.rank < info.dim
        projectors[name] = NullSpaceProjector(basis, dtype=dtype)
    assert projectors["0"].rank == 5  # exactly the input subspace
    assert projectors["2"].rank <= 32 and projectors["4"].rank <= 32

    vanilla = _mlp().to(dtype)
    vanilla.load_state_dict(model.state_dict())
    _unlearn(model, x_forget, targets, projectors)
    _unlearn(vanilla, x_forget, targets, None)

    def relative_change(net: nn.Module, x: Tensor, before: Tensor) -> float:
        with torch.no_grad():
            return float((net(x) - before).abs().max() / before.abs().max())

    assert relative_change(model, x_remain, remain_before) <= tolerance
    assert relative_change(model, x_forget, forget_before) > 1e-1
    with torch.no_grad():
        assert (model(x_forget).argmax(1) == targets).float().mean() > 0.9
    # compare to vanilla: without projection the same steps move the remaining logits a lot
    assert relative_change(vanilla, x_remain, remain_before) > 1e-1


# --------------------------------------------------------------------------------------------
# Rank-bounded eigendecomposition (fewer rows than dimensions)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_basis", [False, True])
def test_rank_bounded_eigh_equals_the_full_one_on_low_rank_covariances(with_basis):
    from unsc_lightning.nullspace.eigen import eigh_descending

    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 90, generator=generator, dtype=torch.float64) * torch.logspace(
        0, -4, 12, dtype=torch.float64
    ).unsqueeze(1)
    cov = rows.T @ rows
    basis = None
    if with_basis:
        basis, _ = torch.linalg.qr(torch.randn(90, 4, generator=generator, dtype=torch.float64))
    full_values, full_vectors = eigh_descending(cov, basis=basis)
    values, vectors = eigh_descending(cov, rank_bound=12, basis=basis)
    assert vectors.shape[1] == 12  # the range found from 12 + 8 sampled columns, not 90
    rank = int((full_values > 1e-10 * full_values.sum()).sum())
    assert rank == 12
    torch.testing.assert_close(values[:rank], full_values[:rank], rtol=1e-9, atol=0)
    top, full_top = vectors[:, :rank], full_vectors[:, :rank]
    torch.testing.assert_close(top @ top.T, full_top @ full_top.T, rtol=0, atol=1e-8)
    if basis is not None:
        assert float((basis.T @ top).abs().max()) < 1e-10


def test_per_class_basis_with_rank_bounds_equals_without():
    generator = torch.Generator().manual_seed(4)
    covariances, bounds = {}, {}
    for k, n in enumerate((5, 9, 3)):
        rows = torch.randn(n, 64, generator=generator, dtype=torch.float64)
        covariances[k], bounds[k] = rows.T @ rows, n
    schedule = class_threshold_schedule(0.95, 0.01)
    plain, plain_info = per_class_basis(covariances, schedule)
    bounded, bounded_info = per_class_basis(covariances, schedule, rank_bounds=bounds)
    assert plain.shape == bounded.shape and plain_info.rank == bounded_info.rank
    torch.testing.assert_close(bounded @ bounded.T, plain @ plain.T, rtol=0, atol=1e-8)
