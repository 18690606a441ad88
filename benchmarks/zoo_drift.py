"""Remaining-output drift of a zoo model unlearned at a given threshold, layer by layer.

Trains (or reads from ``--cache-dir``) a zoo model's original the way ``tests/lightning/
test_zoo.py`` does (a third of its recipe), then unlearns class 3 with ``UnlearningModule`` at its
defaults and ``NullSpaceCalibration(threshold=--threshold)`` for ``--epochs`` epochs, in one
process for each variant:

- ``library``: as shipped;
- ``no_drop``: ``module.NULL_GRADIENT_FRACTION`` patched to 0, so no gradient is dropped (the
  engine before 2026-11-27 evening: relative steps rescaled whatever projection left, rounding
  included).

Reported per variant: the relative change of the remaining logits, and per constrained layer the
leak ``||ΔW x|| / ||W₀ x||`` on the original's inputs ``x`` (remaining samples), the relative
weight change ``||ΔW|| / ||W₀||`` and the basis's rank. At ``threshold=1.0`` every leak and the
logit change should be rounding only.

Example:
    python benchmarks/zoo_drift.py --threads 2 --model resnet18 --json zoo_drift_resnet18.json
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import machine, parser, setup, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.zoo import NUM_CLASSES, ZOO, plain_trainer, train_zoo_model, zoo_datamodule  # noqa: E402

from unsc_lightning import NullSpaceCalibration, UnlearningModule  # noqa: E402
from unsc_lightning import module as unsc_module  # noqa: E402

FORGET = [3]


def original(name: str, cache: Path) -> torch.nn.Module:
    entry = ZOO[name]
    path = cache / f"{name}-test-original-forget3.pt"
    model = entry.build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    with torch.random.fork_rng():
        model = train_zoo_model(replace(entry, epochs=max(2, entry.epochs // 3)), FORGET)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def output(layer: torch.nn.Module, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s output on ``inputs`` with ``weight`` instead of its own (no bias), float64."""
    if isinstance(layer, torch.nn.Linear):
        return F.linear(inputs.double(), weight)
    conv: Any = F.conv1d if isinstance(layer, torch.nn.Conv1d) else F.conv2d
    settings: Any = layer
    return conv(
        inputs.double(),
        weight,
        None,
        settings.stride,
        settings.padding,
        settings.dilation,
        settings.groups,
    )


@torch.no_grad()
def layer_leaks(
    before: torch.nn.Module, after: torch.nn.Module, x: torch.Tensor
) -> dict[str, dict[str, float]]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
        for n, m in before.named_modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))
    ]
    before(x)
    for hook in hooks:
        hook.remove()
    moved = dict(after.named_modules())
    result = {}
    for name, x_in in inputs.items():
        layer: Any = before.get_submodule(name)
        weight = layer.weight.detach().double()
        delta = moved[name].weight.detach().double() - weight
        result[name] = {
            "leak": float(output(layer, x_in, delta).norm() / output(layer, x_in, weight).norm()),
            "weight_change": float(delta.norm() / weight.norm()),
        }
    return result


def unlearn(
    model: torch.nn.Module, name: str, threshold: float, epochs: int, drop: bool
) -> dict[str, Any]:
    dm = zoo_datamodule(ZOO[name].data, FORGET)
    dm.setup("fit")
    x = torch.cat([batch[0] for batch in dm.retain_dataloader()])
    unlearned = copy.deepcopy(model)
    module = UnlearningModule(unlearned, NUM_CLASSES, forget_classes=FORGET)
    callback = NullSpaceCalibration(threshold=threshold)
    patched = unsc_module.NULL_GRADIENT_FRACTION
    if not drop:  # every gradient kept, however little of it the projection left
        unsc_module.NULL_GRADIENT_FRACTION = 0.0
    try:
        plain_trainer(epochs, callbacks=[callback]).fit(module, datamodule=dm)
    finally:
        unsc_module.NULL_GRADIENT_FRACTION = patched
    unlearned.eval()
    with torch.no_grad():
        before, after = model(x), unlearned(x)
    leaks = layer_leaks(model, unlearned, x[:256])
    ranks = {key.removeprefix("model."): info.rank for key, info in callback.layer_infos.items()}
    for layer, row in leaks.items():
        row["rank"] = ranks.get(layer, -1)
    return {
        "logit_change": float((after - before).norm() / before.norm()),
        "worst_leak": max(row["leak"] for row in leaks.values()),
        "layers_moved": sum(row["weight_change"] > 0 for row in leaks.values()),
        "layers": leaks,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--model", choices=list(ZOO), default="resnet18")
    args.add_argument("--threshold", type=float, default=1.0)
    args.add_argument("--epochs", type=int, default=3)
    args.add_argument("--cache-dir", type=Path, default=Path("/tmp/unsc_zoo_cache"))
    options = args.parse_args()
    device = setup(options)
    model = original(options.model, options.cache_dir)
    results = {
        "library": unlearn(model, options.model, options.threshold, options.epochs, True),
        "no_drop": unlearn(model, options.model, options.threshold, options.epochs, False),
    }
    for variant, row in results.items():
        print(
            f"{variant}: remaining logits changed by {row['logit_change']:.3g}, worst layer "
            f"leak {row['worst_leak']:.3g}, {row['layers_moved']} layers moved"
        )
    write_json(
        options.json,
        {
            "benchmark": "zoo_drift",
            "model": options.model,
            "threshold": options.threshold,
            "epochs": options.epochs,
            "results": results,
            "machine": machine(device),
        },
    )


if __name__ == "__main__":
    main()
