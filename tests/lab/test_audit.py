"""`unsc-lightning audit` end to end on a tiny setting (three models per group, a small split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unsc_lightning.cli import main as cli_main
from unsc_lightning.lab.audit import AuditConfig, main
from unsc_lightning.metrics import forgetting_quality, per_example_epsilon, ulira

TINY = ["--num-samples", "600", "--train-epochs", "1", "--models", "3", "--workers", "1"]


def test_audit_writes_scores_that_follow_from_its_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "audit"
    assert main([*TINY, "--out", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["models"] == 3 and report["method"] == "unsc" and report["wall_seconds"] > 0
    statistics = {g: np.array(v) for g, v in report["statistics"].items()}
    examples = report["forget_examples"]
    assert examples > 0
    for group in ("original", "retrained", "unlearned"):
        assert statistics[group].shape == (3, examples)
    for group in ("unlearned", "original"):
        scores = report["scores"][group]
        epsilon = per_example_epsilon(statistics[group], statistics["retrained"]).numpy()
        stored = np.array([np.inf if e is None else e for e in scores["per_example_epsilon"]])
        np.testing.assert_allclose(stored, epsilon)
        quality = forgetting_quality(
            statistics[group],
            statistics["retrained"],
            scores["retain_acc_ratio"],
            scores["test_acc_ratio"],
        )
        assert scores["forgetting_quality"] == pytest.approx(float(quality))
        test = ulira(statistics[group], statistics["retrained"])
        assert scores["ulira_accuracy"] == pytest.approx(test.accuracy)
        assert len(scores["per_example_ulira_accuracy"]) == examples
    # the three models of each seed differ: seeds change the training, not the forget set
    assert not np.allclose(statistics["retrained"][0], statistics["retrained"][1])
    assert (out / "audit.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "forgetting quality" in printed and "U-LiRA" in printed
    # a rerun reads every model from the cache
    assert main([*TINY, "--out", str(out)]) == 0
    again = json.loads((out / "audit.json").read_text())
    np.testing.assert_allclose(again["statistics"]["retrained"], report["statistics"]["retrained"])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--models", "2"], "`--models` >= 3"),
        (["--scenario", "class"], "`--scenario random`"),
        (["--fraction", "1.5"], "`--fraction`"),
        (["--method", "retrain"], "`--method`"),
        (["--workers", "0"], "`--workers`"),
    ],
)
def test_audit_argument_errors(
    args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["audit", *TINY, *args, "--out", str(tmp_path / "a")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_audit_config_defaults_fit_the_budget() -> None:
    assert AuditConfig().models == 32 and AuditConfig().scenario == "random"
