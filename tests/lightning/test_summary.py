"""The per-class spread and the compact end-of-run table."""

from __future__ import annotations

import numpy as np
import torch

from unsc_lightning.evaluation import ForgetEvaluation, summary_rows


def test_retain_spread_is_min_and_max_of_remaining_per_class_accuracy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=generator)
    targets = torch.randint(0, 5, (200,), generator=generator)
    keep = targets != 2
    evaluation = ForgetEvaluation(num_classes=5, forget_classes=[2])
    evaluation.update("retain", logits[keep], targets[keep])
    evaluation.update("forget", logits[~keep], targets[~keep])
    results = evaluation.compute("test")
    predictions, y = logits.argmax(1).numpy(), targets.numpy()
    per_class = [np.mean(predictions[y == k] == k) for k in (0, 1, 3, 4)]
    assert float(results["test/retain_acc_min"]) == np.float32(min(per_class))
    assert float(results["test/retain_acc_max"]) == np.float32(max(per_class))

    rows = summary_rows({**results, "nullspace_drift/model": 0.01}, "test")
    assert [key for _, key, _ in rows] == [
        "test/retain_acc",
        "test/forget_acc",
        "test/retain_acc_min",
        "test/retain_acc_max",
        "nullspace_drift/model",
    ]
    assert summary_rows({"val/mia_efficacy": 0.5}, "val")[0][0] == "MIA-efficacy (threshold)"
