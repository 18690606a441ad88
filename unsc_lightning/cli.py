"""Command line entry point `unsc-lightning`.

``unsc-lightning fit|validate|test|predict --config configs/<experiment>.yaml`` runs
:class:`UnlearningCLI`, a :class:`~lightning.pytorch.cli.LightningCLI` in subclass mode: the
model, the data module, the network inside the model and every callback are chosen by
``class_path`` in YAML (short names such as ``UnlearningModule`` or ``MNIST1DDataModule`` work
for the package's classes). ``unsc-lightning demo``, ``unsc-lightning bench`` and
``unsc-lightning audit`` run the offline demo, the benchmarks and the per-example privacy audit.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import lightning.pytorch as L
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

# Imported so that jsonargparse resolves the package's classes by their short names.
import unsc_lightning.callback
import unsc_lightning.checkpoint
import unsc_lightning.data
import unsc_lightning.data.torchvision_data
import unsc_lightning.models
import unsc_lightning.models.paper
import unsc_lightning.module  # noqa: F401
from unsc_lightning.errors import UnlearningConfigError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = (*LIGHTNING_COMMANDS, "demo", "bench", "audit", "export")

USAGE = f"usage: unsc-lightning {{{','.join(COMMANDS)}}} [options]\n"
HELP = (
    USAGE
    + """
Machine unlearning with UNSC (Machine Unlearning via Null Space Calibration, IJCAI 2024).

commands:
  fit, validate, test, predict   LightningCLI subcommands; e.g.
                                   unsc-lightning fit --config configs/mnist1d_original.yaml
                                   unsc-lightning fit --config configs/mnist1d_unsc.yaml
                                 `unsc-lightning fit --help` lists every option.
  demo                           original vs retrain vs UNSC on an embedded data set, offline
  bench                          UNSC vs baselines (FT, RL, GA, SalUn, SCRUB, Fisher, ...) over
                                 seeds; --scenario sequential for successive requests
  audit                          per-example privacy of sample-wise forgetting: N retrained and
                                 N unlearned models, per-example epsilon, forgetting quality, U-LiRA
  export --ckpt C --out F        the unlearned network of checkpoint C alone (plain state_dict,
                                 no frozen original) to F, with F.sha256; never overwrites
"""
)


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory, and log it to W&B.

    The run directory is ``trainer.log_dir`` (the first logger's directory, so keep a
    CSV/TensorBoard logger first when adding a W&B one), or ``trainer.default_root_dir`` when the
    first logger keeps no local directory. As in Lightning, an existing ``config.yaml`` is never
    overwritten (the run fails in ``setup`` instead): give a new run a new logger ``version``.
    Nothing is saved under ``fast_dev_run``, which suppresses logging and checkpointing. Every
    :class:`~lightning.pytorch.loggers.WandbLogger` also receives the resolved config as the
    ``cli_config`` hyperparameter and :func:`~unsc_lightning.reporting.run_environment` (world
    size, devices, precision, effective batch) as ``run``.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or getattr(trainer, "fast_dev_run", False):
            return
        if self.save_to_log_dir:
            directory = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: all ranks
            config_path = os.path.join(directory, self.config_filename)
            fs = get_filesystem(directory)
            exists = fs.isfile(config_path) if trainer.is_global_zero else False
            if trainer.strategy.broadcast(exists) and not self.overwrite:
                raise RuntimeError(
                    f"{config_path} exists: a previous run was saved in {directory}. Give this run its "
                    "own directory (e.g. `--trainer.logger.init_args.version=NAME`) or delete the old one."
                )
            if trainer.is_global_zero:
                fs.makedirs(directory, exist_ok=True)
                self.parser.save(
                    self.config,
                    config_path,
                    skip_none=False,
                    overwrite=self.overwrite,
                    multifile=self.multifile,
                )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not wandb_loggers:
            return
        from unsc_lightning.reporting import run_environment

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        environment = run_environment(trainer)  # world size, devices, precision, batch
        for logger in wandb_loggers:
            logger.log_hyperparams({"cli_config": config, "run": environment})


class UnlearningCLI(LightningCLI):
    """LightningCLI for unlearning experiments: original, retrain and UNSC runs from one YAML each.

    Model and data are given in subclass mode (``model: {class_path: ..., init_args: ...}``), so
    :class:`~unsc_lightning.ClassifierModule`, :class:`~unsc_lightning.UnlearningModule`, any
    other LightningModule, and every data module of the package (or yours) can be used; the
    callback :class:`~unsc_lightning.NullSpaceCalibration` is configured like any Lightning
    callback under ``trainer.callbacks``. The resolved config is saved next to each run by
    :class:`RunConfigSaver`.

    Example:
        >>> cli = UnlearningCLI(args=["--config", "configs/mnist1d_unsc.yaml"], run=False)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", "unsc-lightning")
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, test the checkpoint kept by ModelCheckpoint (its best, or its last "
            "when it has no monitor) in the same run, logging test/* metrics next to the training "
            "curves. Ignored by the other subcommands.",
        )

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", False):
            return
        checkpoint = self.trainer.checkpoint_callback
        has_kept = checkpoint is not None and bool(getattr(checkpoint, "best_model_path", ""))
        ckpt_path = (
            "best" if has_kept and not getattr(self.trainer, "fast_dev_run", False) else None
        )
        if ckpt_path is None:
            rank_zero_info("test_after_fit: no checkpoint was kept; testing the weights in memory.")
        # verbose=False: Lightning prints one table per evaluation dataloader, each repeating the
        # epoch-level metrics; `after_test` prints them once instead
        self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False
        )
        self.after_test()

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            parser.set_defaults(
                verbose=False
            )  # the compact table of `after_*` replaces Lightning's
        return parser

    def after_validate(self) -> None:
        print_summary(self.trainer, "val")

    def after_test(self) -> None:
        print_summary(self.trainer, "test")


def print_summary(trainer: L.Trainer, stage: str) -> None:
    """One compact table of the run's results (see :func:`unsc_lightning.evaluation.summary_rows`)."""
    from rich.console import Console
    from rich.table import Table

    from unsc_lightning.evaluation import summary_rows

    metrics: dict[str, Any] = dict(trainer.callback_metrics)
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        # the fit's logit drift, measured once at its end (test resets the logged metrics)
        drift = getattr(callback, "model_drift", None)
        if isinstance(callback, unsc_lightning.callback.NullSpaceCalibration) and drift is not None:
            metrics.setdefault("nullspace_drift/model", drift)
    rows = summary_rows(metrics, stage)
    if not rows or not trainer.is_global_zero:
        return
    table = Table(title=f"unlearning results ({stage})")
    for column in ("metric", "key", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for label, key, value in rows:
        table.add_row(label, key, f"{value:.4f}")
    Console().print(table)


def run_lightning(args: list[str] | None = None) -> UnlearningCLI:
    """Run a LightningCLI subcommand; ``args`` starts with it (``None``: ``sys.argv[1:]``)."""
    return UnlearningCLI(args=args)


def configuration_error(error: BaseException) -> UnlearningConfigError | None:
    """The :class:`UnlearningConfigError` that ``error`` is or was caused by, if any."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UnlearningConfigError):
            return current
        pending.extend([current.__cause__, current.__context__])
    return None


def export_main(argv: list[str]) -> int:
    """``unsc-lightning export --ckpt run.ckpt --out unlearned.pt``: see :mod:`unsc_lightning.export`."""
    import argparse

    from unsc_lightning.errors import UnlearningConfigError
    from unsc_lightning.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="unsc-lightning export",
        description="Write the unlearned network of a checkpoint alone (a plain state_dict, "
        "without the frozen original model) and its SHA-256; an existing file is never overwritten.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of an unlearning run")
    parser.add_argument("--out", required=True, help="new file for the state_dict")
    parser.add_argument(
        "--prefix", default="model.", help="key prefix of the network in the checkpoint"
    )
    args = parser.parse_args(argv)
    try:
        exported = export_checkpoint(args.ckpt, args.out, prefix=args.prefix)
    except UnlearningConfigError as error:
        sys.stderr.write(f"unsc-lightning export: error: {error}\n")
        return 2
    sys.stdout.write(f"{exported.sha256}  {exported.path}\nwrote {exported.sha256_path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``unsc-lightning <command> ...`` (``argv`` defaults to ``sys.argv[1:]``)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from unsc_lightning.lab.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "bench":
        from unsc_lightning.lab.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "audit":
        from unsc_lightning.lab.audit import main as audit_main

        return audit_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if argv and argv[0] in LIGHTNING_COMMANDS:
        try:
            run_lightning(None if from_command_line else argv)
        except Exception as error:
            cause = configuration_error(error)
            if cause is None:
                raise
            # the traceback for context, then our message as the last line (jsonargparse ends
            # its own with "Does not validate against any of the Union subtypes" and the value)
            traceback.print_exception(error)
            sys.stderr.write(f"\nunsc-lightning {argv[0]}: error: {cause}\n")
            return 2
        return 0
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(HELP)
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
