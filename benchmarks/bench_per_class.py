"""Per-class accumulation kernels: masks, sorted slices, padded ``bmm``, one-hot ``einsum``.

One batch of representation rows (``--batch`` samples, ``rows_per_sample`` rows each, random
labels over ``--classes`` classes) is added to per-class sums ``(C, d, d)`` in float64 by:

- ``mask``: the former loop, ``rows[labels == k]`` (a boolean mask and a copy per class);
- ``sorted``: what the library does — the batch forwarded sorted by label, so every class is a
  contiguous block of rows: one ``addmm_`` per class on a view, no copy;
- ``bmm``: classes scattered into a zero-padded ``(C, n_max * rows, d)`` tensor, one
  ``baddbmm_`` (batched, but it touches all ``C`` sums and multiplies the padding);
- ``einsum``: one-hot weighted ``einsum('nc,ni,nj->cij')``, ``C`` times the pooled flops;
- ``pooled``: a single ``addmm_`` of all rows (the floor).

The shapes are those of MNIST1DConvNet / AllCNN / ResNet-18 layers.

Section ``rule`` (``--section``): the per-class basis rule itself (``per_class_basis``, the
paper's Algorithm 1) on ``--classes`` synthetic covariances per layer size, the library's
implementation against the former one (``dense_per_class_basis``: a full ``eigh`` of every
class's d x d residual), in one process, with the largest projector difference between the two.
The sizes are MNIST1DConvNet's (5, 96, 128, 320) and AllCNN-like (27, 432, 864, 1728). Every class
shares a dominant spectrum and adds a few directions of its own, so the basis grows fast over the
first classes and little after (as on real features).

On a GPU (``--device cuda``) the rule section also times the same rule on the host's CPU
(covariances copied over, the basis copied back: ``host_ms``, ``host_over_device``): the seventh
pass found the MNIST-1D bases' eigendecompositions slower on an H200 than on one CPU thread, and
this is the measurement a size threshold for decomposing on the host needs.

Example:
    python benchmarks/bench_per_class.py --threads 1 --json bench_per_class.json
    python benchmarks/bench_per_class.py --threads 1 --section rule --repeats 2
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from _common import best, machine, parser, setup, synchronize, table, timed, write_json
from helpers.oracles import dense_per_class_basis
from torch import Tensor

from unsc_lightning.nullspace.rules import class_threshold_schedule, per_class_basis

SHAPES = [  # (layer, d, rows per sample)
    ("allcnn conv1 (3x3, 48 ch, 32x32)", 432, 1024),
    ("allcnn conv3 (3x3, 96 ch, 16x16)", 864, 256),
    ("allcnn conv0 (3x3, 3 ch, 32x32)", 27, 1024),
    ("mnist1d conv1 (k3, 32 ch, L=10)", 96, 10),
    ("linear 512 (one row per sample)", 512, 1),
]


def mask(sums: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> None:
    row_labels = labels.repeat_interleave(rows.shape[0] // labels.numel())
    for k in torch.unique(row_labels).tolist():
        block = rows[row_labels == k]
        sums[k].addmm_(block.T, block)


def sorted_blocks(sums: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> None:
    # rows and labels already sorted by label (the batch was forwarded sorted)
    per_sample = rows.shape[0] // labels.numel()
    start = 0
    for k, count in enumerate(torch.bincount(labels.cpu(), minlength=num_classes).tolist()):
        if count:
            block = rows[start : start + count * per_sample]
            sums[k].addmm_(block.T, block)
            start += count * per_sample


def padded_bmm(sums: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> None:
    samples, dim = labels.numel(), rows.shape[1]
    per_sample = rows.shape[0] // samples
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(samples, device=rows.device) - starts[labels]  # labels sorted
    padded = rows.new_zeros(num_classes, int(counts.max()), per_sample, dim)
    padded[labels, position] = rows.view(samples, per_sample, dim)
    padded = padded.view(num_classes, -1, dim)
    sums.baddbmm_(padded.transpose(1, 2), padded)


def one_hot_einsum(sums: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> None:
    row_labels = labels.repeat_interleave(rows.shape[0] // labels.numel())
    weights = torch.nn.functional.one_hot(row_labels, num_classes).to(rows.dtype)
    sums += torch.einsum("nc,ni,nj->cij", weights, rows, rows)


def pooled(sums: Tensor, rows: Tensor, labels: Tensor, num_classes: int) -> None:
    sums[0].addmm_(rows.T, rows)


KERNELS = {
    "mask": mask,
    "sorted": sorted_blocks,
    "bmm": padded_bmm,
    "einsum": one_hot_einsum,
    "pooled": pooled,
}


RULE_DIMS = [5, 96, 128, 320, 27, 432, 864, 1728]


def class_covariances(dim: int, classes: int, device: torch.device) -> dict[int, Tensor]:
    """Shared power-law spectrum in a common rotation, per-class reweighting and own directions."""
    generator = torch.Generator().manual_seed(dim)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    spectrum = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64) ** 1.5
    covariances = {}
    for k in range(classes):
        weights = spectrum * (1 + 0.5 * torch.rand(dim, generator=generator, dtype=torch.float64))
        own = torch.randn(dim, max(1, dim // 64), generator=generator, dtype=torch.float64) * 0.05
        cov = (rotation * weights) @ rotation.T + own @ own.T
        covariances[k] = cov.to(device)
    return covariances


def rule_section(options: Any, device: torch.device) -> list[dict[str, Any]]:
    schedule = class_threshold_schedule(0.97, 0.003)  # the authors' per-class schedule
    results = []
    for dim in options.rule_dims:
        covariances = class_covariances(dim, options.classes, device)
        row: dict[str, Any] = {"d": dim, "classes": options.classes}
        bases = {}
        for name, rule in (("former", dense_per_class_basis), ("new", per_class_basis)):
            call = partial(rule, covariances, schedule)
            times = []
            for _ in range(options.repeats):
                start = time.perf_counter()
                bases[name] = call()
                synchronize(device)
                times.append(time.perf_counter() - start)
            row[f"{name}_ms"] = 1e3 * best(times)
        former, new = bases["former"][0], bases["new"][0]
        row["rank"] = new.shape[1]
        row["speedup"] = row["former_ms"] / row["new_ms"]
        row["max_projector_difference"] = (
            float((former @ former.T - new @ new.T).abs().max())
            if former.shape == new.shape
            else float("inf")
        )
        if device.type != "cpu":
            row.update(host_rule(covariances, schedule, device, options.repeats, new))
            row["host_over_device"] = row["host_ms"] / row["new_ms"]
        results.append(row)
        print(row, flush=True)
    columns = ["d", "classes", "rank", "former_ms", "new_ms", "speedup", "max_projector_difference"]
    if device.type != "cpu":
        columns += ["host_ms", "host_over_device", "host_projector_difference"]
    print(table(results, columns))
    return results


def host_rule(
    covariances: dict[int, Tensor], schedule: Any, device: torch.device, repeats: int, basis: Tensor
) -> dict[str, float]:
    """The same rule with the covariances moved to the host's CPU and the basis moved back (what
    decomposing small layers on the CPU would cost a model on ``device``), in the same process:
    the crossover size below which the host is faster."""

    def on_host() -> Tensor:
        host = {k: v.to("cpu") for k, v in covariances.items()}
        return per_class_basis(host, schedule)[0].to(device)

    times, found = [], basis
    for _ in range(repeats):
        start = time.perf_counter()
        found = on_host()
        synchronize(device)
        times.append(time.perf_counter() - start)
    gap = (
        float((found @ found.T - basis @ basis.T).abs().max())
        if found.shape == basis.shape
        else float("inf")
    )
    return {"host_ms": 1e3 * best(times), "host_projector_difference": gap}


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--batch", type=int, default=128)
    args.add_argument("--classes", type=int, default=10)
    args.add_argument("--max-einsum-gflop", type=float, default=20.0, help="skip einsum above this")
    args.add_argument("--section", choices=["kernels", "rule", "both"], default="both")
    args.add_argument("--rule-dims", type=int, nargs="+", default=RULE_DIMS)
    options = args.parse_args()
    device = setup(options)
    rule_results = rule_section(options, device) if options.section != "kernels" else []
    generator = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    for layer, dim, per_sample in SHAPES if options.section != "rule" else []:
        labels = (
            torch.randint(0, options.classes, (options.batch,), generator=generator).sort().values
        )
        rows = torch.randn(
            options.batch * per_sample, dim, generator=generator, dtype=torch.float64
        )
        rows, labels = rows.to(device), labels.to(device)
        sums = {
            name: torch.zeros(options.classes, dim, dim, dtype=torch.float64, device=device)
            for name in KERNELS
        }
        einsum_gflop = options.classes * rows.shape[0] * dim * dim / 1e9
        kernels = {
            k: f
            for k, f in KERNELS.items()
            if k != "einsum" or einsum_gflop <= options.max_einsum_gflop
        }
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(options.repeats):
            for name, kernel in kernels.items():
                call = partial(kernel, sums[name], rows, labels, options.classes)
                times[name].append(timed(call, device))
        for name in ("sorted", "bmm", "einsum"):
            if name in kernels and not torch.allclose(sums[name], sums["mask"]):
                raise AssertionError(f"{name} differs from the masked reference for {layer}")
        row: dict[str, Any] = {"layer": layer, "d": dim, "rows_per_sample": per_sample}
        row.update({f"{name}_ms": 1e3 * best(values) for name, values in times.items()})
        results.append(row)
        print(row, flush=True)
    columns = ["layer", "d", "rows_per_sample"] + [f"{name}_ms" for name in KERNELS]
    if results:
        print(table(results, columns))
    write_json(
        options.json,
        {
            "benchmark": "bench_per_class",
            "batch": options.batch,
            "classes": options.classes,
            "results": results,
            "rule_results": rule_results,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
