"""Sequential deletion requests: forget class ``a``, then class ``b`` from the already-unlearned model.

Request ``i`` forgets ``classes[i]`` from the model request ``i - 1`` left (the first from the
original) and is compared with a model retrained without ``classes[:i + 1]``. It trains on the
forgotten training samples of ``classes[i]`` only: the data of earlier requests are gone by
then. Its pseudo-labels come from the model before the request, among the classes that still
remain; UNSC's remaining subspace is rebuilt from the data that still remain. There is no
covariance reuse between requests: the covariance cache (``covariance_cache=``) is keyed by a
fingerprint of the model's weights, which the previous request changed, so the second request
accumulates every covariance from data again (what it saves is per-class sums within one model,
not across requests).

After each request every method reports remaining / forgotten accuracy (forgotten: every class
forgotten so far), MIA-efficacy (SVC) on all forgotten training samples so far, the average gap
to that request's retrained model, and the logit drift on remaining test data relative to the
model before the request and to the original.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unsc_lightning.data import ForgetSpec
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.lab.recipes import METHODS, TrainRecipe
from unsc_lightning.lab.runs import make_datamodule, run_method, train_classifier
from unsc_lightning.lab.scoring import GAP_METRICS, gap_to_retrain, score
from unsc_lightning.reporting import RunEnvironment

Printer = Callable[[str], None]


def request_classes(classes: list[int] | None) -> list[int]:
    """The forgotten class of each request, in order (default ``[3, 5]``).

    Raises:
        UnlearningConfigError: for fewer than two classes or a repeated class.
    """
    chosen = list(classes or [3, 5])
    if len(chosen) < 2 or len(set(chosen)) != len(chosen):
        raise UnlearningConfigError(
            "`--scenario sequential` forgets one class per request, at least two distinct "
            f"classes; got `--forget-classes {' '.join(map(str, chosen))}`."
        )
    return chosen


@torch.no_grad()
def logit_drift(before: nn.Module, after: nn.Module, loader: Any) -> float:
    """``||f_after(x) − f_before(x)|| / ||f_before(x)||`` over every input of ``loader``."""
    before.eval()
    after.eval()
    change = reference = 0.0
    for batch in loader:
        old, new = before(batch[0]), after(batch[0])
        change += float((new - old).square().sum())
        reference += float(old.square().sum())
    return (change / max(reference, 1e-24)) ** 0.5


def run_sequential_seed(
    dataset: str,
    classes: list[int],
    seed: int,
    methods: list[str],
    *,
    train_recipe: TrainRecipe,
    cache_dir: Any,
    data_options: dict[str, Any],
    say: Printer,
    advance: Callable[[], None],
) -> dict[str, list[dict[str, Any]]]:
    """Every request of one seed: ``{method: [scores after request 1, after request 2, ...]}``.

    ``original`` has one entry per request (the original scored against that request's splits),
    ``retrain`` one per request (retrained without every class forgotten so far).
    """
    first = ForgetSpec(kind="class", classes=[classes[0]])
    original, seconds, cached = train_classifier(
        dataset, first, seed, "all", cache_dir, recipe=train_recipe, data_options=data_options
    )
    advance()
    results: dict[str, list[dict[str, Any]]] = {"original": [], "retrain": []}
    previous = {name: original for name in methods}
    for step in range(len(classes)):
        spec = ForgetSpec(kind="class", classes=classes[: step + 1])
        dm = make_datamodule(dataset, spec, seed, "forget", 128, **data_options)
        retain_test = dm.test_dataloader()[0]
        retrained, retrain_seconds, retrain_cached = train_classifier(
            dataset, spec, seed, "retain", cache_dir, recipe=train_recipe, data_options=data_options
        )
        advance()
        retrain_scores = score(retrained, dm, retrain_seconds, cached=retrain_cached)
        results["retrain"].append(retrain_scores)
        results["original"].append(
            score(original, dm, seconds, cached=cached, drift=0.0, drift_from_original=0.0)
        )
        for name in methods:
            environment = RunEnvironment()
            run = run_method(
                name,
                previous[name],
                dataset,
                spec,
                seed,
                callbacks=[environment],
                data_options=data_options,
                forget_train_classes=[classes[step]],
            )
            finite = not _diverged(run.model)
            scores = score(
                run.model,
                dm,
                run.seconds,
                cached=False,
                drift=logit_drift(previous[name], run.model, retain_test) if finite else None,
                drift_from_original=logit_drift(original, run.model, retain_test)
                if finite
                else None,
                run=environment.environment,
            )
            scores["avg_gap"] = gap_to_retrain(scores, retrain_scores)
            results.setdefault(name, []).append(scores)
            previous[name] = run.model
            say(
                f"seed {seed} request {step + 1} (forget {classes[step]}) {METHODS[name].label:<20} "
                f"Acc_r {scores['acc_r']:6.2f}  Acc_f {scores['acc_f']:6.2f}  "
                f"drift {_number(scores['drift'])}  gap {_number(scores['avg_gap'])}"
            )
            advance()
    for name in ("original", "retrain"):
        for step, scores in enumerate(results[name]):
            scores["avg_gap"] = gap_to_retrain(scores, results["retrain"][step])
    return results


def _diverged(model: nn.Module) -> bool:
    return not all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


SEQUENTIAL_METRICS = (*GAP_METRICS, "avg_gap", "drift", "drift_from_original", "seconds")


def summarize_sequential(
    per_seed: dict[int, dict[str, list[dict[str, Any]]]], classes: list[int]
) -> dict[str, list[dict[str, Any]]]:
    """Mean and population std over seeds of every metric, per method and request."""
    first = next(iter(per_seed.values()))
    summary: dict[str, list[dict[str, Any]]] = {}
    for method in first:
        entries = []
        for step in range(len(classes)):
            entry: dict[str, Any] = {
                "label": METHODS[method].label,
                "request": step + 1,
                "forgets": classes[step],
                "forgotten_so_far": classes[: step + 1],
            }
            for metric in SEQUENTIAL_METRICS:
                values = [r[method][step].get(metric) for r in per_seed.values()]
                present = [v for v in values if v is not None]
                entry[f"{metric}_mean"] = statistics.fmean(present) if present else None
                entry[f"{metric}_std"] = (
                    statistics.pstdev(present) if len(present) > 1 else 0.0 if present else None
                )
            entries.append(entry)
        summary[method] = entries
    return summary


def sequential_markdown(report: dict[str, Any]) -> str:
    """``results.md`` of the sequential scenario: one row per method and request."""
    lines = [
        f"# {report['dataset']}: sequential requests, forget {' then '.join(map(str, report['classes']))}",
        "",
        f"Seeds {report['seeds']}; mean ± std (population) over seeds. Request i forgets one class "
        "from the model request i-1 left, training on that class's samples only; it is compared "
        "with a model retrained without every class forgotten so far. Acc_r / Acc_f: test "
        "accuracy (%) of the remaining / all forgotten-so-far classes; MIA: MIA-efficacy, SVC "
        "attacker, on all forgotten training samples so far; gap: mean |method − retrain| over "
        "the three; drift: ||Δ logits|| / ||logits|| on remaining test data, relative to the "
        "model before the request (and to the original). The second request rebuilds UNSC's "
        "covariances from data: the cache is keyed by the model's weights, which request 1 "
        "changed.",
        "",
        "| Method | Request | Acc_r (%) | Acc_f (%) | MIA-efficacy, SVC (%) | Avg. gap to retrain | "
        "Drift (vs before) | Drift (vs original) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entries in report["methods"].values():
        for e in entries:
            cells = [_cell(e, m) for m in (*GAP_METRICS, "avg_gap", "drift", "drift_from_original")]
            lines.append(
                f"| {e['label']} | {e['request']} (forget {e['forgets']}) | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _cell(entry: dict[str, Any], metric: str) -> str:
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    if mean is None:
        return "n/a"
    digits = 3 if metric.startswith("drift") else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
