"""`UnlearningReport` with the real `wandb` package (offline), with `CSVLogger` and without a logger.

wandb 0.31 offline writes no ``files/wandb-summary.json``: what was logged lives in the run's
``run-<id>.wandb`` transaction log (LevelDB-log framing of ``wandb.proto`` ``Record`` messages,
read with :func:`_wandb_history` below) and the media files under ``files/media/``.
"""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from unsc_lightning import NullSpaceCalibration, UnlearningDataModule, UnlearningModule
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.models import DigitsConvNet
from unsc_lightning.reporting import MIA_REPORT_SPLITS, UnlearningReport, confidence_histogram

FORGET = 3
MAX_BATCHES = 2
EVAL_BATCH = 64


def _fit(
    logger: Any, when: str = "fit", test: bool = False
) -> tuple[L.Trainer, NullSpaceCalibration, UnlearningReport]:
    L.seed_everything(0, verbose=False)
    dm = UnlearningDataModule.from_name(
        "digits", forget_classes=[FORGET], batch_size=32, eval_batch_size=EVAL_BATCH
    )
    module = UnlearningModule(
        DigitsConvNet(channels=4, hidden=16), num_classes=10, forget_classes=[FORGET], lr=0.05
    )
    calibration = NullSpaceCalibration(threshold=0.97, max_retain_batches=2)
    report = UnlearningReport(when=when, max_batches=MAX_BATCHES)  # type: ignore[arg-type]
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[calibration, report],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=None if when == "fit" else 0,
        limit_test_batches=None,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm)
    if test:
        trainer.test(module, datamodule=dm, verbose=False)
    return trainer, calibration, report


def _expected_scalars(
    trainer: L.Trainer, calibration: NullSpaceCalibration, prefix: str
) -> dict[str, float]:
    expected = {
        f"report/acc_class_{k}": float(trainer.callback_metrics[f"{prefix}/acc_class_{k}"])
        for k in range(10)
    }
    assert calibration.layer_infos  # the fit built bases
    for name, info in calibration.layer_infos.items():
        expected[f"report/basis/{name}/dim"] = float(info.dim)
        expected[f"report/basis/{name}/rank"] = float(info.rank)
        expected[f"report/basis/{name}/energy"] = info.energy
    return expected


# --------------------------------------------------------------------------------------------
# Reading an offline wandb run
# --------------------------------------------------------------------------------------------
_BLOCK = 32768  # LevelDB log: 32 KiB blocks of chunks with a 7-byte header (crc32c, length, type)
_FULL, _LAST = 1, 4


def _wandb_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # block trailer padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``history`` row of the run as a nested dict (``nested_key`` path -> JSON value)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in _wandb_records(log_file):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_wandb_report_logs_tables_charts_and_scalars(offline_wandb: Path):
    import wandb

    logger = WandbLogger(offline=True, save_dir=str(offline_wandb), project="unsc-report-test")
    try:
        trainer, calibration, report = _fit(logger)
    finally:
        wandb.finish()
        # wandb-core writes the offline transaction log asynchronously: `finish()` can return
        # before the records are on disk; shutting the service down flushes them.
        wandb.teardown()
    (run_dir,) = (offline_wandb / "wandb").glob("offline-run-*")
    rows = [row for row in _wandb_history(run_dir) if "report/acc_class_0" in row]
    assert len(rows) == 1  # logged once, in one step
    row = rows[0]
    assert row["trainer/global_step"] == trainer.global_step == 2

    # scalars: per-class accuracy from val/, basis sizes from the calibration callback
    expected = _expected_scalars(trainer, calibration, "val")
    assert {key: row[key] for key in expected} == pytest.approx(expected)
    assert expected["report/acc_class_0"] == report.last_report["per_class_accuracy"][0]

    def table(key: str) -> dict[str, Any]:
        assert row[key]["_type"] == "table-file"
        return json.loads((run_dir / "files" / row[key]["path"]).read_text())

    per_class = table("report/per_class_accuracy")
    assert per_class["columns"] == ["class", "accuracy"]
    assert [k for k, _ in per_class["data"]] == list(range(10))
    assert [value for _, value in per_class["data"]] == pytest.approx(
        [expected[f"report/acc_class_{k}"] for k in range(10)]
    )

    bases = table("report/nullspace_bases")
    assert bases["columns"] == ["layer", "input_dim", "rank", "energy"]
    assert [row_[0] for row_ in bases["data"]] == list(calibration.layer_infos)
    for (name, dim, rank, energy), info in zip(bases["data"], calibration.layer_infos.values()):
        assert (dim, rank) == (info.dim, info.rank) and energy == pytest.approx(info.energy)
        assert 0 < rank <= dim and energy >= 0.97 - 1e-6, name

    # MIA histogram: the numbers behind the image, one column per split, fractions sum to 1
    histogram = table("report/mia_confidence_table")
    assert histogram["columns"] == ["bin_start", "bin_end", *MIA_REPORT_SPLITS]
    assert len(histogram["data"]) == 20
    assert histogram["data"][0][:2] == pytest.approx([0.0, 0.05])
    for column in range(2, 5):
        assert sum(r[column] for r in histogram["data"]) == pytest.approx(1.0)
    sizes = trainer.datamodule.split_sizes()
    split_names = {"forget": "train_forget", "test": "test_retain", "retain": "train_retain"}
    for split in MIA_REPORT_SPLITS:  # capped by max_batches
        assert row[f"report/mia/{split}_samples"] == min(
            MAX_BATCHES * EVAL_BATCH, sizes[split_names[split]]
        )
        assert 0.0 < row[f"report/mia/{split}_confidence_mean"] < 1.0
    fractions = report.last_report["mia_histogram"]["fractions"]
    assert [r[2] for r in histogram["data"]] == pytest.approx(fractions["forget"].tolist())

    for key in ("report/per_class_accuracy_chart", "report/mia_confidence_histogram"):
        assert row[key]["_type"] == "image-file" and row[key]["format"] == "png"
        assert (row[key]["width"], row[key]["height"]) == (600, 300)
        assert (run_dir / "files" / row[key]["path"]).stat().st_size > 1000


def _csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("when", ["fit", "test"])
def test_csv_logger_receives_report_scalars_only(tmp_path: Path, when: str):
    logger = CSVLogger(tmp_path, name="report")
    trainer, calibration, _ = _fit(logger, when=when, test=when == "test")
    rows = [row for row in _csv_metrics(logger) if row.get("report/acc_class_0")]
    assert len(rows) == 1
    expected = _expected_scalars(trainer, calibration, "val" if when == "fit" else "test")
    assert {key: float(rows[0][key]) for key in expected} == pytest.approx(expected)
    assert not [column for column in rows[0] if column.startswith("report/mia")]  # W&B-only extras


def test_without_logger_reports_nothing_and_warns(tmp_path: Path):
    with pytest.warns(UserWarning, match="no logger"):
        trainer, calibration, report = _fit(False)
    assert report.last_report["scalars"] == pytest.approx(
        _expected_scalars(trainer, calibration, "val")
    )
    assert "mia_histogram" not in report.last_report


def test_missing_per_class_metrics_warn_and_keep_basis_scalars(tmp_path: Path):
    report = UnlearningReport()
    callback = NullSpaceCalibration()
    infos = {"fc": SimpleNamespace(dim=4, rank=2, energy=0.98)}
    callback.engine = SimpleNamespace(layer_infos=infos, bases={}, report=None)  # type: ignore[assignment]
    trainer = SimpleNamespace(
        is_global_zero=True,
        callback_metrics={"val/retain_acc": torch.tensor(0.5)},
        callbacks=[callback],
        loggers=[],
    )
    with pytest.warns(UserWarning) as caught:
        report._report(trainer, None, prefix="val")  # type: ignore[arg-type]
    messages = [str(w.message) for w in caught]
    assert any("no `val/acc_class_k`" in m for m in messages)
    assert any("no logger" in m for m in messages)
    assert report.last_report["scalars"] == {
        "report/basis/fc/dim": 4.0,
        "report/basis/fc/rank": 2.0,
        "report/basis/fc/energy": 0.98,
    }


def test_confidence_pass_is_skipped_without_the_data_module_methods():
    report = UnlearningReport()
    assert report._confidences(SimpleNamespace(datamodule=None), None) is None  # type: ignore[arg-type]
    assert report._confidences(SimpleNamespace(datamodule=object()), None) is None  # type: ignore[arg-type]


def test_confidence_histogram_fractions():
    edges, fractions = confidence_histogram(
        {"forget": torch.tensor([0.0, 0.1, 0.9, 1.0]), "test": torch.empty(0)}, bins=2
    )
    assert edges.tolist() == [0.0, 0.5, 1.0]
    assert fractions["forget"].tolist() == [0.5, 0.5]
    assert fractions["test"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"when": "validate"}, "`when`"),
        ({"max_batches": 0}, "`max_batches`"),
        ({"bins": 0}, "`bins`"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any], match: str):
    with pytest.raises(UnlearningConfigError, match=match):
        UnlearningReport(**kwargs)


def test_run_environment_records_world_size_precision_and_effective_batch(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from unsc_lightning.reporting import RunEnvironment

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    logger = WandbLogger(project="unsc-test", offline=True, save_dir=str(tmp_path))
    received: list[dict[str, Any]] = []
    logger.log_hyperparams = received.append  # type: ignore[method-assign]
    recorder = RunEnvironment()
    loader = DataLoader(TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,))), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=3,
        logger=logger,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), loader)
    expected = {
        "world_size": 1,
        "num_nodes": 1,
        "devices": 1,
        "accelerator": "CPUAccelerator",
        "strategy": "SingleDeviceStrategy",
        "precision": "32-true",
        "batch_size": 4,
        "accumulate_grad_batches": 3,
        "effective_batch": 12,
    }
    assert recorder.environment == expected
    assert {"run": expected} in received  # the W&B run's config
