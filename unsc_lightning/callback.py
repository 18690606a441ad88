"""`NullSpaceCalibration`: the UNSC null-space constraint as a Lightning callback (wiring only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from unsc_lightning import covariance_cache
from unsc_lightning.arguments import check_selection, validate_callback_arguments
from unsc_lightning.diagnostics import log_bases, model_evidence, start_layer_drift
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics.drift import NullSpaceDrift
from unsc_lightning.modes import choose_mode, gradient_mode_warnings
from unsc_lightning.nullspace import BasisInfo, GramOptions
from unsc_lightning.nullspace.engine import (
    BasisRule,
    BatchAdapter,
    NullSpaceEngine,
    NullSpaceEngineError,
    default_batch_adapter,
)
from unsc_lightning.nullspace.settings import check_gram
from unsc_lightning.retain import (
    RankShare,
    RetainForward,
    RowGather,
    ShapeRecorder,
    check_input_shape,
    find_retain_loader,
)

ProjectionMode = Literal["auto", "gradient", "update"]
_SUPPORTED = (SingleDeviceStrategy, DDPStrategy)


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
    no-grad pass over remaining data (DDP ranks read every ``world_size``-th batch and the sums
    are all-reduced), projection in ``on_before_optimizer_step`` (gradients accumulated, unscaled,
    all-reduced, not yet clipped) or right after each step in ``"update"`` mode. Sharded
    strategies are rejected. Checkpoints keep the bases with a fingerprint of the model, settings
    and forget request; a resumed fit reuses them and refuses a state built for anything else.

    Args:
        threshold, rule, class_threshold_step, layers, exclude_layers, freeze_bias_and_norm,
            freeze_unconstrained, norm_eval, max_samples_per_class, memory_budget, gram: as in
            :class:`~unsc_lightning.nullspace.NullSpaceEngine` (``layers`` and
            ``exclude_layers`` also take a single pattern string; ``layers=[]`` constrains
            nothing and leaves training unchanged).
        retain_dataloader: remaining data; defaults to the DataModule's ``retain_dataloader()``.
        max_retain_batches: use at most this many retain batches (``None`` = all).
        mode: ``"gradient"`` (exact for SGD with or without momentum, no weight decay),
            ``"update"`` (projects each step's weight change: exact for any optimizer) or
            ``"auto"`` (``"gradient"`` for plain SGD without weight decay, else ``"update"``).
        log_drift: log per-layer drift, the model's logit drift and the share of changed
            predictions on a remaining probe, and its accuracy change when the retain batches
            have class labels (warning when that accuracy fell, or without labels when
            predictions changed).
        drift_every_n_steps: also log the per-layer drift every N steps (0 = only at the end).
        covariance_cache: file of per-class covariances serving later class-wise requests
            without reading data (see :mod:`unsc_lightning.covariance_cache`).
        remaining_classes: classes that remain, for ``covariance_cache``.
        keep_forgotten_statistics: keep the forgotten classes' covariances in
            ``covariance_cache`` after a request (so that a later request from the *same
            original* that keeps them reads no data). Default ``False``: the forgotten data are
            never read into the cache, and statistics of classes this request forgets that an
            earlier request left in the file are zeroed before it is written back.
        batch_adapter: ``batch -> (inputs, labels)`` for retain batches other than ``x``,
            ``(x, y, ...)`` or a dict with ``labels`` (see
            :func:`~unsc_lightning.nullspace.engine.default_batch_adapter`).
        project_every: amortised update projection (implies ``mode="update"``): the optimizer
            steps freely and every ``K`` optimizer steps, before validation, in every checkpoint
            and at the end of the fit (also after an exception) each constrained weight becomes
            ``W₀ + (W - W₀)(I - U Uᵀ)``, ``W₀`` the weight at fit start; SGD momentum is
            projected too. ``K`` times less projection work, but the weights between two
            projections are not exact (the forget accuracy ``UnlearningModule`` stops on is
            read from them) and it forgets less per epoch. ``None`` (default) projects each step.
            ``UnlearningModule``'s relative steps (``lr=None``) project each gradient anyway,
            to size the step that remains, so there it saves nothing.

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
        keep_forgotten_statistics: bool = False,
        project_every: int | None = None,
        gram: GramOptions | str | torch.dtype | None = "auto",
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
        self.keep_forgotten_statistics = keep_forgotten_statistics
        self.batch_adapter: BatchAdapter = batch_adapter or default_batch_adapter
        self.memory_budget = memory_budget
        self.project_every: int | None = project_every
        self.gram = gram
        # runtime state
        self.engine: NullSpaceEngine | None = None
        self.active_mode: Literal["gradient", "update"] | None = None
        self.retain_input_shape: tuple[int, ...] | None = None
        self.drift: dict[str, float] = {}
        self.model_drift: float | None = None
        self.prediction_change: float | None = None
        #: accuracy on the remaining probe at the fit end minus when the bases were built
        #: (``None`` when the probe has no class labels)
        self.probe_accuracy_change: float | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._drift_meter: NullSpaceDrift | None = None
        self._check_shape = False

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
        self._check_remaining_classes(pl_module)
        engine = self._make_engine(pl_module)
        _refuse_compiled(pl_module, list(engine.accounting.layers.values()))
        self.engine = engine
        self.engine.freeze_()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self._engine()
        half = sorted(
            {
                str(c.parameter.dtype).removeprefix("torch.")
                for c in engine.accounting.constraints.values()
                if c.parameter.dtype in (torch.bfloat16, torch.float16)
            }
        )
        if half:
            rank_zero_warn(
                f"NullSpaceCalibration: the constrained weights are stored in {', '.join(half)} "
                f"(precision={trainer.precision!r}): every optimizer step rounds them to that "
                "precision, which moves the remaining outputs however exact the projection is. "
                "Keep float32 weights (e.g. precision='bf16-mixed') for the null-space guarantee."
            )
        if engine.accounting.constraints:
            if self._loaded_state is not None:
                self._restore(self._loaded_state)
                self._loaded_state = None
            else:
                self._build(trainer, pl_module)
            engine.make_projectors()
        self._check_shape = self.retain_input_shape is not None
        self.active_mode = choose_mode(self.mode, trainer.optimizers, self.project_every)
        if self.active_mode == "gradient" and engine.accounting.constraints:
            clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
            for message in gradient_mode_warnings(trainer.optimizers, *clip):
                rank_zero_warn(message)
        if self.active_mode == "update":
            every = self.project_every or 1
            for optimizer in trainer.optimizers:
                engine.attach(optimizer, every, project_state=every > 1)
        # Lightning warns about every module in eval mode at the start of training (after the
        # sanity check): the normalisation layers are ours to keep in eval, so they wait in
        # train mode until `on_train_start` (no training forward runs before it)
        engine.lift_norm_eval()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._engine().keep_norm_eval()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._check_shape and self.retain_input_shape is not None:
            self._check_shape = False
            check_input_shape(self.batch_adapter, batch, self.retain_input_shape)
        self._engine().keep_norm_eval()  # Lightning switches the model to train every epoch

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.active_mode == "gradient":
            self._engine().project_step_()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        every = self.drift_every_n_steps
        if self._drift_meter is not None and every and trainer.global_step % every == 0:
            values = self._drift_meter.compute()
            pl_module.log_dict({f"nullspace_drift/{name}": value for name, value in values.items()})

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.engine is not None:
            self.engine.project_weights_(pending_only=True)  # `project_every`

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning moves the model back to the CPU in `on_fit_end`
        if self.engine is not None:
            self.engine.project_weights_(pending_only=True)
        metrics: dict[str, float] = {}
        if self._drift_meter is not None and self._drift_meter.layer_names:
            self.drift = self._drift_meter.compute()
            metrics.update({f"nullspace_drift/{k}": v for k, v in self.drift.items()})
        self._drift_meter = None
        if self.log_drift and self.engine is not None:
            evidence = model_evidence(self.engine, pl_module)
            self.model_drift = evidence.get("nullspace_drift/model")
            self.prediction_change = evidence.get("nullspace_drift/model_predictions")
            self.probe_accuracy_change = evidence.get("nullspace_drift/probe_accuracy_change")
            metrics.update(evidence)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()  # idempotent; also after a failed or interrupted fit

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException
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
                gram=check_gram(self.gram),
            )
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        check_selection(
            engine.accounting,
            type(pl_module).__name__,
            self.layers,
            self.exclude_layers,
            self.threshold,
            self.freeze_unconstrained,
        )
        return engine

    def _build(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        engine = self._engine()
        forward = RetainForward(pl_module)
        if self.covariance_cache is not None and covariance_cache.serve(self, trainer, pl_module):
            return
        loader = find_retain_loader(self.retain_dataloader, trainer)
        batches = ShapeRecorder(
            RankShare(loader, trainer, self.max_retain_batches), self.batch_adapter
        )
        reduce, gather, process = None, None, None
        if trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            gather = RowGather(trainer)
            process = (trainer.global_rank, trainer.world_size)
        try:
            with trainer.precision_plugin.forward_context():
                device = pl_module.device
                engine.build(batches, forward, reduce, self.batch_adapter, device, gather, process)
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        self.retain_input_shape = batches.shape
        if trainer.world_size > 1:  # rank 0 always holds the first retain batch
            self.retain_input_shape = trainer.strategy.broadcast(self.retain_input_shape)
        if self.log_drift:
            self._drift_meter = start_layer_drift(engine, pl_module)
        log_bases(engine, trainer, self.rule)

    def _restore(self, state: Mapping[str, Any]) -> None:
        try:
            self._engine().load_state_dict(state, self._request())
        except NullSpaceEngineError as error:
            raise UnlearningConfigError(str(error)) from error
        shape = state.get("retain_input_shape")
        self.retain_input_shape = None if shape is None else tuple(shape)
        rank_zero_info(
            "NullSpaceCalibration: reusing the bases stored in the checkpoint (no pass over the data)."
        )

    def _check_remaining_classes(self, pl_module: L.LightningModule) -> None:
        """Refuse `remaining_classes` that include a class the module or DataModule forgets."""
        if self.remaining_classes is None:
            return
        datamodule = getattr(getattr(pl_module, "_trainer", None), "datamodule", None)
        for owner, forgotten in _forgotten_by_owner(pl_module, datamodule):
            overlap = sorted(set(self.remaining_classes) & set(forgotten))
            if overlap:
                raise UnlearningConfigError(
                    f"Expected `remaining_classes` without the forgotten classes, got "
                    f"{self.remaining_classes}: {overlap} are forgotten by the {owner} "
                    f"(`forget_classes={sorted(forgotten)}`). Drop them, or leave "
                    "`remaining_classes=None` to derive them from `forget_classes`."
                )

    def _request(self) -> dict[str, Any]:
        # what the bases were built from, beyond the settings: the forget request
        model = self.engine.model if self.engine is not None else None
        owners = [model, getattr(getattr(model, "_trainer", None), "datamodule", None)]
        forget = next((getattr(o, "forget_classes", None) for o in owners if o is not None), None)
        return {
            "max_retain_batches": self.max_retain_batches,
            "forget_classes": None if forget is None else sorted(int(k) for k in forget),
            "remaining_classes": self.remaining_classes,
        }

    def _release(self) -> None:
        self._drift_meter = None
        if self.engine is not None:
            self.engine.release_()


def _forgotten_by_owner(
    pl_module: L.LightningModule, datamodule: Any
) -> list[tuple[str, list[int]]]:
    """``(owner, forget_classes)`` of the LightningModule and DataModule that declare any."""
    owners = [(type(pl_module).__name__, pl_module)]
    if datamodule is not None:
        owners.append((type(datamodule).__name__, datamodule))
    found = []
    for name, owner in owners:
        forgotten = getattr(owner, "forget_classes", None)
        if forgotten:
            found.append((name, [int(k) for k in forgotten]))
    return found


def _refuse_compiled(pl_module: L.LightningModule, layers: list[Any]) -> None:
    """A clear error for ``torch.compile``: forward hooks registered on the layers of a compiled
    graph after compilation do not fire, so the basis pass (and the drift probe, the covariance
    cache) would find layers that "received no input" -- or read them once and never again.
    Compiled parts without a constrained layer (``layers``) are left alone."""
    constrained = {id(layer) for layer in layers}
    compiled = [
        f"`{name}`"
        for name, module in pl_module.named_modules()
        if type(module).__name__ == "OptimizedModule"
        and hasattr(module, "_orig_mod")
        and any(id(inner) in constrained for inner in module.modules())
    ]
    if getattr(pl_module, "_compiler_ctx", None):  # Trainer.fit(torch.compile(pl_module))
        compiled.insert(0, f"the {type(pl_module).__name__} itself")
    if compiled:
        raise UnlearningConfigError(
            f"`NullSpaceCalibration` cannot record layer inputs inside `torch.compile`d modules "
            f"({', '.join(compiled)}): forward hooks added after compilation do not run in the "
            "compiled graph. Unlearn the uncompiled model (pass it, not `torch.compile(model)`, "
            "to your LightningModule and to `Trainer.fit`) and compile the result afterwards."
        )
