"""Time to build null-space bases for torchvision's ResNet-18 (random 3 x 32 x 32 inputs).

Random inputs make every covariance full rank, the worst case for the eigendecompositions of
ResNet-18's 2304- and 4608-dimensional layers.

``--variant`` picks the basis computation: ``partial`` is the library's (on the CPU only the kept
eigenvectors, see ``unsc_lightning.nullspace.eigen.top_vectors``), ``dense`` the reference (a
full ``eigh`` of every covariance: ``helpers.oracles`` patched
into the basis pass), ``both`` runs the two in this process, dense first, and checks that they
keep the same ranks and subspaces. Section ``matrices`` times ``pooled_basis`` alone on random
PSD matrices of ResNet-18's sizes, section ``solvers`` with either tridiagonal eigenvector
solver forced (``dstemr`` for the kept vectors, ``dstevd`` for all). Wall seconds are reported
next to this process's CPU seconds (single-threaded, the CPU seconds are the less disturbed by
other jobs on the machine).

    python benchmarks/bench_resnet_bases.py --threads 1 --rules pooled --variant both \\
        --json docs/results/resnet_bases.json
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from _common import machine, parser, setup, table, write_json
from helpers.oracles import dense_per_class_basis, dense_pooled_basis
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning.nullspace import NullSpaceEngine, basis_pass, rules

#: variant -> (pooled rule, per-class rule) used by the basis pass
RULES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "partial": (rules.pooled_basis, rules.per_class_basis),
    "dense": (dense_pooled_basis, dense_per_class_basis),
}


@contextlib.contextmanager
def recorded(variant: str, calls: list[dict[str, Any]]) -> Iterator[None]:
    """The basis pass with ``variant``'s rules, each call's bases and CPU seconds recorded."""
    pooled, per_class = RULES[variant]

    def recording(rule: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            basis, info = rule(*args, **kwargs)
            calls.append({"basis": basis, "info": info, "cpu_s": time.process_time() - start})
            return basis, info

        return call

    saved = basis_pass.pooled_basis, basis_pass.per_class_basis
    basis_pass.pooled_basis = recording(pooled)  # type: ignore[assignment]
    basis_pass.per_class_basis = recording(per_class)  # type: ignore[assignment]
    try:
        yield
    finally:
        basis_pass.pooled_basis, basis_pass.per_class_basis = saved


def subspace_gap(first: Tensor, second: Tensor) -> float:
    """``r - ||U₁ᵀ U₂||_F²``: 0 for equal subspaces (the sum of squared sines of their angles)."""
    if first.shape != second.shape:
        return float("inf")
    return float(first.shape[1] - (first.T @ second).square().sum())


def resnet_rows(options: Any, device: torch.device) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(options.samples, 3, 32, 32, generator=generator)
    y = torch.arange(options.samples) % options.classes
    torch.manual_seed(0)  # torchvision initialises from the global generator
    model = torchvision.models.resnet18(num_classes=10).to(device).eval()
    variants = ["dense", "partial"] if options.variant == "both" else [options.variant]
    rows = []
    for rule in options.rules:
        reference: list[dict[str, Any]] | None = None
        for variant in variants:
            calls: list[dict[str, Any]] = []
            engine = NullSpaceEngine(model, rule=rule)
            wall, cpu = time.perf_counter(), time.process_time()
            with recorded(variant, calls):
                engine.build(DataLoader(TensorDataset(x, y), batch_size=128), device=device)
            row = {
                "rule": rule,
                "variant": variant,
                "samples": options.samples,
                "total_s": round(time.perf_counter() - wall, 1),
                "total_cpu_s": round(time.process_time() - cpu, 1),
                "eigendecompositions_s": round(engine.timings["bases"], 2),
                "eigendecompositions_cpu_s": round(sum(c["cpu_s"] for c in calls), 2),
                "passes": engine.report.passes if engine.report else None,
                "ranks": sum(c["info"].rank for c in calls),
            }
            if reference is not None:
                row["same_ranks"] = [c["info"].rank for c in calls] == [
                    c["info"].rank for c in reference
                ]
                row["max_energy_difference"] = max(
                    abs(c["info"].energy - r["info"].energy) for c, r in zip(calls, reference)
                )
                row["max_subspace_gap"] = max(
                    subspace_gap(c["basis"], r["basis"]) for c, r in zip(calls, reference)
                )
            reference = calls
            rows.append(row)
    return rows


def random_psd(dim: int, seed: int = 0) -> Tensor:
    """``A Aᵀ`` with Gaussian ``A`` whose columns decay from 1 to 0.01: full rank, spread out."""
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    columns *= torch.logspace(0, -2, dim, dtype=torch.float64)
    return columns @ columns.T


def fastest(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Fastest wall and CPU seconds of ``repeats`` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def matrix_rows(options: Any) -> list[dict[str, Any]]:
    rows = []
    for dim in options.dims:
        cov = random_psd(dim)
        for threshold in options.thresholds:
            dense = functools.partial(dense_pooled_basis, cov, threshold)
            partial = functools.partial(rules.pooled_basis, cov, threshold)
            dense_s, dense_cpu, (reference, reference_info) = fastest(dense, options.repeats)
            partial_s, partial_cpu, (basis, info) = fastest(partial, options.repeats)
            rows.append(
                {
                    "d": dim,
                    "threshold": threshold,
                    "rank": info.rank,
                    "dense_s": round(dense_s, 3),
                    "partial_s": round(partial_s, 3),
                    "dense_cpu_s": round(dense_cpu, 3),
                    "partial_cpu_s": round(partial_cpu, 3),
                    "speedup_cpu": round(dense_cpu / partial_cpu, 2),
                    "same_rank": info.rank == reference_info.rank,
                    "energy_difference": abs(info.energy - reference_info.energy),
                    "subspace_gap": subspace_gap(basis, reference),
                }
            )
    print(table(rows, list(rows[0])), flush=True)
    return rows


def solver_rows(options: Any) -> list[dict[str, Any]]:
    """``pooled_basis`` with each tridiagonal eigenvector solver forced, on the same matrices:
    ``dstemr`` (MRRR, only the kept vectors) against ``dstevd`` (divide and conquer, all of
    them); the library picks ``dstevd`` above ``rules.ALL_VECTORS_ABOVE`` of the vectors kept."""
    rows = []
    saved = rules.ALL_VECTORS_ABOVE
    try:
        for dim in options.dims:
            cov = random_psd(dim)
            for threshold in options.thresholds:
                row: dict[str, Any] = {"d": dim, "threshold": threshold}
                for solver, fraction in (("dstemr", 1.0), ("dstevd", 0.0)):
                    rules.ALL_VECTORS_ABOVE = fraction
                    partial = functools.partial(rules.pooled_basis, cov, threshold)
                    _, cpu, (basis, info) = fastest(partial, options.repeats)
                    row["rank"] = info.rank
                    row[f"{solver}_cpu_s"] = round(cpu, 3)
                row["library_picks"] = "dstevd" if info.rank > saved * dim else "dstemr"
                rows.append(row)
    finally:
        rules.ALL_VECTORS_ABOVE = saved
    print(table(rows, list(rows[0])), flush=True)
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=1600)
    args.add_argument("--classes", type=int, default=9)
    args.add_argument("--rules", nargs="+", default=["pooled"], choices=["pooled", "per_class"])
    args.add_argument("--variant", default="both", choices=["partial", "dense", "both"])
    sections = ["resnet", "matrices", "solvers"]
    args.add_argument("--sections", nargs="+", default=sections, choices=sections)
    args.add_argument("--dims", nargs="+", type=int, default=[576, 1152, 2304, 4608])
    args.add_argument("--thresholds", nargs="+", type=float, default=[0.97, 0.99, 1.0])
    options = args.parse_args()
    device = setup(options)
    payload: dict[str, Any] = {"machine": machine(device), "command": vars(options)}
    if "resnet" in options.sections:
        payload["rows"] = resnet_rows(options, device)
        print(table(payload["rows"], list(payload["rows"][-1])), flush=True)
        write_json(options.json, payload)  # kept should the next section be interrupted
    if "matrices" in options.sections:
        payload["matrices"] = matrix_rows(options)
        write_json(options.json, payload)
    if "solvers" in options.sections:
        payload["solvers"] = solver_rows(options)
    payload["machine_after"] = machine(device)
    write_json(options.json, payload)


if __name__ == "__main__":
    main()
