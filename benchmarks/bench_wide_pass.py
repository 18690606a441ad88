"""The basis pass of a model with wide layers: torchvision's ResNet-18 on 32 x 32 inputs.

At 32 x 32, ResNet-18's last stage runs on 1 x 1 maps: its 2304- and 4608-wide layers receive one
row per sample, a few rows per class and batch. Each class block's Gram product must be added
into that class's ``d x d`` float64 sums, a pass over ``8 d²`` bytes that costs far more than the
product of a few rows. This benchmark times, in one process and interleaved, the pass alone
(the eigendecompositions are skipped) against a plain no-grad forward over the same samples:

- ``library``: the engine as it is: a wide layer's small class blocks gather in a row buffer
  (``nullspace.gram.buffer_rows``) before one product, and convolution sums stay channels-last, the
  bases' rows being permuted at the end;
- ``unbuffered``: every block multiplied and added as it comes (``buffer_rows`` patched to 0);
- ``former``: unbuffered, and every class's sums permuted to weight order after the pass (what
  the engine did before 2026-11-27).

Inputs are random (``--samples``, labels ``i % 10``), batch ``--batch``, rule ``--rule``.

Example:
    python benchmarks/bench_wide_pass.py --threads 1 --json docs/results/wide_pass.json
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from typing import Any

import torch
import torchvision
from _common import best, machine, parser, setup, table, timed, write_json
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning.nullspace import NullSpaceEngine, covariance
from unsc_lightning.nullspace.basis_pass import BasisPass

VARIANTS = ("library", "unbuffered", "former")


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Patch the engine into ``name``'s behaviour; the eigendecompositions are always skipped."""

    def sums_only(
        self: BasisPass, bases: Any, energy: Any, total: Any, accumulator: Any, *rest: Any
    ) -> None:
        accumulator.sums  # noqa: B018  (the property adds the buffered rows: timed, as in a build)

    patches: list[tuple[Any, str, Any]] = [(BasisPass, "_extend", sums_only)]
    if name in ("unbuffered", "former"):
        patches.append((covariance, "buffer_rows", lambda dim: 0))
    if name == "former":
        original = BasisPass._pass

        def weight_ordered(self: BasisPass, *args: Any, **kwargs: Any) -> Any:
            accumulator = original(self, *args, **kwargs).weight_order_()
            self.column_orders = {}
            return accumulator

        patches.append((BasisPass, "_pass", weight_ordered))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=640)
    args.add_argument("--batch", type=int, default=64)
    args.add_argument("--rule", choices=["per_class", "pooled"], default="per_class")
    args.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    options = args.parse_args()
    device = setup(options)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(options.samples, 3, 32, 32, generator=generator)
    y = torch.arange(options.samples) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=options.batch)

    def forward() -> None:
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs.to(device))

    forward()  # warm-up
    forwards: list[float] = []
    passes: dict[str, list[float]] = {name: [] for name in options.variants}
    for _ in range(options.repeats):
        forwards.append(timed(forward, device))
        for name in options.variants:
            engine = NullSpaceEngine(model, threshold=0.97, rule=options.rule)
            with variant(name):
                passes[name].append(timed(functools.partial(engine.build, loader), device))
            del engine  # ten classes' sums of ResNet-18 take 7 GiB: freed before the next
            gc.collect()
    plain = best(forwards)
    rows = [
        {
            "variant": name,
            "forward_s": plain,
            "pass_s": best(times),
            "pass_throughput_vs_forward": plain / best(times),
            "speedup_vs_former": best(passes["former"]) / best(times)
            if "former" in passes
            else None,
        }
        for name, times in passes.items()
    ]
    print(table(rows, list(rows[0])))
    write_json(
        options.json,
        {
            "benchmark": "bench_wide_pass",
            "model": "torchvision resnet18(num_classes=10), eval, random 3x32x32",
            "samples": options.samples,
            "batch": options.batch,
            "rule": options.rule,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
