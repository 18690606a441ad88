"""Two CPU processes (gloo) computing the metrics on halves of the data equal one process on all."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import Metric

from unsc_lightning.metrics import ClassSubsetAccuracy, ForgetVsTestAUROC, MIAEfficacy

WORLD_SIZE = 2
NUM_CLASSES = 5
SPLIT_SIZES = {"retain": 130, "test": 90, "forget": 151}  # odd sizes: uneven shards
# fork reuses the parent's imports (spawn re-imports torch and lightning in every child, which
# costs seconds per process); forked workers set one thread, as DataLoader workers do
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
TIMEOUT_S = 120


def make_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    margins = {"retain": 3.0, "test": 2.0, "forget": 2.5}
    data = {}
    for split, n in SPLIT_SIZES.items():
        targets = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        logits = 2 * torch.randn(n, NUM_CLASSES, generator=generator)
        logits += margins[split] * torch.nn.functional.one_hot(targets, NUM_CLASSES)
        data[split] = (logits, targets)
    return data


def make_metrics() -> dict[str, Metric]:
    return {
        "acc_macro": ClassSubsetAccuracy(NUM_CLASSES, classes=[0, 2, 3]),
        "acc_micro": ClassSubsetAccuracy(NUM_CLASSES, average="micro"),
        "mia_svc": MIAEfficacy(attacker="svc"),
        "mia_threshold": MIAEfficacy(attacker="threshold", feature="modified_entropy"),
        "auroc": ForgetVsTestAUROC(),
    }


def update_and_compute(data, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    metrics = make_metrics()
    for split, (logits, targets) in data.items():
        # rank r takes every world_size-th sample (uneven halves for odd sizes), so the gathered
        # order differs from the single-process order, updated in small batches
        shard = slice(rank, None, world_size)
        for logit_batch, target_batch in zip(logits[shard].split(16), targets[shard].split(16)):
            metrics["acc_macro"].update(logit_batch, target_batch)
            metrics["acc_micro"].update(logit_batch, target_batch)
            metrics["mia_svc"].update(logit_batch, target_batch, split)
            metrics["mia_threshold"].update(logit_batch, target_batch, split)
            if split != "retain":
                metrics["auroc"].update(logit_batch, target_batch, split)
    results = {name: metric.compute() for name, metric in metrics.items()}
    accuracy = metrics["acc_macro"]
    assert isinstance(accuracy, ClassSubsetAccuracy)
    results["per_class"] = accuracy.per_class()
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = update_and_compute(make_data(), rank, WORLD_SIZE)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_equals_single_process(tmp_path):
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method=START_METHOD,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    single = update_and_compute(make_data(), rank=0, world_size=1)
    assert 0 < single["mia_svc"] < 1 and 0 < single["mia_threshold"] < 1
    for rank in range(WORLD_SIZE):
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        assert distributed.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(
                distributed[name], value, rtol=0, atol=0, equal_nan=True, msg=f"{name}, rank {rank}"
            )
