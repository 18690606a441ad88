"""Memory of the per-class bases against the number of classes: pre-flight estimate vs peak.

For K remaining classes (5 samples each, random 16-dimensional inputs, a Linear 16-32-K net)
the engine builds the per-class bases twice: with the default memory budget (every class's sums
at once, one pass) and with ``memory_budget`` set to the estimate for one class (one pass per
class). It reports the estimate, the peak bytes held by sums and bases, and, for scale,
``3 * sum(d^2)`` and the dense ``K * sum(d^2)`` (float64 bytes).

    python benchmarks/bench_class_memory.py --classes 10 100 --json class_memory.json
"""

from __future__ import annotations

import torch
from _common import machine, parser, setup, table, write_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning.nullspace import NullSpaceEngine


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--classes", nargs="+", type=int, default=[10, 100])
    options = args.parse_args()
    device = setup(options)
    rows = []
    for classes in options.classes:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5 * classes, 16, generator=generator)
        y = torch.arange(5 * classes) % classes
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, classes))
        for budget in ("default", "one class"):
            engine = NullSpaceEngine(model)
            if budget == "one class":
                engine.memory_budget = engine.estimate_bytes(1)
            engine.build(DataLoader(TensorDataset(x, y), batch_size=50))
            report = engine.report
            assert report is not None
            squares = sum(d * d for d in engine.dims.values()) * 8
            rows.append(
                {
                    "classes": classes,
                    "budget": budget,
                    "passes": report.passes,
                    "estimate_bytes": report.estimate_bytes,
                    "peak_bytes": report.peak_bytes,
                    "three_squares_bytes": 3 * squares,
                    "dense_bytes": classes * squares,
                }
            )
    print(table(rows, list(rows[0])))
    write_json(options.json, {"machine": machine(device), "rows": rows})


if __name__ == "__main__":
    main()
