"""The cheap / full validation schedule of `UnlearningModule` under DDP (2 CPU processes, gloo).

Every rank must take the same decision each epoch (the full epoch's metrics are gathered across
ranks: ranks that disagree would hang on the collective, which the timeout turns into an error)
and skip the same loaders. See ``test_ddp.py`` for the fork start method.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.distributed as dist
from helpers.problems import quiet_trainer, tensor_datamodule
from lightning.pytorch.strategies import DDPStrategy

from unsc_lightning import UnlearningModule

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method"),
    pytest.mark.filterwarnings(r"ignore:.*", category=UserWarning),
]


class _RecordRank(L.Callback):
    """Per validation epoch of the fit: whether it was full and which loaders yielded batches;
    written to ``out_dir/rank{r}.pt`` at the end of training."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.epochs: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append({"loaders": set()})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, idx=0):
        self.epochs[-1]["loaders"].add(idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs[-1]["full"] = pl_module.full_validation
        self.epochs[-1]["mia"] = "val/mia_efficacy" in trainer.callback_metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.epochs, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.parametrize(
    ("options", "expected_full"),
    [
        ({"stop_at_target": False}, [False, False, True]),  # the last epoch is the full one
        ({"target_forget_acc": 1.0}, [True]),  # stops after epoch 0: that validation is full
    ],
    ids=["fixed-epochs", "stops-at-target"],
)
def test_ddp_ranks_agree_on_the_validation_schedule(tmp_path, options, expected_full):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    module = UnlearningModule(model, num_classes=4, forget_classes=[1], lr=1e-3, **options)
    dm = tensor_datamodule(forget_classes=[1], batch_size=16, eval_batch_size=8)
    strategy = DDPStrategy(
        start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60)
    )
    trainer = quiet_trainer(
        3,
        [_RecordRank(tmp_path)],
        strategy=strategy,
        devices=2,
        limit_val_batches=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0] == ranks[1]
    epochs = ranks[0]
    assert [epoch["full"] for epoch in epochs] == expected_full
    for epoch in epochs:
        assert epoch["loaders"] == ({0, 1, 2, 3} if epoch["full"] else {1})
    assert epochs[-1]["mia"]
