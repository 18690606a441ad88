"""`unsc-lightning audit`: per-example privacy of sample-wise forgetting against retraining.

One forget set (``--fraction`` of the training set, drawn from ``--split-seed``) and ``N``
training seeds. For each seed ``i``: an original model trained on everything, a model retrained
without the forget set, and the original unlearned with ``--method`` (UNSC by default; it stops
once the forgotten samples are classified no better than held-out data, as in the bench's random
scenario). Every model gives each forget example its logit-scaled true-class confidence; then

- the per-example ``ε`` of the best threshold attacks telling the ``N`` unlearned from the ``N``
  retrained models, and the NeurIPS 2023 forgetting-quality score built on it
  (:func:`~unsc_lightning.metrics.per_example_epsilon`,
  :func:`~unsc_lightning.metrics.forgetting_quality`);
- U-LiRA's per-example likelihood-ratio test with the retrained models as the "out"
  population (:func:`~unsc_lightning.metrics.ulira`), leave-one-out over the models;
- the same for the original models, the reference of a model that did not forget at all.

Writes ``OUT/audit.json`` and ``OUT/audit.png`` (histograms of per-example ``ε`` and U-LiRA
accuracy). Models are cached in ``OUT/cache`` (keyed by split and seed), so a rerun or a larger
``--models`` trains only what is new.

Cost. Each seed trains two MNIST-1D models (about 20-40 s each on one busy CPU core) and unlearns
once (a few seconds). Measured: ``--models 16 --workers 2`` took 368 s wall on 2 cores shared
with another benchmark (720 forget examples), so the default ``--models 32`` takes about 12-15
minutes, inside a 30-minute budget with room for a slower machine. With
``N`` models per group the threshold rates move in steps of ``1/N``, so ``ε`` and the score are
only comparable at equal ``N`` (the challenge used 512). At CIFAR scale the training dominates:
the authors' CIFAR-10 recipe (≈100 epochs of a half-width AllCNN, or ResNet-18) takes on the order
of 10-20 GPU-minutes per model on one modern GPU, so ``N = 16`` means 32 trainings ≈ 5-11
GPU-hours plus 16 unlearning runs (≈ 1 GPU-minute each for UNSC), and the challenge's ``N = 512``
≈ 170-340 GPU-hours — a cluster job, not a laptop one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from unsc_lightning.baselines import StopAtHeldOutAccuracy
from unsc_lightning.data import ForgetSpec
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.files import atomic_write, atomic_write_text, check_output_folder
from unsc_lightning.lab.recipes import EMBEDDED, UNLEARNING_METHODS, TrainRecipe
from unsc_lightning.lab.runs import make_datamodule, run_method, train_classifier
from unsc_lightning.metrics import (
    forgetting_quality,
    logit_scaled_confidence,
    per_example_epsilon,
    ulira,
)

#: Default number of models per group (see the module's cost note).
DEFAULT_MODELS = 32
#: The models each seed contributes.
GROUPS = ("original", "retrained", "unlearned")


@dataclass
class AuditConfig:
    """Everything one audit needs (what the command line fills in)."""

    dataset: str = "mnist1d"
    scenario: str = "random"
    fraction: float = 0.1
    models: int = DEFAULT_MODELS
    method: str = "unsc"
    split_seed: int = 0
    workers: int = 1
    delta: float = 1e-5
    out: Path = Path("outputs/audit")
    use_cache: bool = True
    stop_at_held_out: bool = True
    num_samples: int | None = None
    train_epochs: int | None = None

    def validate(self) -> None:
        """Raise :class:`UnlearningConfigError` naming the first bad option."""
        if self.dataset not in EMBEDDED:
            raise UnlearningConfigError(
                f"Expected `--dataset` in {sorted(EMBEDDED)}, got {self.dataset!r}."
            )
        if self.scenario != "random":
            raise UnlearningConfigError(
                f"The audit is for sample-wise forgetting: expected `--scenario random`, got "
                f"{self.scenario!r}."
            )
        if not 0.0 < self.fraction < 1.0:
            raise UnlearningConfigError(f"Expected `--fraction` in (0, 1), got {self.fraction}.")
        if self.models < 3:
            raise UnlearningConfigError(
                f"Expected `--models` >= 3 (U-LiRA fits a variance leave-one-out), got {self.models}."
            )
        if self.method not in UNLEARNING_METHODS:
            raise UnlearningConfigError(
                f"Expected `--method` in {list(UNLEARNING_METHODS)}, got {self.method!r}."
            )
        if self.workers < 1:
            raise UnlearningConfigError(f"Expected `--workers` >= 1, got {self.workers}.")
        if not 0.0 < self.delta < 1.0:
            raise UnlearningConfigError(f"Expected `--delta` in (0, 1), got {self.delta}.")
        if self.num_samples is not None and self.dataset != "mnist1d":
            raise UnlearningConfigError(
                f"`--num-samples` applies to MNIST-1D only, got it with `--dataset {self.dataset}`."
            )
        if self.train_epochs is not None and self.train_epochs < 1:
            raise UnlearningConfigError(f"Expected `--train-epochs` >= 1, got {self.train_epochs}.")

    @property
    def forget(self) -> ForgetSpec:
        return ForgetSpec(kind="random", fraction=self.fraction, seed=self.split_seed)

    @property
    def data_options(self) -> dict[str, Any]:
        return {} if self.num_samples is None else {"num_samples": self.num_samples}

    def train_recipe(self) -> TrainRecipe:
        recipe: TrainRecipe = EMBEDDED[self.dataset]["train"]
        if self.train_epochs is None:
            return recipe
        scale = self.train_epochs / recipe.epochs
        milestones = sorted({max(1, round(m * scale)) for m in recipe.milestones})
        return replace(recipe, epochs=self.train_epochs, milestones=milestones)


# -- one seed -------------------------------------------------------------------------------------
@torch.no_grad()
def _statistics(model: nn.Module, loader: Any) -> tuple[list[float], float]:
    """Logit-scaled true-class confidence per sample (loader order) and the accuracy."""
    model.eval()
    values, correct, total = [], 0, 0
    for batch in loader:
        logits = model(batch[0])
        values.append(logit_scaled_confidence(logits, batch[1]))
        correct += int((logits.argmax(1) == batch[1]).sum())
        total += len(batch[1])
    return torch.cat(values).tolist(), correct / max(total, 1)


def audit_seed(config: AuditConfig, model_seed: int) -> dict[str, Any]:
    """Train the original and the retrained model of ``model_seed``, unlearn, and score.

    Returns:
        ``{group: {"forget_statistic": [...], "retain_acc", "test_acc", "seconds"}}`` for
        ``original``, ``retrained`` and ``unlearned``.
    """
    torch.set_num_threads(1)
    forget, options = config.forget, config.data_options
    cache_dir = config.out / "cache" if config.use_cache else None
    dm = make_datamodule(config.dataset, forget, config.split_seed, "forget", 128, **options)
    loaders = {
        "forget": dm.forget_dataloader(),
        "retain": dm.retain_dataloader(),
        "test": dm.test_dataloader()[0],
    }
    models: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}
    for group, train_on in (("original", "all"), ("retrained", "retain")):
        models[group], seconds[group], _ = train_classifier(
            config.dataset,
            forget,
            config.split_seed,
            train_on,
            cache_dir,
            recipe=config.train_recipe(),
            data_options=options,
            model_seed=model_seed,
        )
    stop = [StopAtHeldOutAccuracy()] if config.stop_at_held_out else []
    run = run_method(
        config.method,
        models["original"],
        config.dataset,
        forget,
        config.split_seed,
        callbacks=list(stop),
        data_options=options,
        model_seed=model_seed,
    )
    models["unlearned"], seconds["unlearned"] = run.model, run.seconds
    result: dict[str, Any] = {}
    for group, model in models.items():
        statistic, _ = _statistics(model, loaders["forget"])
        _, retain_acc = _statistics(model, loaders["retain"])
        _, test_acc = _statistics(model, loaders["test"])
        result[group] = {
            "forget_statistic": statistic,
            "retain_acc": retain_acc,
            "test_acc": test_acc,
            "seconds": seconds[group],
        }
    return result


def _quiet_worker() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _audit_seed_quietly(config: AuditConfig, model_seed: int) -> dict[str, Any]:
    _quiet_worker()
    return audit_seed(config, model_seed)


def run_models(config: AuditConfig, advance: Callable[[], None]) -> dict[int, dict[str, Any]]:
    """Every seed, in ``config.workers`` processes (in this process when 1)."""
    seeds = list(range(config.models))
    if config.workers == 1:
        results = {}
        for seed in seeds:
            results[seed] = audit_seed(config, seed)
            advance()
        return results
    results = {}
    context = get_context("spawn")  # no forked torch / Lightning state in the workers
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        futures = {pool.submit(_audit_seed_quietly, config, seed): seed for seed in seeds}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            advance()
    return dict(sorted(results.items()))


# -- scores ---------------------------------------------------------------------------------------
def _matrix(per_seed: dict[int, dict[str, Any]], group: str) -> np.ndarray:
    return np.array([r[group]["forget_statistic"] for r in per_seed.values()], dtype=np.float64)


def _mean(per_seed: dict[int, dict[str, Any]], group: str, key: str) -> float:
    return statistics.fmean(r[group][key] for r in per_seed.values())


def _finite_summary(values: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    return {
        "median": float(np.median(values)) if values.size else None,
        "mean_finite": float(finite.mean()) if finite.size else None,
        "share_infinite": float(np.mean(~np.isfinite(values))) if values.size else None,
        "share_zero": float(np.mean(values == 0)) if values.size else None,
    }


def score_audit(per_seed: dict[int, dict[str, Any]], delta: float) -> dict[str, Any]:
    """Per-example ``ε``, forgetting quality and U-LiRA for the unlearned and original models."""
    retrained = _matrix(per_seed, "retrained")
    scores: dict[str, Any] = {}
    for group in ("unlearned", "original"):
        candidate = _matrix(per_seed, group)
        epsilon = per_example_epsilon(candidate, retrained, delta=delta).numpy()
        retain_ratio = _mean(per_seed, group, "retain_acc") / _mean(
            per_seed, "retrained", "retain_acc"
        )
        test_ratio = _mean(per_seed, group, "test_acc") / _mean(per_seed, "retrained", "test_acc")
        quality = float(forgetting_quality(candidate, retrained, retain_ratio, test_ratio, delta))
        test = ulira(candidate, retrained)
        scores[group] = {
            "forgetting_quality": quality,
            "retain_acc_ratio": retain_ratio,
            "test_acc_ratio": test_ratio,
            "epsilon": _finite_summary(epsilon),
            "ulira_accuracy": test.accuracy,
            "ulira_per_example_median": float(test.per_example_accuracy.median()),
            "per_example_epsilon": [None if not np.isfinite(e) else float(e) for e in epsilon],
            "per_example_ulira_accuracy": test.per_example_accuracy.tolist(),
            "retain_acc": _mean(per_seed, group, "retain_acc"),
            "test_acc": _mean(per_seed, group, "test_acc"),
        }
    scores["retrained"] = {
        "retain_acc": _mean(per_seed, "retrained", "retain_acc"),
        "test_acc": _mean(per_seed, "retrained", "test_acc"),
    }
    return scores


def plot_audit(report: dict[str, Any], path: Path) -> None:
    """Histograms of per-example ``ε`` (infinite values in the last bin) and U-LiRA accuracy."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    groups = (("unlearned", report["method_label"]), ("original", "original (no unlearning)"))
    finite_max = max(
        [e for g, _ in groups for e in report["scores"][g]["per_example_epsilon"] if e is not None]
        + [1.0]
    )
    edges = np.linspace(0.0, finite_max * 1.05 + 0.5, 26)
    for group, label in groups:
        values = [
            e if e is not None else edges[-1] - 1e-9
            for e in report["scores"][group]["per_example_epsilon"]
        ]
        left.hist(values, bins=edges, alpha=0.6, label=label)
        right.hist(
            report["scores"][group]["per_example_ulira_accuracy"],
            bins=np.linspace(0, 1, 21),
            alpha=0.6,
            label=label,
        )
    left.set(xlabel="per-example ε (last bin: ∞)", ylabel="forget examples")
    left.set_title(f"best-threshold ε vs {report['models']} retrained models", fontsize=9)
    right.set(
        xlabel="U-LiRA balanced accuracy per example (0.5 = chance)", ylabel="forget examples"
    )
    right.axvline(0.5, color="gray", lw=0.8, ls="--")
    right.set_title("likelihood-ratio test, retrained models as 'out'", fontsize=9)
    for axes in (left, right):
        axes.legend(fontsize=7)
    fig.suptitle(
        f"{report['dataset']}: random {100 * report['fraction']:.0f} % forgotten, "
        f"N = {report['models']} models per group",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))


def run_audit(config: AuditConfig, show: bool = True) -> dict[str, Any]:
    """Train, unlearn, score; write ``audit.json`` and ``audit.png`` under ``config.out``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from unsc_lightning.lab.recipes import METHODS

    config.validate()
    check_output_folder(config.out)
    config.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, quiet=not show)
    start = time.perf_counter()
    with Progress(
        TextColumn("audit"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("seeds"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("audit", total=config.models)
        per_seed = run_models(config, lambda: progress.advance(task))
    wall = time.perf_counter() - start
    report: dict[str, Any] = {
        "dataset": config.dataset,
        "scenario": config.scenario,
        "fraction": config.fraction,
        "split_seed": config.split_seed,
        "models": config.models,
        "method": config.method,
        "method_label": METHODS[config.method].label,
        "workers": config.workers,
        "delta": config.delta,
        "wall_seconds": wall,
        "forget_examples": len(next(iter(per_seed.values()))["retrained"]["forget_statistic"]),
        "statistic": "logit-scaled true-class confidence log(p_y / (1 - p_y)) of each forget example",
        "scores": score_audit(per_seed, config.delta),
        # the raw statistic, (models, forget examples) per group, for any further analysis
        "statistics": {group: _matrix(per_seed, group).tolist() for group in GROUPS},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "per_model": {
            str(seed): {
                group: {k: v for k, v in values.items() if k != "forget_statistic"}
                for group, values in result.items()
            }
            for seed, result in per_seed.items()
        },
    }
    atomic_write_text(config.out / "audit.json", json.dumps(report, indent=2))
    plot_audit(report, config.out / "audit.png")
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"{report['dataset']}, random {100 * report['fraction']:.0f} % forgotten "
        f"({report['forget_examples']} examples), N = {report['models']} models per group, "
        f"{report['wall_seconds']:.0f} s wall",
    ]
    for group, label in (("unlearned", report["method_label"]), ("original", "Original")):
        s = report["scores"][group]
        eps = s["epsilon"]
        lines.append(
            f"  {label:<10} forgetting quality {s['forgetting_quality']:.3f}  "
            f"ε median {eps['median']:.2f} (∞: {100 * eps['share_infinite']:.1f} %)  "
            f"U-LiRA accuracy {100 * s['ulira_accuracy']:.1f} %  "
            f"retain/test acc ratio {s['retain_acc_ratio']:.3f}/{s['test_acc_ratio']:.3f}"
        )
    return lines


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unsc-lightning audit",
        description="Per-example privacy audit of sample-wise unlearning against retraining.",
    )
    parser.add_argument("--dataset", choices=sorted(EMBEDDED), default="mnist1d")
    parser.add_argument("--scenario", default="random", help="sample-wise forgetting: 'random'")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--models", type=int, default=DEFAULT_MODELS, help="models per group (N)")
    parser.add_argument("--method", default="unsc", help="unlearning method (default UNSC)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the forget set")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes (default: up to 2; each uses one thread)",
    )
    parser.add_argument("--delta", type=float, default=1e-5, help="δ of (ε, δ)-unlearning")
    parser.add_argument("--out", type=Path, default=Path("outputs/audit"))
    parser.add_argument("--no-cache", action="store_true", help="do not reuse trained models")
    parser.add_argument("--no-stop", action="store_true", help="unlearn for the full recipe")
    parser.add_argument("--num-samples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-epochs", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``unsc-lightning audit``; returns the exit status."""
    args = build_parser().parse_args(argv)
    _quiet_worker()
    torch.set_num_threads(1)
    config = AuditConfig(
        dataset=args.dataset,
        scenario=args.scenario,
        fraction=args.fraction,
        models=args.models,
        method=args.method,
        split_seed=args.split_seed,
        workers=args.workers,
        delta=args.delta,
        out=args.out,
        use_cache=not args.no_cache,
        stop_at_held_out=not args.no_stop,
        num_samples=args.num_samples,
        train_epochs=args.train_epochs,
    )
    try:
        report = run_audit(config)
    except (UnlearningConfigError, OSError) as error:
        sys.stderr.write(f"unsc-lightning audit: error: {error}\n")
        return 2
    for line in summary_lines(report):
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"wrote {config.out / 'audit.json'} and {config.out / 'audit.png'}\n")
    return 0
