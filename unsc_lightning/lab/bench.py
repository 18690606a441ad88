"""`unsc-lightning bench`: UNSC against retraining and the baselines, over seeds, on embedded data.

For every seed the original and the retrained model are trained (or read from the cache) with
:func:`unsc_lightning.lab.runs.train_classifier`, every selected method unlearns the same
original, and each model is scored on the test splits: remaining- and forgotten-class accuracy
(macro over classes, %), MIA-efficacy with the SVC attacker (%), the average gap to the
retrained model over those three numbers, and wall-clock seconds. ``DIR/results.json``,
``DIR/results.md`` (mean ± std over seeds), ``DIR/accuracy.png``, ``DIR/mia_comparison.png``
(the paper's Figure 2) and, when UNSC runs, ``DIR/loss_contour.png`` (Figure 3b, first seed) are
written.

Scenarios (``--scenario``):

- ``class``: one forgotten class (``--forget-classes``, default 3).
- ``multiclass``: the classes of ``--forget-classes`` (2 to 5 of them); without it, the nested
  sets of :data:`MULTICLASS_SETS` for every size in ``--sizes``, each in ``DIR/forget_<ids>/``
  plus a summary in ``DIR``.
- ``subclass``: the model learns the coarse labels of ``unsc_lightning.data.embedded.DIGIT_GROUPS``
  and forgets one fine digit (``--forget-classes``, default 3); its coarse class remains.
- ``random``: a random ``--fraction`` of the training set (re-drawn per seed); unlearning stops
  once the forgotten samples are classified no better than held-out data
  (:class:`~unsc_lightning.baselines.StopAtHeldOutAccuracy`, off with ``--no-stop``).
- ``sequential``: one deletion request per class of ``--forget-classes`` (default 3 then 5), each
  from the model the previous request left, against a model retrained without every class
  forgotten so far (:mod:`unsc_lightning.lab.sequential`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from unsc_lightning.baselines import StopAtHeldOutAccuracy
from unsc_lightning.data import ForgetSpec, UnlearningDataModule
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.figures import loss_contour, plot_loss_contour
from unsc_lightning.lab.files import atomic_write_text, check_output_folder
from unsc_lightning.lab.recipes import (
    ABLATION_LR,
    BASELINE_RECIPES,
    EMBEDDED,
    METHOD_NAMES,
    METHODS,
    UNLEARNING_METHODS,
    TrainRecipe,
)
from unsc_lightning.lab.render import (
    markdown_report,
    plot_accuracy,
    plot_mia_comparison,
    run_line,
    sweep_markdown,
)
from unsc_lightning.lab.runs import UnlearningRun, make_datamodule, run_method, train_classifier
from unsc_lightning.lab.scoring import GAP_METRICS, MIA_VARIANTS, gap_to_retrain, recovery, score
from unsc_lightning.lab.sequential import (
    request_classes,
    run_sequential_seed,
    sequential_markdown,
    summarize_sequential,
)
from unsc_lightning.reporting import RunEnvironment

SCENARIOS = ("class", "multiclass", "subclass", "random", "sequential")
#: Nested forgotten sets of the multi-class sweep (the paper's CIFAR-10 sets), by size.
MULTICLASS_SETS: dict[int, list[int]] = {
    1: [3],
    2: [1, 3],
    3: [1, 3, 5],
    4: [1, 3, 5, 7],
    5: [1, 2, 3, 5, 7],
}

Printer = Callable[[str], None]


@dataclass
class BenchConfig:
    """Everything one bench run needs (what the command line fills in)."""

    dataset: str = "mnist1d"
    scenario: str = "class"
    forget_classes: list[int] | None = None
    fraction: float = 0.1
    methods: list[str] | None = None
    seeds: list[int] | None = None
    out: Path = Path("outputs/bench")
    cache_dir: Path | None = None
    use_cache: bool = True
    num_samples: int | None = None
    train_epochs: int | None = None
    sizes: list[int] | None = None
    stop_at_held_out: bool = True
    recovery: bool = True


# -- command line ---------------------------------------------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="unsc-lightning bench",
        description="Compare UNSC with retraining and baselines over seeds.",
    )
    parser.add_argument("--dataset", choices=sorted(EMBEDDED), default="mnist1d")
    parser.add_argument("--scenario", choices=SCENARIOS, default="class")
    parser.add_argument(
        "--forget-classes",
        type=int,
        nargs="+",
        default=None,
        help="forgotten classes (class/multiclass) or fine digits (subclass); default 3",
    )
    parser.add_argument(
        "--fraction", type=float, default=0.1, help="share forgotten in the random scenario"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["all"],
        help=f"'all' or names from {', '.join(UNLEARNING_METHODS)}",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache (default: OUT/cache)"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="retrain the original and retrained models"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2, 3, 4, 5], help="multiclass sweep sizes"
    )
    parser.add_argument(
        "--no-stop", action="store_true", help="random scenario: run every method its full epochs"
    )
    parser.add_argument(
        "--no-recovery",
        action="store_true",
        help="skip relearning steps and the linear probe (class-wise scenarios)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the embedded models gain nothing from more, and "
        "several threads on a busy machine slow every step down many times)",
    )
    # small runs (tests, smoke checks)
    parser.add_argument("--num-samples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-epochs", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        dataset=args.dataset,
        scenario=args.scenario,
        forget_classes=args.forget_classes,
        fraction=args.fraction,
        methods=resolve_methods(args.methods),
        seeds=list(args.seeds),
        out=args.out,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        num_samples=args.num_samples,
        train_epochs=args.train_epochs,
        sizes=list(args.sizes),
        stop_at_held_out=not args.no_stop,
        recovery=not args.no_recovery,
    )


def resolve_methods(names: list[str]) -> list[str]:
    """``["all"]`` -> every unlearning method; otherwise the names, checked, in table order."""
    if names == ["all"]:
        return list(UNLEARNING_METHODS)
    unknown = [n for n in names if n not in UNLEARNING_METHODS]
    if unknown or not names:
        raise UnlearningConfigError(
            f"Expected `--methods` to be 'all' or names from {list(UNLEARNING_METHODS)}, got {names} "
            f"(unknown: {unknown}; 'original' and 'retrain' are always run)."
        )
    return [n for n in UNLEARNING_METHODS if n in names]


def _class_spec(classes: list[int], seed: int) -> ForgetSpec:
    return ForgetSpec(kind="class", classes=list(classes))


def forget_settings(config: BenchConfig) -> list[Callable[[int], ForgetSpec]]:
    """One forget-spec factory (seed -> spec) per forgotten set the scenario covers."""
    classes = config.forget_classes
    if config.scenario == "class":
        chosen = classes or [3]
        if len(chosen) != 1:
            raise UnlearningConfigError(
                f"`--scenario class` forgets one class; got `--forget-classes {' '.join(map(str, chosen))}` "
                "(use `--scenario multiclass` for several)."
            )
        return [lambda seed: ForgetSpec(kind="class", classes=list(chosen))]
    if config.scenario == "multiclass":
        if classes:
            if not 2 <= len(set(classes)) <= 5:
                raise UnlearningConfigError(
                    f"`--scenario multiclass` forgets 2 to 5 classes, got `--forget-classes {classes}`."
                )
            return [lambda seed: ForgetSpec(kind="class", classes=list(classes))]
        sizes = config.sizes or [2, 3, 4, 5]
        bad = [s for s in sizes if s not in MULTICLASS_SETS]
        if bad:
            raise UnlearningConfigError(
                f"Expected `--sizes` in {sorted(MULTICLASS_SETS)}, got {sizes}."
            )
        return [partial(_class_spec, MULTICLASS_SETS[size]) for size in sizes]
    if config.scenario == "subclass":
        fine = classes or [3]
        return [lambda seed: ForgetSpec(kind="subclass", subclasses=list(fine))]
    if config.scenario == "sequential":
        every = request_classes(classes)
        return [lambda seed: ForgetSpec(kind="class", classes=list(every))]
    if config.scenario == "random":
        if not 0.0 < config.fraction < 1.0:
            raise UnlearningConfigError(f"Expected `--fraction` in (0, 1), got {config.fraction}.")
        return [lambda seed: ForgetSpec(kind="random", fraction=config.fraction, seed=seed)]
    raise UnlearningConfigError(f"Expected `--scenario` in {SCENARIOS}, got {config.scenario!r}.")


# -- running ----------------------------------------------------------------------------------
def _data_options(config: BenchConfig) -> dict[str, Any]:
    if config.num_samples is None:
        return {}
    if config.dataset != "mnist1d":
        raise UnlearningConfigError(
            f"`--num-samples` applies to MNIST-1D only, got it with `--dataset {config.dataset}`."
        )
    return {"num_samples": config.num_samples}


def _train_recipe(config: BenchConfig) -> TrainRecipe:
    recipe: TrainRecipe = EMBEDDED[config.dataset]["train"]
    if config.train_epochs is None:
        return recipe
    if config.train_epochs < 1:
        raise UnlearningConfigError(f"Expected `--train-epochs` >= 1, got {config.train_epochs}.")
    scale = config.train_epochs / recipe.epochs
    milestones = sorted({max(1, round(m * scale)) for m in recipe.milestones})
    return replace(recipe, epochs=config.train_epochs, milestones=milestones)


def run_seed(
    config: BenchConfig,
    forget: ForgetSpec,
    seed: int,
    methods: list[str],
    say: Printer,
    advance: Callable[[], None],
    contour_path: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Original, retrain and every method for one seed: ``{method: scores}``.

    Each entry records ``run`` (:func:`~unsc_lightning.reporting.run_environment`: world size,
    devices, precision, effective batch) and, for class-wise forgetting with ``recovery`` on,
    ``relearn_steps`` and ``probe_acc_f`` (:func:`~unsc_lightning.lab.scoring.recovery`).
    With ``contour_path``, UNSC's entry also holds ``loss_contour`` (drawn to that path; see
    :func:`draw_loss_contour`).
    """
    data_options = _data_options(config)
    cache_dir = None if not config.use_cache else (config.cache_dir or config.out / "cache")
    recipe = _train_recipe(config)
    dm = make_datamodule(config.dataset, forget, seed, "forget", 128, **data_options)
    results: dict[str, dict[str, Any]] = {}
    models = {}
    runs: dict[str, UnlearningRun] = {}
    for name, train_on in (("original", "all"), ("retrain", "retain")):
        cpu_start = time.process_time()
        environment = RunEnvironment()
        model, seconds, cached = train_classifier(
            config.dataset,
            forget,
            seed,
            train_on,
            cache_dir,
            recipe=recipe,
            data_options=data_options,
            environment=environment,
        )
        models[name] = model
        cpu = None if cached else time.process_time() - cpu_start
        results[name] = score(
            model, dm, seconds, cached=cached, cpu_seconds=cpu, run=environment.environment
        )
        _add_recovery(config, results, name, model, dm, seed)
        say(run_line(seed, name, results[name]))
        advance()
    for name in methods:
        stop = (
            StopAtHeldOutAccuracy() if forget.kind == "random" and config.stop_at_held_out else None
        )
        environment = RunEnvironment()
        callbacks: list[Callback] = [stop] if stop is not None else []
        cpu_start = time.process_time()
        run = run_method(
            name,
            models["original"],
            config.dataset,
            forget,
            seed,
            callbacks=[*callbacks, environment],
            data_options=data_options,
        )
        stopped = stop.stopped_at_step if stop is not None else None
        cpu = time.process_time() - cpu_start
        runs[name] = run
        results[name] = score(
            run.model,
            dm,
            run.seconds,
            cached=False,
            stopped_at_step=stopped,
            cpu_seconds=cpu,
            run=environment.environment,
        )
        _add_recovery(config, results, name, run.model, dm, seed)
        say(run_line(seed, name, results[name]))
        advance()
    unsc = runs.get("unsc")
    if contour_path is not None and unsc is not None and not results["unsc"]["diverged"]:
        ablation = runs.get("unsc_no_nullspace")
        contrast = None
        if ablation is not None and not results["unsc_no_nullspace"]["diverged"]:
            contrast = ablation.model
        results["unsc"]["loss_contour"] = draw_loss_contour(
            models["original"], unsc, dm, contour_path, contrast
        )
    return results


def draw_loss_contour(
    original: nn.Module,
    unsc: UnlearningRun,
    dm: UnlearningDataModule,
    path: Path,
    contrast: nn.Module | None = None,
) -> dict[str, Any]:
    """Figure 3b for UNSC's run: remaining test loss in the plane of its update's two parts.

    UNSC's update has no in-subspace part; the in-subspace direction is ``contrast``'s (the
    no-null-space ablation, when it ran), else the figure shows UNSC's own, empty, one.
    Returns the grid (:meth:`~unsc_lightning.lab.figures.LossContour.as_dict`).
    """
    if unsc.calibration is None:
        raise UnlearningConfigError("Expected UNSC's run to carry its `NullSpaceCalibration`.")
    contour = loss_contour(
        original, unsc.model, unsc.calibration, dm.test_dataloader()[0], contrast=contrast
    )
    direction = "UNSC without null space" if contrast is not None else "UNSC itself"
    title = f"UNSC: remaining test loss\n(in-subspace direction from {direction})"
    plot_loss_contour(contour, path, title=title)
    return contour.as_dict()


def _add_recovery(
    config: BenchConfig,
    results: dict[str, dict[str, Any]],
    name: str,
    model: Any,
    dm: Any,
    seed: int,
) -> None:
    """Relearning steps and probe accuracy (class-wise forgetting, finite models)."""
    scores = results[name]
    if not config.recovery or not dm.forget_classes or scores["diverged"]:
        return
    scores.update(recovery(model, dm, results["original"]["acc_f"], seed))


#: Metrics averaged over seeds in the summary.
SUMMARY_METRICS = (
    *GAP_METRICS,
    "mia_threshold",
    "acc_r_min",
    "acc_r_max",
    "relearn_steps",
    "probe_acc_f",
    "seconds",
    "cpu_seconds",
)


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std, ignoring missing values (``None`` when nothing is left)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.pstdev(present) if len(present) > 1 else 0.0


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and std over seeds of every metric, and the average gap to the retrained model."""
    methods = [m for m in METHOD_NAMES if all(m in r for r in per_seed.values())]
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        entry: dict[str, Any] = {"label": METHODS[method].label}
        for metric in SUMMARY_METRICS:
            mean, std = _mean_std([r[method].get(metric) for r in per_seed.values()])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean, std
        # relearning: None means "not within the step budget"; count those seeds apart
        steps = [r[method].get("relearn_steps", "absent") for r in per_seed.values()]
        entry["relearn_not_reached"] = sum(1 for v in steps if v is None)
        entry["acc_r_min_worst"] = min(
            (
                r[method]["acc_r_min"]
                for r in per_seed.values()
                if r[method].get("acc_r_min") is not None
            ),
            default=None,
        )
        gaps = [gap_to_retrain(r[method], r["retrain"]) for r in per_seed.values()]
        entry["avg_gap_mean"], entry["avg_gap_std"] = _mean_std(gaps)
        entry["cached"] = any(r[method].get("cached", False) for r in per_seed.values())
        entry["diverged_seeds"] = [
            seed for seed, r in per_seed.items() if r[method].get("diverged")
        ]
        summary[method] = entry
    return summary


def run_setting(
    config: BenchConfig,
    spec_of: Callable[[int], ForgetSpec],
    out: Path,
    say: Printer,
    advance: Callable[[], None],
) -> dict[str, Any]:
    """Every seed of one forgotten set; writes ``results.json``, ``results.md`` and the figures."""
    seeds = config.seeds or [0]
    methods = config.methods or list(UNLEARNING_METHODS)
    out.mkdir(parents=True, exist_ok=True)  # the first seed draws the loss contour
    contour = out / "loss_contour.png"
    per_seed = {
        seed: run_seed(
            config,
            spec_of(seed),
            seed,
            methods,
            say,
            advance,
            contour_path=contour if seed == seeds[0] else None,
        )
        for seed in seeds
    }
    summary = summarize(per_seed)
    forget = spec_of(seeds[0])
    report: dict[str, Any] = {
        "dataset": config.dataset,
        "scenario": config.scenario,
        "forget": asdict(forget),
        "forget_classes": forget.forgotten_classes,
        "seeds": seeds,
        "mia_attacker": "svc",
        "mia_variants": {
            key: {"variant": variant, "direction": direction}
            for key, (variant, direction) in MIA_VARIANTS.items()
        },
        "headline": "avg_gap: mean |method - retrain| over acc_r, acc_f and mia_efficacy (SVC), per seed",
        "metrics": "test accuracy in %, macro over classes (acc_r_min / acc_r_max: worst / best "
        "remaining class); MIA-efficacy in % (mia_efficacy: SVC, mia_threshold: best threshold); "
        "relearn_steps: fine-tuning steps until the forgotten classes reach half the original's "
        "accuracy (None: not within 100); probe_acc_f: linear-probe forgotten accuracy in %; "
        "seconds of wall time",
        "methods": summary,
        "unsc_seconds_over_retrain": _ratio(summary, "unsc", "retrain", "seconds"),
        "unsc_cpu_seconds_over_retrain": _ratio(summary, "unsc", "retrain", "cpu_seconds"),
        "stop_at_held_out": forget.kind == "random" and config.stop_at_held_out,
        "train_recipe": asdict(_train_recipe(config)),
        "unlearn_recipe": asdict(EMBEDDED[config.dataset]["unlearn"]),
        "ablation_lr": {
            m: lr for m, lr in ABLATION_LR.get(config.dataset, {}).items() if m in methods
        },
        "baseline_recipes": {
            m: asdict(r) for m, r in BASELINE_RECIPES[config.dataset].items() if m in methods
        },
        "data_options": _data_options(config),
        "runs": {str(seed): results for seed, results in per_seed.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(out / "results.md", markdown_report(report))
    plot_accuracy(report, out / "accuracy.png")
    plot_mia_comparison(report, out / "mia_comparison.png")
    return report


def run_sequential(
    config: BenchConfig, say: Printer, advance: Callable[[], None]
) -> dict[str, Any]:
    """The ``sequential`` scenario over seeds; writes ``results.json`` and ``results.md``."""
    classes = request_classes(config.forget_classes)
    seeds = config.seeds or [0]
    methods = config.methods or list(UNLEARNING_METHODS)
    cache_dir = None if not config.use_cache else (config.cache_dir or config.out / "cache")
    per_seed = {
        seed: run_sequential_seed(
            config.dataset,
            classes,
            seed,
            methods,
            train_recipe=_train_recipe(config),
            cache_dir=cache_dir,
            data_options=_data_options(config),
            say=say,
            advance=advance,
        )
        for seed in seeds
    }
    report: dict[str, Any] = {
        "dataset": config.dataset,
        "scenario": "sequential",
        "classes": classes,
        "seeds": seeds,
        "mia_attacker": "svc",
        "covariance_reuse": "none: the covariance cache is keyed by a fingerprint of the model's "
        "weights, which every request changes; each request rebuilds UNSC's covariances from data",
        "methods": summarize_sequential(per_seed, classes),
        "train_recipe": asdict(_train_recipe(config)),
        "unlearn_recipe": asdict(EMBEDDED[config.dataset]["unlearn"]),
        "data_options": _data_options(config),
        "runs": {str(seed): results for seed, results in per_seed.items()},
    }
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.out / "results.json", json.dumps(report, indent=2))
    atomic_write_text(config.out / "results.md", sequential_markdown(report))
    return report


def _ratio(summary: dict[str, Any], numerator: str, denominator: str, metric: str) -> float | None:
    if numerator not in summary or denominator not in summary:
        return None
    top, bottom = summary[numerator][f"{metric}_mean"], summary[denominator][f"{metric}_mean"]
    return None if top is None or not bottom else top / bottom


def sweep_report(config: BenchConfig, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary of a multi-class sweep: one row per forgotten set."""
    rows = []
    for report in reports:
        methods = report["methods"]
        rows.append({"forget_classes": report["forget_classes"], "methods": methods})
    summary = {
        "dataset": config.dataset,
        "scenario": config.scenario,
        "seeds": config.seeds,
        "settings": rows,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(
        config.out / "results.md", sweep_markdown(config.dataset, config.seeds, reports)
    )
    return summary


def run_bench(config: BenchConfig, say: Printer | None = None) -> dict[str, Any]:
    """Run the bench described by ``config``; returns the report written to ``config.out``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    print_line = say or console.print
    settings = forget_settings(config)
    _data_options(config), _train_recipe(config)  # argument errors before any training
    methods = config.methods or list(UNLEARNING_METHODS)
    seeds = config.seeds or [0]
    total = len(settings) * len(seeds) * (2 + len(methods))
    if config.scenario == "sequential":
        requests = len(request_classes(config.forget_classes))
        total = len(seeds) * (1 + requests * (1 + len(methods)))
    with Progress(
        TextColumn("bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("bench", total=total)

        def advance() -> None:
            progress.advance(task)

        if config.scenario == "sequential":
            report = run_sequential(config, print_line, advance)
        elif len(settings) == 1:
            report = run_setting(config, settings[0], config.out, print_line, advance)
        else:
            reports = []
            for spec_of in settings:
                classes = spec_of(seeds[0]).forgotten_classes
                out = config.out / ("forget_" + "_".join(map(str, classes)))
                reports.append(run_setting(config, spec_of, out, print_line, advance))
            report = sweep_report(config, reports)
    print_line(f"wrote {config.out / 'results.json'}, {config.out / 'results.md'}")
    return report


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def _write_line(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unsc-lightning bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        if args.threads < 1:
            raise UnlearningConfigError(f"Expected `--threads` >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
        config = config_from_args(args)
        check_output_folder(config.out)  # before hours of runs, not after
        run_bench(config, say=_write_line)
    except (UnlearningConfigError, OSError) as error:
        sys.stderr.write(f"unsc-lightning bench: error: {error}\n")
        return 2
    _write_line((config.out / "results.md").read_text())
    return 0
