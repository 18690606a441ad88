"""Time to build null-space bases for torchvision's ResNet-18 (random 3 x 32 x 32 inputs).

Random inputs make every covariance full rank, the worst case for the eigendecompositions of
ResNet-18's 2304- and 4608-dimensional layers.

    python benchmarks/bench_resnet_bases.py --threads 1 --rules pooled --json resnet_bases.json
"""

from __future__ import annotations

import time

import torch
import torchvision
from _common import machine, parser, setup, table, write_json
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning.nullspace import NullSpaceEngine


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=1600)
    args.add_argument("--classes", type=int, default=9)
    args.add_argument("--rules", nargs="+", default=["pooled"], choices=["pooled", "per_class"])
    options = args.parse_args()
    device = setup(options)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(options.samples, 3, 32, 32, generator=generator)
    y = torch.arange(options.samples) % options.classes
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    rows = []
    for rule in options.rules:
        engine = NullSpaceEngine(model, rule=rule)
        start = time.perf_counter()
        engine.build(DataLoader(TensorDataset(x, y), batch_size=128), device=device)
        rows.append(
            {
                "rule": rule,
                "total_s": round(time.perf_counter() - start, 1),
                "eigendecompositions_s": round(engine.timings["bases"], 1),
                "passes": engine.report.passes if engine.report else None,
            }
        )
    print(table(rows, list(rows[0])))
    write_json(options.json, {"machine": machine(device), "rows": rows})


if __name__ == "__main__":
    main()
