"""Where a basis build and the callback's set-up spend their time: profiler tables, not ratios.

- ``build``: ``NullSpaceEngine(model, 0.97, per_class).build`` over ``--samples`` random inputs
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
from collections.abc import Callable
from pathlib import Path

import torch
from _common import parser, setup, synchronize
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.lab.runs import make_trainer
from unsc_lightning.models import MNIST1DConvNet
from unsc_lightning.models.paper import AllCNN, ResNet18CIFAR
from unsc_lightning.nullspace import NullSpaceEngine

MODELS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], int, int]] = {
    "mnist1d": (MNIST1DConvNet, (1, 40), 512, 10),
    "allcnn": (lambda: AllCNN(num_classes=10), (3, 32, 32), 128, 10),
    "resnet18cifar": (lambda: ResNet18CIFAR(num_classes=100), (3, 32, 32), 128, 100),
}


def loader(n: int, shape: tuple[int, ...], batch: int, classes: int, device: torch.device) -> list:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return [(a.to(device), b.to(device)) for a, b in zip(x.split(batch), y.split(batch))]


def profile_build(options, device: torch.device) -> str:
    factory, shape, batch, classes = MODELS[options.model]
    model = factory().to(device).eval()
    data = loader(options.samples, shape, batch, classes, device)
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
    options = {"accelerator": "gpu" if device.type == "cuda" else "cpu", "deterministic": False}

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
