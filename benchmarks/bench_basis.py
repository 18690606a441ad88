"""Basis building: the engine's build against a plain no-grad forward pass, as ratios.

For every model (``--models``) and number of remaining samples (``--samples``), one process
times, interleaved ``--repeats`` times (the fastest kept): a plain ``torch.no_grad()`` forward
over the samples, and ``NullSpaceEngine(model, threshold=0.97).build(loader)`` for each variant.
The build's ``engine.timings`` split it into the pass over the data (forward with recording
hooks and the Gram products; ``total - bases``) and the eigendecompositions (``bases``).
Throughputs are ``forward time / pass time`` and ``forward time / build time``: ratios inside
one process, so they compare across machines better than seconds do. Inputs are random and
regenerated batch by batch from a seed.

Variants (``--variants``):

- ``float64``: ``gram=torch.float64``, every Gram product in float64 (the exact reference);
- ``auto``: the default ``gram="auto"``: float32 products summed in float64 (threshold 0.97 is
  below the float32 margin);
- ``plain``: ``auto`` with every class block's Gram as one product (``gram.shifted_gram_pays``
  patched to refuse): the shifted Gram saves multiply-adds at the cost of more, smaller
  products, a trade measured for the CPU (on CUDA the library multiplies so since an H200 run
  showed it faster: there ``plain`` equals ``auto``);
- ``shift_by_rows``: ``auto`` with the shifted Gram only for class blocks of at least
  ``SHIFTED_ROWS`` rows whatever the stride, the rule before stride-1 blocks of 65,536 entries
  took it too (eighth pass);
- ``unmerged``: ``auto`` with one forward per loader batch (``basis_pass.MERGE_SAMPLES``
  patched to 1), as before small batches were merged (eighth pass; differs from ``auto`` only
  when ``--batch`` is below the merged size: 512 samples, or 64 MiB of one layer's rows);
- ``flags_per_product``: ``auto`` with the float32 flags read and switched around every class
  block's product, as before the nested contexts of ``nullspace.context.ieee_float32`` became free
  (``context._NESTING`` patched to forget every enclosing context): what that per-product cost was;
- ``subsampled``: ``gram=GramOptions(row_fraction=F)`` (``--row-fraction``, default 0.25),
  approximate. Its basis error is reported as the fraction of held-out remaining rows' energy
  (fresh random inputs through the same model) that its bases capture, next to the exact bases'
  (``heldout_energy``, the trace-weighted mean over layers, and the lowest layer's).

Models: ``mnist1d`` (MNIST1DConvNet, inputs 1 x 40, batch 512) and ``allcnn`` (AllCNN at the
paper's width 0.5, inputs 3 x 32 x 32, batch 128); ``--batch`` sets another batch size (a user's
retain loader at a training batch size of 32 to 128 makes many more, smaller products).

Example:
    python benchmarks/bench_basis.py --threads 1 --repeats 2 --samples 4000 16000 \\
        --json docs/results/bench_basis_mnist1d.json
    python benchmarks/bench_basis.py --models allcnn --samples 256 --threads 1
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from _common import best, machine, parser, setup, synchronize, table, timed, write_json
from torch import Tensor

from unsc_lightning.models import MNIST1DConvNet
from unsc_lightning.models.paper import AllCNN
from unsc_lightning.nullspace import NullSpaceEngine, basis_pass, context, gram
from unsc_lightning.nullspace.covariance import CovarianceAccumulator, SiteRecorder
from unsc_lightning.nullspace.gram import GramOptions

NUM_CLASSES = 10
THRESHOLD = 0.97


class _NoNesting:
    """A ``context._NESTING`` that never records a context: each one switches the flags again."""

    def __getattr__(self, kind: str) -> int:
        return 0

    def __setattr__(self, kind: str, depth: int) -> None:
        pass


MODELS = {
    "mnist1d": (lambda: MNIST1DConvNet(num_classes=NUM_CLASSES), (1, 40), 512),
    "allcnn": (lambda: AllCNN(num_classes=NUM_CLASSES), (3, 32, 32), 128),
}
VARIANTS = (
    "float64",
    "auto",
    "subsampled",
    "plain",
    "flags_per_product",
    "shift_by_rows",
    "unmerged",
)


class SyntheticLoader:
    """``n`` random labelled samples in batches, regenerated from a seed on every iteration."""

    def __init__(
        self, n: int, batch_size: int, shape: tuple[int, ...], device: torch.device, seed: int = 0
    ) -> None:
        self.n, self.batch_size, self.shape, self.device = n, batch_size, shape, device
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.batch_size):
            size = min(self.batch_size, self.n - start)
            x = torch.randn(size, *self.shape, generator=generator)
            y = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
            yield x.to(self.device), y.to(self.device)


def gram_of(variant: str, row_fraction: float) -> Any:
    if variant == "float64":
        return torch.float64
    if variant in ("auto", "plain", "flags_per_product", "shift_by_rows", "unmerged"):
        return "auto"
    return GramOptions(row_fraction=row_fraction, seed=0)


@torch.no_grad()
def heldout_energy(
    engine: NullSpaceEngine, loader: SyntheticLoader, device: torch.device
) -> dict[str, float]:
    """Fraction of the held-out rows' energy inside each basis: ``tr(Uᵀ C U) / tr(C)``."""
    accumulator = CovarianceAccumulator(engine.dims, device=device)
    with SiteRecorder(engine.accounting.sites(), accumulator.add, accumulator.add_shared):
        for inputs, labels in loader:
            accumulator.set_labels(labels)
            engine.model(inputs)
    result = {}
    for key, total in accumulator.sums.items():
        basis = engine.bases[key].to(device=device, dtype=torch.float64)
        trace = float(total.trace())
        result[key] = float((basis.T @ total @ basis).trace()) / trace if trace > 0 else 1.0
    return result


def measure(
    model_name: str,
    n: int,
    variants: list[str],
    device: torch.device,
    repeats: int,
    row_fraction: float,
    batch: int | None = None,
) -> list[dict[str, Any]]:
    factory, shape, batch_size = MODELS[model_name]
    batch_size = batch or batch_size
    torch.manual_seed(0)
    model = factory().to(device).eval()
    loader = SyntheticLoader(n, batch_size, shape, device)

    def forward_pass() -> None:
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs)

    engines: dict[str, NullSpaceEngine] = {}

    def build(variant: str) -> dict[str, float]:
        engine = NullSpaceEngine(
            model, threshold=THRESHOLD, gram=gram_of(variant, row_fraction), memory_budget=1 << 34
        )
        shifted, nesting = gram.shifted_gram_pays, context._NESTING
        merge = basis_pass.MERGE_SAMPLES
        if variant == "plain":  # every class block's Gram as one product, no shifted Gram
            gram.shifted_gram_pays = lambda *_: False
        if variant == "shift_by_rows":
            gram.shifted_gram_pays = lambda rows, *_: rows >= gram.SHIFTED_ROWS
        if variant == "unmerged":
            basis_pass.MERGE_SAMPLES = 1
        if variant == "flags_per_product":
            context._NESTING = _NoNesting()  # type: ignore[assignment]
        try:
            engine.build(loader)
        finally:
            gram.shifted_gram_pays = shifted
            context._NESTING = nesting
            basis_pass.MERGE_SAMPLES = merge
        synchronize(device)
        engines[variant] = engine
        return dict(engine.timings)

    with torch.no_grad():  # warm-up: allocator and kernels, one batch
        model(next(iter(loader))[0])
    forward_times: list[float] = []
    timings: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(repeats):  # interleaved: a load spike disturbs every variant alike
        forward_times.append(timed(forward_pass, device))
        for variant in variants:
            synchronize(device)
            timings[variant].append(build(variant))
    forward = best(forward_times)
    exact_energy = None
    heldout = SyntheticLoader(min(n, 2048), batch_size, shape, device, seed=1)
    results = []
    for variant in variants:
        total = best([t["total"] for t in timings[variant]])
        passes = best([t["total"] - t["bases"] for t in timings[variant]])
        bases = best([t["bases"] for t in timings[variant]])
        row: dict[str, Any] = {
            "model": model_name,
            "samples": n,
            "batch": batch_size,
            "variant": variant,
            "forward_s": forward,
            "pass_s": passes,
            "bases_s": bases,
            "build_s": total,
            "pass_throughput_vs_forward": forward / passes,
            "build_throughput_vs_forward": forward / total,
            "ranks": {k: i.rank for k, i in engines[variant].layer_infos.items()},
        }
        if variant in ("float64", "subsampled"):
            energy = heldout_energy(engines[variant], heldout, device)
            row["heldout_energy_by_layer"] = energy
            row["heldout_energy_min"] = min(energy.values())
            if variant == "float64":
                exact_energy = energy
            elif exact_energy is not None:
                row["exact_heldout_energy_min"] = min(exact_energy.values())
                row["heldout_energy_loss_max"] = max(exact_energy[k] - energy[k] for k in energy)
        if variant == "subsampled":
            row["row_fraction"] = row_fraction
        results.append(row)
    return results


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mnist1d"])
    args.add_argument("--samples", type=int, nargs="+", default=[4000, 16000])
    args.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args.add_argument("--row-fraction", type=float, default=0.25)
    args.add_argument("--batch", type=int, default=None, help="default: the model's (512 / 128)")
    options = args.parse_args()
    device = setup(options)
    results = []
    for model_name in options.models:
        for n in options.samples:
            rows = measure(
                model_name,
                n,
                options.variants,
                device,
                options.repeats,
                options.row_fraction,
                options.batch,
            )
            for row in rows:
                print({k: v for k, v in row.items() if "by_layer" not in k}, flush=True)
            results += rows
    columns = [
        "model",
        "samples",
        "batch",
        "variant",
        "forward_s",
        "pass_s",
        "bases_s",
        "pass_throughput_vs_forward",
        "build_throughput_vs_forward",
        "heldout_energy_min",
        "heldout_energy_loss_max",
    ]
    print(table(results, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_basis",
            "what": "NullSpaceEngine.build (threshold 0.97, per-class) vs a no-grad forward",
            "machine": machine(device),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
