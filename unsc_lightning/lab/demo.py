"""`unsc-lightning demo`: original vs retrain vs UNSC on an embedded data set, offline."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from unsc_lightning.data import ForgetSpec
from unsc_lightning.lab.runs import (
    EMBEDDED,
    evaluate,
    make_datamodule,
    mia_efficacy_of,
    run_unsc,
    train_classifier,
)

METHOD_LABELS = {"original": "Original", "retrain": "Retrain", "unsc": "UNSC"}


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


def plot_per_class(report: dict[str, Any], path: Path) -> None:
    """Grouped bar chart of per-class test accuracy for every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    num_classes = len(next(iter(methods.values()))["per_class"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, (name, result) in enumerate(methods.items()):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(num_classes)]
        ys = [v if v is not None else 0.0 for v in result["per_class"]]
        ax.bar(xs, ys, width=width, label=METHOD_LABELS.get(name, name))
    for k in report["forget_classes"]:
        ax.axvspan(k - 0.45, k + 0.45, color="red", alpha=0.08)
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("class (shaded: forgotten)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['dataset']}: per-class accuracy, forget {report['forget_classes']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from rich.table import Table

    console = Console(quiet=not show)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache" if use_cache else None
    forget = ForgetSpec(kind="class", classes=forget_classes)
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
        tasks = {name: progress.add_task(label, total=1) for name, label in METHOD_LABELS.items()}

        def reporter(name: str) -> Any:
            return lambda done, total: progress.update(tasks[name], completed=done, total=total)

        test_dm = make_datamodule(dataset, forget, seed, "forget", 128)
        original, seconds, cached = train_classifier(
            dataset, forget, seed, "all", cache_dir, progress=reporter("original")
        )
        results["original"] = {
            **evaluate(original, test_dm),
            "mia_efficacy": mia_efficacy_of(original, test_dm, seed=seed),
            "seconds": seconds,
            "cached": cached,
        }
        retrained, seconds, cached = train_classifier(
            dataset, forget, seed, "retain", cache_dir, progress=reporter("retrain")
        )
        results["retrain"] = {
            **evaluate(retrained, test_dm),
            "mia_efficacy": mia_efficacy_of(retrained, test_dm, seed=seed),
            "seconds": seconds,
            "cached": cached,
        }
        unlearned, seconds, callback = run_unsc(
            original, dataset, forget, seed, progress=reporter("unsc")
        )
        results["unsc"] = {
            **evaluate(unlearned, test_dm),
            "mia_efficacy": mia_efficacy_of(unlearned, test_dm, seed=seed),
            "seconds": seconds,
            "cached": False,
        }
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
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_per_class(report, out / "per_class_accuracy.png")
    table = Table(
        title=f"{dataset}, forget {forget.forgotten_classes}, seed {seed} (test accuracy, %)"
    )
    for column in ("method", "remaining acc", "forgotten acc", "MIA-efficacy (SVC)", "seconds"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name, result in results.items():
        note = " (cached)" if result["cached"] else ""
        table.add_row(
            METHOD_LABELS[name],
            f"{result['acc_r']:.2f}",
            f"{result['acc_f']:.2f}",
            f"{result['mia_efficacy']:.2f}",
            f"{result['seconds']:.1f}{note}",
        )
    console.print(table)
    console.print(f"wrote {out / 'report.json'} and {out / 'per_class_accuracy.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    run_demo(args.dataset, args.forget_classes, args.seed, args.out, use_cache=not args.no_cache)
    return 0
