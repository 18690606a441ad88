"""Sequential deletion requests: splits of the second request, drift, and the bench scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import ForgetSpec, UnlearningConfigError
from unsc_lightning.lab.bench import BenchConfig, forget_settings, main
from unsc_lightning.lab.runs import make_datamodule, restrict_forget_split
from unsc_lightning.lab.sequential import logit_drift, request_classes

TINY = ["--dataset", "mnist1d", "--num-samples", "600", "--train-epochs", "2", "--seeds", "0"]


def test_second_request_trains_on_its_own_class_and_keeps_the_rest_out() -> None:
    spec = ForgetSpec(kind="class", classes=[3, 5])
    dm = make_datamodule("digits", spec, 0, "forget", 64)
    dm.setup()
    retain_before = dm.splits["train_retain"].clone()
    restrict_forget_split(dm, [5])
    forget_labels = torch.cat([batch[1] for batch in dm.train_dataloader()])
    assert forget_labels.numel() > 0 and set(forget_labels.tolist()) == {5}
    retain_labels = torch.cat([batch[1] for batch in dm.retain_dataloader()])
    assert not torch.isin(retain_labels, torch.tensor([3, 5])).any()
    assert torch.equal(dm.splits["train_retain"], retain_before)
    # both forgotten classes are evaluated as forgotten
    test_forget = torch.cat([batch[1] for batch in dm.test_dataloader()[1]])
    assert set(test_forget.tolist()) == {3, 5}


def test_logit_drift_matches_its_formula() -> None:
    torch.manual_seed(0)
    before, after = nn.Linear(4, 3), nn.Linear(4, 3)
    inputs = torch.randn(10, 4)
    loader = DataLoader(TensorDataset(inputs, torch.zeros(10)), batch_size=3)
    with torch.no_grad():
        expected = torch.linalg.norm(after(inputs) - before(inputs)) / torch.linalg.norm(
            before(inputs)
        )
    assert logit_drift(before, after, loader) == pytest.approx(float(expected), rel=1e-5)
    assert logit_drift(before, before, loader) == 0.0


def test_request_classes() -> None:
    assert request_classes(None) == [3, 5]
    assert request_classes([1, 2, 0]) == [1, 2, 0]
    for bad in ([3], [3, 3]):
        with pytest.raises(UnlearningConfigError, match="at least two distinct"):
            request_classes(bad)
    settings = forget_settings(BenchConfig(scenario="sequential", forget_classes=[4, 1]))
    assert [s(0) for s in settings] == [ForgetSpec(kind="class", classes=[4, 1])]


def test_sequential_bench_reports_every_request(tmp_path: Path) -> None:
    out = tmp_path / "seq"
    args = [*TINY, "--scenario", "sequential", "--forget-classes", "3", "5"]
    assert main([*args, "--methods", "unsc", "ga", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["classes"] == [3, 5] and "fingerprint" in report["covariance_reuse"]
    assert list(report["methods"]) == ["original", "retrain", "unsc", "ga"]
    for name, entries in report["methods"].items():
        assert [e["request"] for e in entries] == [1, 2], name
        assert [e["forgotten_so_far"] for e in entries] == [[3], [3, 5]]
    retrain = report["methods"]["retrain"]
    assert [e["acc_f_mean"] for e in retrain] == [0.0, 0.0]  # never saw the classes
    for name in ("unsc", "ga"):
        for entry in report["methods"][name]:
            assert entry["drift_mean"] is not None and entry["drift_mean"] >= 0.0
    runs = report["runs"]["0"]
    # request 2's drift against the original composes both requests' changes
    assert runs["unsc"][1]["drift_from_original"] > 0.0
    table = (out / "results.md").read_text()
    assert "| UNSC | 2 (forget 5) |" in table and "Drift (vs before)" in table
    assert main([*args, "--forget-classes", "3", "--out", str(out)]) == 2
