"""`unsc-lightning demo`: original vs retrain vs UNSC on an embedded data set, offline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from unsc_lightning.data import ForgetSpec
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.files import atomic_write_text, check_output_folder
from unsc_lightning.lab.recipes import EMBEDDED, METHODS
from unsc_lightning.lab.render import demo_table, plot_per_class
from unsc_lightning.lab.runs import make_datamodule, run_method, train_classifier
from unsc_lightning.lab.scoring import recovery, score

#: The models the demo compares, in table order.
DEMO_METHODS = ("original", "retrain", "unsc")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="unsc-lightning demo")
    parser.add_argument("--dataset", choices=sorted(EMBEDDED), default="mnist1d")
    parser.add_argument("--forget-classes", type=int, nargs="+", default=[3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument(
        "--no-cache", action="store_true", help="retrain the original and retrained models"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest for these small nets)",
    )
    return parser


def run_demo(
    dataset: str,
    forget_classes: list[int],
    seed: int,
    out: Path,
    use_cache: bool = True,
    show: bool = True,
) -> dict[str, Any]:
    """Run the three models, write ``report.json`` and ``per_class_accuracy.png`` under ``out``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(quiet=not show)
    forget = ForgetSpec(kind="class", classes=forget_classes)
    # an invalid request fails here, before any folder is created
    test_dm = make_datamodule(dataset, forget, seed, "forget", 128)
    test_dm.setup()
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache" if use_cache else None
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (
        ".*does not have many workers.*",
        ".*module\\(s\\) in eval mode.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    results: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks = {name: progress.add_task(METHODS[name].label, total=1) for name in DEMO_METHODS}

        def reporter(name: str) -> Any:
            return lambda done, total: progress.update(tasks[name], completed=done, total=total)

        models = {}
        for name, train_on in (("original", "all"), ("retrain", "retain")):
            model, seconds, cached = train_classifier(
                dataset, forget, seed, train_on, cache_dir, progress=reporter(name)
            )
            models[name] = model
            results[name] = score(model, test_dm, seconds, mia_seed=seed, cached=cached)
        unsc = run_method(
            "unsc", models["original"], dataset, forget, seed, progress=reporter("unsc")
        )
        results["unsc"] = score(unsc.model, test_dm, unsc.seconds, mia_seed=seed, cached=False)
        models["unsc"] = unsc.model
        for name, model in models.items():  # does the forgotten class come back?
            results[name].update(recovery(model, test_dm, results["original"]["acc_f"], seed))
    callback = unsc.calibration
    if callback is None:  # "unsc" always runs with the null-space callback
        raise RuntimeError("UNSC ran without its NullSpaceCalibration callback.")
    report = {
        "dataset": dataset,
        "forget_classes": forget.forgotten_classes,
        "seed": seed,
        "unlearn_recipe": vars(EMBEDDED[dataset]["unlearn"]),
        "mia": "MIA-efficacy, SVC attacker (RBF, C=3, gamma='auto') on true-class confidence; members = remaining training samples, non-members = test samples of remaining classes (balanced 1:1); score = % of forgotten training samples predicted non-member",
        "drift": callback.drift,
        "bases": {
            name: {"dim": i.dim, "rank": i.rank, "energy": i.energy}
            for name, i in callback.layer_infos.items()
        },
        "methods": results,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    plot_per_class(report, out / "per_class_accuracy.png")
    console.print(demo_table(report))
    console.print(f"wrote {out / 'report.json'} and {out / 'per_class_accuracy.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """``unsc-lightning demo``; a bad request or output folder is one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        run_demo(
            args.dataset, args.forget_classes, args.seed, args.out, use_cache=not args.no_cache
        )
    except (UnlearningConfigError, OSError) as error:
        sys.stderr.write(f"unsc-lightning demo: error: {error}\n")
        return 2
    return 0
