"""Does a fit run at the defaults on torchvision classifiers? A smoke probe, not an accuracy test.

For each ``--models`` name: ``torchvision.models.NAME(num_classes=4)`` (untrained), random
inputs of its ``--sizes`` (64 x 64 by default; Inception-v3 needs 299 for its auxiliary head),
64 samples of 4 classes, ``UnlearningModule(model, forget_classes=[3])`` with
``NullSpaceCalibration(retain_dataloader=…)`` at the defaults, one epoch. Each model's row: did
the fit complete (else the error), wall seconds, how many parameters were constrained and
frozen, the layers no remaining sample reached (``engine.report.unused_layers``: kept
unchanged), those whose rows came from ``F.linear`` calls on their weight
(``engine.report.functional_layers``), and the library's warnings. Random data say nothing about forgetting quality
(``zoo.py`` trains on digits for that).

Example:
    python benchmarks/probe_torchvision_defaults.py --threads 1 --models googlenet swin_t \\
        --json docs/results/torchvision_defaults_probe.json
"""

from __future__ import annotations

import time
import traceback
import warnings
from typing import Any

import lightning.pytorch as L
import torch
from _common import machine, parser, setup, table, write_json
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule

MODELS = [
    "googlenet",
    "inception_v3",
    "swin_t",
    "densenet121",
    "mobilenet_v2",
    "mnasnet0_5",
    "efficientnet_v2_s",
]
SIZES = {"inception_v3": 299}  # its auxiliary head's 5 x 5 convolution needs the full size


def probe(name: str, size: int, device: torch.device) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(0)
    options: dict[str, Any] = {"num_classes": 4}
    if name in ("googlenet", "inception_v3"):
        options["init_weights"] = True  # silences torchvision's own FutureWarning
    model = getattr(torchvision.models, name)(**options)
    x = torch.randn(64, 3, size, size)
    y = torch.arange(64) % 4
    retain = DataLoader(TensorDataset(x[y != 3], y[y != 3]), batch_size=16)
    forget = DataLoader(TensorDataset(x[y == 3], y[y == 3]), batch_size=16)
    module = UnlearningModule(model, num_classes=4, forget_classes=[3], stop_at_target=False)
    callback = NullSpaceCalibration(retain_dataloader=retain)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator=device.type,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    row: dict[str, Any] = {"model": name, "size": size}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, train_dataloaders=forget)
            row["result"] = "completed"
        except Exception as error:  # the probe reports every failure, whatever its type
            row["result"] = f"{type(error).__name__}: {error}"[:300]
            row["traceback_tail"] = traceback.format_exc()[-600:]
    row["seconds"] = time.perf_counter() - start
    engine = callback.engine
    report = None if engine is None else engine.report
    row["constrained"] = 0 if engine is None else len(engine.constrained_parameters)
    row["frozen"] = 0 if engine is None else len(engine.frozen_parameters)
    row["unused_layers"] = [] if report is None else list(report.unused_layers)
    row["functional_layers"] = [] if report is None else list(report.functional_layers)
    row["library_warnings"] = [
        str(w.message)[:200]
        for w in caught
        if "unsc_lightning" in (w.filename or "")
        or str(w.message).startswith(("NullSpace", "Unlearning"))
    ]
    return row


def main() -> None:
    args = parser(__doc__.splitlines()[0])
    args.add_argument("--models", nargs="+", default=MODELS)
    args.add_argument("--size", type=int, default=64, help="input size (Inception-v3: 299)")
    options = args.parse_args()
    import torchvision

    known = set(torchvision.models.list_models(module=torchvision.models))
    unknown = [name for name in options.models if name not in known]
    if unknown:
        raise SystemExit(f"--models: {unknown} are not torchvision classifiers")
    device = setup(options)
    rows = []
    for name in options.models:
        row = probe(name, SIZES.get(name, options.size), device)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "traceback_tail"}, flush=True)
    for row in rows:
        row["unused"] = len(row["unused_layers"])
        row["functional"] = len(row["functional_layers"])
    columns = [
        "model",
        "size",
        "result",
        "seconds",
        "constrained",
        "frozen",
        "unused",
        "functional",
    ]
    print(table(rows, columns))
    write_json(
        options.json,
        {"benchmark": "probe_torchvision_defaults", "rows": rows, "machine": machine(device)},
    )


if __name__ == "__main__":
    main()
