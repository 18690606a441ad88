"""UNSC at default settings on a zoo of models nobody here wrote (issue 12, "any model").

For each model of ``tests/helpers/zoo.py`` (MNIST-1D CNN, digits CNN, torchvision ResNet-18 on
digits upsampled to 32x32, a small ViT, a ConvNeXt-style net, an embedding token classifier):
train the original on all training data and a retrain from scratch without the forgotten class
(both with the zoo's plain LightningModule), then unlearn the class from a copy of the original
with ``UnlearningModule(model, num_classes, forget_classes=[k])`` and ``NullSpaceCalibration()``
at their defaults, under a Trainer whose only setting is a cap on epochs. Reported per model:
macro test accuracy over remaining (Acc_r) and forgotten (Acc_f) classes of the three models, the
epochs unlearning used (it stops by itself at the target) and its wall seconds (bases included).

``--torchvision NAME ...`` adds classifiers of ``torchvision.models`` by name (built with
``num_classes=10``, trained on digits upsampled to 32x32 for ``--train-epochs`` at
``--train-lr``, like the zoo's ResNet-18). Every row also reports the callback's
``nullspace_drift/model`` (relative change of the logits on a probe of remaining samples) and the
share of that probe whose prediction changed, and the change of its accuracy (the callback
warns when it fell).

``--unlearn '{"lr": 0.05, "optimizer": "sgd"}'`` and ``--callback '{"rule": "pooled"}'`` pass
other settings, to compare mechanisms with the same models. Trained originals and retrains are
cached under ``--cache-dir``.

Example:
    python benchmarks/zoo.py --threads 1 --seeds 0 --callback '{"rule": "pooled"}' --json zoo.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from _common import machine, parser, setup, table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.zoo import (  # noqa: E402  (the zoo lives with the tests: one definition)
    NUM_CLASSES,
    ZOO,
    ZooEntry,
    plain_trainer,
    train_zoo_model,
    zoo_accuracy,
    zoo_datamodule,
    zoo_tensors,
)

from unsc_lightning import NullSpaceCalibration, UnlearningModule  # noqa: E402
from unsc_lightning.metrics.recovery import linear_probe_accuracy  # noqa: E402

COLUMNS = [
    "model",
    "seed",
    "original_acc_r",
    "original_acc_f",
    "retrain_acc_r",
    "retrain_acc_f",
    "unsc_acc_r",
    "unsc_acc_f",
    "epochs",
    "seconds",
    "drift",
    "changed",
    "probe_accuracy_change",
]


def trained(
    entry: ZooEntry, forget: list[int], retrain: bool, seed: int, accelerator: str, cache: Path
) -> torch.nn.Module:
    """The original (or retrained) model, from ``cache`` when it was trained before."""
    kind = "retrain" if retrain else "original"
    path = cache / f"{entry.name}-{kind}-forget{'_'.join(map(str, forget))}-seed{seed}.pt"
    model = entry.build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train_zoo_model(entry, forget, retrain=retrain, seed=seed, accelerator=accelerator)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def unlearn(
    original: torch.nn.Module,
    entry: ZooEntry,
    forget: list[int],
    seed: int,
    options: argparse.Namespace,
) -> tuple[torch.nn.Module, int, float, NullSpaceCalibration]:
    """UNSC on a copy of ``original``: ``(model, epochs used, seconds, callback)``."""
    model = copy.deepcopy(original)
    L.seed_everything(seed, verbose=False)
    dm = zoo_datamodule(entry.data, forget, "forget", seed=seed)
    module = UnlearningModule(model, NUM_CLASSES, forget_classes=forget, **options.unlearn)
    callback = NullSpaceCalibration(**options.callback)
    trainer = plain_trainer(options.max_epochs, options.accelerator, callbacks=[callback])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    return model.cpu().eval(), trainer.current_epoch, seconds, callback


def run(entry: ZooEntry, seed: int, options: argparse.Namespace) -> dict[str, Any]:
    forget = [options.forget_class]
    dm = zoo_datamodule(entry.data, forget, seed=seed)
    cache = options.cache_dir
    if entry.name not in ZOO:  # a --torchvision model: cached per training recipe
        cache = cache / f"torchvision-e{entry.epochs}-lr{entry.lr:g}"
    original = trained(entry, forget, False, seed, options.accelerator, cache)
    retrain = trained(entry, forget, True, seed, options.accelerator, cache)
    unlearned, epochs, seconds, callback = unlearn(original, entry, forget, seed, options)
    row: dict[str, Any] = {"model": entry.name, "seed": seed}
    for label, model in (("original", original), ("retrain", retrain), ("unsc", unlearned)):
        accuracy = zoo_accuracy(model, dm)
        row[f"{label}_acc_r"] = accuracy["acc_r"]
        row[f"{label}_acc_f"] = accuracy["acc_f"]
    row.update(epochs=epochs, seconds=seconds)
    row.update(drift=callback.model_drift, changed=callback.prediction_change)
    row["probe_accuracy_change"] = callback.probe_accuracy_change
    if options.probe:  # forgotten-class accuracy of a linear probe on the penultimate features
        x_train, y_train, x_test, y_test = zoo_tensors(entry.data)
        for label, model in (("original", original), ("retrain", retrain), ("unsc", unlearned)):
            probe = linear_probe_accuracy(model, x_train, y_train, x_test, y_test, forget)
            row[f"{label}_probe_f"] = round(100 * probe.forget_acc, 2)
    return row


def torchvision_entry(name: str, options: argparse.Namespace) -> ZooEntry:
    """A ``torchvision.models`` classifier on the zoo's 32x32 digits, trained as ``--train-*``."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise SystemExit(f"--torchvision: {name!r} is not a torchvision classifier")
    build = getattr(torchvision.models, name)
    return ZooEntry(
        name,
        "digits32",
        lambda: build(num_classes=NUM_CLASSES),
        epochs=options.train_epochs,
        lr=options.train_lr,
    )


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    args.add_argument(
        "--torchvision", nargs="+", default=[], help="torchvision.models classifiers by name"
    )
    args.add_argument("--train-epochs", type=int, default=8, help="--torchvision models only")
    args.add_argument("--train-lr", type=float, default=1e-3, help="--torchvision models only")
    args.add_argument("--seeds", nargs="+", type=int, default=[0])
    args.add_argument("--forget-class", type=int, default=3)
    args.add_argument(
        "--max-epochs", type=int, default=100, help="the Trainer's cap on unlearning epochs"
    )
    args.add_argument("--unlearn", type=json.loads, default={}, help="UnlearningModule options")
    args.add_argument(
        "--callback", type=json.loads, default={}, help="NullSpaceCalibration options"
    )
    args.add_argument(
        "--probe", action="store_true", help="also report a linear probe's forgotten-class accuracy"
    )
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_zoo_cache"))
    options = args.parse_args()
    device = setup(options)
    options.accelerator = "gpu" if device.type == "cuda" else "cpu"
    entries = [ZOO[name] for name in options.models]
    entries += [torchvision_entry(name, options) for name in options.torchvision]
    rows = []
    for entry in entries:
        for seed in options.seeds:
            rows.append(run(entry, seed, options))
            print(table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(table(rows, COLUMNS))
    settings = {
        "unlearn": options.unlearn,
        "callback": options.callback,
        "max_epochs": options.max_epochs,
        "forget_class": options.forget_class,
        "torchvision_training": {"epochs": options.train_epochs, "lr": options.train_lr},
    }
    write_json(options.json, {"machine": machine(device), "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
