"""`NullSpaceCalibration`: the UNSC null-space constraint as a Lightning callback (wiring only)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from unsc_lightning import covariance_cache
from unsc_lightning.arguments import validate_callback_arguments
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics.drift import NullSpaceDrift
from unsc_lightning.nullspace import BasisInfo
from unsc_lightning.nullspace.engine import (
    BasisRule,
    BatchAdapter,
    NullSpaceEngine,
    NullSpaceEngineError,
    default_batch_adapter,
)

ProjectionMode = Literal["auto", "gradient", "update"]
_SUPPORTED = (SingleDeviceStrategy, DDPStrategy)
#: Share of a remaining probe whose predicted class changed above which the fit end warns.
PREDICTION_CHANGE_WARNING = 0.01


class NullSpaceCalibration(Callback):
    r"""Keep every weight update in the null space of the remaining data (UNSC).

    For each constrained weight ``W_l`` with remaining-subspace basis ``U_l`` the update uses

    .. math:: G_l \leftarrow G_l - (G_l U_l) U_l^\top

    so ``ΔW_l x = 0`` for every remaining input ``x`` (Chen, Zhu, Yu, Zhou, *Machine Unlearning
    via Null Space Calibration*, IJCAI 2024, Theorem 1). Every other trainable parameter (biases,
    normalisation affine parameters, raw parameters such as class tokens and position
    embeddings, weights of unsupported layers) is frozen for the fit and restored afterwards, so
    the model's outputs on remaining data are unchanged up to the discarded energy.

    The work is done by :class:`~unsc_lightning.nullspace.NullSpaceEngine` (usable from any
    training loop); this callback wires it to the Trainer: bases in ``on_fit_start`` from one
    no-grad pass over remaining data (each DDP rank reads every ``world_size``-th batch and the
    covariances are all-reduced), projection in ``on_before_optimizer_step`` (gradients already
    accumulated, unscaled and all-reduced, not yet clipped) or, in ``"update"`` mode, right after
    each optimizer step. Sharded strategies (FSDP, DeepSpeed) are rejected in ``setup``. The
    bases and a fingerprint of the model, settings and forget request are saved in checkpoints;
    a resumed fit reuses them and refuses a state built for anything else.

    Args:
        threshold: energy fraction in ``(0, 1]`` kept in each basis, or ``pattern -> fraction``.
        rule: ``"per_class"`` (the paper's Algorithm 1; classes come from the labels seen,
            unlabelled retain data fall back to ``"pooled"``) or ``"pooled"``.
        class_threshold_step: per-class schedule ``threshold + step * k`` (authors: 0.003).
        retain_dataloader: remaining data; defaults to the DataModule's ``retain_dataloader()``.
        layers: ``fnmatch`` patterns of layer names to constrain (``None`` = all supported;
            ``[]`` = none, the callback then changes nothing); a single string is one pattern.
        exclude_layers: patterns of layer names to leave unconstrained (their parameters train freely).
        freeze_bias_and_norm: freeze biases and normalisation parameters during the fit.
        freeze_unconstrained: freeze every other parameter no basis constrains (default on; a
            warning names them). ``False`` leaves them free, with a warning that remaining
            outputs can then move.
        norm_eval: keep normalisation layers in eval mode (running statistics unchanged).
        max_retain_batches: use at most this many retain batches (``None`` = all).
        max_samples_per_class: use at most this many samples per class for the bases.
        mode: ``"gradient"`` (exact for SGD with or without momentum, no weight decay),
            ``"update"`` (projects each step's weight change: exact for any optimizer) or
            ``"auto"`` (``"gradient"`` for plain SGD without weight decay, else ``"update"``).
        log_drift: log per-layer drift and the model's logit drift on a remaining probe.
        drift_every_n_steps: also log the per-layer drift every N steps (0 = only at the end).
        covariance_cache: file of per-class covariances serving later class-wise requests
            without reading data (see :mod:`unsc_lightning.covariance_cache`).
        remaining_classes: classes that remain, for ``covariance_cache``.
        batch_adapter: ``batch -> (inputs, labels)`` for retain batches that are not ``x``,
            ``(x, y, ...)`` or a dict with ``labels``; inputs may be a tensor, a tuple
            (``model(*x)``) or a dict (``model(**x)``).
        memory_budget: bytes the covariance sums may take (``None`` = half the free memory of
            the device); classes that do not fit cost extra passes over the data, not memory.

    Raises:
        UnlearningConfigError: for invalid arguments (at construction) or an unusable model or
            strategy (in ``setup``).

    Example:
        >>> import lightning.pytorch as L
        >>> from unsc_lightning import NullSpaceCalibration
        >>> callback = NullSpaceCalibration(threshold=0.97)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        threshold: float | dict[str, float] = 0.97,
        rule: BasisRule = "per_class",
        class_threshold_step: float = 0.0,
        retain_dataloader: Any = None,
        layers: list[str] | str | None = None,
        exclude_layers: list[str] | str | None = None,
        freeze_bias_and_norm: bool = True,
        freeze_unconstrained: bool = True,
        norm_eval: bool = True,
        max_retain_batches: int | None = None,
        max_samples_per_class: int | None = None,
        mode: ProjectionMode = "auto",
        log_drift: bool = True,
        drift_every_n_steps: int = 0,
        covariance_cache: str | None = None,
        remaining_classes: list[int] | None = None,
        batch_adapter: BatchAdapter | None = None,
        memory_budget: int | None = None,
    ) -> None:
        arguments = validate_callback_arguments(locals())
        self.threshold: float | dict[str, float] = arguments["threshold"]
        self.rule: BasisRule = rule
        self.class_threshold_step = float(class_threshold_step)
        self.retain_dataloader = retain_dataloader
        self.layers: list[str] | None = arguments["layers"]
        self.exclude_layers: list[str] = arguments["exclude_layers"] or []
        self.freeze_bias_and_norm = freeze_bias_and_norm
        self.freeze_unconstrained = freeze_unconstrained
        self.norm_eval = norm_eval
        self.max_retain_batches = max_retain_batches
        self.max_samples_per_class = max_samples_per_class
        self.mode: ProjectionMode = mode
        self.log_drift = log_drift
        self.drift_every_n_steps = int(drift_every_n_steps)
        self.covariance_cache = None if covariance_cache is None else str(covariance_cache)
        self.remaining_classes = arguments["remaining_classes"]
        self.batch_adapter: BatchAdapter = batch_adapter or default_batch_adapter
        self.memory_budget = memory_budget
        # runtime state
        self.engine: NullSpaceEngine | None = None
        self.active_mode: Literal["gradient", "update"] | None = None
        self.retain_input_shape: tuple[int, ...] | None = None
        self.drift: dict[str, float] = {}
        self.model_drift: float | None = None
        self.prediction_change: float | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._drift_meter: NullSpaceDrift | None = None
        self._check_shape = False
        self._forget_accuracy: list[float] = []

    # -- public state -------------------------------------------------------------------------
    @property
    def bases(self) -> Mapping[str, Tensor]:
        """Read-only mapping ``basis key -> U`` (CPU float32, ``d x r``); keys are layer names."""
        return self.engine.bases if self.engine is not None else {}

    @property
    def layer_infos(self) -> dict[str, BasisInfo]:
        return self.engine.layer_infos if self.engine is not None else {}

    @property
    def retain_samples(self) -> int:
        report = None if self.engine is None else self.engine.report
        return 0 if report is None else report.samples

    # -- hooks --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, _SUPPORTED):
            raise UnlearningConfigError(
                f"`NullSpaceCalibration` does not support the strategy "
                f"`{type(trainer.strategy).__name__}`: sharded parameters (FSDP, DeepSpeed) cannot "
                "be projected per layer. Use one of SingleDeviceStrategy, DDPStrategy (or a subclass; "
                "e.g. `strategy='ddp'`, 'ddp_spawn' or 'ddp_fork')."
            )
        self.engine = self._make_engine(pl_module)
        self.engine.freeze_()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self._engine()
        if engine.accounting.constraints:
            if self._loaded_state is not None:
                self._restore(trainer, pl_module, self._loaded_state)
                self._loaded_state = None
            else:
                self._build(trainer, pl_module)
            engine.make_projectors()
        self._check_shape = self.retain_input_shape is not None
        self.active_mode = self._choose_mode(trainer)
        self._warn_unexact_optimizer(trainer)
        if self.active_mode == "update":
            for optimizer in trainer.optimizers:
                engine.attach(optimizer)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._check_shape:
            self._check_shape = False
            self._compare_input_shape(batch)
        self._engine().keep_norm_eval()  # Lightning switches the model to train every epoch

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.active_mode == "gradient":
            self._engine().project_gradients_()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        every = self.drift_every_n_steps
        if self._drift_meter is not None and every and trainer.global_step % every == 0:
            values = self._drift_meter.compute()
            pl_module.log_dict({f"nullspace_drift/{name}": value for name, value in values.items()})

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning moves the model back to the CPU in `on_fit_end`
        metrics: dict[str, float] = {}
        if self._drift_meter is not None and self._drift_meter.layer_names:
            self.drift = self._drift_meter.compute()
            metrics.update({f"nullspace_drift/{k}": v for k, v in self.drift.items()})
        self._drift_meter = None
        if self.log_drift and self.engine is not None:
            self.model_drift = self.engine.output_drift(pl_module)
            self.prediction_change = self.engine.prediction_change(pl_module)
        if self.model_drift is not None and self.prediction_change is not None:
            metrics["nullspace_drift/model"] = self.model_drift
            metrics["nullspace_drift/model_predictions"] = self.prediction_change
            if self.prediction_change > PREDICTION_CHANGE_WARNING:
                rank_zero_warn(
                    f"NullSpaceCalibration: the model's predictions on remaining data changed for "
                    f"{self.prediction_change:.1%} of a probe of remaining samples during unlearning "
                    f"(logits moved by {self.model_drift:.1%}, relative): remaining accuracy may have "
                    "changed. Check `engine.free_parameters`, a higher `threshold`, or "
                    "`mode='update'` for optimizers with weight decay."
                )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None or not self.engine.bases:
            return {}
        state = self.engine.state_dict(self._request())
        state["retain_samples"] = self.retain_samples
        state["retain_input_shape"] = self.retain_input_shape
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict) if state_dict else None

    # -- engine ---------------------------------------------------------------------------------
    def _engine(self) -> NullSpaceEngine:
        if self.engine is None:
            raise RuntimeError("NullSpaceCalibration was not set up: use it inside `Trainer.fit`.")
        return self.engine

    def _make_engine(self, pl_module: L.LightningModule) -> NullSpaceEngine:
        try:
            engine = NullSpaceEngine(
                pl_module,
                threshold=self.threshold,
                rule=self.rule,
                class_threshold_step=self.class_threshold_step,
                layers=self.layers,
                exclude_layers=self.exclude_layers,
                freeze_bias_and_norm=self.freeze_bias_and_norm,
                freeze_unconstrained=self.freeze_unconstrained,
                norm_eval=self.norm_eval,
                max_samples_per_class=self.max_samples_per_class,
                memory_budget=self.memory_budget,
            )
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        _check_selection(engine, pl_module, self)
        return engine

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self._engine()
        if type(pl_module).forward is L.LightningModule.forward:
            raise UnlearningConfigError(
                f"{type(pl_module).__name__} does not define `forward`; NullSpaceCalibration runs "
                "remaining data through `pl_module(x)`. Add `def forward(self, x): return self.model(x)`."
            )
        if self.covariance_cache is not None and covariance_cache.serve(self, trainer, pl_module):
            return
        batches = _RankShare(self._retain_loader(trainer), trainer, self.max_retain_batches)
        reduce = None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        try:
            with trainer.precision_plugin.forward_context():
                engine.build(
                    _Shapes(batches, self),
                    forward=_RetainForward(pl_module),
                    reduce=reduce,
                    batch_adapter=self.batch_adapter,
                    device=pl_module.device,
                )
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        if trainer.world_size > 1:  # rank 0 always holds the first retain batch
            self.retain_input_shape = trainer.strategy.broadcast(self.retain_input_shape)
        self._start_drift(pl_module)
        self._report(trainer)

    def _restore(
        self, trainer: L.Trainer, pl_module: L.LightningModule, state: Mapping[str, Any]
    ) -> None:
        try:
            self._engine().load_state_dict(state, self._request())
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        shape = state.get("retain_input_shape")
        self.retain_input_shape = None if shape is None else tuple(shape)
        rank_zero_info(
            "NullSpaceCalibration: reusing the bases stored in the checkpoint (no pass over the data)."
        )

    def _request(self) -> dict[str, Any]:
        # what the bases were built from, beyond the settings: the forget request
        trainer = getattr(self.engine.model, "_trainer", None) if self.engine else None
        owners = [self.engine.model if self.engine else None, getattr(trainer, "datamodule", None)]
        forget = next((getattr(o, "forget_classes", None) for o in owners if o is not None), None)
        return {
            "max_retain_batches": self.max_retain_batches,
            "forget_classes": None if forget is None else sorted(int(k) for k in forget),
            "remaining_classes": self.remaining_classes,
        }

    def _retain_loader(self, trainer: L.Trainer) -> Any:
        if self.retain_dataloader is not None:
            return self.retain_dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "retain_dataloader", None)):
            return datamodule.retain_dataloader()
        raise UnlearningConfigError(
            "NullSpaceCalibration needs remaining (retain) data to build its bases: pass "
            "`retain_dataloader=` to the callback or give your DataModule a `retain_dataloader()` method."
        )

    def _start_drift(self, pl_module: L.LightningModule) -> None:
        engine = self._engine()
        probe = engine.probe
        layers = {
            key: layer
            for key, layer in engine.accounting.layers.items()
            if type(layer) in _DRIFT_LAYERS and len(engine.accounting.constraints[key].sites) == 1
        }
        if not self.log_drift or not isinstance(probe, Tensor) or not layers:
            return
        was_training = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            self._drift_meter = NullSpaceDrift.from_probe(pl_module, layers, probe)
        finally:
            for module, training in was_training.items():
                module.train(training)

    def _report(self, trainer: L.Trainer) -> None:
        engine = self._engine()
        lines = [
            f"{name}: rank {i.rank}/{i.dim}, energy {i.energy:.4f}"
            for name, i in engine.layer_infos.items()
        ]
        report = engine.report
        passes = "" if report is None or report.passes <= 1 else f", {report.passes} passes"
        rank_zero_info(
            f"NullSpaceCalibration: bases from {self.retain_samples} remaining samples "
            f"(rule={self.rule}{passes}):\n  " + "\n  ".join(lines)
        )
        metrics: dict[str, float] = {}
        for name, info in engine.layer_infos.items():
            metrics[f"nullspace/{name}/rank"] = info.rank
            metrics[f"nullspace/{name}/dim"] = info.dim
            metrics[f"nullspace/{name}/energy"] = info.energy
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    def _compare_input_shape(self, batch: Any) -> None:
        try:
            inputs, _ = self.batch_adapter(batch)
        except Exception:
            return  # the training batches may have another layout than the retain batches
        if isinstance(inputs, Tensor) and tuple(inputs.shape[1:]) != self.retain_input_shape:
            raise UnlearningConfigError(
                f"The remaining (retain) data have per-sample input shape {self.retain_input_shape} but "
                f"the training batches have {tuple(inputs.shape[1:])}: the bases were built from inputs "
                "other than those the model is trained on. Pass a `retain_dataloader` (or give the "
                "DataModule a `retain_dataloader()`) that yields inputs like the training data's."
            )

    # -- projection modes -----------------------------------------------------------------------
    def _choose_mode(self, trainer: L.Trainer) -> Literal["gradient", "update"]:
        if self.mode != "auto":
            return self.mode
        chosen: Literal["gradient", "update"] = (
            "gradient" if all(_plain_sgd(opt) for opt in trainer.optimizers) else "update"
        )
        names = ", ".join(type(opt).__name__ for opt in trainer.optimizers) or "none"
        rank_zero_info(
            f"NullSpaceCalibration: mode='auto' chose {chosen!r} projection for optimizers [{names}]."
        )
        return chosen

    def _warn_unexact_optimizer(self, trainer: L.Trainer) -> None:
        if self.active_mode != "gradient" or not self._engine().accounting.constraints:
            return
        # clipping runs after the projection: a norm clip only rescales the projected gradient,
        # an element-wise clip moves it out of the null space
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            rank_zero_warn(
                "NullSpaceCalibration: `gradient_clip_algorithm='value'` clips projected gradients "
                "element-wise, which moves them out of the null space, so remaining outputs can change. "
                "Use `mode='update'` (projects each step's weight change after clipping) or clip by "
                "norm (`gradient_clip_algorithm='norm'`)."
            )
        unexact = [type(o).__name__ for o in trainer.optimizers if not _gradient_exact(o)]
        if unexact:
            rank_zero_warn(
                f"NullSpaceCalibration: `mode='gradient'` is not exact for {unexact} (adaptive "
                "steps or weight decay move the update out of the null space), so remaining outputs "
                "can change. Use `mode='update'` or `mode='auto'`."
            )

    def _release(self) -> None:
        self._drift_meter = None
        if self.engine is not None:
            self.engine.release_()


_DRIFT_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


def _plain_sgd(optimizer: Any) -> bool:
    return type(optimizer) is torch.optim.SGD and all(
        g.get("weight_decay", 0) == 0 for g in optimizer.param_groups
    )


def _gradient_exact(optimizer: Any) -> bool:
    # SGD (momentum included) is linear in the gradients; anything else is checked by type
    return _plain_sgd(optimizer) or type(optimizer).__name__ in ("LBFGS",)


def _check_selection(
    engine: NullSpaceEngine, pl_module: L.LightningModule, callback: NullSpaceCalibration
) -> None:
    accounting = engine.accounting
    if accounting.unmatched_patterns:
        from unsc_lightning.nullspace.representation import supported_layer_types

        raise UnlearningConfigError(
            f"`layers` patterns {accounting.unmatched_patterns} match no supported layer with a "
            f"trainable weight in {type(pl_module).__name__}; supported layer types: "
            f"{supported_layer_types()}. Names come from `named_modules()`."
        )
    if callback.layers is None and not accounting.constraints and not callback.exclude_layers:
        raise UnlearningConfigError(
            f"{type(pl_module).__name__} has no supported layer with a trainable weight; there is "
            "nothing to constrain."
        )
    if not accounting.constraints:
        rank_zero_warn("NullSpaceCalibration: no layer selected; training is left unchanged.")
    if isinstance(callback.threshold, dict):
        from fnmatch import fnmatchcase

        missing = [
            key
            for key in accounting.constraints
            if not any(p == key or fnmatchcase(key, p) for p in callback.threshold)
        ]
        if missing:
            raise UnlearningConfigError(
                f"`threshold` mapping {callback.threshold} has no entry for layers {missing}; add "
                "them (patterns such as '*' are allowed)."
            )
    others = {n: r for n, r in accounting.frozen.items() if r not in ("bias", "norm")}
    if others and accounting.constraints:
        listing = ", ".join(f"`{n}` ({r})" for n, r in others.items())
        if callback.freeze_unconstrained:
            rank_zero_warn(
                "NullSpaceCalibration: these trainable parameters have no null-space basis and are "
                f"frozen during unlearning (restored afterwards): {listing}. Pass "
                "`freeze_unconstrained=False` to train them freely (remaining outputs can then move)."
            )
        else:
            rank_zero_warn(
                "NullSpaceCalibration: these trainable parameters are NOT constrained and their "
                f"updates can change remaining outputs: {listing}. Freeze them "
                "(`freeze_unconstrained=True`) or exclude them from the optimizer."
            )


class _RankShare:
    """The retain batches this rank reads: every ``world_size``-th, up to ``max_batches``."""

    def __init__(self, loader: Any, trainer: L.Trainer, max_batches: int | None) -> None:
        self.loader = loader
        self.rank, self.world = trainer.global_rank, trainer.world_size
        self.max_batches = max_batches

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            if index % self.world == self.rank:  # sums are all-reduced afterwards
                yield batch


class _Shapes:
    """Passes batches through and records the retain inputs' per-sample shape."""

    def __init__(self, batches: Iterable[Any], callback: NullSpaceCalibration) -> None:
        self.batches = batches
        self.callback = callback

    def __iter__(self) -> Iterator[Any]:
        shapes: set[tuple[int, ...]] = set()
        for batch in self.batches:
            inputs, _ = self.callback.batch_adapter(batch)
            if isinstance(inputs, Tensor):
                shapes.add(tuple(inputs.shape[1:]))
            yield batch
        # one per-sample shape: compared with the first training batch (variable shapes: no check)
        self.callback.retain_input_shape = next(iter(shapes)) if len(shapes) == 1 else None


class _RetainForward:
    """``pl_module(...)`` on retain inputs; a failure says the retain data could not be run."""

    def __init__(self, pl_module: L.LightningModule) -> None:
        self.pl_module = pl_module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.pl_module(*args, **kwargs)
        except (UnlearningConfigError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
            dtypes = [a.dtype for a in args if isinstance(a, Tensor)]
            shape = shapes[0] if len(shapes) == 1 else shapes
            dtype = dtypes[0] if len(dtypes) == 1 else dtypes
            raise RuntimeError(
                f"The remaining (retain) data could not be run through "
                f"`{type(self.pl_module).__name__}.forward` (a batch of inputs of shape "
                f"{shape}, {dtype}); check that the retain dataloader yields "
                f"inputs like the training data's. The error was {type(error).__name__}: {error}"
            ) from error
