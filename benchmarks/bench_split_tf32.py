"""One layer's gradient projection with split TF32 products against IEEE float32, by shape.

For each ``out x d`` gradient and rank ``r`` (ResNet-18's layer shapes at ``r = d/2`` and at a
trained model's ranks, and small layers), times ``NullSpaceProjector.project_matrix_`` with
split TF32 products forced on and forced off, interleaved, fastest of ``--repeats`` (each
repeat ``--calls`` calls), and measures each result against the float64 reference: the
relative error and the part left in the remaining subspace, ``‖G' U‖ / ‖G‖``, next to one
plain TF32 product's. On the CPU both paths are IEEE float32 (the split adds work): the
figures that matter come from a GPU with TF32 tensor cores, and they set
``SPLIT_TF32_MIN_MACS`` (the multiply-adds per product from which the split pays).

Example (on a GPU):
    python benchmarks/bench_split_tf32.py --device cuda --json docs/results/gpu/split_tf32.json
"""

from __future__ import annotations

from typing import Any

import torch
from _common import best, machine, parser, setup, table, timed, write_json

from unsc_lightning.nullspace.gram import ieee_float32, tf32_float32
from unsc_lightning.nullspace.projection import SPLIT_TF32_MIN_MACS, NullSpaceProjector

SHAPES = [  # (out, d, r)
    (64, 27, 14),
    (64, 576, 288),
    (128, 576, 288),
    (128, 1152, 576),
    (256, 1152, 576),
    (256, 2304, 1152),
    (512, 2304, 1152),
    (512, 4608, 2304),
    (512, 4608, 600),
    (512, 4608, 4000),
    (256, 2304, 300),
    (1000, 512, 256),
]


def measure(out: int, dim: int, rank: int, device: torch.device, repeats: int, calls: int):
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(dim, rank, dtype=torch.float64, generator=generator))[0]
    grad = torch.randn(out, dim, generator=generator)
    reference = grad.double() - (grad.double() @ basis) @ basis.T
    norm = float(grad.norm())
    split, ieee = NullSpaceProjector(basis, device=device), NullSpaceProjector(basis, device=device)
    split.split, ieee.split = True, False
    work = grad.to(device)
    row: dict[str, Any] = {
        "out": out,
        "d": dim,
        "r": rank,
        "form": "complement" if split.use_complement else "direct",
        "macs_per_product": out * dim * min(rank, dim - rank),
    }
    for name, projector in (("split", split), ("ieee", ieee)):
        with ieee_float32():
            got = projector.project_matrix_(work.clone()).double().cpu()
        row[f"{name}_error"] = float((got - reference).norm()) / norm
        row[f"{name}_leak"] = float((got @ basis).norm()) / norm
    factor = basis.float().to(device)
    with tf32_float32():  # one plain TF32 product: what the split avoids
        plain = (work - (work @ factor) @ factor.T).double().cpu()
    row["plain_tf32_leak"] = float((plain @ basis).norm()) / norm
    times: dict[str, list[float]] = {"split_s": [], "ieee_s": []}
    buffer = work.clone()

    def run(projector: NullSpaceProjector) -> None:
        with ieee_float32():
            for _ in range(calls):
                projector.project_matrix_(buffer)

    run(split), run(ieee)  # warm-up: kernels chosen, factor split
    for _ in range(repeats):
        times["split_s"].append(timed(lambda: run(split), device) / calls)
        times["ieee_s"].append(timed(lambda: run(ieee), device) / calls)
    row.update({key: best(values) for key, values in times.items()})
    row["split_over_ieee"] = row["split_s"] / row["ieee_s"]
    row["split_by_default"] = row["macs_per_product"] >= SPLIT_TF32_MIN_MACS
    return row


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--calls", type=int, default=20, help="projections per timed repeat")
    options = args.parse_args()
    device = setup(options)
    rows = []
    for out, dim, rank in SHAPES:
        row = measure(out, dim, rank, device, options.repeats, options.calls)
        rows.append(row)
        print({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    columns = [
        "out", "d", "r", "form", "macs_per_product", "split_s", "ieee_s", "split_over_ieee",
        "split_by_default", "split_error", "ieee_error", "split_leak", "ieee_leak",
        "plain_tf32_leak",
    ]  # fmt: skip
    print(table(rows, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_split_tf32",
            "split_tf32_min_macs": SPLIT_TF32_MIN_MACS,
            "repeats": options.repeats,
            "calls": options.calls,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
