"""Every YAML in `configs/` parses, carries the authors' recipe, and runs with `fast_dev_run`.

The paper configs run against tiny synthetic files written in the real on-disk formats
(`tests/fakedata.py`), with `--data.init_args.root` pointing at them. The CLI runs in-process
through `unsc_lightning.cli.main`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers.fakedata import WRITERS

from unsc_lightning.cli import UnlearningCLI, main
from unsc_lightning.models.paper import PAPER_MODELS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
EMBEDDED = ("mnist1d", "digits")
PAPER = ("fmnist_alexnet", "cifar10_allcnn", "svhn_vgg11", "cifar100_resnet18")
STAGES = ("original", "retrain", "unsc")
CIFAR100_FORGET = [19, 28, 32, 51, 65, 67, 80, 85, 86, 97]

# REFERENCE.md "Recipes": forgotten classes, number of classes, original/retrain milestones, and
# the unlearning table (lr, epochs, batch, basis rule, threshold, per-class step).
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "fmnist_alexnet": dict(
        forget=[6],
        classes=10,
        milestones=[30, 60, 90],
        lr=0.005,
        epochs=15,
        rule="per_class",
        threshold=0.97,
        step=0.003,
    ),
    "cifar10_allcnn": dict(
        forget=[3],
        classes=10,
        milestones=[30, 60, 90],
        lr=0.04,
        epochs=25,
        rule="per_class",
        threshold=0.97,
        step=0.003,
    ),
    "svhn_vgg11": dict(
        forget=[3],
        classes=10,
        milestones=[30, 60, 90],
        lr=0.005,
        epochs=15,
        rule="per_class",
        threshold=0.97,
        step=0.003,
    ),
    "cifar100_resnet18": dict(
        forget=CIFAR100_FORGET,
        classes=100,
        milestones=[60, 120, 160],
        lr=0.04,
        epochs=20,
        rule="pooled",
        threshold=0.99,
        step=0.0,
    ),
}
PAPER_DATA = {
    "fmnist_alexnet": ("FashionMNISTDataModule", "AlexNetFMNIST"),
    "cifar10_allcnn": ("CIFAR10DataModule", "AllCNN"),
    "svhn_vgg11": ("SVHNDataModule", "VGG11BN"),
    "cifar100_resnet18": ("CIFAR100DataModule", "ResNet18CIFAR"),
}
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _isolated_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in a temporary directory and undo the global state a CLI run sets (seed, determinism)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["unsc-lightning"])  # pytest's own arguments are not ours
    environ = dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_rng_state(rng)
    os.environ.clear()
    os.environ.update(environ)


@functools.cache
def _printed_config(path: Path) -> str:
    # The parser without subcommands is the `fit` one minus `ckpt_path`; every config also goes
    # through `unsc-lightning fit` itself in the fast_dev_run tests below.
    output = io.StringIO()
    with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(output):
        UnlearningCLI(args=["--config", str(path), "--print_config"], run=False)
    assert info.value.code == 0, output.getvalue()
    return output.getvalue()


def print_config(path: Path) -> dict[str, Any]:
    """The resolved config, as `--config PATH --print_config` prints it."""
    return yaml.safe_load(_printed_config(path))


def by_class(callbacks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    matches = [c["init_args"] for c in callbacks if c["class_path"].endswith(f".{name}")]
    assert len(matches) == 1, [c["class_path"] for c in callbacks]
    return matches[0]


def write_original_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """A stand-in for the original run's checkpoint: a fresh model in Lightning's layout."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


# -- every config parses and states what it should ------------------------------------------------
def test_every_setting_has_three_configs():
    names = {path.stem for path in CONFIGS}
    assert names == {f"{setting}_{stage}" for setting in (*EMBEDDED, *PAPER) for stage in STAGES}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses(path: Path):
    config = print_config(path)
    setting, stage = path.stem.rsplit("_", 1)
    model, data, trainer = (
        config["model"]["init_args"],
        config["data"]["init_args"],
        config["trainer"],
    )
    assert model["forget_classes"] == data["forget_classes"]
    assert config["test_after_fit"] is True
    logger = trainer["logger"][0]
    assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert (logger["init_args"]["save_dir"], logger["init_args"]["name"]) == ("runs", setting)
    assert (
        logger["init_args"]["version"] == stage
    )  # one run directory per stage: runs/<setting>/<stage>
    checkpoint = by_class(trainer["callbacks"], "ModelCheckpoint")
    assert checkpoint["dirpath"] is None  # next to the logger's run directory
    if stage == "unsc":
        assert config["model"]["class_path"].endswith("UnlearningModule")
        assert (model["optimizer"], model["momentum"], model["weight_decay"]) == ("sgd", 0.0, 0.0)
        assert model["original_checkpoint"] == f"runs/{setting}/original/checkpoints/best.ckpt"
        assert data["train_on"] == "forget"
        assert checkpoint["monitor"] is None  # the model after the last epoch
        assert trainer["callbacks"][-1]["class_path"].endswith("NullSpaceCalibration")
    else:
        assert config["model"]["class_path"].endswith("ClassifierModule")
        assert (
            model["momentum"],
            model["weight_decay"],
            model["warmup_epochs"],
            model["gamma"],
        ) == (0.9, 5e-4, 1, 0.2)
        assert data["train_on"] == ("all" if stage == "original" else "retain")
        assert data["val_fraction"] == 0.1
        expected = "val/acc" if stage == "original" else "val/retain_acc"
        assert (checkpoint["monitor"], checkpoint["mode"], checkpoint["filename"]) == (
            expected,
            "max",
            "best",
        )
        if stage == "original":  # val/acc (all classes) is the mean of the per-class accuracies
            assert by_class(trainer["callbacks"], "MeanMetric") == {
                "pattern": "val/acc_class_*",
                "name": "val/acc",
            }


@pytest.mark.parametrize("setting", PAPER)
def test_paper_recipes(setting: str):
    recipe = PAPER_RECIPES[setting]
    data_class, model_class = PAPER_DATA[setting]
    for stage in ("original", "retrain"):
        config = print_config(CONFIG_DIR / f"{setting}_{stage}.yaml")
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert config["seed_everything"] == 2023
        assert (model["lr"], model["milestones"], data["batch_size"]) == (
            0.1,
            recipe["milestones"],
            512,
        )
        assert (
            model["num_classes"] == recipe["classes"] == model["model"]["init_args"]["num_classes"]
        )
        assert model["forget_classes"] == recipe["forget"]
        assert config["trainer"]["max_epochs"] > recipe["milestones"][-1]
        assert config["data"]["class_path"].endswith(data_class)
        assert model["model"]["class_path"].endswith(model_class)
    config = print_config(CONFIG_DIR / f"{setting}_unsc.yaml")
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    callback = by_class(config["trainer"]["callbacks"], "NullSpaceCalibration")
    assert (model["lr"], config["trainer"]["max_epochs"], data["batch_size"]) == (
        recipe["lr"],
        recipe["epochs"],
        512,
    )
    assert (callback["rule"], callback["threshold"], callback["class_threshold_step"]) == (
        recipe["rule"],
        recipe["threshold"],
        recipe["step"],
    )
    assert model["forget_classes"] == recipe["forget"]
    if recipe["rule"] == "pooled":  # one mixed batch of 512 remaining samples
        assert (callback["max_retain_batches"], data["eval_batch_size"]) == (1, 512)
    assert "WandbLogger" in (CONFIG_DIR / f"{setting}_unsc.yaml").read_text()  # the commented block


@pytest.mark.parametrize("setting", EMBEDDED)
def test_embedded_configs_follow_the_demo_recipe(setting: str):
    from unsc_lightning.lab.recipes import EMBEDDED as RECIPES

    train, unlearn = RECIPES[setting]["train"], RECIPES[setting]["unlearn"]
    for stage in ("original", "retrain"):
        config = print_config(CONFIG_DIR / f"{setting}_{stage}.yaml")
        model = config["model"]["init_args"]
        assert config["trainer"]["max_epochs"] == train.epochs
        assert (model["lr"], model["milestones"], model["momentum"]) == (
            train.lr,
            train.milestones,
            train.momentum,
        )
        assert config["data"]["init_args"]["batch_size"] == train.batch_size
    config = print_config(CONFIG_DIR / f"{setting}_unsc.yaml")
    callback = by_class(config["trainer"]["callbacks"], "NullSpaceCalibration")
    assert config["trainer"]["max_epochs"] == unlearn.epochs
    assert config["model"]["init_args"]["lr"] == unlearn.lr
    assert config["data"]["init_args"]["batch_size"] == unlearn.batch_size
    assert (callback["threshold"], callback["class_threshold_step"], callback["rule"]) == (
        unlearn.threshold,
        unlearn.class_threshold_step,
        unlearn.rule,
    )


def test_unsc_configs_read_what_the_original_configs_write():
    for setting in (*EMBEDDED, *PAPER):
        original = print_config(CONFIG_DIR / f"{setting}_original.yaml")["trainer"]
        logger = original["logger"][0]["init_args"]
        filename = by_class(original["callbacks"], "ModelCheckpoint")["filename"]
        written = (
            f"{logger['save_dir']}/{logger['name']}/{logger['version']}/checkpoints/{filename}.ckpt"
        )
        unsc = print_config(CONFIG_DIR / f"{setting}_unsc.yaml")
        assert unsc["model"]["init_args"]["original_checkpoint"] == written


# -- fast_dev_run ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("setting", EMBEDDED)
def test_embedded_fast_dev_run(setting: str, stage: str, tmp_path: Path):
    overrides = ["--trainer.fast_dev_run=true", *QUIET]
    if setting == "mnist1d":
        overrides.append("--data.init_args.num_samples=400")
    if stage == "unsc":
        from unsc_lightning.models import DigitsConvNet, MNIST1DConvNet

        net = MNIST1DConvNet() if setting == "mnist1d" else DigitsConvNet()
        path = write_original_checkpoint(tmp_path / "original.ckpt", net)
        overrides.append(f"--model.init_args.original_checkpoint={path}")
    assert main(["fit", "--config", str(CONFIG_DIR / f"{setting}_{stage}.yaml"), *overrides]) == 0
    assert not Path("runs").exists()  # fast_dev_run logs and saves nothing


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {}
    for prefix, writer in WRITERS.items():
        root = tmp_path_factory.mktemp(prefix)
        writer(root, np.random.default_rng(0))
        roots[prefix] = root
    return roots


# The 4-sample validation split of the synthetic files can lack the forgotten class.
@pytest.mark.filterwarnings("ignore:Total length of `DataLoader` across ranks is zero")
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("setting", PAPER)
def test_paper_fast_dev_run(setting: str, stage: str, paper_data: dict[str, Path], tmp_path: Path):
    prefix = setting.split("_")[0]
    overrides = [
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        f"--data.init_args.root={paper_data[prefix]}",
        "--data.init_args.num_workers=0",
        # one batch of 4 per loader keeps the big networks cheap on CPU
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4",
        *QUIET,
    ]
    if stage == "unsc":
        recipe = PAPER_RECIPES[setting]
        kwargs = {"in_channels": 1} if prefix == "fmnist" else {}
        net = PAPER_MODELS[prefix](num_classes=recipe["classes"], **kwargs)
        path = write_original_checkpoint(tmp_path / "original.ckpt", net)
        overrides += [
            f"--model.init_args.original_checkpoint={path}",
            # Per-class eigendecompositions of 2048- to 4608-dim covariances take minutes on two
            # CPU cores; the first convolution is enough to exercise the wiring.
            '--trainer.callbacks.init_args.layers=["model.features.0*"]',
        ]
    assert main(["fit", "--config", str(CONFIG_DIR / f"{setting}_{stage}.yaml"), *overrides]) == 0
