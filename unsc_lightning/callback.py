"""`NullSpaceCalibration`: the UNSC null-space constraint as a Lightning callback (wiring only)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics.drift import NullSpaceDrift
from unsc_lightning.nullspace import (
    CovarianceAccumulator,
    NullSpaceProjector,
    accumulate_covariances,
    layer_dims,
)
from unsc_lightning.nullspace.basis import BasisInfo
from unsc_lightning.nullspace.cache import ClassCovarianceCache, model_fingerprint
from unsc_lightning.nullspace.layers import (
    NORM_LAYERS,
    BasisRule,
    build_bases,
    select_layers,
    supported_layer_types,
    threshold_for,
)

ProjectionMode = Literal["auto", "gradient", "update"]
# class names of the supported strategies ("ddp", "ddp_spawn" and "ddp_fork" are all DDPStrategy)
_UNSHARDED = ("SingleDeviceStrategy", "DDPStrategy")
_STATE_VERSION = 1
_PROBE_SAMPLES = 256


class NullSpaceCalibration(Callback):
    r"""Keep every weight update in the null space of the remaining data (UNSC).

    For each constrained layer ``l`` with remaining-subspace basis ``U_l`` the update uses

    .. math:: G_l \leftarrow G_l - (G_l U_l) U_l^\top

    so ``ΔW_l x = 0`` for every remaining input ``x`` and the model's outputs on remaining data
    are unchanged up to the discarded energy ``1 - threshold`` (Chen, Zhu, Yu, Zhou, *Machine
    Unlearning via Null Space Calibration*, IJCAI 2024, Theorem 1). Bases are built in
    ``on_fit_start`` from one no-grad pass over remaining data (model in eval mode, modes restored
    afterwards); projection runs in ``on_before_optimizer_step`` (gradients already accumulated,
    unscaled and all-reduced, not yet clipped) or, in ``"update"`` mode, right after the step.

    Strategies: single device and DDP (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``, ...): each
    rank accumulates the covariances of its share of the retain batches (batch ``i`` goes to rank
    ``i % world_size``) and the sums are all-reduced before the eigendecomposition, so every rank
    holds the same bases as one process on all the data. Sharded strategies (FSDP, DeepSpeed) are
    rejected in ``setup``: a layer's weight and gradient are not whole on any rank. Precision:
    any (e.g. ``"bf16-mixed"``); covariances are accumulated in float64 whatever the activation
    dtype. Gradient accumulation, norm clipping (applied after the projection: a rescaling keeps
    the gradient in the null space) and manual optimization (``optimizer.step()`` still calls
    ``on_before_optimizer_step``) keep the guarantee; clipping by value does not in
    ``"gradient"`` mode (a warning says so; use ``mode="update"``). The bases and a fingerprint
    of the model and settings are saved in checkpoints; a resumed fit reuses them without reading
    the retain data, and refuses a state built for another model or other settings. The retain
    inputs' per-sample shape is compared with the first training batch.

    Args:
        threshold: energy fraction in ``(0, 1]`` kept in each basis, or a mapping from layer name
            (``fnmatch`` patterns allowed) to threshold. ``1.0`` keeps every numerically
            non-zero direction.
        rule: ``"per_class"`` grows the basis class by class (the paper's Algorithm 1; retain
            batches must yield labels) or ``"pooled"`` uses one covariance of all remaining data.
        class_threshold_step: per-class schedule ``threshold + step * k``; the authors use
            ``threshold=0.97, class_threshold_step=0.003``.
        retain_dataloader: remaining data; defaults to the DataModule's ``retain_dataloader()``.
        layers: ``fnmatch`` patterns of layer names to constrain (``None`` = every supported
            layer with a trainable weight; ``[]`` = none, the callback then changes nothing).
        exclude_layers: patterns of layer names to leave unconstrained.
        freeze_bias_and_norm: freeze biases of constrained layers and normalisation parameters
            during the fit (restored afterwards) — a bias update would shift remaining outputs.
        norm_eval: keep normalisation layers in eval mode during the fit, so running statistics
            stay those of the original model.
        max_retain_batches: use at most this many retain batches (``None`` = all).
        mode: ``"gradient"`` projects gradients (exact for SGD with or without momentum, without
            weight decay), ``"update"`` projects each step's weight change (exact for any
            optimizer), ``"auto"`` picks ``"gradient"`` for plain SGD without weight decay and
            ``"update"`` otherwise, and logs which. Cost per optimizer step: both project each
            constrained weight once (``2·out·d·min(r, d - r)`` multiply-adds, never a dense
            ``d x d`` projector); ``"update"`` also keeps a copy of every constrained weight from
            before the step until after it (one weight-sized buffer per layer, freed after the
            step) and a few elementwise passes over those weights (measured in
            ``docs/performance.md``).
        covariance_cache: file of per-class covariances (see
            :class:`~unsc_lightning.nullspace.cache.ClassCovarianceCache`). The first fit
            accumulates them over *all* training data — the DataModule's ``retain_dataloader()``
            and ``forget_dataloader()``, or only ``retain_dataloader=`` when given — and writes the
            file atomically; a later fit on the same model (fingerprint of every parameter and
            buffer, and ``max_retain_batches``) that forgets other classes builds its bases from
            the file without reading any data (no drift probe is then measured). A stale file is
            rebuilt with an info message; a file missing some remaining class is completed.
            Only for class-wise forgetting: the cache holds whole classes.
        remaining_classes: classes that remain, for ``covariance_cache``; by default derived from
            the ``forget_classes`` of the LightningModule or DataModule.

    Raises:
        UnlearningConfigError: for invalid arguments (at construction) or an unusable model or
            strategy (in ``setup``).

    Example:
        >>> import lightning.pytorch as L
        >>> from unsc_lightning import NullSpaceCalibration
        >>> callback = NullSpaceCalibration(threshold=0.97, class_threshold_step=0.003)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        threshold: float | dict[str, float] = 0.97,
        rule: BasisRule = "per_class",
        class_threshold_step: float = 0.0,
        retain_dataloader: Any = None,
        layers: list[str] | None = None,
        exclude_layers: list[str] | None = None,
        freeze_bias_and_norm: bool = True,
        norm_eval: bool = True,
        max_retain_batches: int | None = None,
        mode: ProjectionMode = "auto",
        log_drift: bool = True,
        drift_every_n_steps: int = 0,
        covariance_cache: str | None = None,
        remaining_classes: list[int] | None = None,
    ) -> None:
        thresholds = threshold.values() if isinstance(threshold, Mapping) else [threshold]
        for value in thresholds:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 < float(value) <= 1.0
            ):
                raise UnlearningConfigError(f"Expected `threshold` in (0, 1], got {threshold!r}.")
        if rule not in ("per_class", "pooled"):
            raise UnlearningConfigError(
                f"Expected `rule` to be 'per_class' or 'pooled', got {rule!r}."
            )
        if not 0.0 <= class_threshold_step < 1.0:
            raise UnlearningConfigError(
                f"Expected `class_threshold_step` in [0, 1), got {class_threshold_step!r}."
            )
        if max_retain_batches is not None and max_retain_batches < 1:
            raise UnlearningConfigError(
                f"Expected `max_retain_batches` >= 1 or None, got {max_retain_batches!r}."
            )
        if mode not in ("auto", "gradient", "update"):
            raise UnlearningConfigError(
                f"Expected `mode` to be 'auto', 'gradient' or 'update', got {mode!r}."
            )
        if drift_every_n_steps < 0:
            raise UnlearningConfigError(
                f"Expected `drift_every_n_steps` >= 0 (0 disables it), got {drift_every_n_steps!r}."
            )
        if covariance_cache is not None and not isinstance(covariance_cache, (str, Path)):
            raise UnlearningConfigError(
                f"Expected `covariance_cache` to be a file path or None, got {covariance_cache!r}."
            )
        if remaining_classes is not None and (
            not remaining_classes
            or not all(isinstance(k, int) and k >= 0 for k in remaining_classes)
        ):
            raise UnlearningConfigError(
                "Expected `remaining_classes` to be a non-empty list of class ids >= 0 or None, "
                f"got {remaining_classes!r}."
            )
        if retain_dataloader is not None and not _is_iterable(retain_dataloader):
            raise UnlearningConfigError(
                f"Expected `retain_dataloader` to be an iterable of batches (e.g. a DataLoader), "
                f"got {type(retain_dataloader).__name__}."
            )
        self.threshold = dict(threshold) if isinstance(threshold, Mapping) else float(threshold)
        self.rule: BasisRule = rule
        self.class_threshold_step = float(class_threshold_step)
        self.retain_dataloader = retain_dataloader
        self.layers = None if layers is None else list(layers)
        self.exclude_layers = list(exclude_layers or [])
        self.freeze_bias_and_norm = freeze_bias_and_norm
        self.norm_eval = norm_eval
        self.max_retain_batches = max_retain_batches
        self.mode: ProjectionMode = mode
        self.log_drift = log_drift
        self.drift_every_n_steps = int(drift_every_n_steps)
        self.covariance_cache = None if covariance_cache is None else str(covariance_cache)
        self.remaining_classes = (
            None if remaining_classes is None else sorted(set(remaining_classes))
        )

        # runtime state
        self.active_mode: Literal["gradient", "update"] | None = None
        self.layer_infos: dict[str, BasisInfo] = {}
        self._layers: dict[str, Any] = {}
        self._bases: dict[str, Tensor] = {}
        self._projectors: dict[str, NullSpaceProjector] = {}
        self._loaded_state: dict[str, Any] | None = None
        self._frozen: list[nn.Parameter] = []
        self._norm_layers: list[nn.Module] = []
        self._modes: dict[nn.Module, bool] = {}
        self._step_hooks: list[RemovableHandle] = []
        self._before_step: dict[str, Tensor] = {}
        self.retain_samples = 0
        self.retain_input_shape: tuple[int, ...] | None = None
        self._retain_shapes: set[tuple[int, ...]] = set()
        self._check_input_shape = False
        self.drift: dict[str, float] = {}
        self._drift_meter: NullSpaceDrift | None = None
        self._probe: Tensor | None = None

    # -- public state -------------------------------------------------------------------------
    @property
    def bases(self) -> Mapping[str, Tensor]:
        """Read-only mapping ``layer name -> U`` (CPU float32, ``d x r``)."""
        return MappingProxyType(self._bases)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, rule=self.rule)

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if strategy not in _UNSHARDED:
            raise UnlearningConfigError(
                f"`NullSpaceCalibration` does not support the strategy `{strategy}`: sharded "
                f"parameters (FSDP, DeepSpeed) cannot be projected per layer. Use one of "
                f"{', '.join(_UNSHARDED)} (e.g. `strategy='ddp'`, 'ddp_spawn' or 'ddp_fork')."
            )
        self._modes = {module: module.training for module in pl_module.modules()}
        norms = [m for m in pl_module.modules() if isinstance(m, NORM_LAYERS)]
        self._norm_layers = norms if self.norm_eval else []
        selection = select_layers(pl_module, self.layers, self.exclude_layers)
        if selection.unmatched_patterns:
            raise UnlearningConfigError(
                f"`layers` patterns {selection.unmatched_patterns} match no supported layer with a "
                f"trainable weight in {type(pl_module).__name__}; supported layer types: "
                f"{supported_layer_types()}. Names come from `named_modules()`."
            )
        if self.layers is None and not selection.layers and not self.exclude_layers:
            raise UnlearningConfigError(
                f"{type(pl_module).__name__} has no supported layer with a trainable weight "
                f"(supported: {supported_layer_types()}); there is nothing to constrain."
            )
        if selection.unsupported:
            listing = ", ".join(f"`{n}` ({t})" for n, t in selection.unsupported.items())
            rank_zero_warn(
                f"NullSpaceCalibration: layers of unsupported types are NOT constrained and their "
                f"updates can change remaining outputs: {listing}. Freeze them "
                f"(`requires_grad_(False)`) or exclude them from the optimizer."
            )
        if isinstance(self.threshold, dict):
            missing = [
                name for name in selection.layers if not _has_threshold(self.threshold, name)
            ]
            if missing:
                raise UnlearningConfigError(
                    f"`threshold` mapping {self.threshold} has no entry for layers {missing}; add "
                    "them (patterns such as '*' are allowed)."
                )
        if not selection.layers:
            rank_zero_warn("NullSpaceCalibration: no layer selected; training is left unchanged.")
        self._layers = selection.layers
        if self.freeze_bias_and_norm:
            self._freeze(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._layers:
            if self._loaded_state is not None:
                self._restore_bases(self._loaded_state)
                self._loaded_state = None
            else:
                self._build_bases(trainer, pl_module)
                self._start_drift(pl_module)
            device = pl_module.device
            self._projectors = {
                name: NullSpaceProjector(basis, device=device)
                for name, basis in self._bases.items()
            }
        self._check_input_shape = self.retain_input_shape is not None
        self.active_mode = self._choose_mode(trainer)
        self._warn_value_clipping(trainer)
        if self.active_mode == "update":
            self._attach_step_hooks(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._check_input_shape:
            self._check_input_shape = False
            self._compare_input_shape(batch)
        for module in self._norm_layers:  # Lightning may have switched them back to train
            if module.training:
                module.eval()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self.active_mode != "gradient":
            return
        for name, projector in self._projectors.items():
            grad = self._layers[name].weight.grad
            if grad is not None:
                projector.project_(grad)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = self.drift_every_n_steps
        if self._drift_meter is not None and every and trainer.global_step % every == 0:
            values = self._drift_meter.compute()
            pl_module.log_dict({f"nullspace_drift/{name}": value for name, value in values.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning moves the model back to the CPU in `on_fit_end`
        if self._drift_meter is not None and self._drift_meter.layer_names:
            self.drift = self._drift_meter.compute()
            metrics = {f"nullspace_drift/{name}": value for name, value in self.drift.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            rank_zero_info(
                f"NullSpaceCalibration: largest remaining-output drift {max(self.drift.values()):.2e}."
            )
        self._drift_meter = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drift_meter = None
        self._release(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release(pl_module)

    def state_dict(self) -> dict[str, Any]:
        if not self._bases:
            return {}
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "bases": {name: basis.clone() for name, basis in self._bases.items()},
            "infos": {name: [i.dim, i.rank, i.energy] for name, i in self.layer_infos.items()},
            "retain_samples": self.retain_samples,
            "retain_input_shape": self.retain_input_shape,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict) if state_dict else None

    # -- bases --------------------------------------------------------------------------------
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

    def _retain_batches(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loader: Any = None
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        needs_labels = self.rule == "per_class" or loader is not None  # the cache is per class
        loader = self._retain_loader(trainer) if loader is None else loader
        rank, world = trainer.global_rank, trainer.world_size
        for index, batch in enumerate(loader):
            if self.max_retain_batches is not None and index >= self.max_retain_batches:
                break
            if index % world != rank:  # every rank takes its own share; sums are all-reduced
                continue
            inputs, labels = _split_batch(batch, needs_labels=needs_labels)
            if self._probe is None and self.log_drift:
                self._probe = inputs[:_PROBE_SAMPLES].to(pl_module.device)
            self.retain_samples += int(inputs.shape[0])
            self._retain_shapes.add(tuple(inputs.shape[1:]))
            yield (
                inputs.to(pl_module.device),
                None if labels is None else labels.to(pl_module.device),
            )

    def _build_bases(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if type(pl_module).forward is L.LightningModule.forward:
            raise UnlearningConfigError(
                f"{type(pl_module).__name__} does not define `forward`; NullSpaceCalibration runs "
                "remaining data through `pl_module(x)`. Add `def forward(self, x): return self.model(x)`."
            )
        plan = self._plan_cache(trainer, pl_module) if self.covariance_cache is not None else None
        if plan is not None and plan.hit:
            self._bases_from_cache(trainer, pl_module, plan)
            return
        per_class = self.rule == "per_class" or plan is not None
        num_classes = _num_classes(pl_module, trainer) if per_class else None
        accumulator = CovarianceAccumulator(
            layer_dims(self._layers), num_classes=num_classes, device=pl_module.device
        )
        was_training = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        self.retain_samples = 0
        self._retain_shapes = set()
        try:
            with trainer.precision_plugin.forward_context():
                seen = accumulate_covariances(
                    _RetainForward(pl_module),
                    self._layers,
                    self._retain_batches(
                        trainer, pl_module, None if plan is None else _Chained(plan.loaders)
                    ),
                    accumulator,
                )
        finally:
            for module, training in was_training.items():
                module.train(training)
        # one per-sample shape: compared with the first training batch (variable shapes: no check)
        shapes = self._retain_shapes
        self.retain_input_shape = next(iter(shapes)) if len(shapes) == 1 else None
        if trainer.world_size > 1:
            # rank 0 always holds the first retain batch; every rank then checks the same shape
            self.retain_input_shape = trainer.strategy.broadcast(self.retain_input_shape)
            accumulator.samples_per_class = accumulator.samples_per_class.to(pl_module.device)
            accumulator.reduce_(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
            total = trainer.strategy.reduce(
                torch.tensor(self.retain_samples, device=pl_module.device), reduce_op="sum"
            )
            self.retain_samples = int(total)
            # "seen" is reduced too: a rank with no retain batch cannot tell from the summed
            # covariances that a layer fed only zeros was run, and would raise alone
            flags = torch.tensor(
                [float(name in seen) for name in self._layers], device=pl_module.device
            )
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
            seen = {name for name, flag in zip(self._layers, flags.tolist()) if flag > 0}
        if self.retain_samples == 0:
            raise RuntimeError(
                "The remaining (retain) data are empty: the retain dataloader yielded no sample, so "
                "no basis can be built. Check the forget specification and `max_retain_batches`."
            )
        unseen = [name for name in self._layers if name not in seen]
        if unseen:
            raise RuntimeError(
                f"Layers {unseen} received no input while running remaining data through "
                f"`{type(pl_module).__name__}.forward`; exclude them with `exclude_layers=` or make "
                "`forward` use them."
            )
        if plan is not None:
            bases = self._bases_from_new_cache(trainer, plan, accumulator)
        else:
            bases = build_bases(
                accumulator,
                self.threshold,
                self.rule,
                class_threshold_step=self.class_threshold_step,
            )
        del accumulator  # release the d x d covariances
        self._bases = {
            name: basis.to(device="cpu", dtype=torch.float32) for name, (basis, _) in bases.items()
        }
        self.layer_infos = {name: info for name, (_, info) in bases.items()}
        self._report(trainer)

    # -- covariance cache -----------------------------------------------------------------------
    def _plan_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> _CachePlan | None:
        remaining = self._cache_remaining_classes(trainer, pl_module)
        if remaining is None:
            rank_zero_warn(
                "NullSpaceCalibration: `covariance_cache` needs to know which whole classes remain, "
                "but no class is forgotten (`forget_classes` of the module and DataModule are empty: "
                "sample-level or sub-class forgetting); building the bases from the retain data "
                "without the cache. Pass `remaining_classes=` for class-wise forgetting."
            )
            return None
        num_classes = _num_classes(pl_module, trainer)
        if remaining[-1] >= num_classes:
            raise UnlearningConfigError(
                f"Expected `remaining_classes` in [0, {num_classes}), got {remaining}."
            )
        path = Path(self.covariance_cache or "")
        fingerprint = model_fingerprint(pl_module, {"max_retain_batches": self.max_retain_batches})
        dims = layer_dims(self._layers)
        cache: ClassCovarianceCache | None = None
        if path.exists():
            try:
                cache = ClassCovarianceCache.load(path, map_location=pl_module.device)
            except Exception as error:  # unreadable or another format: rebuild, never guess
                rank_zero_info(
                    f"NullSpaceCalibration: cannot read covariance cache {path} ({error})."
                )
        if cache is not None and not cache.serves(fingerprint, dims, num_classes):
            rank_zero_info(
                f"NullSpaceCalibration: covariance cache {path} was built for another model, layer "
                f"set or settings (fingerprint {cache.fingerprint}, current {fingerprint}); "
                "rebuilding it."
            )
            cache = None
        missing = remaining if cache is None else cache.missing_classes(remaining)
        if cache is not None and missing:
            rank_zero_info(
                f"NullSpaceCalibration: covariance cache {path} holds no sample of the remaining "
                f"classes {missing}; adding them from the data."
            )
        hit = bool(trainer.strategy.broadcast(not missing))  # every rank follows rank 0
        loaders = [] if hit else self._cache_loaders(trainer)
        return _CachePlan(path, remaining, fingerprint, hit, cache, loaders)

    def _cache_remaining_classes(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> list[int] | None:
        if self.remaining_classes is not None:
            return list(self.remaining_classes)
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            forgotten = getattr(owner, "forget_classes", None)
            if forgotten:  # class-wise forgetting: whole classes leave, the others remain
                num_classes = _num_classes(pl_module, trainer)
                gone = {int(k) for k in forgotten}
                return [k for k in range(num_classes) if k not in gone]
        return None

    def _cache_loaders(self, trainer: L.Trainer) -> list[Any]:
        # every class a later request may keep: the remaining *and* the forgotten training data
        retain = self._retain_loader(trainer)
        forget = getattr(getattr(trainer, "datamodule", None), "forget_dataloader", None)
        if self.retain_dataloader is None and callable(forget):
            return [retain, forget()]
        return [retain]

    def _bases_from_cache(
        self, trainer: L.Trainer, pl_module: L.LightningModule, plan: _CachePlan
    ) -> None:
        cache = plan.cache or ClassCovarianceCache.load(plan.path, map_location=pl_module.device)
        self._set_bases(self._cache_bases(cache, plan))
        del cache  # release the per-class d x d covariances
        rank_zero_info(
            f"NullSpaceCalibration: bases for the remaining classes {plan.remaining} from the "
            f"covariance cache {plan.path} (no pass over the data)."
        )
        self._report(trainer)

    def _bases_from_new_cache(
        self, trainer: L.Trainer, plan: _CachePlan, accumulator: CovarianceAccumulator
    ) -> dict[str, tuple[Tensor, BasisInfo]]:
        built = ClassCovarianceCache.from_accumulator(accumulator, plan.fingerprint)
        cache = built if plan.cache is None else plan.cache.update_(built)
        if trainer.is_global_zero:
            cache.save(plan.path)
            rank_zero_info(
                f"NullSpaceCalibration: wrote the per-class covariance cache {plan.path} "
                f"(classes {cache.classes})."
            )
        missing = cache.missing_classes(plan.remaining)
        if missing:
            raise RuntimeError(
                f"The remaining classes {missing} have no sample in the data read for the "
                f"covariance cache {plan.path}; check `remaining_classes`, the retain data and "
                "`max_retain_batches`."
            )
        return self._cache_bases(cache, plan)

    def _cache_bases(
        self, cache: ClassCovarianceCache, plan: _CachePlan
    ) -> dict[str, tuple[Tensor, BasisInfo]]:
        self.retain_samples = int(cache.samples_per_class[plan.remaining].sum())
        return cache.bases(
            plan.remaining, self.threshold, self.rule, self.class_threshold_step, self._layers
        )

    def _set_bases(self, bases: Mapping[str, tuple[Tensor, BasisInfo]]) -> None:
        self._bases = {
            name: basis.to(device="cpu", dtype=torch.float32) for name, (basis, _) in bases.items()
        }
        self.layer_infos = {name: info for name, (_, info) in bases.items()}

    def _start_drift(self, pl_module: L.LightningModule) -> None:
        probe, self._probe = self._probe, None
        if not self.log_drift or probe is None:
            return
        was_training = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            self._drift_meter = NullSpaceDrift.from_probe(pl_module, self._layers, probe)
        finally:
            for module, training in was_training.items():
                module.train(training)

    def _restore_bases(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise UnlearningConfigError(
                "The NullSpaceCalibration state in this checkpoint was built for another model, layer "
                f"set or settings (stored fingerprint {state.get('fingerprint')!r}, current "
                f"{self._fingerprint()!r}); resume with the same model and callback arguments or start a new fit."
            )
        self._bases = {
            name: torch.as_tensor(basis).float().cpu() for name, basis in state["bases"].items()
        }
        self.layer_infos = {
            name: BasisInfo(int(d), int(r), float(e)) for name, (d, r, e) in state["infos"].items()
        }
        self.retain_samples = int(state.get("retain_samples", 0))
        shape = state.get("retain_input_shape")
        self.retain_input_shape = None if shape is None else tuple(shape)
        rank_zero_info(
            "NullSpaceCalibration: reusing the bases stored in the checkpoint (no pass over the data)."
        )

    def _fingerprint(self) -> str:
        layout = {name: list(layer.weight.shape) for name, layer in self._layers.items()}
        settings = {
            "threshold": self.threshold,
            "rule": self.rule,
            "class_threshold_step": self.class_threshold_step,
            "max_retain_batches": self.max_retain_batches,
            "layers": layout,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def _report(self, trainer: L.Trainer) -> None:
        lines = [
            f"{name}: rank {i.rank}/{i.dim}, energy {i.energy:.4f}"
            for name, i in self.layer_infos.items()
        ]
        rank_zero_info(
            f"NullSpaceCalibration: bases from {self.retain_samples} remaining samples "
            f"(rule={self.rule}):\n  " + "\n  ".join(lines)
        )
        metrics: dict[str, float] = {}
        for name, info in self.layer_infos.items():
            metrics[f"nullspace/{name}/rank"] = info.rank
            metrics[f"nullspace/{name}/dim"] = info.dim
            metrics[f"nullspace/{name}/energy"] = info.energy
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)

    def _compare_input_shape(self, batch: Any) -> None:
        inputs = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(inputs, Tensor) or self.retain_input_shape is None:
            return  # e.g. dict batches: nothing to compare
        if tuple(inputs.shape[1:]) != self.retain_input_shape:
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
        optimizers = trainer.optimizers
        plain_sgd = all(
            type(opt) is torch.optim.SGD
            and all(g.get("weight_decay", 0) == 0 for g in opt.param_groups)
            for opt in optimizers
        )
        chosen: Literal["gradient", "update"] = "gradient" if plain_sgd else "update"
        names = ", ".join(type(opt).__name__ for opt in optimizers) or "none"
        rank_zero_info(
            f"NullSpaceCalibration: mode='auto' chose {chosen!r} projection for optimizers [{names}]."
        )
        return chosen

    def _warn_value_clipping(self, trainer: L.Trainer) -> None:
        # clipping runs after the projection: a norm clip only rescales the projected gradient,
        # an element-wise clip moves it out of the null space
        clip_value = trainer.gradient_clip_val
        by_value = trainer.gradient_clip_algorithm == "value"
        if self.active_mode == "gradient" and clip_value and by_value:
            rank_zero_warn(
                "NullSpaceCalibration: `gradient_clip_algorithm='value'` clips projected gradients "
                "element-wise, which moves them out of the null space, so remaining outputs can change. "
                "Use `mode='update'` (projects each step's weight change after clipping) or clip by "
                "norm (`gradient_clip_algorithm='norm'`)."
            )

    def _attach_step_hooks(self, trainer: L.Trainer) -> None:
        constrained = {id(layer.weight): name for name, layer in self._layers.items()}

        def before(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    name = constrained.get(id(param))
                    if name is not None:
                        self._before_step[name] = param.detach().clone()

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            with torch.no_grad():
                for name, old in self._before_step.items():
                    weight = self._layers[name].weight
                    delta = self._projectors[name].project_(weight.detach() - old)
                    weight.copy_(old + delta)
            self._before_step.clear()

        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_pre_hook(before))
            self._step_hooks.append(optimizer.register_step_post_hook(after))

    # -- user state -----------------------------------------------------------------------------
    def _freeze(self, pl_module: L.LightningModule) -> None:
        candidates: list[nn.Parameter] = [
            layer.bias
            for layer in self._layers.values()
            if isinstance(getattr(layer, "bias", None), nn.Parameter)
        ]
        for module in pl_module.modules():
            if isinstance(module, NORM_LAYERS):
                candidates.extend(module.parameters(recurse=False))
        self._frozen = [p for p in candidates if p.requires_grad]
        for param in self._frozen:
            param.requires_grad_(False)

    def _release(self, pl_module: L.LightningModule) -> None:
        while self._step_hooks:
            self._step_hooks.pop().remove()
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []
        for module, training in self._modes.items():
            module.train(training)
        self._modes = {}
        self._norm_layers = []


@dataclass
class _CachePlan:
    """What ``covariance_cache`` does in this fit: serve the request from the file or (re)build."""

    path: Path
    remaining: list[int]
    fingerprint: str
    hit: bool
    cache: ClassCovarianceCache | None  # a valid file (possibly missing some remaining class)
    loaders: list[Any]  # what to read when not a hit: every class's training data


class _Chained:
    """The batches of several loaders, one after the other."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            yield from loader


class _RetainForward:
    """``pl_module(x)`` on a retain batch; a failure says the retain data could not be run."""

    def __init__(self, pl_module: L.LightningModule) -> None:
        self.pl_module = pl_module

    def __call__(self, inputs: Tensor) -> Any:
        try:
            return self.pl_module(inputs)
        except (UnlearningConfigError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            raise RuntimeError(
                f"The remaining (retain) data could not be run through "
                f"`{type(self.pl_module).__name__}.forward` (a batch of inputs of shape "
                f"{tuple(inputs.shape)}, {inputs.dtype}); check that the retain dataloader yields "
                f"inputs like the training data's. The error was {type(error).__name__}: {error}"
            ) from error


def _is_iterable(value: Any) -> bool:
    # Inspect, never call `iter()`: on a DataLoader with workers that starts worker processes
    # (kept alive with `persistent_workers=True`) when the callback is merely constructed.
    return isinstance(value, Iterable) or callable(getattr(value, "__getitem__", None))


def _has_threshold(mapping: Mapping[str, float], name: str) -> bool:
    try:
        threshold_for(mapping, name)
    except KeyError:
        return False
    return True


def _split_batch(batch: Any, needs_labels: bool) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        inputs, labels = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        inputs = batch[0]
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    else:
        raise UnlearningConfigError(
            f"Retain batches must be a tensor `x` or a tuple `(x, y, ...)`, got {type(batch).__name__}."
        )
    if needs_labels and labels is None:
        raise UnlearningConfigError(
            "`rule='per_class'` needs labelled retain batches `(x, y)`; the retain dataloader yields "
            "inputs only. Use `rule='pooled'` or yield labels."
        )
    return inputs, labels


def _num_classes(pl_module: L.LightningModule, trainer: L.Trainer) -> int:
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        value = getattr(owner, "num_classes", None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnlearningConfigError(
        "`rule='per_class'` needs the number of classes: give your LightningModule or DataModule a "
        "`num_classes` attribute, or use `rule='pooled'`."
    )
