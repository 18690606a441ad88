"""The basis pass's Gram products: float32 products summed in float64 against the float64
reference, the ``gram="auto"`` rule, channels-last convolution rows, the vectorised class slots
and the opt-in row subsampling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.zoo import zoo_tensors
from torch import Tensor, nn

from unsc_lightning.models import DigitsConvNet
from unsc_lightning.nullspace import NullSpaceEngine, NullSpaceEngineError, covariance
from unsc_lightning.nullspace import gram as gram_module
from unsc_lightning.nullspace.basis_pass import BasisPass, _Slots
from unsc_lightning.nullspace.batches import default_batch_adapter
from unsc_lightning.nullspace.eigen import eigh_descending, energy_rank
from unsc_lightning.nullspace.gram import FLOAT32_GRAM_MAX_THRESHOLD, GramOptions
from unsc_lightning.nullspace.representations import (
    channels_last_gram_to_weight_order,
    channels_last_weight_index,
    conv_representation,
    conv_rows,
    conv_rows_channels_last,
    conv_shift_borders,
    layer_rows,
)


def _batches(x: Tensor, y: Tensor, size: int = 256) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _class_sums(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256, **engine_kwargs: object
) -> dict[str, dict[int, Tensor]]:
    """``key -> class -> float64 sum`` of one basis pass (every class held at once)."""
    engine = NullSpaceEngine(model, **engine_kwargs)  # type: ignore[arg-type]
    basis_pass = BasisPass(engine, torch.device("cpu"), default_batch_adapter, model, None)
    slots = _Slots(1000, fixed=None)
    batches = _batches(x, y, batch_size)
    with torch.no_grad():
        accumulator = basis_pass._pass(batches, slots, pooled_labels=False).weight_order_()
    return {
        key: {label: sums[i] for i, label in enumerate(slots.classes)}
        for key, sums in accumulator.sums.items()
    }


def _conv3x3() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, dilation=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def _nets(name: str, mnist1d_model: nn.Module) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "mnist1d_trained":
        x, y = zoo_tensors("mnist1d")[:2]
        return mnist1d_model.eval(), x[:1500], y[:1500]
    if name == "mnist1d_random":
        x, y = zoo_tensors("mnist1d")[:2]
        return type(mnist1d_model)().eval(), x[:1500], y[:1500]
    if name == "digits":
        x, y = zoo_tensors("digits")[:2]
        return DigitsConvNet().eval(), x, y
    x, y = zoo_tensors("digits32")[:2]
    return _conv3x3().eval(), x[:400], y[:400]


@pytest.mark.parametrize("net", ["mnist1d_trained", "mnist1d_random", "digits", "conv3x3"])
def test_float32_products_match_the_float64_reference(net, mnist1d_model):
    """Eigenvalues above the threshold's cut agree within 1e-6 of the largest one, and every
    class and layer keeps the same rank, at thresholds up to the ``auto`` margin."""
    model, x, y = _nets(net, mnist1d_model)
    reference = _class_sums(model, x, y, gram=torch.float64)
    fast = _class_sums(model, x, y, gram=torch.float32)
    assert reference.keys() == fast.keys()
    # the float32 products really ran (a layer fed exact small integers may still agree bitwise)
    assert any(not torch.equal(reference[k][c], fast[k][c]) for k in fast for c in fast[k])
    for key in reference:
        for label, exact in reference[key].items():
            approx = fast[key][label]
            values, _ = eigh_descending(exact)
            found, _ = eigh_descending(approx)
            total = float(values.sum())
            for threshold in (0.9, 0.97, 0.99, FLOAT32_GRAM_MAX_THRESHOLD):
                cut = energy_rank(values, threshold, total)
                assert energy_rank(found, threshold, float(found.sum())) == cut, (key, label)
                error = (values[:cut] - found[:cut]).abs().max() / values[0]
                assert error < 1e-6, (key, label, threshold, float(error))


def test_engine_keeps_the_same_ranks_with_float32_products(mnist1d_model):
    x, y = zoo_tensors("mnist1d")[:2]
    x, y = x[:1000], y[:1000]
    infos = {}
    for gram in (torch.float64, "auto"):
        engine = NullSpaceEngine(copy.deepcopy(mnist1d_model), threshold=0.97, gram=gram)
        infos[str(gram)] = engine.build(_batches(x, y))
    reference, fast = infos["torch.float64"], infos["auto"]
    assert {k: i.rank for k, i in fast.items()} == {k: i.rank for k, i in reference.items()}
    for key in reference:
        assert fast[key].energy == pytest.approx(reference[key].energy, abs=1e-6)


def test_auto_falls_back_to_float64_products_at_threshold_one(mnist1d_model):
    """``threshold=1.0`` keeps every non-zero direction: ``auto`` multiplies in float64 there
    (bit for bit the float64 reference), and in float32 below the margin."""
    x, y = zoo_tensors("mnist1d")[:2]
    x, y = x[:600], y[:600]
    exact = _class_sums(mnist1d_model, x, y, gram=torch.float64)
    single = _class_sums(mnist1d_model, x, y, gram=torch.float32)
    at_one = _class_sums(mnist1d_model, x, y, threshold=1.0)
    below = _class_sums(mnist1d_model, x, y, threshold=0.97)
    for key in exact:
        for label in exact[key]:
            assert torch.equal(at_one[key][label], exact[key][label])
            assert torch.equal(below[key][label], single[key][label])
    assert any(not torch.equal(below[k][c], exact[k][c]) for k in exact for c in exact[k])


def test_auto_follows_the_per_class_schedule(mnist1d_model):
    """With ``threshold + step * k`` crossing the margin, classes above it multiply in float64."""
    x, y = zoo_tensors("mnist1d")[:2]
    x, y = x[:600], y[:600]
    exact = _class_sums(mnist1d_model, x, y, gram=torch.float64)
    single = _class_sums(mnist1d_model, x, y, gram=torch.float32)
    scheduled = _class_sums(mnist1d_model, x, y, threshold=0.995, class_threshold_step=0.001)
    for key in exact:
        for label in exact[key]:
            wide = 0.995 + 0.001 * label > FLOAT32_GRAM_MAX_THRESHOLD
            expected = exact if wide else single
            assert torch.equal(scheduled[key][label], expected[key][label]), (key, label)


@pytest.mark.parametrize("gram", [torch.float64, torch.float32])
def test_pass_equals_the_sums_of_the_layer_rows(gram, monkeypatch):
    """Several batches, the last one smaller (buffers reused from batch to batch)."""
    torch.manual_seed(0)
    model = _conv3x3().eval()
    x, y = zoo_tensors("digits32")[:2]
    x, y = x[:96], y[:96]
    with monkeypatch.context() as patch:
        # one plain product for every block
        patch.setattr(gram_module, "shifted_gram_pays", lambda *_: False)
        sums = _class_sums(model, x, y, batch_size=40, gram=gram)
    with monkeypatch.context() as patch:
        patch.setattr(gram_module, "SHIFTED_ROWS", 1)  # the shifted product for every block
        shifted = _class_sums(model, x, y, batch_size=40, gram=gram)
    # float32 products: each entry is a float32 dot product over the ~4,000 rows of a class in
    # a batch, typical error sqrt(n)·u ~ 4e-6 relative (observed: 1e-6 on the 2-core CI machine,
    # 2e-6 on a 16-core GPU host, whose BLAS sums in another order)
    tolerance = 1e-12 if gram == torch.float64 else 1e-5
    inputs: dict[str, Tensor] = {}
    hooks = [
        model[i].register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(str(i), a[0].double())
        )
        for i in (0, 2, 4, 8)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for key, per_class in sums.items():
        layer = model[int(key)]
        for label, total in per_class.items():
            rows = layer_rows(layer, inputs[key][y == label])
            expected = rows.T @ rows
            atol = tolerance * float(expected.max())
            assert torch.allclose(total, expected, rtol=tolerance, atol=atol), (key, label)
            found = shifted[key][label]
            assert torch.allclose(found, expected, rtol=tolerance, atol=atol), (key, label)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(6, 4, 3, stride=2, padding=1), (3, 6, 11)),
        (nn.Conv1d(6, 4, 3, dilation=2, padding="same", padding_mode="reflect"), (3, 6, 11)),
        (nn.Conv1d(6, 6, 5, groups=3, padding=2, padding_mode="circular"), (2, 6, 9)),
        (nn.Conv1d(6, 4, 3, padding=1), (6, 10)),  # unbatched
        (
            nn.Conv2d(6, 4, (3, 2), stride=(2, 1), padding=1, groups=2, dilation=(1, 2)),
            (2, 6, 9, 8),
        ),
        (nn.Conv2d(3, 5, 3, padding=1, padding_mode="replicate"), (3, 3, 7, 6)),
        (nn.Conv3d(4, 4, 2, groups=4, padding=1), (2, 4, 5, 4, 3)),
    ],
)
def test_channels_last_rows_give_the_gram_of_the_patch_rows(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    rows = conv_rows(conv, x)
    fast = conv_rows_channels_last(conv, x)
    assert fast.shape == rows.shape
    gram = channels_last_gram_to_weight_order(
        fast.T @ fast, tuple(conv.kernel_size), conv.in_channels // conv.groups
    )
    expected = rows.T @ rows
    assert torch.allclose(gram, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()))
    # the same rows up to a column permutation: every row's sorted entries agree
    assert torch.equal(fast.sort(dim=1).values, rows.sort(dim=1).values)
    # the row index the basis pass permutes its bases with is that same permutation
    index = channels_last_weight_index(tuple(conv.kernel_size), conv.in_channels // conv.groups)
    assert torch.equal(fast[:, index], rows)
    assert torch.equal(gram, (fast.T @ fast)[index][:, index])


def _reference_slots(
    labels: list[int], slots: _Slots, used: dict[int, int], cap: int | None
) -> list[int]:
    """The per-sample loop the vectorised ``_slots`` replaced."""
    slot_of = {}
    for label in sorted(set(labels)):
        slot_of[label] = slots.assign_all([label], used)[0]
    result = []
    for label in labels:
        slot = slot_of[label]
        if slot < 0 or (cap is not None and used.get(label, 0) >= cap):
            result.append(-1)
            continue
        used[label] = used.get(label, 0) + 1
        result.append(slot)
    return result


@pytest.mark.parametrize(
    ("capacity", "cap", "fixed"), [(3, None, None), (2, 3, None), (4, 2, [1, 4, 6])]
)
def test_vectorised_slots_match_the_per_sample_loop(capacity, cap, fixed):
    from unsc_lightning.nullspace.covariance import CovarianceAccumulator

    engine = NullSpaceEngine(nn.Linear(3, 2), max_samples_per_class=cap)
    basis_pass = BasisPass(engine, torch.device("cpu"), default_batch_adapter, engine.model, None)
    fast_slots, slow_slots = _Slots(capacity, fixed), _Slots(capacity, fixed)
    for slots in (fast_slots, slow_slots):
        slots.bind(CovarianceAccumulator({"x": 2}, num_classes=0))
    slow_used: dict[int, int] = {}
    generator = torch.Generator().manual_seed(0)
    for batch in range(12):
        # descending class ids over the batches force evictions of the highest held class
        labels = torch.randint(max(0, 6 - batch), 8, (17,), generator=generator)
        fast = basis_pass._slots(labels, fast_slots).tolist()
        slow = _reference_slots(labels.tolist(), slow_slots, slow_used, cap)
        assert fast == slow, batch
        assert fast_slots.classes == slow_slots.classes
        assert basis_pass.used == slow_used
        assert fast_slots.accumulator is not None
        assert fast_slots.accumulator.sums["x"].shape[0] == len(fast_slots.classes)


def test_gram_setting_is_checked():
    bad_values = ("float16", torch.float16, GramOptions(row_fraction=0.0), GramOptions(seed=1.5), 3)
    for bad in bad_values:  # type: ignore[arg-type]
        with pytest.raises(NullSpaceEngineError, match="gram"):
            NullSpaceEngine(nn.Linear(3, 2), gram=bad)
    # the spelling of a YAML config
    assert NullSpaceEngine(nn.Linear(3, 2), gram="float32").gram.dtype == torch.float32
    assert NullSpaceEngine(nn.Linear(3, 2)).gram == GramOptions()
    assert NullSpaceEngine(nn.Linear(3, 2), gram=None).gram == GramOptions()


def test_float32_overflow_is_named():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.full((8, 4), 1e20)
    with pytest.raises(RuntimeError, match="float32 Gram products overflowed"):
        NullSpaceEngine(model, gram=torch.float32).build([(x, torch.zeros(8, dtype=torch.long))])
    NullSpaceEngine(model, gram=torch.float64).build([(x, torch.zeros(8, dtype=torch.long))])


def test_half_precision_inputs_are_widened_before_the_products():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 3, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(10, 4, 12).to(torch.bfloat16)
    y = torch.zeros(10, dtype=torch.long)
    sums = _class_sums(nn.Sequential(conv), x, y, gram=torch.float32)["0"][0]
    rows = conv_rows(conv, x.double())
    expected = rows.T @ rows
    assert torch.allclose(sums, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    exact = _class_sums(nn.Sequential(conv), x, y, gram=torch.float64)["0"][0]
    assert torch.allclose(exact, expected, rtol=1e-12, atol=0)


def test_row_subsampling_is_seeded_and_captures_the_remaining_energy(mnist1d_model):
    x, y, x_test, y_test = zoo_tensors("mnist1d")
    x, y = x[:1500], y[:1500]
    options = GramOptions(row_fraction=0.25, seed=3)
    first = _class_sums(mnist1d_model, x, y, gram=options)
    again = _class_sums(mnist1d_model, x, y, gram=options)
    other = _class_sums(mnist1d_model, x, y, gram=GramOptions(row_fraction=0.25, seed=4))
    exact = _class_sums(mnist1d_model, x, y, gram=torch.float32)
    for key in first:
        for label in first[key]:
            assert torch.equal(first[key][label], again[key][label])
            # about a quarter of the rows (the sums scale with the rows summed)
            ratio = float(first[key][label].trace() / exact[key][label].trace())
            assert 0.15 < ratio < 0.35, (key, label, ratio)
        assert any(not torch.equal(first[key][k], other[key][k]) for k in first[key])
    # the subsampled basis captures nearly the energy of the exact one on held-out data
    held_out = _batches(x_test[:500], y_test[:500])
    energies = {}
    for gram in (torch.float32, options):
        engine = NullSpaceEngine(copy.deepcopy(mnist1d_model), threshold=0.97, gram=gram)
        engine.build(_batches(x, y))
        energies[str(gram)] = _held_out_energy(engine, held_out)
    for key, exact_energy in energies["torch.float32"].items():
        assert energies[str(options)][key] > exact_energy - 0.05, key


def _held_out_energy(
    engine: NullSpaceEngine, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, float]:
    """Fraction of the held-out rows' energy inside each basis (``‖Uᵀx‖² / ‖x‖²`` summed)."""
    sums = _class_sums(engine.model, *map(torch.cat, zip(*batches)), gram=torch.float64)
    result = {}
    for key, per_class in sums.items():
        basis = engine.bases[key].double()
        total = sum(float(c.trace()) for c in per_class.values())
        kept = sum(float((basis.T @ c @ basis).trace()) for c in per_class.values())
        result[key] = kept / total if total > 0 else 1.0
    return result


def test_subsampled_rank_bound_still_bounds_the_rank():
    # rows per sample counts every row (before subsampling): a valid bound on the rank
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1))
    x = torch.randn(5, 2, 16)
    y = torch.zeros(5, dtype=torch.long)
    engine = NullSpaceEngine(model, threshold=0.99, gram=GramOptions(row_fraction=0.1))
    engine.build([(x, y)])
    assert engine.layer_infos["0"].rank <= 6
    assert math.isfinite(engine.layer_infos["0"].energy)


def test_subsampled_conv_rows_are_a_seeded_subset_of_each_samples_positions():
    conv = nn.Conv2d(4, 2, 3, stride=(1, 2), padding=1, groups=2)
    x = torch.randn(3, 4, 8, 7, dtype=torch.float64)
    full = conv_rows_channels_last(conv, x).reshape(3, 8, -1, 2 * 9)  # (B, L1, L2 * groups, d)
    part = conv_rows_channels_last(conv, x, 0.3, torch.Generator().manual_seed(5))
    part = part.reshape(3, -1, full.shape[2], 2 * 9)
    assert part.shape[1] in (2, 3)  # every third output row of eight, from a random offset
    offsets = [o for o in range(3) if torch.equal(full[:, o::3], part)]
    assert len(offsets) == 1
    again = conv_rows_channels_last(conv, x, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(again.reshape(part.shape), part)
    seen = set()
    for seed in range(20):
        rows = conv_rows_channels_last(conv, x, 0.3, torch.Generator().manual_seed(seed))
        seen.add(rows.shape[0])
    assert len(seen) == 2  # offsets 0, 1 (3 rows of positions) and 2 (2 rows) all drawn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_layers_multiply_only_the_upper_gram_blocks(dtype):
    from unsc_lightning.nullspace.gram import _add_symmetric_gram, _parts

    rows = torch.randn(300, 500, dtype=torch.float64).to(dtype)
    assert _parts(rows) == 3
    target = torch.ones(500, 500, dtype=torch.float64)
    _add_symmetric_gram(target, rows)
    expected = 1 + (rows.double().T @ rows.double())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(target, expected, rtol=0, atol=tolerance * float(expected.max()))
    # blocks off the diagonal are mirrored exactly
    assert torch.equal(target[:167, 167:], target[167:, :167].T)


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv1d(16, 4, 3, stride=2, padding=1), (7, 16, 21)),
        (nn.Conv1d(16, 4, 5, stride=2, padding=2, padding_mode="reflect"), (7, 16, 19)),
        (nn.Conv1d(16, 4, 4, stride=1, padding="same"), (7, 16, 12)),
        (nn.Conv2d(6, 4, 3, padding=1), (7, 6, 8, 7)),
        (nn.Conv2d(6, 4, (3, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (7, 6, 9, 8)),
        (nn.Conv2d(6, 4, 3, stride=1, padding=1, padding_mode="circular"), (7, 6, 5, 6)),
        (nn.Conv3d(4, 4, (3, 2, 2), padding=1), (7, 4, 5, 4, 3)),
    ],
)
def test_shifted_conv_gram_equals_the_patch_rows_gram(conv, shape, monkeypatch):
    """The Gram from ``stride / kernel`` of the products plus the border rows equals the
    unfold-based one per class (float64, 1e-10 relative), labels unsorted."""
    from unsc_lightning.nullspace.covariance import CovarianceAccumulator, SiteRecorder

    monkeypatch.setattr(gram_module, "SHIFTED_ROWS", 1)  # the shifted product for every block
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 0, -1, 1])
    accumulator = CovarianceAccumulator({"c": conv.weight[0].numel()}, num_classes=3)
    recorder = SiteRecorder(
        [("c", conv, conv_representation(conv)[0])],
        accumulator.add,
        channels_last=True,
        shift_gram=True,
    )
    assert recorder.shifted == {"c"}
    accumulator.column_orders = dict(recorder.column_orders)
    with recorder, torch.no_grad():
        accumulator.set_labels(labels)
        conv.double()(x)
    accumulator.weight_order_()
    for label in range(3):
        rows = conv_rows(conv, x[labels == label])
        expected = rows.T @ rows
        found = accumulator.sums["c"][label]
        assert torch.allclose(found, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 3, 3, padding=1),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
        nn.Conv2d(3, 2, (5, 3), stride=(2, 1), padding=(2, 1)),
        nn.Conv2d(3, 2, (3, 4), stride=(1, 2), padding=0),
        nn.Conv2d(2, 2, 4, stride=3, padding=2, padding_mode="reflect"),
        nn.Conv2d(2, 2, (3, 3), dilation=(1, 2), padding=2),  # second dimension dilated
        nn.Conv1d(5, 3, 5, stride=2, padding=2),
    ],
)
def test_shifted_gram_along_both_dimensions_equals_the_unfold_gram(conv):
    """The products of ``gram.add_shifted_gram``, along the first and (2-d, undilated) the second
    spatial dimension, against the Gram of the patch rows, float64, exact to rounding."""
    torch.manual_seed(0)
    shape = (
        (3, conv.in_channels, 11) if isinstance(conv, nn.Conv1d) else (3, conv.in_channels, 9, 10)
    )
    x = torch.randn(shape, dtype=torch.float64)
    rows = conv_rows_channels_last(conv, x)
    first, last = conv_shift_borders(conv, x)
    inner = None
    if covariance._inner_shiftable(conv):
        inner_first, inner_last = conv_shift_borders(conv, x, dim=1)
        inner = (inner_first, inner_last, conv.kernel_size[1], conv.stride[1])
    assert (inner is not None) == (isinstance(conv, nn.Conv2d) and conv.dilation[1] == 1)
    found = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    gram_module.add_shifted_gram(
        found, rows, first, last, conv.kernel_size[0], conv.stride[0], torch.float64, inner
    )
    expected = rows.T @ rows
    assert torch.allclose(found, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def _tf32_state() -> tuple[str | None, str, str, bool | None]:
    matmul = torch.backends.cuda.matmul
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user mixed the legacy and the new API
        legacy = None
    try:
        allowed: bool | None = matmul.allow_tf32
    except RuntimeError:
        allowed = None
    return legacy, matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision, allowed


@pytest.mark.parametrize(
    "user", ["default", "legacy_high", "legacy_medium", "allow_tf32", "new_api_tf32", "mixed"]
)
def test_ieee_float32_switches_tf32_off_consistently_and_restores_the_users_setting(user):
    # The flags are process-wide and settable without a GPU; on CUDA they decide whether cuBLAS
    # rounds float32 products to TF32 (and cuBLAS refuses flags that disagree), on the CPU
    # whether oneDNN multiplies float32 in bfloat16 ("medium").
    from unsc_lightning.nullspace.context import ieee_float32

    matmul, cpu = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = _tf32_state()
    try:
        if user == "legacy_high":
            torch.set_float32_matmul_precision("high")
        elif user == "legacy_medium":
            torch.set_float32_matmul_precision("medium")
        elif user == "allow_tf32":
            matmul.allow_tf32 = True
        elif user == "new_api_tf32":
            matmul.fp32_precision = "tf32"
        elif user == "mixed":
            torch.set_float32_matmul_precision("high")
            matmul.fp32_precision = "ieee"
        before = _tf32_state()
        for _ in range(2):  # entered twice: nothing left behind by the first
            with ieee_float32():
                assert matmul.allow_tf32 is False  # readable: the flags agree
                assert matmul.fp32_precision in ("none", "ieee")
                assert cpu.fp32_precision in ("none", "ieee")
                assert torch.get_float32_matmul_precision() == "highest"
            assert _tf32_state() == before
    finally:
        torch.set_float32_matmul_precision(saved[0] or "highest")
        matmul.fp32_precision, cpu.fp32_precision = saved[1], saved[2]
    assert _tf32_state() == saved


def _cudnn_state() -> tuple[bool | None, str, str]:
    cudnn = torch.backends.cudnn
    try:
        legacy: bool | None = cudnn.allow_tf32
    except RuntimeError:  # the user mixed the legacy and the new API
        legacy = None
    return legacy, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision


@pytest.mark.parametrize(
    "user", ["default", "legacy_off", "new_api_conv_ieee", "new_api_conv_tf32"]
)
def test_ieee_forward_switches_cudnn_tf32_off_and_restores_the_users_setting(user):
    from unsc_lightning.nullspace.context import ieee_forward

    cudnn = torch.backends.cudnn
    saved = _cudnn_state()
    try:
        if user == "legacy_off":
            cudnn.allow_tf32 = False
        elif user == "new_api_conv_ieee":
            cudnn.conv.fp32_precision = "ieee"
        elif user == "new_api_conv_tf32":
            cudnn.allow_tf32 = False
            cudnn.conv.fp32_precision = "tf32"
        before = _cudnn_state()
        with ieee_forward(torch.device("cuda")):
            assert cudnn.allow_tf32 is False  # readable: conv and rnn agree
            assert cudnn.conv.fp32_precision in ("none", "ieee")
            assert torch.get_float32_matmul_precision() == "highest"
        assert _cudnn_state() == before
    finally:
        cudnn.allow_tf32 = saved[0] if saved[0] is not None else True
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[1], saved[2]
    assert _cudnn_state() == saved


def test_nested_ieee_float32_leaves_the_flags_to_the_enclosing_context(monkeypatch):
    # The basis pass holds one context around the forward; the Gram product of every class block
    # enters another inside it, which must neither read nor write the flags (a cost per product)
    # nor restore the user's setting before the enclosing context ends.
    from unsc_lightning.nullspace import context

    saved = _tf32_state()
    calls = []
    original_get = torch.get_float32_matmul_precision
    try:
        torch.set_float32_matmul_precision("high")
        with context.ieee_float32():
            monkeypatch.setattr(
                torch, "get_float32_matmul_precision", lambda: calls.append(1) or original_get()
            )
            for _ in range(3):
                with context.ieee_float32(), context.ieee_float32():
                    assert original_get() == "highest"
                assert original_get() == "highest"  # not restored by an inner context
            monkeypatch.setattr(torch, "get_float32_matmul_precision", original_get)
        assert calls == []
        assert original_get() == "high"  # the enclosing context restores the user's setting
        with context.ieee_float32():  # and a later context switches again
            assert original_get() == "highest"
        assert original_get() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0] or "highest")
        torch.backends.cuda.matmul.fp32_precision = saved[1]
        torch.backends.mkldnn.matmul.fp32_precision = saved[2]
    assert _tf32_state() == saved


def test_ieee_float32_nesting_is_undone_when_switching_the_flags_fails(monkeypatch):
    # A context whose switch raises is not counted: the next one switches the flags again.
    from unsc_lightning.nullspace import context

    def refuse(value):
        raise RuntimeError("refused")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
        patch.setattr(torch, "set_float32_matmul_precision", refuse)
        with pytest.raises(RuntimeError, match="refused"), context.ieee_float32():
            pass
    assert getattr(context._NESTING, "matmul", 0) == 0


@pytest.mark.parametrize(
    ("rows", "dim", "stride", "expected"),
    [
        (2048, 96, 2, True),  # many rows: any stride
        (2047, 96, 2, False),
        (832, 864, 2, False),  # stride 2: only from SHIFTED_ROWS on
        (832, 864, 1, True),  # AllCNN's 8 x 8 maps, a class's rows from a batch of 128
        (256, 256, 1, True),
        (256, 144, 1, False),  # small and narrow: the plain product is faster
    ],
)
def test_shifted_gram_pays_for_many_rows_or_unit_stride_blocks(rows, dim, stride, expected):
    assert gram_module.shifted_gram_pays(rows, dim, stride) is expected


def test_unit_stride_class_blocks_below_shifted_rows_take_the_shifted_product(monkeypatch):
    """The pass sends a stride-1 convolution's small class blocks to the shifted Gram (where it
    pays, :func:`~unsc_lightning.nullspace.gram.shifted_gram_pays`) and its sums still equal
    the plain product's (float64, 1e-10)."""
    calls: list[tuple[int, int]] = []
    original = gram_module.shifted_gram_pays

    def counting(rows: int, dim: int, stride: int) -> bool:
        pays = original(rows, dim, stride)
        if pays:
            calls.append((rows, dim))
        return pays

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(24, 32, 8, 8, dtype=torch.float64)
    y = torch.arange(24) % 3
    model = model.double()
    with monkeypatch.context() as patch:
        patch.setattr(gram_module, "shifted_gram_pays", lambda *_: False)
        plain = _class_sums(model, x, y, batch_size=24, gram=torch.float64)
    with monkeypatch.context() as patch:
        patch.setattr(gram_module, "shifted_gram_pays", counting)
        shifted = _class_sums(model, x, y, batch_size=24, gram=torch.float64)
    # each class: 8 samples x 64 positions = 512 rows of width 288, under SHIFTED_ROWS
    assert calls and all(rows < gram_module.SHIFTED_ROWS for rows, _ in calls)
    for key, per_class in plain.items():
        for label, expected in per_class.items():
            got = shifted[key][label]
            assert torch.allclose(
                got, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max())
            )
