"""What the callback reports: the bases it built, per-layer drift and model-level evidence."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from unsc_lightning.metrics.drift import NullSpaceDrift
from unsc_lightning.nullspace.context import eval_mode
from unsc_lightning.nullspace.engine import NullSpaceEngine

#: The fit end warns when the accuracy on the remaining probe fell by more than this (or, for a
#: probe without class labels, when this share of its predicted classes changed).
PREDICTION_CHANGE_WARNING = 0.01
#: Layers whose weight is ``reshape(out, -1)`` of its rows: the per-layer drift applies.
_DRIFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def log_bases(engine: NullSpaceEngine, trainer: L.Trainer, rule: str) -> None:
    """One info line per basis, and ``nullspace/<key>/{rank,dim,energy}`` to every logger."""
    report = engine.report
    samples = 0 if report is None else report.samples
    passes = "" if report is None or report.passes <= 1 else f", {report.passes} passes"
    peak = (
        "" if report is None or not report.peak_bytes else f", {report.peak_bytes / 2**20:.0f} MiB"
    )
    held = {} if report is None else report.held_rows
    lines = [
        f"{k}: rank {i.rank}/{i.dim}, energy {i.energy:.4f}"
        + (f" (from rows: {held[k]} classes)" if k in held else "")
        for k, i in engine.layer_infos.items()
    ]
    rank_zero_info(
        f"NullSpaceCalibration: bases from {samples} remaining samples "
        f"(rule={rule}{passes}{peak}):\n  " + "\n  ".join(lines)
    )
    metrics: dict[str, float] = {}
    for key, info in engine.layer_infos.items():
        metrics[f"nullspace/{key}/rank"] = info.rank
        metrics[f"nullspace/{key}/dim"] = info.dim
        metrics[f"nullspace/{key}/energy"] = info.energy
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=0)


def start_layer_drift(
    engine: NullSpaceEngine, pl_module: L.LightningModule
) -> NullSpaceDrift | None:
    """Per-layer drift on the engine's remaining probe (plain Linear/Conv layers only)."""
    probe = engine.probe
    report = engine.report
    # neither layers no sample reached nor those used only through `F.linear` on their weight
    # are seen by the drift probe's module hooks
    unused = set() if report is None else {*report.unused_layers, *report.functional_layers}
    layers = {
        key: layer
        for key, layer in engine.accounting.layers.items()
        if type(layer) in _DRIFT_LAYERS
        and len(engine.accounting.constraints[key].sites) == 1
        and key not in unused
    }
    if not isinstance(probe, Tensor) or not layers:
        return None
    with eval_mode(pl_module):
        return NullSpaceDrift.from_probe(pl_module, layers, probe)


def model_evidence(engine: NullSpaceEngine, forward: Any) -> dict[str, float]:
    """``nullspace_drift/model`` (relative logit change on the remaining probe),
    ``nullspace_drift/model_predictions`` (share of the probe whose class changed) and, when the
    probe has class labels, ``nullspace_drift/probe_accuracy_change`` (accuracy now minus when
    the bases were built).

    Warns when the probe's accuracy fell by more than :data:`PREDICTION_CHANGE_WARNING` (by
    more than one sample on a small probe); without labels, when that share of its predictions
    changed. Below ``threshold=1.0`` some predictions change by design (a small share of each
    class's input energy lies outside every basis); a change that costs no accuracy (wrong to
    right, or between wrong classes) is logged, not warned about, and the warning says how
    much accuracy the probe lost."""
    evidence = engine.probe_evidence(forward)
    if evidence is None:
        return {}
    drift, changed, accuracy = evidence
    metrics = {"nullspace_drift/model": drift, "nullspace_drift/model_predictions": changed}
    if accuracy is not None:
        then, now = accuracy
        metrics["nullspace_drift/probe_accuracy_change"] = now - then
        samples = len(engine.probe_labels) if engine.probe_labels is not None else 0
        if then - now > max(PREDICTION_CHANGE_WARNING, 1.5 / max(samples, 1)):
            rank_zero_warn(
                f"NullSpaceCalibration: the accuracy on a probe of {samples} remaining training "
                f"samples fell from {then:.1%} to {now:.1%} during unlearning ({changed:.1%} of "
                f"its predictions changed, logits moved by {drift:.1%}, relative): remaining "
                "accuracy may have dropped. Check `engine.free_parameters`, a higher "
                "`threshold`, or `mode='update'` for optimizers with weight decay."
            )
    elif changed > PREDICTION_CHANGE_WARNING:
        rank_zero_warn(
            f"NullSpaceCalibration: the model's predictions on remaining data changed for "
            f"{changed:.1%} of a probe of remaining samples during unlearning (logits moved by "
            f"{drift:.1%}, relative): remaining accuracy may have changed. Check "
            "`engine.free_parameters`, a higher `threshold`, or `mode='update'` for optimizers "
            "with weight decay."
        )
    return metrics
