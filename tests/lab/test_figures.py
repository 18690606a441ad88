"""The paper's figures: Figure 3b's loss contour (a property, not only a picture) and Figure 2."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    SUBSPACE_DIM,
    BoringClassifier,
    SubspaceDataModule,
    SubspaceProblem,
    mlp,
    quiet_trainer,
)
from matplotlib.patches import Rectangle
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError, UnlearningModule
from unsc_lightning.lab.bench import main as bench_main
from unsc_lightning.lab.figures import (
    loss_contour,
    loss_contour_figure,
    plot_loss_contour,
    update_plane,
)
from unsc_lightning.lab.render import mia_comparison_figure, plot_mia_comparison

FLAT = 1e-4  # float32 rounding of a null-space move on remaining inputs
MOVED = 1e-2


@dataclass
class Runs:
    original: nn.Module
    projected: nn.Module  # unlearned with the null-space projection at threshold 1.0
    plain: nn.Module  # the same unlearning without it
    calibration: NullSpaceCalibration
    remaining_test: DataLoader


@pytest.fixture
def runs(problem: SubspaceProblem) -> Runs:
    # hidden width 8 < 32 remaining samples: the hidden layers' remaining inputs span their whole
    # space, so fresh remaining inputs of span(A) stay in every layer's remaining subspace
    torch.manual_seed(0)
    original = mlp(hidden=8)
    everything = TensorDataset(
        torch.cat([problem.retain_x, problem.forget_x]),
        torch.cat([problem.retain_y, problem.forget_y]),
    )
    quiet_trainer(10).fit(
        BoringClassifier(original), train_dataloaders=DataLoader(everything, batch_size=16)
    )
    original.eval()

    def unlearn(callbacks: list[NullSpaceCalibration]) -> nn.Module:
        model = copy.deepcopy(original)
        module = UnlearningModule(
            model, num_classes=NUM_CLASSES, forget_classes=[FORGET_CLASS], lr=0.5
        )
        quiet_trainer(3, callbacks).fit(module, datamodule=SubspaceDataModule(problem))
        return model.eval()

    calibration = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())
    projected, plain = unlearn([calibration]), unlearn([])
    generator = torch.Generator().manual_seed(1)
    test_x = torch.randn(64, SUBSPACE_DIM, generator=generator) @ problem.basis
    test_y = torch.arange(64) % FORGET_CLASS
    loader = DataLoader(TensorDataset(test_x, test_y), batch_size=32)
    return Runs(original, projected, plain, calibration, loader)


def test_update_parts_match_the_formula_and_add_up(runs: Runs) -> None:
    projected = update_plane(runs.original, runs.projected, runs.calibration)
    before = dict(runs.original.named_parameters())
    for name, after in runs.projected.named_parameters():
        delta = after.detach() - before[name].detach()
        zero = torch.zeros_like(delta)  # frozen biases: no part at all
        total = projected.in_subspace.get(name, zero) + projected.null_space.get(name, zero)
        torch.testing.assert_close(total, delta)
    assert projected.null_norm > 0.1 and projected.unlearned_at == (1.0, 1.0)
    assert projected.in_norm < 1e-4 * projected.null_norm  # a projected run stays in the null space

    # the contrast's in-subspace part: ΔW U Uᵀ of the first layer, its bias change whole
    plane = update_plane(runs.original, runs.projected, runs.calibration, contrast=runs.plain)
    basis = runs.calibration.bases["model.0"].double()
    delta = (runs.plain[0].weight - runs.original[0].weight).detach().double()
    expected = (delta @ basis @ basis.T).float()
    torch.testing.assert_close(plane.in_subspace["0.weight"], expected, atol=1e-6, rtol=1e-4)
    bias = (runs.plain[0].bias - runs.original[0].bias).detach()
    torch.testing.assert_close(plane.in_subspace["0.bias"], bias)
    assert plane.in_norm > 0.1
    assert abs(plane.unlearned_at[0]) < 1e-3 and plane.unlearned_at[1] == 1.0


def test_remaining_loss_is_flat_along_the_null_space_part(runs: Runs) -> None:
    contour = loss_contour(
        runs.original,
        runs.projected,
        runs.calibration,
        runs.remaining_test,
        contrast=runs.plain,
        steps=7,  # (-1, -0.5, 0, ..., 2): 0 and 1 are grid points
    )

    assert len(contour.loss) == len(contour.b) == 7 and len(contour.loss[0]) == len(contour.a)
    # the projected run sits at a = 0 (no in-subspace part), b = 1
    assert abs(contour.unlearned_at[0]) < 1e-3 and contour.unlearned_at[1] == 1.0
    origin = contour.at(0.0, 0.0)
    for b in contour.b:  # flat along b, the whole column
        assert abs(contour.at(0.0, b) - origin) < FLAT
    assert abs(contour.at(0.0, 1.0) - origin) < FLAT
    # along a (the unprojected run's in-subspace part) the remaining loss moves
    assert abs(contour.at(1.0, 0.0) - origin) > MOVED
    assert max(abs(contour.at(a, 0.0) - origin) for a in contour.a) > MOVED

    fig = loss_contour_figure(contour)
    assert fig.axes and fig.axes[0].get_xlabel().startswith("a: in-subspace part")


def test_contour_without_contrast_uses_the_runs_own_update(runs: Runs, tmp_path: Path) -> None:
    contour = loss_contour(
        runs.original, runs.projected, runs.calibration, runs.remaining_test, steps=4
    )
    assert contour.unlearned_at == (1.0, 1.0) and contour.a_source == "unlearned"
    assert abs(contour.at(0.0, 1.0) - contour.at(0.0, 0.0)) < FLAT
    path = tmp_path / "loss_contour.png"
    plot_loss_contour(contour, path)
    assert path.stat().st_size > 0
    assert json.loads(json.dumps(contour.as_dict()))["b"] == contour.b


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"steps": 1}, "`steps` >= 2, got 1"),
        ({"a_span": (2.0, -1.0)}, r"`a_span` as \(low, high\)"),
        ({"calibration": NullSpaceCalibration()}, "`calibration` to hold bases"),
        ({"unlearned": "copy"}, "`unlearned` to be the model the `calibration` constrained"),
        ({"contrast": "original"}, "`contrast` to move the remaining subspace"),
        ({"remaining_test": []}, "`remaining_test` to yield batches"),
    ],
)
def test_misconfigurations_are_named(runs: Runs, arguments: dict, match: str) -> None:
    given = {
        "original": runs.original,
        "unlearned": runs.projected,
        "calibration": runs.calibration,
        "remaining_test": runs.remaining_test,
        **arguments,
    }
    if given["unlearned"] == "copy":
        given["unlearned"] = copy.deepcopy(runs.projected)
    if given.get("contrast") == "original":
        given["contrast"] = copy.deepcopy(runs.original)
    with pytest.raises(UnlearningConfigError, match=match):
        loss_contour(**given)


def _report() -> dict:
    def entry(label: str, mia: float | None) -> dict:
        return {"label": label, "mia_efficacy_mean": mia, "mia_efficacy_std": 0.5}

    return {
        "dataset": "mnist1d",
        "forget": {"kind": "class", "classes": [3]},
        "seeds": [0, 1],
        "mia_variants": {"mia_efficacy": {"variant": "SVC (RBF, C=3), true-class confidence"}},
        "methods": {
            "original": entry("Original", 20.0),
            "retrain": entry("Retrain", 99.0),
            "unsc": entry("UNSC", 97.0),
            "ga": entry("GA", None),  # diverged
        },
    }


def test_mia_chart_has_one_bar_per_method_and_the_retrain_line(tmp_path: Path) -> None:
    fig = mia_comparison_figure(_report())

    (ax,) = fig.axes
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert [round(b.get_height(), 6) for b in bars] == [20.0, 97.0, 0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Original", "UNSC", "GA"]
    assert [tuple(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == "--"] == [
        (99.0, 99.0)
    ]
    assert "SVC" in ax.get_ylabel()
    path = tmp_path / "mia_comparison.png"
    plot_mia_comparison(_report(), path)
    assert path.stat().st_size > 0


def test_bench_writes_both_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    tiny = ["--dataset", "mnist1d", "--num-samples", "600", "--train-epochs", "3", "--seeds", "0"]
    methods = ["--methods", "unsc", "unsc_no_nullspace", "--no-recovery"]
    assert bench_main([*tiny, *methods, "--out", str(out)]) == 0

    for name in ("mia_comparison.png", "loss_contour.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "results.json").read_text())
    contour = report["runs"]["0"]["unsc"]["loss_contour"]
    assert contour["a_source"] == "contrast" and len(contour["loss"]) == len(contour["b"])
    assert abs(contour["unlearned_at"][0]) < 1e-3
