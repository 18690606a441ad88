"""The basis build under DDP: wide layers' few rows gathered as rows, or their sums all-reduced.

``NullSpaceCalibration()`` at its defaults on the zoo's ResNet-18 trained on digits at 32 x 32
(class 3 forgotten; ``benchmarks/zoo.py`` trains it into ``--cache-dir`` when it is not there),
under ``Trainer(strategy="ddp_fork", devices=--processes)`` on CPU processes (gloo) or GPUs
(``--device cuda``, NCCL). Each rank reads its share of the remaining data. Timed on rank 0: the
engine's build (``engine.timings["total"]``, pass and bases), with the rank's peak memory of
sums, rows and bases (``report.peak_bytes``), for two variants, one fit each, one after the
other:

- ``gather`` (the library): a wide layer's classes with few rows in all are shared as rows
  (``RowGather``: two ``Strategy.all_gather`` calls per layer and class), and each layer's bases
  are computed by one process and all-reduced to the others (``build(process=)``);
- ``replicated``: the same, but every process computes every basis (``process`` dropped);
- ``sums``: the callback passes no ``gather``, so every covariance is formed and all-reduced
  (bases still split over the processes).

Before 2026-11-27 DDP ran ``sums`` with replicated bases and held every per-class sum twice
(``_Slots.aligned``'s copy).

The bases of both variants are compared (largest entry of ``U1 U1ᵀ - U2 U2ᵀ`` over layers).

Example:
    python benchmarks/bench_ddp_build.py --threads 1 --processes 2 --json ddp_build.json
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from _common import machine, parser, setup, table, write_json
from zoo import NUM_CLASSES, ZOO, plain_trainer, trained, zoo_datamodule

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning import callback as callback_module
from unsc_lightning.nullspace.basis_pass import BasisPass

FORGET = [3]


class _SaveBuild(L.Callback):
    """Rank 0 writes the build's time, peak, ``held_rows`` and bases to ``path``."""

    def __init__(self, calibration: NullSpaceCalibration, path: Path) -> None:
        self.calibration, self.path = calibration, path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self.calibration.engine
        assert engine is not None and engine.report is not None
        if trainer.global_rank == 0:
            state = {
                "build_s": engine.timings["total"],
                "bases_s": engine.timings["bases"],
                "peak_mib": engine.report.peak_bytes / 2**20,
                "held_rows": engine.report.held_rows,
                "layers_built": engine.report.layers_built,
                "bases": {k: v.clone() for k, v in self.calibration.bases.items()},
            }
            torch.save(state, self.path)


def run(variant: str, original: torch.nn.Module, options: Any, folder: Path) -> dict[str, Any]:
    path = folder / f"{variant}.pt"
    saved, init = callback_module.RowGather, BasisPass.__init__
    if variant == "sums":  # forked ranks inherit the patches
        callback_module.RowGather = lambda trainer: None  # type: ignore[assignment,misc,return-value]
    if variant == "replicated":

        def replicated(self: BasisPass, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self.process = None

        BasisPass.__init__ = replicated  # type: ignore[method-assign]
    try:
        calibration = NullSpaceCalibration()
        module = UnlearningModule(copy.deepcopy(original), NUM_CLASSES, forget_classes=FORGET)
        trainer = plain_trainer(
            1,
            options.accelerator,
            callbacks=[calibration, _SaveBuild(calibration, path)],
            strategy="ddp_fork",
            devices=options.processes,
            limit_train_batches=1,
        )
        trainer.fit(module, datamodule=zoo_datamodule(ZOO["resnet18"].data, FORGET, "forget"))
    except Exception as error:  # e.g. a rank killed for memory: reported, not hidden
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        callback_module.RowGather = saved  # type: ignore[misc]
        BasisPass.__init__ = init  # type: ignore[method-assign]
    return dict(torch.load(path))


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--processes", type=int, default=2)
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_zoo_cache"))
    options = args.parse_args()
    device = setup(options)
    options.accelerator = "gpu" if device.type == "cuda" else "cpu"
    original = trained(ZOO["resnet18"], FORGET, False, 0, options.accelerator, options.cache_dir)
    with tempfile.TemporaryDirectory() as folder:
        states = {
            name: run(name, original, options, Path(folder))
            for name in ("gather", "replicated", "sums")
        }
    worst: float | None = None
    if all("bases" in state for state in states.values()):
        worst = 0.0
        for key, basis in states["gather"]["bases"].items():
            first, second = basis.double(), states["sums"]["bases"][key].double()
            if first.shape != second.shape:
                worst = float("inf")
                break
            worst = max(worst, float((first @ first.T - second @ second.T).abs().max()))
    rows = [
        {
            "variant": name,
            "build_s": state.get("build_s"),
            "bases_s": state.get("bases_s"),
            "peak_mib": state.get("peak_mib"),
            "layers_from_rows": len(state["held_rows"]) if "held_rows" in state else None,
            "layers_built_here": state.get("layers_built"),
            "speedup": states["sums"]["build_s"] / state["build_s"]
            if "build_s" in states["sums"] and "build_s" in state
            else None,
            "error": state.get("error"),
        }
        for name, state in states.items()
    ]
    print(table(rows, list(rows[0])))
    print(f"largest projector difference between the variants: {worst}")
    write_json(
        options.json,
        {
            "benchmark": "bench_ddp_build",
            "model": "zoo resnet18 (torchvision), trained on digits 32x32, class 3 forgotten",
            "processes": options.processes,
            "results": rows,
            "held_rows": states["gather"].get("held_rows"),
            "max_projector_difference": worst,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
