"""Split TF32 products ("3xTF32") for the gradient projection, against IEEE float32, by shape.

A tried and rejected speed-up for CUDA GPUs with TF32 tensor cores (issue 13: "lower precision
on GPU with the exactness bound tested"). Each float32 operand ``x`` is written exactly as
``hi + lo``, ``hi`` rounded to TF32's 10 mantissa bits, ``lo = x - hi``; a product ``a b`` as
``a_hi b_hi + a_hi b_lo + a_lo b_hi``, three TF32 tensor-core products. With exact
accumulation this keeps float32 accuracy (the dropped ``a_lo b_lo`` is 2⁻²² of the product);
on an H200 the tensor cores' own float32 accumulation left errors growing with the inner
dimension (1.1e-5 of ``‖G‖`` at d = 4608, IEEE float32 4e-7), and the three products and the
splits were slower than one IEEE product except for the largest layer (0.72x at
512 x 4608, r = 2304; 1.4-4.7x elsewhere). Measured in the 2026-11-27 late session
(``docs/results/gpu/split_tf32_cuda.json``); the library projects in IEEE float32.

For each ``out x d`` gradient and rank ``r`` (ResNet-18's layer shapes at ``r = d/2``, at lower
and higher ranks, small layers), times the split projection and the library's
``NullSpaceProjector.project_matrix_`` (IEEE float32), interleaved, fastest of ``--repeats``
(each ``--calls`` calls), and measures each result against the float64 reference: relative
error, and the part left in the remaining subspace ``‖G' U‖ / ‖G‖``, next to one plain TF32
product's. On the CPU both are IEEE float32 products (the split only adds work).

Example (on a GPU):
    python benchmarks/bench_split_tf32.py --device cuda --json docs/results/gpu/split_tf32_cuda.json
"""

from __future__ import annotations

from typing import Any

import torch
from _common import best, machine, parser, setup, table, timed, write_json
from torch import Tensor

from unsc_lightning.nullspace.context import ieee_float32
from unsc_lightning.nullspace.projection import NullSpaceProjector

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


def split_tf32(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)``, ``hi + lo == tensor`` exactly, ``hi`` on TF32's 10 mantissa bits."""
    bits = tensor.contiguous().view(torch.int32)
    hi = bits.add(0x1000).bitwise_and_(~0x1FFF).view(torch.float32)
    return hi, tensor - hi


def split_product(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    out = torch.mm(a_lo, b_hi)
    out.addmm_(a_hi, b_lo)
    return out.addmm_(a_hi, b_hi)


class TF32:
    """TF32 float32 products, the flags restored (the legacy setter writes the new flags too)."""

    def __enter__(self) -> None:
        self.saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.saved)


def split_projection(grad: Tensor, factor: tuple[Tensor, Tensor], complement: bool) -> Tensor:
    """``G - (G U) Uᵀ`` (or ``(G Q) Qᵀ``) from split TF32 products."""
    with TF32():
        reduced = split_product(split_tf32(grad), factor)
        back = split_product(split_tf32(reduced), (factor[0].T, factor[1].T))
    return back if complement else grad - back


def measure(
    out: int, dim: int, rank: int, device: torch.device, repeats: int, calls: int
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(dim, rank, dtype=torch.float64, generator=generator))[0]
    grad = torch.randn(out, dim, generator=generator)
    reference = grad.double() - (grad.double() @ basis) @ basis.T
    norm = float(grad.norm())
    ieee = NullSpaceProjector(basis, device=device)
    factor = split_tf32(ieee.factor)
    work = grad.to(device)
    row: dict[str, Any] = {
        "out": out,
        "d": dim,
        "r": rank,
        "form": "complement" if ieee.use_complement else "direct",
        "macs_per_product": out * dim * min(rank, dim - rank),
    }

    def split() -> Tensor:
        return split_projection(work, factor, ieee.use_complement)

    def plain_ieee() -> Tensor:
        with ieee_float32():
            return ieee.project_matrix_(work.clone())

    for name, fn in (("split", split), ("ieee", plain_ieee)):
        got = fn().double().cpu()
        row[f"{name}_error"] = float((got - reference).norm()) / norm
        row[f"{name}_leak"] = float((got @ basis).norm()) / norm
    dense = basis.float().to(device)
    with TF32():  # one plain TF32 product: what the split is for
        plain = (work - (work @ dense) @ dense.T).double().cpu()
    row["plain_tf32_leak"] = float((plain @ basis).norm()) / norm

    def repeat(fn: Any) -> None:
        for _ in range(calls):
            fn()

    repeat(split)  # warm-up: kernels chosen
    repeat(plain_ieee)
    times: dict[str, list[float]] = {"split_s": [], "ieee_s": []}
    for _ in range(repeats):
        times["split_s"].append(timed(lambda: repeat(split), device) / calls)
        times["ieee_s"].append(timed(lambda: repeat(plain_ieee), device) / calls)
    row.update({key: best(values) for key, values in times.items()})
    row["split_over_ieee"] = row["split_s"] / row["ieee_s"]
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
        "split_error", "ieee_error", "split_leak", "ieee_leak", "plain_tf32_leak",
    ]  # fmt: skip
    print(table(rows, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_split_tf32",
            "repeats": options.repeats,
            "calls": options.calls,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
