"""Per-class covariance cache: equal bases, no data on a second request, fingerprints, storage."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import (
    IN_FEATURES,
    NUM_CLASSES,
    BoringClassifier,
    RaisingLoader,
    logits_of,
    max_relative_change,
    mean_relative_change,
    mlp,
    quiet_trainer,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.nullspace import CovarianceAccumulator, accumulate_covariances, layer_dims
from unsc_lightning.nullspace.cache import (
    CACHE_VERSION,
    ClassCovarianceCache,
    _signatures,
    model_fingerprint,
)
from unsc_lightning.nullspace.layers import build_bases
from unsc_lightning.nullspace.representations import layer_rows

PER_CLASS = 8  # 32 remaining samples < 64 hidden units: every layer keeps a null space
CLASS_DIM = 3  # each class spans its own 3 of the 20 input dimensions
EXACT = 1e-5
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


def class_subspace_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class ``k``'s inputs lie in its own random ``CLASS_DIM``-dimensional subspace."""
    generator = torch.Generator().manual_seed(seed)
    subspaces = torch.randn(NUM_CLASSES, CLASS_DIM, IN_FEATURES, generator=generator)
    labels = torch.arange(NUM_CLASSES * PER_CLASS) % NUM_CLASSES
    latent = torch.randn(labels.numel(), CLASS_DIM, generator=generator)
    return torch.einsum("nk,nkd->nd", latent, subspaces[labels]), labels


class CountingLoader:
    """Labelled batches of ``(x, y)``; counts how many batches were read."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int = 8) -> None:
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
        self.batches_read = 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.batches_read += 1
            yield batch


class ClassForgetDataModule(L.LightningDataModule):
    """Forget whole classes: train on them, retain/forget loaders with every other sample."""

    def __init__(
        self, x: Tensor, y: Tensor, forget_classes: list[int], raising: bool = False
    ) -> None:
        super().__init__()
        self.x, self.y, self.forget_classes, self.raising = x, y, forget_classes, raising
        self.num_classes = NUM_CLASSES
        self.loaders: list[CountingLoader] = []

    def _mask(self) -> Tensor:
        return torch.isin(self.y, torch.tensor(self.forget_classes))

    def _counting(self, mask: Tensor) -> Any:
        if self.raising:
            return RaisingLoader()
        loader = CountingLoader(self.x[mask], self.y[mask])
        self.loaders.append(loader)
        return loader

    @property
    def batches_read(self) -> int:
        return sum(loader.batches_read for loader in self.loaders)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        forget = TensorDataset(self.x[self._mask()], self.y[self._mask()])
        return DataLoader(forget, batch_size=4, shuffle=True, generator=generator)

    def retain_dataloader(self) -> Any:
        return self._counting(~self._mask())

    def forget_dataloader(self) -> Any:
        return self._counting(self._mask())


@pytest.fixture
def lightning_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``caplog`` see Lightning's ``rank_zero_info`` (its logger does not propagate)."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    return class_subspace_data()


@pytest.fixture
def original() -> nn.Module:
    torch.manual_seed(0)
    return mlp()


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def projector(basis: Tensor) -> Tensor:
    basis = basis.double()
    return basis @ basis.T


def assert_same_subspaces(first: dict[str, Tensor], second: dict[str, Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].shape == second[name].shape, name
        torch.testing.assert_close(
            projector(first[name]), projector(second[name]), atol=1e-5, rtol=0
        )


def fit_unlearning(
    original: nn.Module, dm: ClassForgetDataModule, epochs: int = 3, **callback_kwargs: Any
) -> tuple[UnlearningModule, NullSpaceCalibration]:
    module = UnlearningModule(
        copy.deepcopy(original), num_classes=NUM_CLASSES, forget_classes=dm.forget_classes, lr=0.05
    )
    callback = NullSpaceCalibration(threshold=1.0, **callback_kwargs)
    quiet_trainer(epochs, [callback]).fit(module, datamodule=dm)
    return module, callback


# --------------------------------------------------------------------------------------------
# 1. Pure-python API
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "threshold", "step"),
    [("per_class", 0.97, 0.003), ("per_class", 1.0, 0.0), ("pooled", 0.9, 0.0)],
)
@pytest.mark.parametrize("remaining", [[0, 1, 2, 3], [0, 2, 4], [1]])
def test_bases_from_cache_equal_bases_from_the_remaining_data(
    data, original, rule, threshold, step, remaining
):
    x, y = data
    layers = linear_layers(original)
    cache = ClassCovarianceCache.build(original, layers, CountingLoader(x, y), NUM_CLASSES)

    keep = torch.isin(y, torch.tensor(remaining))
    direct = CovarianceAccumulator(layer_dims(layers), num_classes=NUM_CLASSES)
    accumulate_covariances(original, layers, CountingLoader(x[keep], y[keep]), direct)
    expected = build_bases(direct, threshold, rule, class_threshold_step=step)

    bases = cache.bases(remaining, threshold, rule, class_threshold_step=step)

    assert bases.keys() == expected.keys()
    for name, (basis, info) in bases.items():
        reference, reference_info = expected[name]
        assert info.rank == reference_info.rank and info.dim == reference_info.dim, name
        assert info.energy == pytest.approx(reference_info.energy, abs=1e-9)
        torch.testing.assert_close(projector(basis), projector(reference), atol=1e-9, rtol=0)


def test_memoised_sums_follow_every_in_place_change(data, original):
    # the per-class rule reads each layer's class signatures from a memo: it must
    # see drop_classes_, update_ and a user's own in-place edit of the sums
    x, y = data
    layers = linear_layers(original)
    cache = ClassCovarianceCache.build(original, layers, CountingLoader(x, y), NUM_CLASSES)
    other = ClassCovarianceCache.build(original, layers, CountingLoader(2 * x, y), NUM_CLASSES)

    def fresh() -> ClassCovarianceCache:  # the same sums, nothing memoised
        copied = ClassCovarianceCache(
            {k: v.clone() for k, v in cache.sums.items()}, cache.samples_per_class, "x"
        )
        return copied._with_rows_per_sample(cache.rows_per_sample)

    def assert_as_fresh(remaining: list[int]) -> None:
        got, expected = cache.bases(remaining, 0.97), fresh().bases(remaining, 0.97)
        for name, (basis, info) in got.items():
            assert info.rank == expected[name][1].rank, name
            assert info.energy == pytest.approx(expected[name][1].energy, abs=1e-12), name
            torch.testing.assert_close(
                projector(basis), projector(expected[name][0]), atol=1e-9, rtol=0
            )
        for name in cache.sums:  # the memo against a direct computation
            direct = _signatures(cache.sums[name], remaining)
            memoised = cache._signatures_of(name, remaining)  # states match within 1e-12
            torch.testing.assert_close(memoised, direct, rtol=1e-12, atol=0)

    assert_as_fresh([0, 1, 2, 4])  # fills the memo
    cache.update_(other)
    assert_as_fresh([0, 1, 2, 4])
    cache.drop_classes_([1])
    assert_as_fresh([0, 2, 3, 4])
    for total in cache.sums.values():  # the user's own edit
        total[0].mul_(3.0)
    assert_as_fresh([0, 2, 3, 4])


def test_save_and_load_round_trip_atomically(data, original, tmp_path):
    x, y = data
    cache = ClassCovarianceCache.build(
        original, linear_layers(original), CountingLoader(x, y), NUM_CLASSES
    )
    path = tmp_path / "sub" / "covariances.pt"

    assert cache.save(path) == path
    loaded = ClassCovarianceCache.load(path)

    assert loaded.fingerprint == cache.fingerprint == model_fingerprint(original)
    assert torch.equal(loaded.samples_per_class, cache.samples_per_class)
    assert loaded.rows_seen == cache.rows_seen
    for name, total in cache.sums.items():
        assert torch.equal(loaded.sums[name], total)
    assert sorted(p.name for p in path.parent.iterdir()) == ["covariances.pt"]  # no temporary left


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(
    data, original, tmp_path, monkeypatch
):
    x, y = data
    cache = ClassCovarianceCache.build(
        original, linear_layers(original), CountingLoader(x, y), NUM_CLASSES
    )
    path = cache.save(tmp_path / "covariances.pt")
    before = path.read_bytes()

    def broken_save(obj: Any, target: Any) -> None:
        with open(target, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["covariances.pt"]


def test_load_refuses_another_format_version(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"version": CACHE_VERSION + 1, "sums": {}}, path)
    with pytest.raises(ValueError, match="format version"):
        ClassCovarianceCache.load(path)


def test_fingerprint_covers_parameters_buffers_and_settings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    reference = model_fingerprint(model)

    assert model_fingerprint(copy.deepcopy(model)) == reference
    model.requires_grad_(False)
    model.eval()
    assert model_fingerprint(model) == reference  # flags and modes do not change the forward pass
    assert model_fingerprint(model, {"max_retain_batches": 3}) != reference

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-6  # an earlier layer changes every later layer's inputs
    assert model_fingerprint(changed) != reference
    statistics = copy.deepcopy(model)
    statistics[1].running_mean += 1e-6
    assert model_fingerprint(statistics) != reference


def test_bases_for_a_class_the_cache_lacks_raise(data, original):
    x, y = data
    keep = y != 2
    cache = ClassCovarianceCache.build(
        original, linear_layers(original), CountingLoader(x[keep], y[keep]), NUM_CLASSES
    )
    assert cache.classes == [0, 1, 3, 4]
    assert cache.missing_classes([1, 2, 3]) == [2]
    with pytest.raises(ValueError, match=r"remaining classes \[2\]"):
        cache.bases([1, 2, 3], 0.97)
    assert cache.drop_classes_([4]).classes == [0, 1, 3]
    assert float(cache.sums["0"][4].abs().sum()) == 0.0


def test_serves_checks_fingerprint_layers_and_classes(data, original):
    x, y = data
    layers = linear_layers(original)
    cache = ClassCovarianceCache.build(original, layers, CountingLoader(x, y), NUM_CLASSES)
    dims = layer_dims(layers)
    fingerprint = model_fingerprint(original)

    assert cache.serves(fingerprint, dims, NUM_CLASSES)
    assert cache.serves(fingerprint, {"2": 64}, NUM_CLASSES)  # fewer layers: served
    assert not cache.serves("0" * 16, dims, NUM_CLASSES)
    assert not cache.serves(fingerprint, {**dims, "extra": 8}, NUM_CLASSES)
    assert not cache.serves(fingerprint, dims, NUM_CLASSES + 1)


# --------------------------------------------------------------------------------------------
# 2. Per-class accumulation without masks: sorted batches and the unsorted fallback agree
# --------------------------------------------------------------------------------------------
def test_unsorted_per_class_batches_equal_sorted_and_reference():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    x = torch.randn(9, 2, 7, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    sorted_pass = CovarianceAccumulator({"conv": 6}, num_classes=3)
    accumulate_covariances(conv, {"conv": conv}, [(x, y)], sorted_pass)

    unsorted_pass = CovarianceAccumulator({"conv": 6}, num_classes=3)
    with torch.no_grad():
        handle = conv.register_forward_pre_hook(
            lambda m, a: unsorted_pass.add("conv", layer_rows(m, a[0]))
        )
        unsorted_pass.set_labels(y)  # forwarded as is: the rows are gathered by class
        conv(x)
        handle.remove()

    for k in range(3):
        rows = layer_rows(conv, x[y == k])
        torch.testing.assert_close(
            sorted_pass.sums["conv"][k], rows.T @ rows, rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            unsorted_pass.sums["conv"][k], rows.T @ rows, rtol=1e-12, atol=1e-12
        )


def test_labels_outside_the_class_range_raise():
    accumulator = CovarianceAccumulator({"fc": 3}, num_classes=2)
    with pytest.raises(RuntimeError, match=r"Labels must lie in \[0, 2\)"):
        accumulator.set_labels(torch.tensor([0, 2]))


# --------------------------------------------------------------------------------------------
# 3. The callback: first request builds the cache, later requests read no data
# --------------------------------------------------------------------------------------------
def test_second_request_for_other_classes_reads_no_data(data, original, tmp_path):
    x, y = data
    path = tmp_path / "covariances.pt"
    first_dm = ClassForgetDataModule(x, y, forget_classes=[4])
    _, first = fit_unlearning(
        original, first_dm, covariance_cache=str(path), keep_forgotten_statistics=True
    )
    _, uncached_first = fit_unlearning(original, ClassForgetDataModule(x, y, forget_classes=[4]))

    assert path.exists() and first_dm.batches_read == len(first_dm.loaders[0].loader) + len(
        first_dm.loaders[1].loader
    )
    assert ClassCovarianceCache.load(path).classes == list(
        range(NUM_CLASSES)
    )  # forgotten class too
    for (
        name,
        basis,
    ) in uncached_first.bases.items():  # the retain batches are read first: identical sums
        assert torch.equal(first.bases[name], basis)

    second_dm = ClassForgetDataModule(x, y, forget_classes=[1], raising=True)
    module = UnlearningModule(
        copy.deepcopy(original), num_classes=NUM_CLASSES, forget_classes=[1], lr=0.05
    )
    keep = y != 1
    retain_before = logits_of(module.model, x[keep])
    forget_before = logits_of(module.model, x[~keep])
    second = NullSpaceCalibration(threshold=1.0, covariance_cache=str(path))
    quiet_trainer(3, [second]).fit(module, datamodule=second_dm)  # RaisingLoader: any read fails

    _, uncached_second = fit_unlearning(original, ClassForgetDataModule(x, y, forget_classes=[1]))
    assert_same_subspaces(dict(second.bases), dict(uncached_second.bases))
    assert second.retain_samples == int(keep.sum())
    assert max_relative_change(retain_before, logits_of(module.model, x[keep])) <= EXACT
    assert mean_relative_change(forget_before, logits_of(module.model, x[~keep])) >= 0.1


def test_fingerprint_mismatch_rebuilds_the_cache(data, original, tmp_path, caplog, lightning_logs):
    x, y = data
    path = tmp_path / "covariances.pt"
    fit_unlearning(
        original,
        ClassForgetDataModule(x, y, forget_classes=[4]),
        epochs=1,
        covariance_cache=str(path),
    )
    stale = ClassCovarianceCache.load(path).fingerprint

    other = copy.deepcopy(original)
    with torch.no_grad():
        other[0].weight.mul_(1.01)  # another original model: its layer inputs differ
    dm = ClassForgetDataModule(x, y, forget_classes=[2])
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        module, callback = fit_unlearning(other, dm, epochs=1, covariance_cache=str(path))

    assert "was built for another model" in caplog.text and "rebuilding" in caplog.text
    assert dm.batches_read > 0  # the data were read again
    rebuilt = ClassCovarianceCache.load(path)
    assert rebuilt.fingerprint != stale
    assert rebuilt.fingerprint == model_fingerprint(
        module_at_fit_start(other, [2]), {"max_retain_batches": None}
    )
    _, uncached = fit_unlearning(other, ClassForgetDataModule(x, y, forget_classes=[2]), epochs=1)
    for name, basis in uncached.bases.items():
        assert torch.equal(callback.bases[name], basis)


def module_at_fit_start(model: nn.Module, forget_classes: list[int]) -> UnlearningModule:
    return UnlearningModule(
        copy.deepcopy(model), num_classes=NUM_CLASSES, forget_classes=forget_classes, lr=0.05
    )


def test_other_max_retain_batches_rebuilds(data, original, tmp_path):
    x, y = data
    path = tmp_path / "covariances.pt"
    fit_unlearning(
        original,
        ClassForgetDataModule(x, y, forget_classes=[4]),
        epochs=1,
        covariance_cache=str(path),
    )
    dm = ClassForgetDataModule(x, y, forget_classes=[4])
    fit_unlearning(original, dm, epochs=1, covariance_cache=str(path), max_retain_batches=100)
    assert dm.batches_read > 0


def test_cache_from_an_explicit_retain_loader_is_completed_when_a_class_is_missing(
    data, original, tmp_path, caplog, lightning_logs
):
    x, y = data
    path = tmp_path / "covariances.pt"
    keep_first = y != 4
    fit_unlearning(
        original,
        ClassForgetDataModule(x, y, forget_classes=[4]),
        epochs=1,
        covariance_cache=str(path),
        retain_dataloader=CountingLoader(x[keep_first], y[keep_first]),
    )
    assert ClassCovarianceCache.load(path).classes == [0, 1, 2, 3]  # only what was read

    keep_second = y != 0
    retain = CountingLoader(x[keep_second], y[keep_second])
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        fit_unlearning(
            original,
            ClassForgetDataModule(x, y, forget_classes=[0], raising=True),
            epochs=1,
            covariance_cache=str(path),
            retain_dataloader=retain,
        )

    assert "holds no sample of the remaining classes [4]" in caplog.text
    assert retain.batches_read > 0
    # completed with class 4; class 0, forgotten by this request, was dropped
    assert ClassCovarianceCache.load(path).classes == [1, 2, 3, 4]


def test_explicit_remaining_classes_serve_a_module_without_forget_classes(data, original, tmp_path):
    """A module that knows `num_classes` but not what is forgotten; the first fit reads all data."""
    x, y = data
    path = tmp_path / "covariances.pt"
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    first = NullSpaceCalibration(
        threshold=1.0,
        covariance_cache=str(path),
        remaining_classes=[0, 1, 2, 3],
        retain_dataloader=CountingLoader(x, y),
        keep_forgotten_statistics=True,
    )
    quiet_trainer(1, [first]).fit(
        BoringClassifier(copy.deepcopy(original)), train_dataloaders=train
    )
    assert ClassCovarianceCache.load(path).classes == list(range(NUM_CLASSES))

    callback = NullSpaceCalibration(
        threshold=1.0,
        covariance_cache=str(path),
        remaining_classes=[0, 1, 2],
        retain_dataloader=RaisingLoader(),
    )
    quiet_trainer(1, [callback]).fit(
        BoringClassifier(copy.deepcopy(original)), train_dataloaders=train
    )

    expected = ClassCovarianceCache.load(path).bases([0, 1, 2], 1.0)
    for name, (basis, _) in expected.items():
        torch.testing.assert_close(callback.bases[name], basis.float())


def test_sample_level_forgetting_warns_and_builds_without_the_cache(data, original, tmp_path):
    x, y = data
    path = tmp_path / "covariances.pt"
    module = BoringClassifier(copy.deepcopy(original))
    callback = NullSpaceCalibration(
        threshold=1.0, covariance_cache=str(path), retain_dataloader=CountingLoader(x[:20], y[:20])
    )
    with pytest.warns(UserWarning, match="needs to know which whole classes remain"):
        quiet_trainer(1, [callback]).fit(
            module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8)
        )
    assert not path.exists()
    assert callback.bases


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"covariance_cache": 3}, "`covariance_cache`"),
        ({"remaining_classes": []}, "`remaining_classes`"),
        ({"remaining_classes": [0, -1]}, "`remaining_classes`"),
    ],
)
def test_cache_arguments_are_validated(kwargs, match):
    from unsc_lightning import UnlearningConfigError

    with pytest.raises(UnlearningConfigError, match=match):
        NullSpaceCalibration(**kwargs)


def test_no_dense_covariance_stays_alive_after_the_bases_are_built(tmp_path):
    """Only `d x r` bases (and `d x (d-r)` factors) outlive `on_fit_start`, cache or no cache."""
    import gc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, 37), nn.ReLU(), nn.Linear(37, NUM_CLASSES))
    x, y = class_subspace_data()
    path = tmp_path / "covariances.pt"
    for forget in ([4], [1]):  # builds the cache, then is served from it
        module = UnlearningModule(
            copy.deepcopy(model), num_classes=NUM_CLASSES, forget_classes=forget, lr=0.05
        )
        callback = NullSpaceCalibration(threshold=0.97, covariance_cache=str(path))
        quiet_trainer(1, [callback]).fit(module, datamodule=ClassForgetDataModule(x, y, forget))
        del module
        gc.collect()
        dense = [
            tuple(obj.shape)
            for obj in gc.get_objects()
            if isinstance(obj, Tensor)
            and obj.dtype == torch.float64
            and obj.dim() >= 2
            and tuple(obj.shape[-2:]) in {(IN_FEATURES, IN_FEATURES), (37, 37)}
        ]
        assert dense == []
        assert all(basis.dtype == torch.float32 for basis in callback.bases.values())


class _SaveBases(L.Callback):
    """Writes the rank's bases to ``out_dir/{tag}_rank{r}.pt`` (the parent reads them)."""

    def __init__(self, calibration: NullSpaceCalibration, out_dir: Any, tag: str) -> None:
        self.calibration, self.out_dir, self.tag = calibration, out_dir, tag

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bases = {name: basis.clone() for name, basis in self.calibration.bases.items()}
        torch.save(bases, self.out_dir / f"{self.tag}_rank{trainer.global_rank}.pt")


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
def test_ddp_builds_the_same_cache_and_every_rank_is_served(data, original, tmp_path):
    import sys
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    if not sys.platform.startswith("linux"):
        pytest.skip("fork start method")
    x, y = data
    single = tmp_path / "single.pt"
    fit_unlearning(
        original,
        ClassForgetDataModule(x, y, [4]),
        epochs=1,
        covariance_cache=str(single),
        keep_forgotten_statistics=True,
    )

    def ddp_fit(forget: list[int], raising: bool, tag: str) -> None:
        strategy = DDPStrategy(
            start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60)
        )
        calibration = NullSpaceCalibration(
            threshold=1.0, covariance_cache=str(tmp_path / "ddp.pt"), keep_forgotten_statistics=True
        )
        trainer = quiet_trainer(
            1, [calibration, _SaveBases(calibration, tmp_path, tag)], strategy=strategy, devices=2
        )
        module = UnlearningModule(
            copy.deepcopy(original), num_classes=NUM_CLASSES, forget_classes=forget, lr=0.05
        )
        trainer.fit(module, datamodule=ClassForgetDataModule(x, y, forget, raising=raising))

    ddp_fit([4], raising=False, tag="first")  # each rank reads its share; the sums are all-reduced
    reference, built = (
        ClassCovarianceCache.load(single),
        ClassCovarianceCache.load(tmp_path / "ddp.pt"),
    )
    assert built.fingerprint == reference.fingerprint
    assert torch.equal(built.samples_per_class, reference.samples_per_class)
    for name, total in reference.sums.items():
        torch.testing.assert_close(built.sums[name], total, rtol=1e-12, atol=1e-10)

    ddp_fit([1], raising=True, tag="second")  # served from the file on both ranks
    ranks = [torch.load(tmp_path / f"second_rank{rank}.pt") for rank in range(2)]
    expected = {name: basis.float() for name, (basis, _) in built.bases([0, 2, 3, 4], 1.0).items()}
    for name, basis in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], basis)


# --------------------------------------------------------------------------------------------
# Per-class rule states: a later request reuses the rule's basis before its first forgotten class
# --------------------------------------------------------------------------------------------
def without_states(cache: ClassCovarianceCache) -> ClassCovarianceCache:
    """The same sums (shared), no recorded rule state."""
    fresh = ClassCovarianceCache(
        cache.sums, cache.samples_per_class, cache.fingerprint, cache.rows_seen
    )
    fresh.rows_per_sample = dict(cache.rows_per_sample)
    return fresh


@pytest.fixture
def extension_calls(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The trace of every class covariance the cache runs the per-class rule on."""
    from unsc_lightning.nullspace import cache as cache_module

    calls: list[float] = []
    extend = cache_module.extend_by_class

    def counting(basis: Tensor, cov: Tensor, *args: Any) -> Tensor:
        calls.append(float(torch.trace(cov)))
        return extend(basis, cov, *args)

    monkeypatch.setattr(cache_module, "extend_by_class", counting)
    return calls


def built_cache(data: tuple[Tensor, Tensor], original: nn.Module) -> ClassCovarianceCache:
    x, y = data
    return ClassCovarianceCache.build(
        original, linear_layers(original), CountingLoader(x, y), NUM_CLASSES
    )


def assert_equal_results(
    bases: dict[str, tuple[Tensor, Any]], expected: dict[str, tuple[Tensor, Any]]
) -> None:
    assert bases.keys() == expected.keys()
    for name, (basis, info) in bases.items():
        assert torch.equal(basis, expected[name][0]), name  # the same operations, same order
        assert info == expected[name][1], name


def traces_of(cache: ClassCovarianceCache, classes: list[int]) -> list[float]:
    """What ``extension_calls`` records when the rule runs on ``classes`` in every layer."""
    return [float(torch.trace(total[k])) for total in cache.sums.values() for k in classes]


@pytest.mark.parametrize(("threshold", "step"), [(0.97, 0.003), (1.0, 0.0)])
def test_second_request_runs_the_rule_only_after_its_first_forgotten_class(
    data, original, extension_calls, threshold, step
):
    cache = built_cache(data, original)
    cache.prepare_rule_states(threshold, step)
    assert extension_calls == traces_of(cache, list(range(NUM_CLASSES)))
    assert all(state.classes == list(range(NUM_CLASSES)) for state in cache.rule_states.values())
    extension_calls.clear()

    bases = cache.bases([0, 1, 3, 4], threshold, class_threshold_step=step)

    assert extension_calls == traces_of(cache, [3, 4])  # classes 0 and 1 come from the record
    fresh = without_states(cache)
    assert_equal_results(bases, fresh.bases([0, 1, 3, 4], threshold, class_threshold_step=step))
    assert_equal_results(
        bases, build_bases(cache.accumulator(), threshold, "per_class", [0, 1, 3, 4], step)
    )


def test_another_threshold_does_not_reuse_the_record(data, original, extension_calls):
    cache = built_cache(data, original)
    cache.prepare_rule_states(0.97)
    extension_calls.clear()
    bases = cache.bases([0, 1, 2, 3], 0.9)
    assert extension_calls == traces_of(cache, [0, 1, 2, 3])
    assert_equal_results(bases, without_states(cache).bases([0, 1, 2, 3], 0.9))


def test_rule_states_survive_save_and_load(data, original, tmp_path, extension_calls):
    cache = built_cache(data, original)
    cache.bases([0, 1, 2, 3, 4], 0.97)  # records the state of the held classes on the way
    assert cache.states_changed
    path = cache.save(tmp_path / "covariances.pt")
    assert not cache.states_changed
    extension_calls.clear()

    loaded = ClassCovarianceCache.load(path)
    assert loaded.rule_states.keys() == cache.rule_states.keys() and not loaded.states_changed
    for key, state in cache.rule_states.items():
        assert torch.equal(loaded.rule_states[key].basis, state.basis)
    bases = loaded.bases([0, 1, 2, 4], 0.97)
    assert extension_calls == traces_of(loaded, [4])
    assert_equal_results(bases, without_states(loaded).bases([0, 1, 2, 4], 0.97))


def test_a_changed_covariance_is_not_served_from_the_record(data, original, extension_calls):
    cache = built_cache(data, original)
    cache.prepare_rule_states(0.97)
    for total in cache.sums.values():
        total[2].mul_(1.5)  # edited in place, behind the cache's back
    extension_calls.clear()

    bases = cache.bases([0, 1, 2, 3], 0.97)

    assert extension_calls == traces_of(cache, [2, 3])  # the prefix stops before class 2
    assert_equal_results(bases, without_states(cache).bases([0, 1, 2, 3], 0.97))


def test_dropping_a_class_removes_every_direction_built_from_it(data, original, tmp_path):
    cache = built_cache(data, original)
    cache.prepare_rule_states(1.0)
    full = {key: state.widths for key, state in cache.rule_states.items()}

    cache.drop_classes_([2])

    for key, state in cache.rule_states.items():
        assert state.classes == [0, 1]
        assert state.basis.shape[1] == state.widths[-1] == full[key][1]
    loaded = ClassCovarianceCache.load(cache.save(tmp_path / "covariances.pt"))
    assert all(state.classes == [0, 1] for state in loaded.rule_states.values())
    assert_equal_results(
        loaded.bases([0, 1, 3, 4], 1.0), without_states(loaded).bases([0, 1, 3, 4], 1.0)
    )
    cache.drop_classes_([0])
    assert cache.rule_states == {}


@pytest.mark.parametrize(
    "tamper",
    [
        lambda states: states.clear() or states.update({"0|0.97|0.0": "not a state"}),
        lambda states: next(iter(states.values())).update(widths=[1, 2]),
        lambda states: next(iter(states.values())).update(basis=torch.zeros(3, 2)),
        lambda states: next(iter(states.values())).pop("signatures"),
    ],
)
def test_a_malformed_rule_state_in_the_file_is_ignored(data, original, tmp_path, tamper):
    cache = built_cache(data, original)
    cache.prepare_rule_states(0.97)
    path = cache.save(tmp_path / "covariances.pt")
    payload = torch.load(path, weights_only=True)
    tamper(payload["rule_states"])
    torch.save(payload, path)

    loaded = ClassCovarianceCache.load(path)

    assert len(loaded.rule_states) == len(payload["rule_states"]) - 1
    assert_equal_results(
        loaded.bases([0, 2, 3], 0.97), without_states(loaded).bases([0, 2, 3], 0.97)
    )


def test_callback_records_the_rule_and_keeps_no_state_of_a_forgotten_class(
    data, original, tmp_path
):
    x, y = data
    path = tmp_path / "covariances.pt"
    fit_unlearning(
        original, ClassForgetDataModule(x, y, forget_classes=[4]), covariance_cache=str(path)
    )
    first = ClassCovarianceCache.load(path)
    assert first.classes == [0, 1, 2, 3] and first.rule_states
    assert all(state.classes == [0, 1, 2, 3] for state in first.rule_states.values())

    # class 4 is read from the data; class 1 is forgotten, so nothing built from it may stay
    _, second = fit_unlearning(
        original, ClassForgetDataModule(x, y, forget_classes=[1]), covariance_cache=str(path)
    )
    stored = ClassCovarianceCache.load(path)
    assert stored.classes == [0, 2, 3, 4]
    assert stored.rule_states
    assert all(1 not in state.classes for state in stored.rule_states.values())
    _, uncached = fit_unlearning(original, ClassForgetDataModule(x, y, forget_classes=[1]))
    assert_same_subspaces(dict(second.bases), dict(uncached.bases))


def test_a_forgotten_class_that_added_no_direction_does_not_end_the_prefix(extension_calls):
    generator = torch.Generator().manual_seed(3)
    rows = {k: torch.randn(4, 24, generator=generator, dtype=torch.float64) for k in range(5)}
    rows[2] = torch.randn(3, 8, generator=generator, dtype=torch.float64) @ torch.cat(
        [rows[0], rows[1]]
    )  # class 2 lies in the span of classes 0 and 1
    sums = torch.stack([rows[k].T @ rows[k] for k in range(5)])
    cache = ClassCovarianceCache({"layer": sums}, torch.full((5,), 4), "fingerprint")
    cache.prepare_rule_states(1.0)
    assert cache.rule_states["layer|1.0|0.0"].widths == [4, 8, 8, 12, 16]
    extension_calls.clear()

    served = cache.bases([0, 1, 3, 4], 1.0)  # forgets class 2, which added nothing
    assert extension_calls == []
    recomputed = cache.bases([0, 2, 3, 4], 1.0)  # forgets class 1, which added 4 directions
    assert extension_calls == traces_of(cache, [2, 3, 4])

    fresh = without_states(cache)
    assert_equal_results(served, fresh.bases([0, 1, 3, 4], 1.0))
    assert_equal_results(recomputed, fresh.bases([0, 2, 3, 4], 1.0))


def test_a_stale_record_is_replaced_by_a_run_that_serves_the_held_classes(
    data, original, extension_calls
):
    cache = built_cache(data, original)
    cache.prepare_rule_states(0.97)
    for total in cache.sums.values():
        total[2].mul_(1.5)  # the record is stale from class 2 on

    cache.bases([0, 1, 2, 3], 0.97)  # follows the held classes 0..3: longer than the valid 0, 1
    assert all(state.classes == [0, 1, 2, 3] for state in cache.rule_states.values())
    extension_calls.clear()
    bases = cache.bases([0, 1, 2, 3], 0.97)
    assert extension_calls == []
    assert_equal_results(bases, without_states(cache).bases([0, 1, 2, 3], 0.97))


def test_the_callback_caches_a_conv_net_s_sums_in_the_weights_order(tmp_path):
    """The callback's cache pass forms channels-last convolution rows (as the basis pass does)
    and stores the sums permuted back: equal to the float64 sums of the weight-order rows."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (2, 10)),
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(12, NUM_CLASSES),
    )
    x, y = class_subspace_data()
    path = tmp_path / "covariances.pt"
    fit_unlearning(
        model,
        ClassForgetDataModule(x, y, forget_classes=[4]),
        epochs=1,
        covariance_cache=str(path),
        keep_forgotten_statistics=True,
    )
    cache = ClassCovarianceCache.load(path)
    layers = {f"model.{i}": model[i] for i in (1, 3, 5)}
    reference = CovarianceAccumulator(layer_dims(layers), num_classes=NUM_CLASSES)
    accumulate_covariances(
        model, layers, [(x[y != 4], y[y != 4]), (x[y == 4], y[y == 4])], reference
    )
    assert sorted(cache.sums) == sorted(layers)
    for name, expected in reference.sums.items():
        scale = float(expected.abs().max())
        assert torch.allclose(cache.sums[name], expected, rtol=0, atol=1e-10 * scale), name


def test_callback_cache_pass_merges_small_batches_with_the_sums_of_one_forward_each(
    data, original, tmp_path, monkeypatch
):
    """The callback's cache pass forwards small retain batches together (as the basis pass
    does): fewer forwards, and the cached float64 sums of one forward per batch."""
    from unsc_lightning.nullspace import basis_pass

    x, y = data

    def cache_of(name: str) -> tuple[ClassCovarianceCache, list[int]]:
        sizes: list[int] = []
        model = copy.deepcopy(original)
        hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
        path = tmp_path / name
        fit_unlearning(
            model,
            ClassForgetDataModule(x, y, forget_classes=[4]),
            epochs=1,
            covariance_cache=str(path),
        )
        hook.remove()
        return ClassCovarianceCache.load(path), sizes

    merged, merged_sizes = cache_of("merged.pt")
    with monkeypatch.context() as patch:
        patch.setattr(basis_pass, "MERGE_SAMPLES", 1)
        separate, separate_sizes = cache_of("separate.pt")
    assert len(merged_sizes) < len(separate_sizes)
    assert merged.sums.keys() == separate.sums.keys()
    assert torch.equal(merged.samples_per_class, separate.samples_per_class)
    for name, sums in separate.sums.items():
        scale = float(sums.abs().max())
        torch.testing.assert_close(merged.sums[name], sums, atol=1e-12 * scale, rtol=0)
