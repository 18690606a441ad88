"""Tables and plots of the ``demo`` and the ``bench``, from their JSON reports.

Plots use matplotlib's object API (a :class:`~matplotlib.figure.Figure` of its own, saved with
``savefig``): no pyplot state and no display backend, so they are safe in any process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.table import Table

from unsc_lightning.lab.files import atomic_write
from unsc_lightning.lab.recipes import METHODS


# -- demo ---------------------------------------------------------------------------------------
def demo_table(report: dict[str, Any]) -> Table:
    """The demo's console table: accuracy, MIA-efficacy and seconds per method."""
    table = Table(
        title=f"{report['dataset']}, forget {report['forget_classes']}, seed {report['seed']} "
        "(test accuracy, %)"
    )
    columns = ("method", "remaining acc", "forgotten acc", "MIA-efficacy (SVC)")
    recovery = ("relearn steps", "probe forgotten acc")
    shown_recovery = any("relearn_steps" in r for r in report["methods"].values())
    for column in (*columns, *(recovery if shown_recovery else ()), "seconds"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name, result in report["methods"].items():
        note = " (cached)" if result["cached"] else ""
        steps = result.get("relearn_steps")
        extra = (
            (
                ">100" if steps is None else str(steps),
                f"{result.get('probe_acc_f', float('nan')):.2f}",
            )
            if shown_recovery
            else ()
        )
        table.add_row(
            METHODS[name].label,
            f"{result['acc_r']:.2f}",
            f"{result['acc_f']:.2f}",
            f"{result['mia_efficacy']:.2f}",
            *extra,
            f"{result['seconds']:.1f}{note}",
        )
    return table


def plot_per_class(report: dict[str, Any], path: Path) -> None:
    """Grouped bar chart of per-class test accuracy for every method of a demo report."""
    methods = report["methods"]
    num_classes = len(next(iter(methods.values()))["per_class"])
    width = 0.8 / len(methods)
    fig = Figure(figsize=(9, 3.5))
    ax = fig.subplots()
    for i, (name, result) in enumerate(methods.items()):
        xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(num_classes)]
        ys = [v if v is not None else 0.0 for v in result["per_class"]]
        ax.bar(xs, ys, width=width, label=METHODS[name].label)
    for k in report["forget_classes"]:
        ax.axvspan(k - 0.45, k + 0.45, color="red", alpha=0.08)
    ax.set_xticks(range(num_classes))
    ax.set_xlabel("class (shaded: forgotten)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['dataset']}: per-class accuracy, forget {report['forget_classes']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))


# -- bench --------------------------------------------------------------------------------------
def run_line(seed: int, name: str, scores: dict[str, Any]) -> str:
    """One line of the bench's running log: a method's scores on one seed."""
    note = " (cached)" if scores.get("cached") else ""
    if scores.get("stopped_at_step") is not None:
        note += f" (stopped after {scores['stopped_at_step']} steps)"
    if scores.get("diverged"):
        note += " (diverged)"
    mia = "n/a" if scores["mia_efficacy"] is None else f"{scores['mia_efficacy']:6.2f}"
    return (
        f"seed {seed} {METHODS[name].label:<20} Acc_r {scores['acc_r']:6.2f}  Acc_f {scores['acc_f']:6.2f}  "
        f"MIA {mia:>6}  {scores['seconds']:6.1f}s{note}"
    )


def describe(report: dict[str, Any]) -> str:
    """What a bench report forgets, in words."""
    forget = report["forget"]
    if forget["kind"] == "class":
        return f"forget class{'es' if len(forget['classes']) > 1 else ''} {forget['classes']}"
    if forget["kind"] == "subclass":
        return f"forget fine digit(s) {forget['subclasses']} inside their coarse classes"
    return f"forget a random {100 * forget['fraction']:.0f} % of the training set"


def markdown_table(report: dict[str, Any]) -> str:
    """The paper-style table: one row per method, mean ± std over seeds, the gap to retrain first.

    Columns: average gap to retrain (the headline), Acc_r with the range of per-class accuracy
    over remaining classes (worst – best, means over seeds), Acc_f, both MIA variants, and —
    when the report has them — relearning steps and linear-probe forgotten accuracy.
    """
    entries = list(report["methods"].values())
    recovery = any(e.get("probe_acc_f_mean") is not None for e in entries)
    head = [
        "Method",
        "Avg. gap to retrain",
        "Acc_r (%)",
        "Acc_r range over remaining classes",
        "Acc_f (%)",
        "MIA-efficacy, SVC (%)",
        "MIA-efficacy, threshold (%)",
    ]
    if recovery:
        head += ["Relearn steps", "Probe Acc_f (%)"]
    head.append("Seconds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in entries:
        cells = [
            _cell(entry, "avg_gap"),
            _cell(entry, "acc_r"),
            _range(entry),
            _cell(entry, "acc_f"),
            _cell(entry, "mia_efficacy"),
            _cell(entry, "mia_threshold"),
        ]
        if recovery:
            cells += [_steps(entry), _cell(entry, "probe_acc_f")]
        seconds = f"{entry['seconds_mean']:.2f}" + (" (cached)" if entry.get("cached") else "")
        label = entry["label"] + (
            f" (diverged: seeds {entry['diverged_seeds']})" if entry.get("diverged_seeds") else ""
        )
        lines.append(f"| {label} | " + " | ".join([*cells, seconds]) + " |")
    return "\n".join(lines)


def _cell(entry: dict[str, Any], metric: str) -> str:
    mean, std = entry.get(f"{metric}_mean"), entry.get(f"{metric}_std")
    return "n/a" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _range(entry: dict[str, Any]) -> str:
    low, high = entry.get("acc_r_min_mean"), entry.get("acc_r_max_mean")
    return "n/a" if low is None or high is None else f"{low:.1f} – {high:.1f}"


def _steps(entry: dict[str, Any]) -> str:
    """Mean relearning steps over the seeds that relearned; seeds that did not are counted."""
    mean, std = entry.get("relearn_steps_mean"), entry.get("relearn_steps_std")
    missing = entry.get("relearn_not_reached", 0)
    text = "n/a" if mean is None else f"{mean:.1f} ± {std:.1f}"
    return text + (f" ({missing} seed(s) > 100)" if missing else "")


def markdown_report(report: dict[str, Any]) -> str:
    """``results.md`` of one forgotten set: what was measured, the table and the time ratio."""
    ratio = report.get("unsc_seconds_over_retrain")
    cpu_ratio = report.get("unsc_cpu_seconds_over_retrain")
    notes = [
        f"# {report['dataset']}: {describe(report)}",
        "",
        f"Seeds {report['seeds']}; mean ± std (population) over seeds. Acc_r / Acc_f: test accuracy on "
        "the remaining / forgotten classes, macro over classes"
        + (
            " (Acc_f: on the forgotten training samples themselves)"
            if report["forget"]["kind"] == "random"
            else ""
        )
        + ". Avg. gap (the headline; lower is better): mean of |method − retrain| over Acc_r, Acc_f "
        "and MIA-efficacy (SVC), per seed. Acc_r range: worst – best remaining class. MIA-efficacy: "
        "share of forgotten training samples an attacker on true-class confidence calls non-members "
        "(closer to the Retrain row is better), with an SVC attacker (C=3, RBF; the paper's) and a "
        "best-threshold attacker (cheaper, not comparable with the SVC number). Relearn steps: "
        "fine-tuning steps on 10 samples per class until the forgotten classes reach half the "
        "original's accuracy (more = harder to bring back). Probe Acc_f: forgotten-class accuracy of "
        "a linear probe on the penultimate features (lower = less left in the features). Seconds: "
        "wall time of training (original, retrain) or of the whole unlearning fit (UNSC: bases + "
        "unlearning).",
        "",
        markdown_table(report),
        "",
    ]
    if ratio is not None:
        cpu = "" if cpu_ratio is None else f"; CPU time of this process: {100 * cpu_ratio:.1f} %"
        notes.append(f"UNSC wall time / retrain wall time: {100 * ratio:.1f} %{cpu}.")
    if report.get("stop_at_held_out"):
        notes.append(
            "Unlearning methods stop once the forgotten samples' accuracy falls to the original model's "
            "held-out (validation) accuracy."
        )
    return "\n".join(notes) + "\n"


def sweep_markdown(dataset: str, seeds: list[int] | None, reports: list[dict[str, Any]]) -> str:
    """``results.md`` of a multi-class sweep: one row per forgotten set, then each set's table."""
    lines = [
        f"# {dataset}: multi-class forgetting, seeds {seeds}",
        "",
        "Acc_r (%) of the remaining classes, mean ± std over seeds; UNSC's Acc_f in the last column.",
        "",
        "| forgotten classes | Original | Retrain | UNSC | UNSC Acc_f |",
        "|---|---|---|---|---|",
    ]
    for report in reports:
        m = report["methods"]

        def acc(name: str, metric: str = "acc_r", m: dict[str, Any] = m) -> str:
            return (
                f"{m[name][f'{metric}_mean']:.2f} ± {m[name][f'{metric}_std']:.2f}"
                if name in m
                else "–"
            )

        lines.append(
            f"| {report['forget_classes']} | {acc('original')} | {acc('retrain')} | {acc('unsc')} | {acc('unsc', 'acc_f')} |"
        )
    for report in reports:
        lines += ["", f"## forget {report['forget_classes']}", "", markdown_table(report)]
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Remaining vs forgotten accuracy per method of a bench report (bars with std error bars)."""
    methods = report["methods"]
    labels = [entry["label"] for entry in methods.values()]
    xs = range(len(labels))
    fig = Figure(figsize=(max(6.0, 0.9 * len(labels)), 3.8))
    ax = fig.subplots()
    for offset, metric, name in (
        (-0.2, "acc_r", "remaining (Acc_r)"),
        (0.2, "acc_f", "forgotten (Acc_f)"),
    ):
        ax.bar(
            [x + offset for x in xs],
            [e[f"{metric}_mean"] for e in methods.values()],
            width=0.4,
            yerr=[e[f"{metric}_std"] for e in methods.values()],
            capsize=2,
            label=name,
        )
    if "retrain" in methods:
        ax.axhline(
            methods["retrain"]["acc_f_mean"], color="gray", lw=0.8, ls="--", label="retrain Acc_f"
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['dataset']}: {describe(report)} (seeds {report['seeds']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))


def mia_chart(
    values: dict[str, float | None],
    retrain: float | None,
    errors: dict[str, float | None] | None = None,
    title: str = "MIA-efficacy",
    variant: str = "SVC",
) -> Figure:
    """Bar chart of MIA-efficacy per method (paper Figure 2), the retrained model as a line.

    Args:
        values: ``label -> MIA-efficacy (%)``; ``None`` (a diverged model) draws an empty bar
            marked "n/a", so every method keeps its bar.
        retrain: the retrained model's value (the reference), ``None`` to leave the line out.
        errors: ``label -> std`` over seeds for error bars.
        title: the figure's title.
        variant: the attacker, named on the y axis (the SVC and threshold numbers differ).
    """
    labels = list(values)
    heights = [v if v is not None else 0.0 for v in values.values()]
    yerr = None if errors is None else [errors.get(label) or 0.0 for label in labels]
    fig = Figure(figsize=(max(5.0, 0.8 * len(labels)), 3.6))
    ax = fig.subplots()
    bars = ax.bar(range(len(labels)), heights, width=0.6, yerr=yerr, capsize=2, color="tab:blue")
    ax.bar_label(
        bars,
        labels=["" if v is None else f"{v:.1f}" for v in values.values()],
        label_type="center",
        fontsize=7,
        color="white",
    )
    for bar, value in zip(bars, values.values()):
        if value is None:  # no bar to write in
            ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 1.0), ha="center", fontsize=7)
    if retrain is not None:
        ax.axhline(retrain, color="tab:red", lw=1.0, ls="--", label=f"retrain ({retrain:.1f})")
        ax.legend(fontsize=7, loc="upper right", frameon=False)  # above the bars (ylim 118)
    ax.set_xticks(list(range(len(labels))))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"MIA-efficacy, {variant} (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def mia_comparison_figure(report: dict[str, Any], metric: str = "mia_efficacy") -> Figure:
    """:func:`mia_chart` of a bench report: one bar per method but Retrain, mean ± std over seeds.

    Args:
        report: the bench's ``results.json`` of one forgotten set.
        metric: ``"mia_efficacy"`` (SVC attacker, the paper's) or ``"mia_threshold"``.
    """
    methods = {name: entry for name, entry in report["methods"].items() if name != "retrain"}
    retrain = report["methods"].get("retrain", {}).get(f"{metric}_mean")
    variant = report.get("mia_variants", {}).get(metric, {}).get("variant", metric)
    return mia_chart(
        {entry["label"]: entry[f"{metric}_mean"] for entry in methods.values()},
        retrain,
        {entry["label"]: entry[f"{metric}_std"] for entry in methods.values()},
        title=f"{report['dataset']}: {describe(report)} (seeds {report['seeds']})",
        variant=variant.split(" (")[0].split(",")[0],
    )


def plot_mia_comparison(report: dict[str, Any], path: Path, metric: str = "mia_efficacy") -> None:
    """Write :func:`mia_comparison_figure` to ``path`` (PNG)."""
    fig = mia_comparison_figure(report, metric)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))
