"""A second forget request: bases from the per-class covariance cache against from the data.

The first request (forget ``--first``) builds a :class:`ClassCovarianceCache` over all training
data (remaining and forgotten samples) and saves it. The second request (forget ``--second``)
then needs the bases of its own remaining classes; timed both ways in one process:

- from the engine (``from_engine_s``, the baseline of ``speedup``): what ``NullSpaceCalibration``
  does without a cache, ``NullSpaceEngine(model, threshold, rule).build`` over the second
  request's remaining data (its fast basis pass: float32 products, channels-last rows);
- from the data with the generic recorder (``from_data_s``, the baseline of
  ``speedup_vs_generic_pass``; the figure this benchmark reported before 2026-11-27): one
  no-grad pass of :func:`accumulate_covariances` (float64 products, rows in weight order), then
  the eigendecompositions. This is the pass the cache itself is built with;
- from the cache: model fingerprint, ``load``, and the eigendecompositions of the selected (or
  summed) classes — no pass over the data.

As the callback does, the first request computes its own bases from the cache and records the
per-class rule along every held class (``prepare_rule_states``) before saving, so the second
request runs the rule only on the classes above its first forgotten one.

``--variant`` (default both, in one process): ``new`` (the library: partial eigendecompositions,
recorded rule states) and ``reference`` (the former code path: a full ``eigh`` of every class's
d x d residual, ``dense_per_class_basis``, and no recorded state), so the speedups old -> new
are measured side by side on the same machine.

Both rules are timed: ``per_class`` (the paper's Algorithm 1, one eigendecomposition per
remaining class and layer, so it dominates on small data) and ``pooled`` (one per layer). The
bases of both ways are checked to span the same subspaces.

Settings (``--setting``): ``mnist1d`` (MNIST1DConvNet on the embedded MNIST-1D data,
``--num-samples`` generated, 10,000 by default, 72 % of them for training) or ``allcnn`` (AllCNN at width 0.5 on ``--samples`` random
32 x 32 images with random labels: larger layers and a costlier pass per sample).

Example:
    python benchmarks/bench_cache.py --threads 1 --json bench_cache.json
    python benchmarks/bench_cache.py --threads 1 --second 0  # worst case: no prefix to reuse
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _common import best, machine, parser, setup, table, timed, write_json
from bench_basis import MODELS, NUM_CLASSES, SyntheticLoader
from helpers.oracles import dense_per_class_basis
from torch import Tensor, nn

from unsc_lightning.nullspace import (
    CovarianceAccumulator,
    NullSpaceEngine,
    accumulate_covariances,
    layer_dims,
)
from unsc_lightning.nullspace import layers as layers_module
from unsc_lightning.nullspace.cache import ClassCovarianceCache, model_fingerprint
from unsc_lightning.nullspace.layers import build_bases, select_layers

VARIANTS = ("new", "reference")


@contextmanager
def variant_rule(variant: str) -> Iterator[None]:
    """``reference``: :func:`build_bases` runs the former dense per-class rule."""
    original = layers_module.per_class_basis
    if variant == "reference":
        layers_module.per_class_basis = dense_per_class_basis
    try:
        yield
    finally:
        layers_module.per_class_basis = original


def cache_bases(
    cache: ClassCovarianceCache, remaining: list[int], threshold: float, rule: str, variant: str
) -> dict[str, Any]:
    if variant == "reference":  # what ``ClassCovarianceCache.bases`` did before rule states
        return build_bases(cache.accumulator(), threshold, rule, remaining)  # type: ignore[arg-type]
    return cache.bases(remaining, threshold, rule)  # type: ignore[arg-type]


class WithoutClasses:
    """The batches of ``loader`` with the samples of ``classes`` removed."""

    def __init__(self, loader: Iterable[Any], classes: list[int]) -> None:
        self.loader, self.classes = loader, torch.tensor(classes)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for inputs, labels in self.loader:
            keep = ~torch.isin(labels, self.classes.to(labels.device))
            if keep.any():
                yield inputs[keep], labels[keep]


class Chained:
    def __init__(self, *loaders: Iterable[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader


def data_for(
    setting: str, first: list[int], samples: int, device: torch.device, num_samples: int = 10_000
) -> tuple[nn.Module, Any, Any]:
    """(model, all training data, factory of a request's remaining data)."""
    torch.manual_seed(0)
    if setting == "mnist1d":
        from unsc_lightning.data import MNIST1DDataModule

        factory = MODELS["mnist1d"][0]
        dm = MNIST1DDataModule(forget_classes=first, eval_batch_size=512, num_samples=num_samples)
        everything = Chained(dm.retain_dataloader(), dm.forget_dataloader())
    else:
        factory, shape, batch = MODELS["allcnn"]
        everything = SyntheticLoader(samples, batch, shape, torch.device("cpu"))
    model = factory().to(device).eval()
    return model, everything, lambda forget: WithoutClasses(everything, forget)


def on_device(loader: Iterable[Any], device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for inputs, labels in loader:
        yield inputs.to(device), labels.to(device)


def same_subspaces(first: dict[str, Any], second: dict[str, Any]) -> float:
    """Largest entry of ``U1 U1ᵀ - U2 U2ᵀ`` over layers (0 when the bases span the same space)."""
    worst = 0.0
    for name, (basis, _) in first.items():
        other = second[name][0]
        if basis.shape != other.shape:
            return float("inf")
        difference = basis @ basis.T - other.to(basis.device) @ other.to(basis.device).T
        worst = max(worst, float(difference.abs().max()) if difference.numel() else 0.0)
    return worst


def measure_rule(
    variant: str,
    rule: str,
    model: nn.Module,
    layers: dict[str, nn.Module],
    second_data: Iterable[Any],
    remaining: list[int],
    path: Path,
    threshold: float,
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Medians of both ways of building the second request's bases with ``rule``."""
    times: dict[str, list[float]] = {}
    results: dict[str, Any] = {}

    def lap(key: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(key, []).append(now - start)
        return now

    def from_data() -> None:
        start = time.perf_counter()
        accumulator = CovarianceAccumulator(layer_dims(layers), NUM_CLASSES, device=device)
        accumulate_covariances(model, layers, on_device(second_data, device), accumulator)
        start = lap("data_pass_s", start)
        results["data"] = build_bases(accumulator, threshold, rule)
        lap("data_eigen_s", start)

    def from_engine() -> None:  # what the callback runs without a cache
        engine = NullSpaceEngine(model, threshold=threshold, rule=rule)  # type: ignore[arg-type]
        engine.build(on_device(second_data, device))
        results["engine"] = {key: (engine.bases[key], None) for key in engine.bases}

    def from_cache() -> None:
        start = time.perf_counter()
        model_fingerprint(model)
        start = lap("cache_fingerprint_s", start)
        loaded = ClassCovarianceCache.load(path, map_location=device)
        start = lap("cache_load_s", start)
        results["cache"] = cache_bases(loaded, remaining, threshold, rule, variant)
        lap("cache_eigen_s", start)

    with variant_rule(variant):
        for _ in range(repeats):
            times.setdefault("from_engine_s", []).append(timed(from_engine, device))
            times.setdefault("from_data_s", []).append(timed(from_data, device))
            times.setdefault("from_cache_s", []).append(timed(from_cache, device))
    row: dict[str, Any] = {
        "variant": variant,
        "rule": rule,
        **{k: best(v) for k, v in times.items()},
    }
    row["speedup"] = row["from_engine_s"] / row["from_cache_s"]
    row["speedup_vs_generic_pass"] = row["from_data_s"] / row["from_cache_s"]
    row["max_projector_difference"] = same_subspaces(results["data"], results["cache"])
    row["engine_max_projector_difference"] = same_subspaces(results["engine"], results["cache"])
    return row


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--setting", choices=["mnist1d", "allcnn"], default="mnist1d")
    args.add_argument("--samples", type=int, default=2000, help="random images (--setting allcnn)")
    args.add_argument(
        "--num-samples",
        type=int,
        default=10_000,
        help="MNIST-1D samples generated (--setting mnist1d)",
    )
    args.add_argument("--first", type=int, nargs="+", default=[3], help="first request's classes")
    args.add_argument("--second", type=int, nargs="+", default=[5], help="second request's classes")
    args.add_argument("--threshold", type=float, default=0.97)
    args.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    options = args.parse_args()
    variants = VARIANTS if options.variant == "both" else (options.variant,)
    device = setup(options)
    model, everything, remaining_data = data_for(
        options.setting, options.first, options.samples, device, options.num_samples
    )
    layers = select_layers(model).layers
    remaining = [k for k in range(NUM_CLASSES) if k not in options.second]

    first_remaining = [k for k in range(NUM_CLASSES) if k not in options.first]
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "covariances.pt"
        path = Path(folder) / "covariances_with_rule_states.pt"
        start = time.perf_counter()
        cache = ClassCovarianceCache.build(
            model, layers, on_device(everything, device), NUM_CLASSES
        )
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        cache.save(plain)
        save_s = time.perf_counter() - start
        file_mib = os.path.getsize(plain) / 2**20
        # the first request, as the callback serves it: its bases, then the rule along every
        # held class recorded (what it costs on top of the first request's own bases)
        start = time.perf_counter()
        cache.bases(first_remaining, options.threshold)
        first_bases_s = time.perf_counter() - start
        start = time.perf_counter()
        cache.prepare_rule_states(options.threshold)
        prepare_s = time.perf_counter() - start
        cache.save(path)
        states_kib = (os.path.getsize(path) - os.path.getsize(plain)) / 2**10
        del cache
        rows = []
        for rule in ("per_class", "pooled"):
            for variant in variants:
                row = measure_rule(
                    variant,
                    rule,
                    model,
                    layers,
                    remaining_data(options.second),
                    remaining,
                    path if variant == "new" else plain,
                    options.threshold,
                    device,
                    options.repeats,
                )
                rows.append(row)
            print(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                flush=True,
            )

    columns = [
        "variant",
        "rule",
        "from_engine_s",
        "from_data_s",
        "data_pass_s",
        "data_eigen_s",
        "from_cache_s",
        "cache_load_s",
        "cache_fingerprint_s",
        "cache_eigen_s",
        "speedup",
        "speedup_vs_generic_pass",
        "max_projector_difference",
        "engine_max_projector_difference",
    ]
    print(table(rows, columns))
    print(
        f"cache build (all classes, one pass): {build_s:.3g} s, save {save_s:.3g} s, "
        f"file {file_mib:.3g} MiB; first request's per-class bases {first_bases_s:.3g} s, "
        f"recording the rule along every class {prepare_s:.3g} s (+{states_kib:.3g} KiB)"
    )
    write_json(
        options.json,
        {
            "benchmark": "bench_cache",
            "setting": options.setting,
            "samples": options.samples
            if options.setting == "allcnn"
            else f"MNIST-1D training split of {options.num_samples} generated",
            "first": options.first,
            "second": options.second,
            "threshold": options.threshold,
            "cache_build_s": build_s,
            "cache_save_s": save_s,
            "cache_file_mib": file_mib,
            "first_request_per_class_bases_s": first_bases_s,
            "prepare_rule_states_s": prepare_s,
            "rule_states_kib": states_kib,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
