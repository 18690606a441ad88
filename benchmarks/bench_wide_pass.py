"""The basis build of a model with wide layers: torchvision's ResNet-18 on 32 x 32 inputs.

At 32 x 32, ResNet-18's last stage runs on 1 x 1 maps: its 2304- and 4608-wide layers receive one
row per sample, a few rows per class and batch. Each class block's Gram product must be added
into that class's ``d x d`` float64 sums, a pass over ``8 d²`` bytes that costs far more than the
product of a few rows, and each class's basis step then works on a ``d x d`` matrix. This
benchmark times, in one process and interleaved, whole builds (``NullSpaceEngine.build``: the
pass, and the bases, ``bases_s``) against a plain no-grad forward over the same samples, with
the peak memory of sums, rows and bases the build reports (``peak_mib``):

- ``library``: the engine as it is: under the per-class rule a wide layer keeps each class's
  rows as rows (``nullspace.gram.held_rows``, up to ``d/3 - 8``) and the rule works on them
  (``basis._extend_rows``); other small class blocks gather in a row buffer
  (``nullspace.gram.buffer_rows``) before one product; convolution sums stay channels-last, the
  bases' rows being permuted at the end;
- ``sums``: every class's ``d x d`` sums formed (``held_rows`` patched to 0: the engine of the
  third speed pass, before 2026-11-27 16:00);
- ``unbuffered``: ``sums`` with every block multiplied and added as it comes (``buffer_rows``
  patched to 0);
- ``former``: unbuffered, and every class's sums permuted to weight order after the pass (what
  the engine did before the third speed pass).

``--pass-only`` skips the eigendecompositions (the sums are still completed), as this benchmark
did before the held rows: ``library`` then equals ``sums`` plus the cost of multiplying the
held rows at the end.

Data (``--data``): ``random`` (an untrained ``--model``: ResNet-18, or the paper's VGG-11-bn or
AlexNet, whose 4096- and 2048-wide Linear layers get one row per sample; ``--samples`` random
32 x 32 inputs, labels ``i % 10``, batch ``--batch``), or ``zoo``: the zoo's ResNet-18 trained on digits at 32 x 32 and the remaining
data of its unlearning run (class 3 forgotten; ``benchmarks/zoo.py``, which trains the model
into its ``--cache-dir`` when it is not there), the build ``NullSpaceCalibration()`` runs at its
defaults. Rule ``--rule``.

Example:
    python benchmarks/bench_wide_pass.py --threads 1 --json docs/results/wide_pass.json
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from _common import best, machine, parser, setup, table, timed, write_json
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning.nullspace import NullSpaceEngine, covariance
from unsc_lightning.nullspace.basis_pass import BasisPass

VARIANTS = ("library", "sums", "unbuffered", "former")


@contextlib.contextmanager
def variant(name: str, pass_only: bool) -> Iterator[None]:
    """Patch the engine into ``name``'s behaviour (and skip the eigendecompositions)."""

    def sums_only(
        self: BasisPass, bases: Any, energy: Any, total: Any, accumulator: Any, *rest: Any
    ) -> None:
        accumulator.sums  # noqa: B018  (the property adds the buffered rows: timed, as in a build)

    patches: list[tuple[Any, str, Any]] = []
    if pass_only:
        patches.append((BasisPass, "_extend", sums_only))
    if name != "library":
        patches.append((covariance, "held_rows", lambda dim: 0))
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


def _paper(name: str) -> Any:
    from unsc_lightning.models import paper

    return getattr(paper, name)(num_classes=10)


#: ``--model`` (random data only): ``name -> () -> (untrained model, input channels)``
MODELS = {
    "resnet18": lambda: (torchvision.models.resnet18(num_classes=10), 3),
    "vgg11bn": lambda: (_paper("VGG11BN"), 3),  # the paper's SVHN model
    "alexnet": lambda: (_paper("AlexNetFMNIST"), 1),  # the paper's Fashion-MNIST model
}


def data(options: Any) -> tuple[torch.nn.Module, Any]:
    """(model, remaining data) of ``--data``."""
    if options.data == "zoo":
        from zoo import ZOO, trained, zoo_datamodule

        entry = ZOO["resnet18"]
        model = trained(entry, [3], False, 0, "cpu", options.cache_dir)
        datamodule = zoo_datamodule(entry.data, [3], "forget", seed=0)
        datamodule.setup("fit")
        return model, datamodule.retain_dataloader()
    torch.manual_seed(0)
    model, channels = MODELS[options.model]()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(options.samples, channels, 32, 32, generator=generator)
    y = torch.arange(options.samples) % 10
    return model, DataLoader(TensorDataset(x, y), batch_size=options.batch)


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=640)
    args.add_argument("--batch", type=int, default=64)
    args.add_argument("--rule", choices=["per_class", "pooled"], default="per_class")
    args.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args.add_argument("--pass-only", action="store_true", help="skip the eigendecompositions")
    args.add_argument("--data", choices=["random", "zoo"], default="random")
    args.add_argument("--model", choices=list(MODELS), default="resnet18", help="with random data")
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_zoo_cache"))
    options = args.parse_args()
    device = setup(options)
    model, loader = data(options)
    model = model.to(device).eval()

    def forward() -> None:
        with torch.no_grad():
            for inputs, _ in loader:
                model(inputs.to(device))

    forward()  # warm-up
    forwards: list[float] = []
    builds: dict[str, list[float]] = {name: [] for name in options.variants}
    eigen: dict[str, list[float]] = {name: [] for name in options.variants}
    ranks: dict[str, dict[str, int]] = {}
    peaks: dict[str, float] = {}
    for _ in range(options.repeats):
        forwards.append(timed(forward, device))
        for name in options.variants:
            engine = NullSpaceEngine(model, threshold=0.97, rule=options.rule)
            with variant(name, options.pass_only):
                builds[name].append(timed(functools.partial(engine.build, loader), device))
            eigen[name].append(0.0 if options.pass_only else engine.timings["bases"])
            assert engine.report is not None
            peaks[name] = engine.report.peak_bytes / 2**20
            if not options.pass_only:
                ranks[name] = {key: info.rank for key, info in engine.layer_infos.items()}
            del engine  # with every class's sums formed, ResNet-18's take 7 GiB: freed first
            gc.collect()
    plain = best(forwards)
    baseline = next((name for name in ("sums", "former") if name in builds), None)
    rows = []
    for name, times in builds.items():
        fastest = times.index(best(times))  # the fastest build, split into pass and bases
        build, bases = times[fastest], eigen[name][fastest]
        rows.append(
            {
                "variant": name,
                "forward_s": plain,
                "build_s": build,
                "bases_s": bases,
                "pass_s": build - bases,
                "pass_throughput_vs_forward": plain / (build - bases),
                "peak_mib": peaks[name],
                "speedup": None if baseline is None else best(builds[baseline]) / build,
                "same_ranks_as_baseline": None
                if baseline is None or not ranks
                else ranks[name] == ranks[baseline],
            }
        )
    print(table(rows, list(rows[0])))
    write_json(
        options.json,
        {
            "benchmark": "bench_wide_pass",
            "model": "torchvision resnet18(num_classes=10), eval"
            if options.data == "zoo" or options.model == "resnet18"
            else f"unsc_lightning.models.paper {options.model} (num_classes=10), eval",
            "data": "zoo: trained on digits 32x32, remaining data of class 3's unlearning"
            if options.data == "zoo"
            else "random 3x32x32, untrained",
            "samples": options.samples if options.data == "random" else None,
            "batch": options.batch if options.data == "random" else None,
            "rule": options.rule,
            "pass_only": options.pass_only,
            "speedup_against": baseline,
            "results": rows,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
