r"""`NullSpaceEngine`: the whole life of the UNSC constraint on one model, in plain PyTorch.

For every constrained weight ``W`` (viewed as ``out x d``) with remaining-subspace basis ``U``
the engine replaces each gradient (or each optimizer step's update) by

.. math:: G \leftarrow G - (G U) U^\top

so ``ΔW x = 0`` for every remaining input row ``x`` (Chen, Zhu, Yu, Zhou, *Machine Unlearning
via Null Space Calibration*, IJCAI 2024, Theorem 1). Every other trainable parameter is frozen
for the fit and restored afterwards, and normalisation layers stay in eval mode, so the model's
outputs on remaining data do not move.

Usable from any training loop::

    engine = NullSpaceEngine(model, threshold=0.97)
    engine.build(retain_loader)            # one no-grad pass over remaining data
    with engine.guard():                   # freeze what must not move; restore afterwards
        for x, y in forget_loader:
            loss = F.cross_entropy(model(x), targets(x))
            optimizer.zero_grad()
            loss.backward()
            engine.project_gradients_()    # or: engine.attach(optimizer) for any optimizer
            optimizer.step()
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unsc_lightning.nullspace.accounting import Accounting, account_parameters
from unsc_lightning.nullspace.basis import (
    BasisInfo,
    class_threshold_schedule,
    per_class_basis,
    pooled_basis,
)
from unsc_lightning.nullspace.covariance import CovarianceAccumulator, SiteRecorder
from unsc_lightning.nullspace.projection import NullSpaceProjector
from unsc_lightning.nullspace.settings import NullSpaceEngineError, check_engine_settings

BasisRule = Literal["per_class", "pooled"]
Threshold = float | Mapping[str, float]
#: ``batch -> (inputs, labels)``: inputs are a tensor (``model(x)``), a tuple (``model(*x)``) or
#: a mapping (``model(**x)``); labels a 1-D integer tensor, or ``None`` for unlabelled data.
BatchAdapter = Callable[[Any], tuple[Any, Tensor | None]]
Reduce = Callable[[Tensor], Tensor]

STATE_VERSION = 2
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_PROBE_SAMPLES = 256


@dataclass(frozen=True)
class BuildReport:
    """What a basis pass read and kept.

    Attributes:
        samples: remaining samples whose rows entered the bases.
        classes: class ids seen (``[]`` when the data were unlabelled or the rule pooled).
        passes: passes over the data (more than one when the per-class covariances of every
            class do not fit ``memory_budget`` at once).
        peak_bytes: the largest memory the covariance sums and bases held at once.
        estimate_bytes: the pre-flight estimate of that peak.
    """

    samples: int
    classes: list[int]
    passes: int
    peak_bytes: int
    estimate_bytes: int


def default_batch_adapter(batch: Any) -> tuple[Any, Tensor | None]:
    """Split a batch into model inputs and labels.

    ``x`` -> ``(x, None)``; ``(x, y, ...)`` -> ``(x, y)``; a mapping -> (every entry but the
    labels, as keyword inputs; the labels under ``labels``/``label``/``targets``/``target``/``y``).

    Raises:
        NullSpaceEngineError: for any other batch type.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    if isinstance(batch, Mapping):
        label_key = next((k for k in _LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
        inputs = {k: v for k, v in batch.items() if k != label_key}
        return inputs, None if label_key is None else batch[label_key]
    raise NullSpaceEngineError(
        f"Cannot split a batch of type {type(batch).__name__} into inputs and labels; batches "
        "must be a tensor `x`, a tuple `(x, y, ...)` or a dict with a `labels` entry, or pass "
        "`batch_adapter=` (a callable `batch -> (inputs, labels)`)."
    )


def call_model(forward: Callable[..., Any], inputs: Any) -> Any:
    """``forward(x)``, ``forward(*x)`` for a tuple/list or ``forward(**x)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return forward(**inputs)
    if isinstance(inputs, (tuple, list)):
        return forward(*inputs)
    return forward(inputs)


def output_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, the first tensor of a tuple, ``output["logits"]``
    or ``output.logits`` (Hugging Face style).

    Raises:
        NullSpaceEngineError: when no tensor can be found.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        first = next((item for item in output if isinstance(item, Tensor)), None)
        if first is not None:
            return first
    raise NullSpaceEngineError(
        f"The model returned {type(output).__name__}, from which no logits tensor can be taken; "
        "return a tensor, a tuple whose first tensor is the logits, or an object with `.logits`."
    )


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and mappings."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def batch_size_of(inputs: Any, labels: Tensor | None) -> int:
    """Samples in a batch: the labels' count, else the leading size of the first input tensor."""
    if labels is not None:
        return int(labels.reshape(-1).shape[0])
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for value in values if isinstance(values, Iterable) else ():
        size = batch_size_of(value, None)
        if size:
            return size
    return 0


def _select(inputs: Any, index: Tensor, batch: int) -> Any:
    # samples of a batch: every tensor whose leading dimension is the batch
    return map_tensors(
        inputs, lambda t: t.index_select(0, index.to(t.device)) if t.shape[:1] == (batch,) else t
    )


def available_memory(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CUDA: free device memory; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class NullSpaceEngine:
    """Build null-space bases for a model's weights and keep its updates inside them.

    Args:
        model: the network to unlearn; its trainable parameters are sorted once, at
            construction, into constrained and frozen (:attr:`constrained_parameters`,
            :attr:`frozen_parameters`).
        threshold: energy fraction in ``(0, 1]`` kept in each basis, or ``pattern -> fraction``.
        rule: ``"per_class"`` grows each basis class by class (the paper's Algorithm 1; classes
            are taken from the labels seen) or ``"pooled"`` uses one covariance of all remaining
            data. Unlabelled data fall back to ``"pooled"``.
        class_threshold_step: per-class schedule ``threshold + step * k``.
        layers: ``fnmatch`` patterns of layer names to constrain (``None`` = every supported
            layer with a trainable weight).
        exclude_layers: patterns of layer names to leave unconstrained: their parameters train
            freely (listed in :attr:`free_parameters`).
        freeze_bias_and_norm: freeze biases of constrained layers and normalisation parameters.
        freeze_unconstrained: freeze every other trainable parameter no basis constrains (raw
            parameters such as class tokens and position embeddings, weights of unsupported or
            excluded layers). ``False`` leaves them free: remaining outputs can then move.
        norm_eval: keep normalisation layers in eval mode (running statistics unchanged).
        max_samples_per_class: use at most this many samples of each class (the authors used
            one batch per class); ``None`` = all.
        memory_budget: bytes the covariance sums and bases may take; when the per-class sums of
            all classes do not fit, classes are accumulated in ascending groups, one pass over
            the data per group. ``None`` = half the free memory of the model's device.

    Raises:
        NullSpaceEngineError: for invalid settings or a model with nothing to constrain.
    """

    def __init__(
        self,
        model: nn.Module,
        threshold: Threshold = 0.97,
        rule: BasisRule = "per_class",
        class_threshold_step: float = 0.0,
        layers: list[str] | None = None,
        exclude_layers: list[str] | None = None,
        freeze_bias_and_norm: bool = True,
        freeze_unconstrained: bool = True,
        norm_eval: bool = True,
        max_samples_per_class: int | None = None,
        memory_budget: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise NullSpaceEngineError(
                f"Expected `model` to be a torch `nn.Module`, got {type(model).__name__}."
            )
        settings = check_engine_settings(
            threshold,
            rule,
            class_threshold_step,
            layers,
            exclude_layers,
            flags={
                "freeze_bias_and_norm": freeze_bias_and_norm,
                "freeze_unconstrained": freeze_unconstrained,
                "norm_eval": norm_eval,
            },
            limits={"max_samples_per_class": max_samples_per_class, "memory_budget": memory_budget},
        )
        self.model = model
        self.threshold: Threshold = settings["threshold"]
        self.rule: BasisRule = rule
        self.class_threshold_step = float(class_threshold_step)
        self.freeze_bias_and_norm = freeze_bias_and_norm
        self.freeze_unconstrained = freeze_unconstrained
        self.norm_eval = norm_eval
        self.max_samples_per_class = max_samples_per_class
        self.memory_budget = memory_budget
        self.accounting: Accounting = account_parameters(
            model, settings["layers"], settings["exclude_layers"]
        )
        self.layer_infos: dict[str, BasisInfo] = {}
        self.report: BuildReport | None = None
        #: seconds of the last build: ``"total"`` and ``"bases"`` (the eigendecompositions)
        self.timings: dict[str, float] = {}
        self.label_digest: str | None = None
        self._bases: dict[str, Tensor] = {}
        self._projectors: dict[str, NullSpaceProjector] = {}
        self._frozen: list[nn.Parameter] = []
        self._modes: dict[nn.Module, bool] = {}
        self._step_hooks: list[RemovableHandle] = []
        self._before_step: dict[int, Tensor] = {}
        self.probe: Any = None
        self._probe_logits: Tensor | None = None

    # -- what is constrained --------------------------------------------------------------------
    @property
    def constrained_parameters(self) -> list[str]:
        """Full names of the parameters kept in a null space."""
        return self.accounting.constrained_parameters

    @property
    def frozen_parameters(self) -> list[str]:
        """Full names of the trainable parameters frozen while the guard is active."""
        return [name for name, reason in self.accounting.frozen.items() if self._freezes(reason)]

    @property
    def free_parameters(self) -> list[str]:
        """Trainable parameters neither constrained nor frozen (remaining outputs can move)."""
        return [
            name for name, reason in self.accounting.frozen.items() if not self._freezes(reason)
        ]

    def threshold_of(self, key: str) -> float:
        """The energy threshold of basis ``key``.

        Embeddings keep every token seen in remaining data (``1.0``) unless a ``threshold``
        mapping names them: a rare token's row is a whole direction of its own, and an energy
        rule over token counts would free the rows of rare remaining tokens.
        """
        constraint = self.accounting.constraints.get(key)
        embedding = constraint is not None and isinstance(constraint.sites[0][1], nn.Embedding)
        if isinstance(self.threshold, Mapping):
            named = any(p == key for p in self.threshold)
            if embedding and not named:
                return 1.0
            return _threshold_for(self.threshold, key)
        return 1.0 if embedding else float(self.threshold)

    def _freezes(self, reason: str) -> bool:
        if reason == "excluded":  # the user chose to leave these layers unconstrained
            return False
        if reason in ("bias", "norm"):
            return self.freeze_bias_and_norm
        return self.freeze_unconstrained

    @property
    def keys(self) -> list[str]:
        """Basis keys (layer names, ``"<layer>.<suffix>"`` for several weights of one layer)."""
        return list(self.accounting.constraints)

    @property
    def dims(self) -> dict[str, int]:
        return {key: c.dim for key, c in self.accounting.constraints.items()}

    @property
    def bases(self) -> Mapping[str, Tensor]:
        """Read-only ``key -> U`` (CPU float32, ``d x r``)."""
        return MappingProxyType(self._bases)

    @property
    def built(self) -> bool:
        return bool(self._projectors) or not self.accounting.constraints

    # -- memory ---------------------------------------------------------------------------------
    def estimate_bytes(self, groups: int = 1) -> int:
        """Peak bytes of the covariance sums and bases with ``groups`` classes held at once.

        Per basis: ``groups`` float64 ``d x d`` sums (one for the pooled rule) and the basis
        itself (at most ``d x d``). The number of classes never enters: classes beyond
        ``groups`` cost passes over the data, not memory.
        """
        square = sum(d * d for d in self.dims.values()) * 8
        held = groups if self.rule == "per_class" else 1
        return square * (held + 1)

    def _group_size(self, device: torch.device) -> int:
        budget = self.memory_budget
        if budget is None:
            budget = available_memory(device) // 2
        minimum = self.estimate_bytes(1)
        if budget < minimum:
            raise NullSpaceEngineError(
                f"Building the bases needs about {minimum / 2**20:.1f} MiB for the covariance sums "
                f"of {len(self.dims)} weights (largest d = {max(self.dims.values())}), above the "
                f"memory budget of {budget / 2**20:.1f} MiB. Raise `memory_budget`, use "
                "`rule='pooled'`, or leave the widest layers out with `exclude_layers=`."
            )
        square = max(1, self.estimate_bytes(2) - minimum)
        return 1 + int((budget - minimum) // square)

    # -- building -------------------------------------------------------------------------------
    @torch.no_grad()
    def build(
        self,
        batches: Iterable[Any],
        forward: Callable[..., Any] | None = None,
        reduce: Reduce | None = None,
        batch_adapter: BatchAdapter | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, BasisInfo]:
        """Build every basis from batches of remaining data (model in eval mode, no grad).

        Args:
            batches: remaining-data batches (e.g. a DataLoader); must be re-iterable when the
                per-class sums need several passes (see ``memory_budget``).
            forward: what to call on the inputs (default: the model).
            reduce: cross-process sum, e.g. ``lambda t: (dist.all_reduce(t), t)[1]``; every
                process then holds the bases of all processes' data.
            batch_adapter: ``batch -> (inputs, labels)`` (default :func:`default_batch_adapter`).
            device: where inputs and sums go (default: the device of the first parameter).

        Returns:
            ``key -> BasisInfo``.

        Raises:
            RuntimeError: when no sample was read, a constrained layer received no input, or a
                layer's inputs contain NaN/inf.
        """
        device = torch.device(device) if device is not None else self._device()
        adapter = batch_adapter or default_batch_adapter
        forward = forward or self.model
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        start = time.perf_counter()
        self.timings = {"bases": 0.0}
        try:
            bases, report = _BasisPass(self, device, adapter, forward, reduce).run(batches)
            self.timings["total"] = time.perf_counter() - start
        finally:
            for module, training in modes.items():
                module.train(training)
        self.report = report
        self._set_bases(bases)
        self._probe_logits = None
        if self.probe is not None:
            self._probe_logits = self._logits_on_probe(forward)
        return dict(self.layer_infos)

    def _device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _set_bases(self, bases: Mapping[str, tuple[Tensor, BasisInfo]]) -> None:
        self._bases = {k: u.to(device="cpu", dtype=torch.float32) for k, (u, _) in bases.items()}
        self.layer_infos = {key: info for key, (_, info) in bases.items()}
        self.make_projectors()

    def set_bases(
        self,
        bases: Mapping[str, tuple[Tensor, BasisInfo]],
        samples: int = 0,
        classes: list[int] | None = None,
    ) -> None:
        """Use bases built elsewhere (e.g. from a covariance cache): ``key -> (U, info)``."""
        unknown = sorted(set(bases) - set(self.keys))
        if unknown:
            raise NullSpaceEngineError(f"Bases for unknown keys {unknown}; expected {self.keys}.")
        self.report = BuildReport(samples, list(classes or []), 0, 0, 0)
        self._set_bases(bases)

    def make_projectors(self) -> None:
        """(Re)create the projectors next to each weight (call after moving the model)."""
        self._projectors = {
            key: NullSpaceProjector(self._bases[key], device=c.parameter.device)
            for key, c in self.accounting.constraints.items()
            if key in self._bases
        }

    # -- guard ----------------------------------------------------------------------------------
    def freeze_(self) -> None:
        """Freeze every parameter that must not move and put normalisation layers in eval.

        Remembers each parameter's ``requires_grad`` and each module's mode for :meth:`release_`.
        """
        if self._frozen or self._modes:
            return
        params = self.accounting.parameters
        self._frozen = [p for n in self.frozen_parameters if (p := params[n]).requires_grad]
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        if self.norm_eval:
            self._modes = {layer: layer.training for layer in self.accounting.norm_layers}
        self.keep_norm_eval()

    def keep_norm_eval(self) -> None:
        """Put normalisation layers back in eval (a trainer may have switched the model to train)."""
        for layer in self._modes:
            if layer.training:
                layer.eval()

    def release_(self) -> None:
        """Undo :meth:`freeze_` and remove step hooks (idempotent)."""
        self.detach()
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []
        for layer, training in self._modes.items():
            layer.train(training)
        self._modes = {}

    @contextmanager
    def guard(self) -> Iterator[NullSpaceEngine]:
        """Context in which the frozen parameters stay frozen; everything is restored after."""
        self.freeze_()
        try:
            yield self
        finally:
            self.release_()

    # -- projection -----------------------------------------------------------------------------
    @torch.no_grad()
    def project_gradients_(self) -> None:
        """Project every constrained weight's ``.grad`` onto its null space, in place."""
        for key, constraint in self.accounting.constraints.items():
            grad = constraint.parameter.grad
            projector = self._projectors.get(key)
            if grad is not None and projector is not None:
                spec = constraint.spec
                spec.write_matrix_(grad, projector.project(spec.to_matrix(grad)))

    @torch.no_grad()
    def project_update_(self, parameter_id: int, before: Tensor) -> None:
        """Replace a parameter's change since ``before`` by its projection (update mode)."""
        for key, constraint in self.accounting.constraints.items():
            if id(constraint.parameter) != parameter_id or key not in self._projectors:
                continue
            delta = constraint.parameter.detach() - before
            spec = constraint.spec
            spec.write_matrix_(delta, self._projectors[key].project(spec.to_matrix(delta)))
            constraint.parameter.copy_(before + delta)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Project each step's update of ``optimizer`` (exact for any optimizer, weight decay
        included): the weights are copied before ``step`` and the change projected after it."""
        constrained = {id(c.parameter): c.parameter for c in self.accounting.constraints.values()}

        def before(opt: torch.optim.Optimizer, *_: Any) -> None:
            for group in opt.param_groups:
                for parameter in group["params"]:
                    if id(parameter) in constrained:
                        self._before_step[id(parameter)] = parameter.detach().clone()

        def after(opt: torch.optim.Optimizer, *_: Any) -> None:
            for parameter_id, old in self._before_step.items():
                self.project_update_(parameter_id, old)
            self._before_step.clear()

        self._step_hooks.append(optimizer.register_step_pre_hook(before))
        self._step_hooks.append(optimizer.register_step_post_hook(after))

    def detach(self) -> None:
        """Remove the step hooks of :meth:`attach`."""
        while self._step_hooks:
            self._step_hooks.pop().remove()
        self._before_step.clear()

    # -- evidence -------------------------------------------------------------------------------
    def _logits_on_probe(self, forward: Callable[..., Any]) -> Tensor:
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return output_logits(call_model(forward, self.probe)).detach().float().clone()
        finally:
            for module, training in modes.items():
                module.train(training)

    def prediction_change(self, forward: Callable[..., Any] | None = None) -> float | None:
        """Fraction of the remaining probe whose predicted class changed since the bases were
        built (``None`` before :meth:`build`)."""
        if self._probe_logits is None:
            return None
        now = self._logits_on_probe(forward or self.model)
        before = self._probe_logits.to(now.device)
        return float((now.argmax(-1) != before.argmax(-1)).float().mean())

    def output_drift(self, forward: Callable[..., Any] | None = None) -> float | None:
        """``||f(x) - f₀(x)|| / ||f₀(x)||`` on a fixed probe of remaining inputs (the first
        retain batch, at most 256 samples), ``f₀`` the model when the bases were built.

        Unlike a per-layer drift this sees every parameter, constrained or not.
        """
        if self._probe_logits is None:
            return None
        now = self._logits_on_probe(forward or self.model)
        reference = self._probe_logits.to(now.device)
        norm = float(torch.linalg.vector_norm(reference))
        return float(torch.linalg.vector_norm(now - reference)) / max(norm, 1e-12)

    # -- state ----------------------------------------------------------------------------------
    def fingerprint(self, extra: Mapping[str, Any] | None = None) -> str:
        """Hash of the settings and the constrained weights' names and shapes (and ``extra``)."""
        layout = {
            key: [c.parameter_name, list(c.parameter.shape)]
            for key, c in self.accounting.constraints.items()
        }
        settings = {
            "threshold": self.threshold,
            "rule": self.rule,
            "class_threshold_step": self.class_threshold_step,
            "max_samples_per_class": self.max_samples_per_class,
            "layers": layout,
            **dict(extra or {}),
        }
        text = json.dumps(settings, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def state_dict(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Bases, infos and the fingerprint (empty before :meth:`build`)."""
        if not self._bases:
            return {}
        report = self.report
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(extra),
            "bases": {key: basis.clone() for key, basis in self._bases.items()},
            "infos": {k: [i.dim, i.rank, i.energy] for k, i in self.layer_infos.items()},
            "samples": 0 if report is None else report.samples,
            "classes": [] if report is None else list(report.classes),
            "label_digest": self.label_digest,
        }

    def load_state_dict(
        self, state: Mapping[str, Any], extra: Mapping[str, Any] | None = None
    ) -> None:
        """Restore bases from :meth:`state_dict`.

        Raises:
            NullSpaceEngineError: when the state was built for another model or other settings.
        """
        expected = self.fingerprint(extra)
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != expected:
            raise NullSpaceEngineError(
                "The null-space state in this checkpoint was built for another model, layer set or "
                f"settings or another forget request (stored fingerprint {state.get('fingerprint')!r}, current "
                f"{expected!r}); resume with the same model and arguments or start a new fit."
            )
        self._bases = {k: torch.as_tensor(u).float().cpu() for k, u in state["bases"].items()}
        self.layer_infos = {
            key: BasisInfo(int(d), int(r), float(e)) for key, (d, r, e) in state["infos"].items()
        }
        self.label_digest = state.get("label_digest")
        self.report = BuildReport(int(state.get("samples", 0)), list(state["classes"]), 0, 0, 0)
        self.make_projectors()


class _BasisPass:
    """One build: passes over the data, class groups in ascending order, basis updates.

    The first pass takes classes as their labels appear, holding the per-class sums of at most
    ``group`` classes (the lowest ids seen so far: a lower class evicts the highest). When more
    classes exist, later passes accumulate the next groups in ascending order; the per-class rule
    extends each basis group by group, so memory never holds more than one group's sums.
    """

    def __init__(
        self,
        engine: NullSpaceEngine,
        device: torch.device,
        adapter: BatchAdapter,
        forward: Callable[..., Any],
        reduce: Reduce | None,
    ) -> None:
        self.engine = engine
        self.device = device
        self.adapter = adapter
        self.forward = forward
        self.reduce = reduce
        self.dims = engine.dims
        self.used: dict[int, int] = {}  # samples used per class, across passes (for the cap)
        self.seen_keys: set[str] = set()
        self.seen_classes: set[int] = set()
        self.class_samples: dict[int, int] = {}
        self.bases: dict[str, Tensor] = {}
        self.saturated: set[str] = set()
        self.peak = 0

    def _pass(
        self, batches: Iterable[Any], slots: _Slots, pooled_labels: bool
    ) -> CovarianceAccumulator:
        accumulator = CovarianceAccumulator(self.dims, num_classes=0, device=self.device)
        slots.bind(accumulator)
        engine = self.engine
        sites = engine.accounting.sites()
        with SiteRecorder(sites, accumulator.add, accumulator.add_shared) as recorder:
            for batch in batches:
                inputs, labels = self.adapter(batch)
                size = batch_size_of(inputs, labels)
                if size == 0:
                    continue
                if labels is None and not pooled_labels:
                    raise _Unlabelled()
                if labels is None or pooled_labels:
                    labels = torch.zeros(size, dtype=torch.long)
                labels = labels.reshape(-1).long().cpu()
                self.seen_classes.update(labels.unique().tolist())
                slot = self._slots(labels, slots)
                keep = torch.nonzero(slot >= 0).reshape(-1)
                if keep.numel() == 0:
                    continue
                if keep.numel() < size and isinstance(inputs, Tensor):
                    inputs, slot = _select(inputs, keep, size), slot[keep]
                if engine.probe is None:
                    engine.probe = map_tensors(inputs, lambda t: t[:_PROBE_SAMPLES].to(self.device))
                inputs = map_tensors(inputs, lambda t: t.to(self.device))
                if isinstance(inputs, Tensor):  # class blocks contiguous: one addmm per class
                    slot, order = torch.sort(slot, stable=True)
                    inputs = inputs.index_select(0, order.to(inputs.device))
                accumulator.set_labels(slot.to(self.device))
                recorder.batch_size = int(slot.numel())
                call_model(self.forward, inputs)
                accumulator.check_finite()
                self._peak(accumulator)
            self.seen_keys |= recorder.seen
        return accumulator

    def _slots(self, labels: Tensor, slots: _Slots) -> Tensor:
        cap = self.engine.max_samples_per_class
        # ascending: a class taken in this batch is never evicted by a later label of it
        slot_of = {k: slots.assign(k, self.used) for k in sorted(set(labels.tolist()))}
        result = torch.full_like(labels, -1)
        for i, label in enumerate(labels.tolist()):
            slot = slot_of[label]
            if slot < 0 or (cap is not None and self.used.get(label, 0) >= cap):
                continue
            self.used[label] = self.used.get(label, 0) + 1
            result[i] = slot
        return result

    def _union(self, classes: set[int]) -> list[int]:
        if self.reduce is None:
            return sorted(classes)
        # a presence vector as long as the largest label on any rank (the sum of every rank's
        # length bounds the maximum; an all-reduce of sums is all ``reduce`` offers)
        length = torch.tensor([float(max(classes, default=-1) + 1)], device=self.device)
        bound = int(self.reduce(length).item())
        vector = torch.zeros(max(bound, 1), dtype=torch.float64, device=self.device)
        for k in classes:
            vector[k] = 1.0
        vector = self.reduce(vector)
        return [k for k in range(vector.numel()) if vector[k] > 0]

    def run(
        self, batches: Iterable[Any]
    ) -> tuple[dict[str, tuple[Tensor, BasisInfo]], BuildReport]:
        engine = self.engine
        per_class = engine.rule == "per_class"
        group_size = engine._group_size(self.device) if per_class else 1
        try:
            slots = _Slots(group_size, fixed=None)
            first = self._pass(batches, slots, pooled_labels=not per_class)
        except _Unlabelled:
            per_class, group_size = False, 1
            self.used.clear()
            slots = _Slots(1, fixed=None)
            first = self._pass(batches, slots, pooled_labels=True)
        classes = self._union(self.seen_classes) if per_class else [0]
        if per_class and len(classes) > group_size and iter(batches) is batches:
            raise NullSpaceEngineError(
                f"{len(classes)} classes need {-(-len(classes) // group_size)} passes over the "
                "remaining data within `memory_budget`, but the batches are a one-shot iterator; "
                "pass a DataLoader or a list, or raise `memory_budget`."
            )
        groups = [classes[i : i + group_size] for i in range(0, len(classes), group_size)]
        bases = self.bases = {
            k: torch.zeros(d, 0, dtype=torch.float64, device=self.device)
            for k, d in self.dims.items()
        }
        energy = dict.fromkeys(self.dims, 0.0)  # captured energy, summed over groups
        total = dict.fromkeys(self.dims, 0.0)
        for index, group in enumerate(groups):
            if index == 0:
                # per-class sums in slot order; a copy aligned to ``group`` only when another
                # process may hold other slots (the all-reduce needs the same layout everywhere)
                if self.reduce is None and sorted(slots.classes) == group:
                    accumulator, group = first, list(slots.classes)
                else:
                    accumulator = slots.aligned(first, group)
                del first
            else:
                accumulator = self._pass(batches, _Slots(len(group), fixed=group), False)
            self._account(accumulator, group)
            self._extend(bases, energy, total, accumulator, group, per_class)
            del accumulator
        samples = sum(self.class_samples.values())
        if samples == 0:
            raise RuntimeError(
                "The remaining (retain) data are empty: no sample was read, so no basis can be "
                "built. Check the forget specification and the retain dataloader."
            )
        unseen = [key for key in self.dims if key not in self.seen_keys]
        if unseen:
            raise RuntimeError(
                f"Layers {unseen} received no input while running the remaining data through "
                "the model; exclude them (`exclude_layers=`) or make `forward` use them."
            )
        # one group: the energy the final basis captures; several: each group's energy as
        # captured right after it (a lower bound: later directions only add)
        result = {
            key: (
                basis,
                BasisInfo(
                    self.dims[key],
                    basis.shape[1],
                    energy[key] / total[key] if total[key] > 0 else 1.0,
                ),
            )
            for key, basis in bases.items()
        }
        counts = sorted(self.class_samples.items())
        engine.label_digest = hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16]
        report = BuildReport(
            samples=samples,
            classes=classes if per_class else [],
            passes=len(groups),
            peak_bytes=self.peak,
            estimate_bytes=engine.estimate_bytes(group_size if per_class else 1),
        )
        return result, report

    def _account(self, accumulator: CovarianceAccumulator, group: list[int]) -> None:
        if self.reduce is not None:
            accumulator.samples_per_class = accumulator.samples_per_class.to(self.device)
            accumulator.reduce_(self.reduce)
            names = list(self.dims)
            flags = torch.tensor([float(k in self.seen_keys) for k in names], device=self.device)
            flags = self.reduce(flags)
            self.seen_keys = {k for k, f in zip(names, flags.tolist()) if f > 0}
            # a bound on every rank's rows per sample: the sum of the ranks' maxima
            rows = torch.tensor(
                [float(accumulator.rows_per_sample.get(k, 0)) for k in names], device=self.device
            )
            accumulator.rows_per_sample = dict(zip(names, map(int, self.reduce(rows).tolist())))
        counts = accumulator.samples_per_class.cpu().tolist()
        for k, count in zip(group, counts):
            self.class_samples[k] = int(count)

    def _extend(
        self,
        bases: dict[str, Tensor],
        energy: dict[str, float],
        total: dict[str, float],
        accumulator: CovarianceAccumulator,
        group: list[int],
        per_class: bool,
    ) -> None:
        engine = self.engine
        start = time.perf_counter()
        for key in self.dims:
            sums = accumulator.sums[key]
            eps = engine.threshold_of(key)
            # rank(C_k) <= rows summed into it: small eigenproblems where data are few
            per_sample = accumulator.rows_per_sample.get(key, 0)
            counts = accumulator.samples_per_class.tolist()
            bounds = (
                {k: int(counts[i]) * per_sample for i, k in enumerate(group)}
                if per_sample
                else None
            )
            if per_class:
                saturated = [k for k in group if eps + engine.class_threshold_step * k >= 1.0]
                if engine.class_threshold_step and saturated and key not in self.saturated:
                    self.saturated.add(key)
                    warnings.warn(
                        f"NullSpaceEngine: the per-class schedule `threshold + "
                        f"class_threshold_step * k` reaches 1.0 for classes {saturated} of "
                        f"`{key}`: their whole span is kept, leaving less room to forget. Lower "
                        "`class_threshold_step` for data with many classes.",
                        stacklevel=2,
                    )
                schedule = class_threshold_schedule(eps, engine.class_threshold_step)
                covariances = {k: sums[i] for i, k in enumerate(group)}
                bases[key], info = per_class_basis(covariances, schedule, bases[key], bounds)
            else:
                bound = None if bounds is None else sum(bounds.values())
                bases[key], info = pooled_basis(sums[0], eps, bound)
            trace = float(sums.diagonal(dim1=-2, dim2=-1).sum())
            energy[key] += info.energy * trace
            total[key] += trace
            self._peak(accumulator, bases)
        engine.timings["bases"] += time.perf_counter() - start

    def _peak(
        self, accumulator: CovarianceAccumulator, bases: Mapping[str, Tensor] | None = None
    ) -> None:
        held = sum(t.numel() for t in accumulator.sums.values())
        held += sum(t.numel() for t in (bases if bases is not None else self.bases).values())
        self.peak = max(self.peak, held * 8)


class _Slots:
    """Which class each slot of a per-class accumulator holds (lowest ids first)."""

    def __init__(self, capacity: int, fixed: list[int] | None) -> None:
        self.capacity = capacity
        self.classes: list[int] = list(fixed or [])
        self.fixed = fixed is not None
        self.accumulator: CovarianceAccumulator | None = None

    def bind(self, accumulator: CovarianceAccumulator) -> None:
        self.accumulator = accumulator
        for _ in self.classes:
            self._grow()

    def _grow(self) -> None:
        acc = self.accumulator
        assert acc is not None
        for key, total in acc.sums.items():
            d = total.shape[-1]
            fresh = torch.zeros(1, d, d, dtype=total.dtype, device=total.device)
            acc.sums[key] = torch.cat([total, fresh]) if total.shape[0] else fresh
        acc.samples_per_class = torch.cat(
            [acc.samples_per_class[: acc.num_classes or 0], torch.zeros(1, dtype=torch.long)]
        )
        acc.num_classes = (acc.num_classes or 0) + 1

    def assign(self, label: int, used: dict[int, int]) -> int:
        if label in self.classes:
            return self.classes.index(label)
        if self.fixed:
            return -1
        if len(self.classes) < self.capacity:
            self.classes.append(label)
            self._grow()
            return len(self.classes) - 1
        highest = max(self.classes)
        if label > highest:
            return -1
        slot = self.classes.index(highest)  # evict: it comes back in a later pass
        acc = self.accumulator
        assert acc is not None
        for total in acc.sums.values():
            total[slot].zero_()
        acc.samples_per_class[slot] = 0
        used[highest] = 0
        self.classes[slot] = label
        return slot

    def aligned(
        self, accumulator: CovarianceAccumulator, group: list[int]
    ) -> CovarianceAccumulator:
        """The first pass's sums in the order of ``group`` (zeros for a class not held here)."""
        sums = {}
        for key, total in accumulator.sums.items():
            d = total.shape[-1]
            rows = [
                total[self.classes.index(k)]
                if k in self.classes
                else torch.zeros(d, d, dtype=total.dtype, device=total.device)
                for k in group
            ]
            sums[key] = torch.stack(rows)
        counts = torch.tensor(
            [
                int(accumulator.samples_per_class[self.classes.index(k)])
                if k in self.classes
                else 0
                for k in group
            ],
            dtype=torch.long,
        )
        aligned = CovarianceAccumulator.from_sums(sums, counts)
        aligned.rows_per_sample = dict(accumulator.rows_per_sample)
        return aligned


class _Unlabelled(Exception):
    """The data have no labels: the per-class rule falls back to the pooled one."""


def _threshold_for(threshold: Threshold, key: str) -> float:
    from fnmatch import fnmatchcase

    if isinstance(threshold, Mapping):
        layer = key
        for pattern, value in threshold.items():
            if pattern == layer or fnmatchcase(layer, pattern):
                return float(value)
        raise KeyError(key)
    return float(threshold)
