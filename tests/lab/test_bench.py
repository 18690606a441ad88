"""`unsc-lightning bench`: files, schema and argument errors on a tiny split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unsc_lightning import UnlearningConfigError
from unsc_lightning.cli import main as cli_main
from unsc_lightning.lab.bench import main, resolve_methods, summarize

TINY = ["--dataset", "mnist1d", "--num-samples", "600", "--train-epochs", "3", "--seeds", "0"]
SCHEMA = ("acc_r_mean", "acc_r_std", "acc_f_mean", "acc_f_std", "mia_efficacy_mean", "seconds_mean")


def test_bench_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert main([*TINY, "--methods", "ft", "ga", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["methods"]) == ["original", "retrain", "ft", "ga"]
    for name, entry in report["methods"].items():
        for key in SCHEMA:
            assert isinstance(entry[key], float), (name, key)
        assert 0.0 <= entry["acc_r_mean"] <= 100.0 and 0.0 <= entry["acc_f_mean"] <= 100.0
        assert entry["acc_r_std"] == 0.0  # one seed
    assert report["methods"]["retrain"]["acc_f_mean"] == 0.0  # never saw the class
    assert report["methods"]["retrain"]["avg_gap_mean"] == 0.0
    assert (
        report["forget_classes"] == [3]
        and report["seeds"] == [0]
        and report["mia_attacker"] == "svc"
    )
    # recovery, spread and both MIA variants, named
    for entry in report["methods"].values():
        assert entry["probe_acc_f_mean"] is not None and entry["acc_r_min_mean"] is not None
        assert entry["acc_r_min_mean"] <= entry["acc_r_mean"] <= entry["acc_r_max_mean"]
        assert entry["mia_threshold_mean"] is not None
    assert set(report["mia_variants"]) == {"mia_efficacy", "mia_threshold"}
    assert "SVC" in report["mia_variants"]["mia_efficacy"]["variant"]
    # every run records where it ran
    for name, scores in report["runs"]["0"].items():
        run = scores["run"]
        assert run["world_size"] == 1 and run["devices"] == 1, name
        assert run["precision"] == "32-true" and run["effective_batch"] == run["batch_size"] > 0
    table = (out / "results.md").read_text()
    header = table.split("| Method |")[1].splitlines()[0]
    assert header.startswith(" Avg. gap to retrain |")  # the headline column comes first
    for column in ("MIA-efficacy, SVC", "MIA-efficacy, threshold", "Relearn steps", "Probe Acc_f"):
        assert column in header
    assert "Acc_r range over remaining classes" in header and "± " in table
    for label in ("Original", "Retrain", "FT", "GA"):
        assert f"| {label} |" in table
    assert (out / "accuracy.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "seed 0 FT" in printed and "results.json" in printed  # progress lines while it runs
    # the second run reads the original and retrained models from the cache
    assert main([*TINY, "--methods", "ft", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["methods"]["original"]["cached"]


def test_cli_dispatches_bench_and_reports_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", *TINY, "--methods", "nonsense"]) == 2
    assert "`--methods`" in capsys.readouterr().err
    assert main([*TINY, "--scenario", "class", "--forget-classes", "1", "3"]) == 2
    assert main(["--dataset", "digits", "--num-samples", "600"]) == 2
    assert "`--num-samples`" in capsys.readouterr().err
    assert main([*TINY, "--threads", "0"]) == 2
    assert "`--threads`" in capsys.readouterr().err


def test_resolve_methods() -> None:
    assert resolve_methods(["all"])[0] == "unsc" and len(resolve_methods(["all"])) == 11
    assert resolve_methods(["ga", "unsc"]) == ["unsc", "ga"]  # table order
    with pytest.raises(UnlearningConfigError, match="'retrain' are always run"):
        resolve_methods(["retrain"])


def test_summary_statistics() -> None:
    def scores(acc_r: float, acc_f: float, mia: float | None) -> dict[str, object]:
        return {"acc_r": acc_r, "acc_f": acc_f, "mia_efficacy": mia, "seconds": 1.0}

    per_seed = {
        0: {
            "original": scores(90, 99, 0),
            "retrain": scores(92, 0, 100),
            "unsc": scores(93, 1, 97),
        },
        1: {
            "original": scores(90, 97, 0),
            "retrain": scores(94, 0, 100),
            "unsc": scores(95, 3, None),
        },
    }
    summary = summarize(per_seed)
    assert summary["unsc"]["acc_r_mean"] == pytest.approx(94.0)
    assert summary["unsc"]["acc_r_std"] == pytest.approx(1.0)  # population std
    assert summary["unsc"]["mia_efficacy_mean"] == pytest.approx(97.0)  # a missing value is skipped
    # per-seed gap: mean(|93-92|, |1-0|, |97-100|) = 5/3 and mean(|95-94|, |3-0|) = 2
    assert summary["unsc"]["avg_gap_mean"] == pytest.approx((5 / 3 + 2) / 2)
    assert summary["original"]["avg_gap_mean"] == pytest.approx(
        (1 / 3 * (2 + 99 + 100) + 1 / 3 * (4 + 97 + 100)) / 2
    )
