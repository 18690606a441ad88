"""`unsc-lightning`: dispatch, the LightningCLI workflow original -> unlearn, and checkpoint loading.

The CLI runs in-process through `unsc_lightning.cli.main`; every run happens in a temporary
directory, so the configs' relative `runs/...` paths land there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import yaml

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError, UnlearningModule
from unsc_lightning.checkpoint import MeanMetric, extract_model_state, load_model_state
from unsc_lightning.cli import COMMANDS, RunConfigSaver, UnlearningCLI, main
from unsc_lightning.data.torchvision_data import CIFAR10DataModule
from unsc_lightning.models import MLP, MNIST1DConvNet
from unsc_lightning.models.paper import AllCNN

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# A tiny MNIST-1D problem and one epoch per stage: the workflow, not the accuracy, is under test.
SMALL = [
    "--data.init_args.num_samples=400",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lightning_checkpoint(path: Path, model: torch.nn.Module, prefix: str = "model.") -> Path:
    torch.save(
        {"state_dict": {f"{prefix}{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path
    )
    return path


# -- dispatch ----------------------------------------------------------------------------------------
def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    usage = capsys.readouterr().err
    assert all(command in usage for command in COMMANDS)
    assert main(["train"]) == 2


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


def test_demo_and_bench_dispatch_as_before(monkeypatch):
    calls = []
    import unsc_lightning.lab.demo

    monkeypatch.setattr(
        unsc_lightning.lab.demo, "main", lambda argv: calls.append(("demo", argv)) or 0
    )
    bench = types.ModuleType("unsc_lightning.lab.bench")
    bench.main = lambda argv: calls.append(("bench", argv)) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unsc_lightning.lab.bench", bench)
    assert main(["demo", "--dataset", "digits"]) == 0
    assert main(["bench", "--quick"]) == 3
    assert calls == [("demo", ["--dataset", "digits"]), ("bench", ["--quick"])]


def test_fit_help_shows_test_after_fit(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    assert "--test_after_fit" in capsys.readouterr().out


def test_short_class_names_resolve(tmp_path: Path):
    config = tmp_path / "short.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "UnlearningModule",
                    "init_args": {
                        "model": {"class_path": "AllCNN"},
                        "num_classes": 10,
                        "forget_classes": [3],
                    },
                },
                "data": {"class_path": "CIFAR10DataModule", "init_args": {"forget_classes": [3]}},
                "trainer": {
                    "callbacks": [
                        {"class_path": "NullSpaceCalibration", "init_args": {"threshold": 0.9}}
                    ]
                },
            }
        )
    )
    output = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(output):
        main(["fit", "--config", str(config), "--print_config"])
    resolved = yaml.safe_load(output.getvalue())
    paths = [
        resolved["model"]["class_path"],
        resolved["model"]["init_args"]["model"]["class_path"],
        resolved["data"]["class_path"],
        resolved["trainer"]["callbacks"][0]["class_path"],
    ]
    classes = [UnlearningModule, AllCNN, CIFAR10DataModule, NullSpaceCalibration]
    for path, cls in zip(paths, classes):
        module, name = path.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is cls


# -- the workflow: original -> unsc through the CLI --------------------------------------------------
def test_original_then_unsc_reads_the_original_checkpoint_and_never_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["fit", "--config", str(CONFIG_DIR / "mnist1d_original.yaml"), *SMALL]) == 0
    original_dir = tmp_path / "runs" / "mnist1d" / "original"
    original_ckpt = original_dir / "checkpoints" / "best.ckpt"
    assert (original_dir / "config.yaml").is_file() and original_ckpt.is_file()
    digest, mtime = sha256(original_ckpt), original_ckpt.stat().st_mtime_ns
    original_weights = torch.load(original_ckpt, weights_only=True)["state_dict"]

    capsys.readouterr()
    assert main(["fit", "--config", str(CONFIG_DIR / "mnist1d_unsc.yaml"), *SMALL]) == 0
    # test_after_fit ends with one compact table, not one table per evaluation dataloader
    printed = capsys.readouterr().out
    assert printed.count("unlearning results (test)") == 1 and "DataLoader" not in printed
    for key in ("test/retain_acc ", "test/mia_efficacy", "retain_acc_min", "nullspace_drift/model"):
        assert printed.count(key) == 1, key
    assert sha256(original_ckpt) == digest and original_ckpt.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in original_ckpt.parent.iterdir()) == ["best.ckpt"]

    unsc_dir = tmp_path / "runs" / "mnist1d" / "unsc"
    unsc_state = torch.load(unsc_dir / "checkpoints" / "unsc.ckpt", weights_only=True)["state_dict"]
    # The frozen copy θ_o that labelled the forget samples is exactly the original run's model ...
    for key, value in original_weights.items():
        if key.startswith("model."):
            torch.testing.assert_close(
                unsc_state["original." + key[len("model.") :]], value, rtol=0, atol=0
            )
    # ... and unlearning moved the trained copy away from it.
    assert any(
        not torch.equal(unsc_state[k], v)
        for k, v in original_weights.items()
        if k.startswith("model.")
    )

    # The resolved config saved next to the run names the checkpoint and re-parses as it is.
    saved = yaml.safe_load((unsc_dir / "config.yaml").read_text())
    assert (
        saved["model"]["init_args"]["original_checkpoint"]
        == "runs/mnist1d/original/checkpoints/best.ckpt"
    )
    assert saved["data"]["init_args"]["num_samples"] == 400
    metrics = (unsc_dir / "metrics.csv").read_text()
    assert "val/forget_acc" in metrics and "test/forget_acc" in metrics  # test_after_fit

    # A second run into the same directory is refused before anything is trained or written.
    with pytest.raises(RuntimeError, match="init_args.version"):
        main(["fit", "--config", str(CONFIG_DIR / "mnist1d_unsc.yaml"), *SMALL])
    assert sha256(original_ckpt) == digest


def test_saved_config_reruns_the_original_exactly(tmp_path: Path):
    assert main(["fit", "--config", str(CONFIG_DIR / "mnist1d_original.yaml"), *SMALL]) == 0
    first = tmp_path / "runs" / "mnist1d" / "original"
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert (
        saved["model"]["init_args"]["model"]["init_args"]["num_classes"] == 10
    )  # defaults resolved
    rerun = [
        "fit",
        "--config",
        str(first / "config.yaml"),
        "--trainer.logger.init_args.version=rerun",
    ]
    assert main(rerun) == 0
    second = tmp_path / "runs" / "mnist1d" / "rerun"
    weights = [
        torch.load(d / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
        for d in (first, second)
    ]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)


def test_original_checkpoint_missing_is_a_config_error(tmp_path: Path):
    # the module's UnlearningConfigError is the last line of the output (after jsonargparse's)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["fit", "--config", str(CONFIG_DIR / "mnist1d_unsc.yaml"), *SMALL,
                     "--model.init_args.original_checkpoint=nowhere.ckpt"])  # fmt: skip
    assert code == 2
    last = stderr.getvalue().strip().splitlines()[-1]
    assert re.match(
        r"unsc-lightning fit: error: .*`original_checkpoint`.*'nowhere\.ckpt'.*mnist1d_original",
        last,
    )
    with pytest.raises(UnlearningConfigError, match=r"`original_checkpoint`.*'nowhere\.ckpt'"):
        UnlearningModule(
            MNIST1DConvNet(), num_classes=10, forget_classes=[3], original_checkpoint="nowhere.ckpt"
        )


# -- checkpoint loading ------------------------------------------------------------------------------
def test_unlearning_module_loads_lightning_and_plain_checkpoints(tmp_path: Path):
    trained = MNIST1DConvNet()
    paths = {
        "lightning": lightning_checkpoint(tmp_path / "a.ckpt", trained),
        "plain": tmp_path / "b.pth",
        "data_parallel": tmp_path / "c.pth",
    }
    torch.save(trained.state_dict(), paths["plain"])
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, paths["data_parallel"])
    for path in paths.values():
        digest = sha256(path)
        module = UnlearningModule(
            MNIST1DConvNet(), num_classes=10, forget_classes=[3], original_checkpoint=str(path)
        )
        for name, value in trained.state_dict().items():
            torch.testing.assert_close(module.model.state_dict()[name], value, rtol=0, atol=0)
            torch.testing.assert_close(module.original.state_dict()[name], value, rtol=0, atol=0)
        assert module.hparams.original_checkpoint == str(path)
        assert sha256(path) == digest


def test_model_state_of_an_unlearning_checkpoint_is_the_unlearned_model():
    state = {
        "model.w": torch.ones(1),
        "original.w": torch.zeros(1),
        "original_captured": torch.tensor(True),
    }
    assert extract_model_state({"state_dict": state}) == {"w": torch.ones(1)}
    with pytest.raises(UnlearningConfigError, match="no key under `net.`"):
        extract_model_state({"state_dict": state}, prefix="net.")


def test_wrong_architecture_is_a_config_error(tmp_path: Path):
    path = lightning_checkpoint(tmp_path / "mlp.ckpt", MLP(in_features=40, hidden=[16]))
    with pytest.raises(
        UnlearningConfigError,
        match=r"(?s)do not fit MNIST1DConvNet: .*Missing key.*same class and arguments",
    ):
        load_model_state(MNIST1DConvNet(), path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(UnlearningConfigError, match="holds a list"):
        load_model_state(MNIST1DConvNet(), tmp_path / "list.pt")


# -- callbacks of the CLI workflow ---------------------------------------------------------------------
def test_mean_metric_feeds_the_checkpoint_monitor():
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((metrics, step)))
    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={
            "val/acc_class_0": torch.tensor(0.5),
            "val/acc_class_1": torch.tensor(1.0),
            "val/retain_acc": torch.tensor(0.0),
        },
        loggers=[logger],
        global_step=7,
        current_epoch=2,
    )
    MeanMetric().on_validation_end(trainer, None)  # type: ignore[arg-type]
    torch.testing.assert_close(trainer.callback_metrics["val/acc"], torch.tensor(0.75))
    assert logged == [({"val/acc": 0.75, "epoch": 2}, 7)]
    with pytest.raises(UnlearningConfigError, match="`name` not to match `pattern`"):
        MeanMetric(pattern="val/*", name="val/acc")


def test_resolved_config_is_logged_to_wandb(tmp_path: Path):
    from lightning.pytorch.loggers import WandbLogger

    original = lightning_checkpoint(tmp_path / "original.ckpt", MNIST1DConvNet())
    args = [
        "--config",
        str(CONFIG_DIR / "mnist1d_unsc.yaml"),
        f"--model.init_args.original_checkpoint={original}",
    ]
    cli = UnlearningCLI(args=[*args, "--data.init_args.num_samples=400"], run=False)
    saver = RunConfigSaver(cli.parser, cli.config)
    logger = WandbLogger(project="unsc-test", offline=True, save_dir=str(tmp_path))
    received = []
    logger.log_hyperparams = received.append  # type: ignore[method-assign]
    trainer = L.Trainer(logger=logger, accelerator="cpu", devices=1, enable_checkpointing=False)
    saver.save_config(trainer, None, "fit")  # type: ignore[arg-type]
    (params,) = received
    assert params["cli_config"]["model"]["init_args"]["original_checkpoint"] == str(original)
    # where the run ran: W&B's config holds it next to the resolved config
    assert params["run"]["world_size"] == 1 and params["run"]["devices"] == 1
    assert params["run"]["precision"] == "32-true" and "effective_batch" in params["run"]
    assert params["cli_config"]["trainer"]["callbacks"][-1]["class_path"].endswith(
        "NullSpaceCalibration"
    )
