"""Basis building: wall time and peak memory against a plain no-grad forward pass.

For every number of remaining samples (``--samples``) and every variant, a fresh subprocess
runs (so that its peak memory is its own): a plain ``torch.no_grad()`` forward pass over the
samples, then the covariance pass of the bases (forward with recording hooks and the
accumulation), then the eigendecompositions (``build_bases``). Inputs are random and generated
batch by batch from a seed, so the data themselves take constant memory: the peak memory
increase measured is the basis pass's own (per-batch rows and the ``d x d`` sums).

Variants (``--variants``):

- ``legacy``: per-class accumulation as before this benchmark (a boolean mask and a copy per
  class and layer, a finiteness pass with a device sync per layer), the library's rows;
- ``per_class``: the library's per-class accumulation (batches sorted by label, one ``addmm_``
  per class on a view, finiteness checked on the diagonal once per batch), the library's rows;
- ``pooled``: one pooled covariance, the library's rows.

Models (``--model``): ``mnist1d`` (MNIST1DConvNet, inputs 1 x 40, default) or ``allcnn``
(AllCNN at the paper's width 0.5, inputs 3 x 32 x 32).

Example:
    python benchmarks/bench_basis.py --samples 1000 4000 16000 --json bench_basis.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import (
    best,
    machine,
    parser,
    peak_rss_mib,
    setup,
    synchronize,
    table,
    timed,
    write_json,
)
from torch import Tensor, nn

from unsc_lightning.models import MNIST1DConvNet
from unsc_lightning.models.paper import AllCNN
from unsc_lightning.nullspace import (
    CovarianceAccumulator,
    accumulate_covariances,
    layer_dims,
    recording,
)
from unsc_lightning.nullspace.layers import build_bases, select_layers

NUM_CLASSES = 10
MODELS = {
    "mnist1d": (lambda: MNIST1DConvNet(num_classes=NUM_CLASSES), (1, 40), 512),
    "allcnn": (lambda: AllCNN(num_classes=NUM_CLASSES), (3, 32, 32), 128),
}
VARIANTS = ("legacy", "per_class", "pooled")


class SyntheticLoader:
    """``n`` random labelled samples in batches, regenerated from a seed on every iteration."""

    def __init__(
        self, n: int, batch_size: int, shape: tuple[int, ...], device: torch.device
    ) -> None:
        self.n, self.batch_size, self.shape, self.device = n, batch_size, shape, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(0)
        for start in range(0, self.n, self.batch_size):
            size = min(self.batch_size, self.n - start)
            x = torch.randn(size, *self.shape, generator=generator)
            y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
            yield x.to(self.device), y.to(self.device)


class LegacyAccumulator(CovarianceAccumulator):
    """The per-class ``add`` this benchmark started from: a mask and a copy per class and layer."""

    def add(self, name: str, rows: Tensor) -> None:
        if not torch.isfinite(rows).all():  # a device synchronisation per layer and batch
            raise RuntimeError(f"Layer `{name}` received NaN or inf inputs.")
        target = self.sums[name]
        rows = rows.to(device=target.device, dtype=self.dtype)
        self.rows_seen[name] += rows.shape[0]
        labels = self._labels
        assert labels is not None
        row_labels = labels.to(rows.device).repeat_interleave(rows.shape[0] // labels.numel())
        for cls in torch.unique(row_labels).tolist():
            class_rows = rows[row_labels == cls]
            target[cls].addmm_(class_rows.T, class_rows)


@torch.no_grad()
def legacy_accumulate(
    model: nn.Module, layers: dict[str, nn.Module], loader: Any, accumulator: Any
) -> None:
    with recording(layers, accumulator):
        for inputs, labels in loader:
            accumulator.set_labels(labels)  # forwarded unsorted, no per-batch check
            model(inputs)


def worker(
    model_name: str, n: int, variant: str, device: torch.device, repeats: int
) -> dict[str, Any]:
    factory, shape, batch_size = MODELS[model_name]
    torch.manual_seed(0)
    model = factory().to(device).eval()
    layers = select_layers(model).layers
    loader = SyntheticLoader(n, batch_size, shape, device)
    per_class = not variant.startswith("pooled")

    def covariance_pass() -> CovarianceAccumulator:
        cls = LegacyAccumulator if variant == "legacy" else CovarianceAccumulator
        accumulator = cls(
            layer_dims(layers), num_classes=NUM_CLASSES if per_class else None, device=device
        )
        if True:
            if variant == "legacy":
                legacy_accumulate(model, layers, loader, accumulator)
            else:
                accumulate_covariances(model, layers, loader, accumulator)
        return accumulator

    with torch.no_grad():  # warm-up: allocator and kernels, one batch
        model(next(iter(loader))[0])
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device) / 2**20
    memory_before = peak_rss_mib() if device.type != "cuda" else memory_before
    accumulators: list[CovarianceAccumulator] = []
    pass_times = [timed(lambda: accumulators.append(covariance_pass()), device)]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = peak_rss_mib()
    rule = "per_class" if per_class else "pooled"
    eig_time = timed(lambda: build_bases(accumulators[0], 0.97, rule), device)
    accumulators.clear()  # release the sums before the next passes
    for _ in range(repeats - 1):
        pass_times.append(timed(covariance_pass, device))

    def forward_pass() -> None:
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs)

    forward_times = [timed(forward_pass, device) for _ in range(repeats)]
    forward, covariance = best(forward_times), best(pass_times)
    return {
        "model": model_name,
        "samples": n,
        "variant": variant,
        "forward_s": forward,
        "covariance_pass_s": covariance,
        "eigendecomposition_s": eig_time,
        "basis_total_s": covariance + eig_time,
        "forward_us_per_sample": 1e6 * forward / n,
        "covariance_us_per_sample": 1e6 * covariance / n,
        "throughput_vs_forward": forward / covariance,
        "peak_memory_increase_mib": peak - memory_before,
        "memory_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS (ru_maxrss)",
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--model", choices=sorted(MODELS), default="mnist1d")
    args.add_argument("--samples", type=int, nargs="+", default=[1000, 4000, 16000])
    args.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args.add_argument("--worker", nargs=2, metavar=("SAMPLES", "VARIANT"), help=argparse_hidden())
    options = args.parse_args()
    device = setup(options)
    if options.worker:
        samples, variant = options.worker
        print(json.dumps(worker(options.model, int(samples), variant, device, options.repeats)))
        return
    results = []
    for n in options.samples:
        for variant in options.variants:
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), variant]
            command += [
                "--model",
                options.model,
                "--device",
                options.device,
                "--repeats",
                str(options.repeats),
            ]
            if options.threads:
                command += ["--threads", str(options.threads)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    columns = [
        "samples",
        "variant",
        "forward_s",
        "covariance_pass_s",
        "eigendecomposition_s",
        "throughput_vs_forward",
        "peak_memory_increase_mib",
    ]
    print(table(results, columns))
    write_json(
        options.json, {"benchmark": "bench_basis", "machine": machine(device), "results": results}
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
