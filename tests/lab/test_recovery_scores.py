"""The lab's recovery columns: relearning steps and probe accuracy from a data module."""

from __future__ import annotations

import torch
from helpers.problems import single_thread, tensor_datamodule
from torch import nn

from unsc_lightning.lab.scoring import recovery


def test_recovery_reads_train_and_test_splits_of_the_datamodule() -> None:
    dm = tensor_datamodule(num_train=120, num_test=60, forget_classes=[1], batch_size=32)
    dm.setup("fit")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with single_thread():
        scores = recovery(model, dm, original_acc_f=0.0)
    assert scores["relearn_steps"] == 0  # half of 0 % is reached before any step
    assert 0.0 <= scores["probe_acc_f"] <= 100.0
    assert recovery(model, tensor_datamodule(forget=None), 50.0) == {}
