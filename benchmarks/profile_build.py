"""Where a basis build and the callback's set-up spend their time: profiler tables, not ratios.

- ``build``: ``NullSpaceEngine(model, 0.97, per_class).build`` of one of ``bench_basis.py``'s
  models over ``--samples`` of its random inputs
  (one warm-up build first), under ``torch.profiler`` (CPU and, on CUDA, the GPU kernels): the
  operators by self time on the device and by self CPU time;
- ``fit``: ``NullSpaceCalibration`` with the paper's CIFAR-100 / ResNet-18 recipe (pooled, 0.99,
  one batch of 512 remaining samples) in a one-step fit, under ``cProfile``: the library's
  functions by cumulative time (what the set-up costs besides the basis build).

Example:
    python benchmarks/profile_build.py --device cuda --model allcnn --samples 4096 --out prof.txt
"""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path

import torch
from _common import parser, setup, synchronize, trainer_options
from bench_basis import MODELS, SyntheticLoader  # the same models and random data
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.lab.runs import make_trainer
from unsc_lightning.models.paper import ResNet18CIFAR
from unsc_lightning.nullspace import NullSpaceEngine


def profile_build(options, device: torch.device) -> str:
    factory, shape, batch = MODELS[options.model]
    model = factory().to(device).eval()
    data = list(SyntheticLoader(options.samples, batch, shape, device))
    NullSpaceEngine(model, threshold=0.97).build(data)  # warm-up
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        engine = NullSpaceEngine(model, threshold=0.97)
        engine.build(data)
        synchronize(device)
    out = [f"# build of {options.model}, {options.samples} samples: {engine.timings}"]
    if device.type == "cuda":
        out.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return "\n".join(out)


def profile_fit(device: torch.device) -> str:
    model = ResNet18CIFAR(num_classes=100)
    forget = list(range(10))
    retain = DataLoader(
        TensorDataset(torch.randn(512, 3, 32, 32), torch.randint(10, 100, (512,))), batch_size=512
    )
    train = DataLoader(
        TensorDataset(torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))), batch_size=512
    )
    options = {**trainer_options(device), "deterministic": False}

    def fit() -> None:
        module = UnlearningModule(model, 100, forget, lr=0.04, stop_at_target=False)
        callback = NullSpaceCalibration(
            threshold=0.99, rule="pooled", max_retain_batches=1, retain_dataloader=retain
        )
        make_trainer(1, [callback], **options).fit(module, train_dataloaders=train)

    fit()  # warm-up (CUDA context, cuDNN)
    profiler = cProfile.Profile()
    profiler.enable()
    fit()
    synchronize(device)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(60)
    return "# one-step fit, ResNet18CIFAR, CIFAR-100 recipe (cProfile, cumulative)\n" + (
        stream.getvalue()
    )


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--model", choices=list(MODELS), default="allcnn")
    args.add_argument("--samples", type=int, default=4096)
    args.add_argument("--what", nargs="+", choices=["build", "fit"], default=["build", "fit"])
    args.add_argument("--out", type=Path, default=None)
    options = args.parse_args()
    device = setup(options)
    parts = []
    if "build" in options.what:
        parts.append(profile_build(options, device))
    if "fit" in options.what:
        parts.append(profile_fit(device))
    text = "\n\n".join(parts)
    if options.out is not None:
        options.out.write_text(text)
    print(text[-6000:])


if __name__ == "__main__":
    main()
