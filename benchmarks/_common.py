"""Shared helpers of the benchmark scripts: arguments, timing, memory, machine description.

Importing it puts the tests' ``helpers`` package (tiny models, data, reference oracles) on the
path, so benchmarks measure the same models the tests check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def parser(description: str) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: ``--device``, ``--json``, ``--threads``, ``--repeats``."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args.add_argument("--repeats", type=int, default=3, help="timed repetitions (fastest reported)")
    return args


def setup(options: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, check ``--device`` and return it."""
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available on this machine.")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def best(values: list[float]) -> float:
    """The fastest repetition: on a shared machine the least disturbed (``timeit``'s choice)."""
    return float(min(values))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` (floats with 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class PhaseTimer(L.Callback):
    """Timestamps of a fit's phases (placed after `NullSpaceCalibration` in the callback list:
    ``fit_start - setup`` is then the basis build), the epochs run, the seconds spent in
    validation and the ``val/`` metric keys each validation logged."""

    def __init__(self) -> None:
        self.stamps: dict[str, float] = {}
        self.validation_s = 0.0
        self.epochs = 0
        self.logged: list[list[str]] = []
        self._val_start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stamps.setdefault("setup", time.perf_counter())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["fit_start"] = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["train_start"] = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stamps["train_end"] = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_s += time.perf_counter() - self._val_start
        if not trainer.sanity_checking:
            self.logged.append(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))


@torch.no_grad()
def plain_pass_seconds(
    model: torch.nn.Module, loader: Any, device: torch.device | None = None
) -> float:
    """One plain no-grad forward pass over ``loader`` (data loading and the copy to ``device``
    included): the cost floor. ``model`` is moved to ``device`` (default: where it is)."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in loader:
            model(inputs.to(device))
    synchronize(device)
    return time.perf_counter() - start


def trainer_options(device: torch.device) -> dict[str, Any]:
    """Lightning Trainer options that put a fit on ``device``."""
    if device.type == "cuda":
        return {"accelerator": "gpu", "devices": [device.index or 0]}
    return {"accelerator": device.type}
