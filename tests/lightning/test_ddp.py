"""`NullSpaceCalibration` under DDP (2 CPU processes, gloo) equals a single process.

Each rank takes the retain batches ``index % world_size == rank`` and the covariances are summed
across ranks before the eigendecomposition, so every rank must hold the *same* bases, equal to the
bases one process builds from all the data; DDP then keeps the weights identical across ranks.

The processes are started with ``start_method="fork"`` (Lightning's ``ddp_fork``, the
multiprocessing launcher of ``ddp_spawn``): the children reuse the parent's imports, where
``spawn`` would re-import torch and Lightning in each of them (many seconds per test on a busy
runner), and no test object has to be picklable. Each rank writes what it holds to a file.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from helpers.problems import (
    FORGET_CLASS,
    IN_FEATURES,
    NUM_CLASSES,
    NUM_RETAIN,
    BoringClassifier,
    make_subspace_problem,
    mlp,
    quiet_trainer,
)
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError, UnlearningModule

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method"),
]

WORLD_SIZE = 2
EPOCHS = 4
RETAIN_BATCH = 6  # 32 samples -> 6 batches (6, 6, 6, 6, 6, 2): uneven shards of 18 and 14 samples
# float64 covariances summed in another order: the projectors differ by float64 rounding only,
# and float32 weights after a few identical steps by float32 rounding only
PROJECTOR_ATOL = 1e-10
WEIGHT_ATOL = 1e-6


def ddp_trainer(callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    # a timeout on the collectives turns a rank that never arrives into an error, not a hang
    strategy = DDPStrategy(
        start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60)
    )
    return quiet_trainer(EPOCHS, callbacks, strategy=strategy, devices=WORLD_SIZE, **kwargs)


class _SaveRankState(L.Callback):
    """Writes the rank's bases, retain-sample count and final weights to ``out_dir/rank{r}.pt``."""

    def __init__(self, calibration: NullSpaceCalibration, out_dir: Path) -> None:
        self.calibration = calibration
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            "world_size": trainer.world_size,
            "bases": {name: basis.clone() for name, basis in self.calibration.bases.items()},
            "retain_samples": self.calibration.retain_samples,
            "held_rows": self.calibration.engine.report.held_rows,  # type: ignore[union-attr]
            "layers_built": self.calibration.engine.report.layers_built,  # type: ignore[union-attr]
            "energy": {k: i.energy for k, i in self.calibration.engine.layer_infos.items()},  # type: ignore[union-attr]
            "weights": {
                name: value.detach().clone() for name, value in pl_module.state_dict().items()
            },
        }
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


def load_ranks(out_dir: Path) -> list[dict[str, Any]]:
    states = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    assert all(state["world_size"] == WORLD_SIZE for state in states)
    return states


def projector(basis: Tensor) -> Tensor:
    basis = basis.double()
    return basis @ basis.T


def max_projector_difference(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(
        float((projector(first[name]) - projector(second[name])).abs().max()) for name in first
    )


def max_weight_difference(first: dict[str, Tensor], second: dict[str, Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(
        float((first[name].double() - second[name].double()).abs().max())
        for name in first
        if first[name].is_floating_point()
    )


# --------------------------------------------------------------------------------------------
# 1. Bases and weights: every rank equals every other rank and the single process
# --------------------------------------------------------------------------------------------
def unlearning_module() -> UnlearningModule:
    torch.manual_seed(0)
    return UnlearningModule(
        mlp(),
        num_classes=NUM_CLASSES,
        forget_classes=[FORGET_CLASS],
        lr=0.05,
        momentum=0.9,
        stop_at_target=False,
    )


def forget_loader(batch_size: int) -> DataLoader:
    # no shuffling: under DDP, Lightning's DistributedSampler gives rank r the samples r, r + 2, ...
    # so one step of 2 x 8 samples sees the same 16 samples as one single-process step of 16
    problem = make_subspace_problem()
    return DataLoader(TensorDataset(problem.forget_x, problem.forget_y), batch_size=batch_size)


# float64 products: the shards' sums equal one process's to float64 rounding; float32 products
# ("auto" at threshold 0.97) round each rank's batches in float32 before the float64 sums
@pytest.mark.parametrize(("gram", "projector_atol"), [("float64", PROJECTOR_ATOL), ("auto", 1e-6)])
@pytest.mark.parametrize("rule", ["per_class", "pooled"])
def test_ddp_bases_and_weights_equal_single_process(tmp_path, rule, gram, projector_atol):
    problem = make_subspace_problem()
    retain = problem.retain_loader(batch_size=RETAIN_BATCH)

    single = NullSpaceCalibration(threshold=0.97, rule=rule, retain_dataloader=retain, gram=gram)
    single_module = unlearning_module()
    initial = {name: value.clone() for name, value in single_module.state_dict().items()}
    quiet_trainer(EPOCHS, [single]).fit(single_module, train_dataloaders=forget_loader(2 * 8))
    single_weights = single_module.state_dict()

    calibration = NullSpaceCalibration(
        threshold=0.97, rule=rule, retain_dataloader=retain, gram=gram
    )
    trainer = ddp_trainer([calibration, _SaveRankState(calibration, tmp_path)])
    trainer.fit(unlearning_module(), train_dataloaders=forget_loader(8))
    ranks = load_ranks(tmp_path)

    for state in ranks:
        assert state["retain_samples"] == NUM_RETAIN  # the shards were summed, not one of them
        assert {name: b.shape for name, b in state["bases"].items()} == {
            name: b.shape for name, b in single.bases.items()
        }
    # identical across ranks: both eigendecompose the same all-reduced covariance
    for name, basis in ranks[0]["bases"].items():
        assert torch.equal(basis, ranks[1]["bases"][name]), name
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0
    # equal to one process over the same data
    assert max_projector_difference(ranks[0]["bases"], dict(single.bases)) <= projector_atol
    assert max_weight_difference(ranks[0]["weights"], single_weights) <= WEIGHT_ATOL
    # ...and training did happen (the weight comparison is not trivially true)
    assert max_weight_difference(initial, single_weights) > 1e-2


@pytest.mark.parametrize(
    ("classes_per_pass", "limit"), [(None, None), (2, None), (None, 6)], ids=["1", "2", "6"]
)
def test_ddp_sums_rows_waiting_in_row_buffers_before_the_all_reduce(
    tmp_path, monkeypatch, classes_per_pass, limit
):
    """A 600-wide layer gets one or two rows per class and batch: they wait in row buffers
    (``nullspace.gram.buffer_rows``) and must be multiplied and added before the ranks' sums are
    all-reduced, so both ranks hold the single process's bases. With two classes per pass the
    later passes' sums go straight to the all-reduce (``reduce_`` adds the buffers first). One
    process keeps each class's few rows as rows (``held_rows``) and builds from them; the ranks
    gather them and build from them too. With a limit of 6 rows per class, each rank holds
    fewer (4 or 5 of a class's 8), but together they hold more: both must multiply them into
    the sums and all-reduce those instead (forked ranks inherit the patched limit)."""
    from unsc_lightning.nullspace import NullSpaceEngine, basis_pass, covariance

    # one forward per retain batch (no merging of small batches), on every rank: the rows must
    # arrive a few per class and batch; and the single process's float32 products then match
    # the ranks' block for block (PROJECTOR_ATOL)
    monkeypatch.setattr(basis_pass, "MERGE_SAMPLES", 1)
    if limit is not None:  # no row buffer either (it would hold 75 rows of this layer)
        monkeypatch.setattr(covariance, "held_rows", lambda dim: limit if dim >= 512 else 0)
        monkeypatch.setattr(covariance, "buffer_rows", lambda dim: 0)

    calls: list[int] = []
    original = covariance.CovarianceAccumulator.take_rows

    def counting(self: Any) -> Any:
        taken = original(self)
        calls.extend(1 for name, _ in taken if name == "model.2")
        return taken

    monkeypatch.setattr(covariance.CovarianceAccumulator, "take_rows", counting)

    def wide_module() -> UnlearningModule:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN_FEATURES, 600), nn.ReLU(), nn.Linear(600, NUM_CLASSES))
        return UnlearningModule(
            model,
            num_classes=NUM_CLASSES,
            forget_classes=[FORGET_CLASS],
            lr=0.05,
            stop_at_target=False,
        )

    problem = make_subspace_problem()
    retain = problem.retain_loader(batch_size=RETAIN_BATCH)
    budget = None
    if classes_per_pass is not None:
        budget = NullSpaceEngine(wide_module().model).estimate_bytes(classes_per_pass)
    options: dict[str, Any] = {"retain_dataloader": retain, "gram": "float64"}
    single = NullSpaceCalibration(threshold=0.97, memory_budget=budget, **options)
    quiet_trainer(1, [single]).fit(wide_module(), train_dataloaders=forget_loader(2 * 8))
    # every class of the wide layer was held as rows, in every pass (none past the limit)
    assert len(calls) == (NUM_CLASSES - 1 if limit is None else 0)
    assert single.bases["model.2"].shape[0] == 600
    assert single.engine is not None and single.engine.report is not None
    assert single.engine.report.passes == (1 if budget is None else 2)

    calibration = NullSpaceCalibration(threshold=0.97, memory_budget=budget, **options)
    trainer = ddp_trainer([calibration, _SaveRankState(calibration, tmp_path)])
    trainer.fit(wide_module(), train_dataloaders=forget_loader(8))
    ranks = load_ranks(tmp_path)
    for state in ranks:
        assert state["retain_samples"] == NUM_RETAIN
        # gathered as rows, or (past the limit together) multiplied into the summed sums
        assert state["held_rows"] == ({"model.2": NUM_CLASSES - 1} if limit is None else {})
        # each of the two layers' bases computed by one rank and shared with the other
        assert state["layers_built"] == 1
        for name, energy in single.engine.layer_infos.items():  # type: ignore[union-attr]
            assert state["energy"][name] == pytest.approx(energy.energy, abs=1e-9), name
    for name, basis in ranks[0]["bases"].items():
        assert torch.equal(basis, ranks[1]["bases"][name]), name
    assert max_projector_difference(ranks[0]["bases"], dict(single.bases)) <= PROJECTOR_ATOL


# --------------------------------------------------------------------------------------------
# 2. Layers seen on some ranks only
# --------------------------------------------------------------------------------------------
class _ZeroBranch(nn.Module):
    """An MLP plus a Linear layer whose inputs are always exactly zero (think dead units)."""

    def __init__(self) -> None:
        super().__init__()
        self.main = mlp()
        self.aux = nn.Linear(IN_FEATURES, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.aux(torch.zeros_like(x))


def test_ddp_rank_without_retain_batches_agrees_on_seen_layers(tmp_path):
    """One retain batch for two ranks: rank 1 runs no data, yet must agree that `aux` was run.

    `aux` receives input on rank 0 but its covariance is exactly zero, so rank 1 cannot infer from
    the reduced sums that it was used; "seen" itself has to be reduced across ranks, otherwise rank
    1 alone raises "received no input" and the ranks diverge.
    """
    problem = make_subspace_problem()
    retain = problem.retain_loader(batch_size=NUM_RETAIN)  # a single batch: rank 1 gets none
    calibration = NullSpaceCalibration(threshold=1.0, rule="pooled", retain_dataloader=retain)
    torch.manual_seed(0)
    module = BoringClassifier(_ZeroBranch(), lr=0.05)
    trainer = ddp_trainer([calibration, _SaveRankState(calibration, tmp_path)])
    trainer.fit(module, train_dataloaders=forget_loader(8))
    ranks = load_ranks(tmp_path)

    for state in ranks:
        assert state["retain_samples"] == NUM_RETAIN
        assert state["bases"]["model.aux"].shape == (IN_FEATURES, 0)  # seen, with an empty basis
    for name, basis in ranks[0]["bases"].items():
        assert torch.equal(basis, ranks[1]["bases"][name]), name
    assert max_weight_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0


# --------------------------------------------------------------------------------------------
# 3. Sharded strategies are rejected by name
# --------------------------------------------------------------------------------------------
class DeepSpeedStrategy:
    """Stands in for Lightning's (needs the `deepspeed` package): recognised by class name."""


@pytest.mark.parametrize(
    "strategy", [FSDPStrategy(), DeepSpeedStrategy()], ids=["fsdp", "deepspeed"]
)
def test_sharded_strategies_rejected_in_setup(strategy):
    # `Trainer(strategy="fsdp", accelerator="cpu")` itself refuses to build (FSDP needs a GPU), so
    # the hook gets a stand-in trainer holding the real FSDPStrategy object
    callback = NullSpaceCalibration(retain_dataloader=make_subspace_problem().retain_loader())
    name = type(strategy).__name__
    with pytest.raises(
        UnlearningConfigError,
        match=rf"does not support the strategy `{name}`.* Use one of SingleDeviceStrategy, DDPStrategy",
    ):
        callback.setup(SimpleNamespace(strategy=strategy), BoringClassifier(), "fit")  # type: ignore[arg-type]
