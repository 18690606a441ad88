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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from unsc_lightning.nullspace.accounting import Accounting, Constraint, account_parameters
from unsc_lightning.nullspace.basis_pass import (
    BasisPass,
    BuildReport,
    Gather,
    Reduce,
    _threshold_for,
    unused_layers_message,
)
from unsc_lightning.nullspace.batches import (
    BatchAdapter,
    batch_size_of,
    call_model,
    default_batch_adapter,
    map_tensors,
    output_logits,
)
from unsc_lightning.nullspace.context import eval_mode, ieee_float32, ieee_forward
from unsc_lightning.nullspace.gram import GramDtype, GramOptions, buffer_rows, held_rows
from unsc_lightning.nullspace.projection import NullSpaceProjector
from unsc_lightning.nullspace.rules import BasisInfo
from unsc_lightning.nullspace.settings import (
    NullSpaceEngineError,
    check_engine_settings,
    check_gram,
)

BasisRule = Literal["per_class", "pooled"]
Threshold = float | Mapping[str, float]
STATE_VERSION = 2
#: a gradient that its projection ``G - (G U) Uᵀ`` left with less than this fraction of its norm
#: is projected a second time by :meth:`NullSpaceEngine.project_step_` given the norms before
#: projection: above it, the float32 cancellation error left along the remaining subspace is at
#: most ``4 u / 0.05 ≈ 5e-6`` of the step (``u = 2⁻²⁴``), a step of 1 % of the weight leaking
#: ``5e-8`` of it, below the rounding of the update itself (about ``u`` of the weight per step)
SECOND_PROJECTION_BELOW = 0.05
#: the engines whose guard is active (:meth:`NullSpaceEngine.freeze_` to
#: :meth:`NullSpaceEngine.release_`), for :func:`guarding_engines`
_GUARDING: weakref.WeakSet[NullSpaceEngine] = weakref.WeakSet()

__all__ = [
    "BasisRule",
    "BatchAdapter",
    "BuildReport",
    "NullSpaceEngine",
    "NullSpaceEngineError",
    "Reduce",
    "SECOND_PROJECTION_BELOW",
    "available_memory",
    "batch_size_of",
    "call_model",
    "default_batch_adapter",
    "guarding_engines",
    "map_tensors",
    "output_logits",
]


def guarding_engines(module: nn.Module) -> list[NullSpaceEngine]:
    """The engines whose guard is active on ``module``: built on it, or constraining one of its
    parameters (a LightningModule finds the engine a callback built on it, without the callback)."""
    owned = {id(parameter) for parameter in module.parameters()}
    return [
        engine
        for engine in list(_GUARDING)
        if engine.model is module
        or any(id(c.parameter) in owned for c in engine.accounting.constraints.values())
    ]


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
        gram: how each batch's Gram products ``Σ x xᵀ`` are formed (always summed in float64):
            ``"auto"`` (default) multiplies in float32 for bases whose threshold is at most
            :data:`~unsc_lightning.nullspace.covariance.FLOAT32_GRAM_MAX_THRESHOLD` (0.999) and
            in float64 otherwise (``threshold=1.0`` keeps every non-zero direction, which float32
            rounding noise would add to); ``torch.float64`` or ``torch.float32`` for every basis;
            or a :class:`~unsc_lightning.nullspace.covariance.GramOptions`, which also offers an
            opt-in, seeded subsampling of the rows (``row_fraction``, approximate).

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
        gram: GramOptions | GramDtype | None = "auto",
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
        self.gram: GramOptions = check_gram(gram)
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
        self._by_parameter: dict[int, list[tuple[str, Constraint]]] = {}
        self._frozen: list[nn.Parameter] = []
        self._modes: dict[nn.Module, bool] = {}
        self._step_hooks: list[RemovableHandle] = []
        self._anchors: dict[int, Tensor] = {}  # W₀ of each constrained parameter (attach)
        self._compact: set[int] = set()  # parameters whose anchor is W₀'s remaining part only
        self._state_optimizers: list[torch.optim.Optimizer] = []
        self._every = 1
        self._pending = 0  # optimizer steps since the last projection of the weights
        self._stepping = False  # inside an attached optimizer's step (between its hooks)
        #: ``key -> (gradient, its version)`` right after this engine projected it: a gradient
        #: still the same tensor at the same version is projected already (``project_step_``)
        self._projected: dict[str, tuple[weakref.ref[Tensor], int]] = {}
        self.probe: Any = None
        #: the probe samples' class labels when the retain batches had them (else ``None``)
        self.probe_labels: Tensor | None = None
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

        Per basis: ``groups`` float64 ``d x d`` sums (one for the pooled rule), as many row
        buffers (the larger of :func:`~unsc_lightning.nullspace.gram.buffer_rows` and the
        :func:`~unsc_lightning.nullspace.gram.held_rows` a class may keep as rows; counted at
        8 bytes) and the basis itself (at most ``d x d``). The number of classes never enters:
        classes beyond ``groups`` cost passes over the data, not memory.
        """
        square = sum(d * d for d in self.dims.values()) * 8
        buffers = sum(max(buffer_rows(d), held_rows(d)) * d for d in self.dims.values()) * 8
        held = groups if self.rule == "per_class" else 1
        return square * (held + 1) + buffers * held

    def classes_per_pass(self, device: torch.device) -> int:
        """How many classes' sums fit ``memory_budget`` at once (the rest cost extra passes).

        Raises:
            NullSpaceEngineError: when not even one class fits, naming the figure and the way out.
        """
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
        gather: Gather | None = None,
        process: tuple[int, int] | None = None,
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
            gather: with ``reduce``, every process's ``n x d`` tensor concatenated in process
                order (e.g. from ``Strategy.all_gather``, padded): a wide layer's few rows of a
                class are then shared as rows (see
                :func:`~unsc_lightning.nullspace.gram.held_rows`) instead of forming and
                all-reducing ``d x d`` sums. Without it, every covariance is all-reduced.
            process: with ``reduce``, ``(this process's index, number of processes)``: each
                layer's bases are then computed by one process (the costliest layers spread
                over the processes) and all-reduced to the others, instead of every process
                computing every basis. Every process must pass the same number.

        Returns:
            ``key -> BasisInfo``. A constrained layer no remaining sample reached gets the
            whole space as its basis (it is kept unchanged; ``report.unused_layers``, and a
            warning, name it).

        Raises:
            RuntimeError: when no sample was read, or a layer's inputs contain NaN/inf; when
                the processes' ``process`` pairs do not number them ``0 .. world - 1``.
            ValueError: for a ``gather`` or ``process`` without ``reduce``, or a malformed
                ``process``.
        """
        _check_collectives(reduce, gather, process)
        device = torch.device(device) if device is not None else self._device()
        adapter = batch_adapter or default_batch_adapter
        forward = forward or self.model
        start = time.perf_counter()
        self.timings = {"bases": 0.0}
        # IEEE float32 forward and products whatever the user's TF32 setting: the bases must
        # describe the model's float32 outputs (see ieee_forward)
        with eval_mode(self.model), ieee_forward(device):
            runner = BasisPass(self, device, adapter, forward, reduce, gather, process)
            bases, report = runner.run(batches)
        self.timings["total"] = time.perf_counter() - start
        self.report = report
        self._set_bases(bases, report.unused_layers)
        self._probe_logits = None
        if self.probe is not None:
            self._probe_logits = self._logits_on_probe(forward)
        return dict(self.layer_infos)

    def _device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _set_bases(
        self, bases: Mapping[str, tuple[Tensor, BasisInfo]], unused: list[str] | None = None
    ) -> None:
        if unused:
            # no remaining rows constrain these layers: the whole space as their basis keeps
            # them unchanged (every update projected to zero)
            bases = dict(bases)
            for key in unused:
                dim = self.dims[key]
                bases[key] = (torch.eye(dim, dtype=torch.float64), BasisInfo(dim, dim, 1.0))
            warnings.warn(unused_layers_message(unused), stacklevel=3)
        self._bases = {k: u.to(device="cpu", dtype=torch.float32) for k, (u, _) in bases.items()}
        self.layer_infos = {key: info for key, (_, info) in bases.items()}
        self.make_projectors()

    def set_bases(
        self,
        bases: Mapping[str, tuple[Tensor, BasisInfo]],
        samples: int = 0,
        classes: list[int] | None = None,
        unused_layers: list[str] | None = None,
    ) -> None:
        """Use bases built elsewhere (e.g. from a covariance cache): ``key -> (U, info)``;
        ``unused_layers``: keys no remaining sample reached (given the whole space, and named
        in a warning)."""
        unknown = sorted(set(bases) - set(self.keys))
        if unknown:
            raise NullSpaceEngineError(f"Bases for unknown keys {unknown}; expected {self.keys}.")
        unused = list(unused_layers or [])
        self.report = BuildReport(samples, list(classes or []), 0, 0, 0, unused_layers=unused)
        self._set_bases(bases, unused)

    def make_projectors(self, projectors: Mapping[str, NullSpaceProjector] | None = None) -> None:
        """(Re)create the projectors next to each weight (call after moving the model), or use
        ready ``projectors`` (``key -> NullSpaceProjector``, e.g. with a known complement)."""
        if projectors is None:
            made = self._projectors
            projectors = {}
            for key, constraint in self.accounting.constraints.items():
                if key not in self._bases:
                    continue
                device = constraint.parameter.device
                old = made.get(key)
                # same basis: move the factor, never factor the complement again
                if old is not None and old.source is self._bases[key]:
                    projectors[key] = old.to(device)
                else:
                    projectors[key] = NullSpaceProjector(self._bases[key], device=device)
        self._projectors = dict(projectors)
        # update mode looks constraints up by parameter on every step: index them once here
        self._by_parameter = {}
        for key, constraint in self.accounting.constraints.items():
            if key in self._projectors:
                self._by_parameter.setdefault(id(constraint.parameter), []).append(
                    (key, constraint)
                )

    # -- guard ----------------------------------------------------------------------------------
    def freeze_(self) -> None:
        """Freeze every parameter that must not move and put normalisation layers in eval.

        Remembers each parameter's ``requires_grad`` and each module's mode for :meth:`release_`.
        """
        if self._frozen or self._modes:
            return
        _GUARDING.add(self)
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

    def lift_norm_eval(self) -> None:
        """Set the held normalisation layers to train mode until the next :meth:`keep_norm_eval`
        (their modes to restore are kept). Lightning warns about every module in eval mode at
        the start of training; these are the engine's to keep in eval, and the callback puts
        them back before training starts."""
        for layer in self._modes:
            layer.train(True)

    def release_(self) -> None:
        """Undo :meth:`freeze_` and remove step hooks (idempotent)."""
        _GUARDING.discard(self)
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
        """Project every constrained weight's ``.grad`` onto its null space, in place (IEEE
        float32 products on CUDA, whatever the user's TF32 setting)."""
        with ieee_float32():
            for key, constraint, grad, projector in self._gradients():
                self._project_grad_(key, constraint, grad, projector)

    @torch.no_grad()
    def project_step_(self, raw_norms: Mapping[int, Tensor] | None = None) -> None:
        """Project this step's gradients once, whoever asks first (the callback in gradient
        mode, a module that sizes its step on the projected gradient, or both).

        A gradient this engine projected already (the same tensor, not modified since) is left
        alone, except with ``raw_norms`` (``id(parameter) -> norm before projection``): the form
        ``G - (G U) Uᵀ`` (rank at most ``d/2``) leaves float32 cancellation error of about
        ``4 u ‖G‖`` along the remaining subspace (``u = 2⁻²⁴``), so where the first projection
        kept less than :data:`SECOND_PROJECTION_BELOW` of the norm it is projected once more;
        a step rescaled to a fixed length would otherwise blow that error up. The test is one
        comparison of stacked norms per device (one wait for the GPU per step). The complement
        form ``(G Q) Qᵀ`` (rank above ``d/2``) has no such error.
        """
        again: list[tuple[str, Any, Tensor, NullSpaceProjector, Tensor | None]] = []
        with ieee_float32():
            for key, constraint, grad, projector in self._gradients():
                if not self._is_projected(key, grad):
                    self._project_grad_(key, constraint, grad, projector)
                elif raw_norms is not None and projector.rank and not projector.use_complement:
                    again.append(
                        (key, constraint, grad, projector, raw_norms.get(id(constraint.parameter)))
                    )
            self._reproject_cancelled_(again)

    def _is_projected(self, key: str, grad: Tensor) -> bool:
        found = self._projected.get(key)
        return found is not None and found[0]() is grad and found[1] == grad._version

    def _project_grad_(
        self, key: str, constraint: Any, grad: Tensor, projector: NullSpaceProjector
    ) -> None:
        _project_matrix_(constraint.spec, grad, projector)
        self._projected[key] = (weakref.ref(grad), grad._version)

    def _gradients(self) -> Iterator[tuple[str, Any, Tensor, NullSpaceProjector]]:
        """``(key, constraint, gradient, projector)`` of every constrained weight with both (a
        sparse gradient made dense first, see :func:`dense_grad`)."""
        for key, constraint in self.accounting.constraints.items():
            grad = dense_grad(constraint.parameter)
            projector = self._projectors.get(key)
            if grad is not None and projector is not None:
                yield key, constraint, grad, projector

    def _reproject_cancelled_(
        self, entries: list[tuple[str, Any, Tensor, NullSpaceProjector, Tensor | None]]
    ) -> None:
        # projected gradients without a norm before projection are projected again, to be safe
        by_device: dict[torch.device, list[tuple[str, Any, Tensor, NullSpaceProjector, Tensor]]]
        by_device = {}
        for key, constraint, grad, projector, raw in entries:
            if raw is None:
                self._project_grad_(key, constraint, grad, projector)
            else:
                by_device.setdefault(grad.device, []).append(
                    (key, constraint, grad, projector, raw)
                )
        for group in by_device.values():
            norms = torch._foreach_norm([grad for _, _, grad, _, _ in group])
            kept = torch.stack([norm.float() for norm in norms])
            raws = torch.stack([raw.to(kept) for *_, raw in group])
            redo = (kept < SECOND_PROJECTION_BELOW * raws).tolist()  # the one wait per device
            for (key, constraint, grad, projector, _), again in zip(group, redo):
                if again:
                    self._project_grad_(key, constraint, grad, projector)

    @torch.no_grad()
    def project_weights_(self, pending_only: bool = False) -> None:
        """Replace each constrained weight ``W`` by ``W₀ + (W - W₀)(I - U Uᵀ)``, ``W₀`` the weight
        at :meth:`attach`, and project the attached optimizers' SGD momentum (when asked).

        No-op when nothing is attached, or with ``pending_only`` when no optimizer step ran
        since the last projection (a projected change stays projected, up to rounding).
        """
        if pending_only and not self._pending:
            return
        with ieee_float32():
            for parameter_id, anchor in self._anchors.items():
                constraints = self._by_parameter.get(parameter_id, [])
                if not constraints:
                    continue
                weight = constraints[0][1].parameter.detach()
                anchor = anchor.to(weight.device)  # the model may have moved (end of a fit)
                if parameter_id in self._compact:  # anchor: W₀'s remaining part, restored in place
                    key, constraint = constraints[0]
                    self._projectors[key].restore_remaining_(
                        constraint.spec.to_matrix(weight), anchor
                    )
                    continue
                delta = weight - anchor
                for key, constraint in constraints:
                    _project_matrix_(constraint.spec, delta, self._projectors[key])
                torch.add(anchor, delta, out=weight)
            for optimizer in self._state_optimizers:
                self._project_moments_(optimizer)
            self._pending = 0

    def _project_moments_(self, optimizer: torch.optim.Optimizer) -> None:
        # SGD momentum is a direction of future steps: projected, the weights do not drift
        # along remaining directions between two projections (see _FIRST_MOMENTS)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                state = optimizer.state.get(parameter, {})
                for name in _FIRST_MOMENTS:
                    moment = state.get(name)
                    if not isinstance(moment, Tensor) or moment.shape != parameter.shape:
                        continue
                    for key, constraint in self._by_parameter.get(id(parameter), []):
                        _project_matrix_(constraint.spec, moment, self._projectors[key])

    def _remember_weights(self) -> None:
        """``W₀`` of each constrained parameter: for a weight that is one plain ``out x d`` view,
        only its remaining part (``W₀ U``, or ``W₀ U Uᵀ`` when r > d/2); else a copy."""
        with ieee_float32():
            self._compact = set()
            for parameter_id, constraints in self._by_parameter.items():
                weight = constraints[0][1].parameter.detach()
                key, constraint = constraints[0]
                if len(constraints) == 1 and _is_view(constraint.spec, weight):
                    matrix = constraint.spec.to_matrix(weight)
                    self._anchors[parameter_id] = self._projectors[key].remaining_part(matrix)
                    self._compact.add(parameter_id)
                else:
                    self._anchors[parameter_id] = weight.clone()

    def attach(
        self, optimizer: torch.optim.Optimizer, every: int = 1, project_state: bool = False
    ) -> None:
        """Keep ``optimizer``'s steps in the null space (exact for any optimizer, weight decay
        included).

        The constrained weights ``W₀`` are copied once (at the first attach); every ``every``
        optimizer steps (counted over all attached optimizers), any ``state_dict()`` of the model
        (so every checkpoint) and :meth:`detach` replace ``W`` by ``W₀ + (W - W₀)(I - U Uᵀ)``
        (:meth:`project_weights_`). ``every=1`` projects each step's update (update mode);
        ``every=K`` lets the optimizer step freely in between, ``K`` times less projection work,
        with the same guarantee for the weights whenever they are read through
        :meth:`project_weights_`, ``state_dict`` or at the end. ``project_state`` also projects
        SGD momentum buffers at each projection (without, the weights drift further along
        remaining directions between projections; Adam's moments are never projected).
        """
        if every < 1:
            raise NullSpaceEngineError(f"Expected `every` >= 1 optimizer steps, got {every!r}.")
        if not self._anchors:
            self._remember_weights()
            self._step_hooks.append(
                self.model.register_state_dict_pre_hook(lambda *_: self.project_weights_(True))
            )
        self._every = every
        if project_state:
            self._state_optimizers.append(optimizer)

        def before(opt: torch.optim.Optimizer, *_: Any) -> None:
            self._stepping = True

        def after(opt: torch.optim.Optimizer, *_: Any) -> None:
            self._stepping = False
            self._pending += 1
            if self._pending >= self._every:
                self.project_weights_()

        self._step_hooks.append(optimizer.register_step_pre_hook(before))
        self._step_hooks.append(optimizer.register_step_post_hook(after))

    def detach(self) -> None:
        """Project the weights a last time (see :meth:`attach`) and remove the step hooks.

        Only when an optimizer step ran since the last projection, or raised inside its step
        (some weights may have moved): weights that did not move are left bit for bit as they
        are (projecting them again would round them where the projector uses the complement).
        """
        if self._anchors and (self._pending or self._stepping):
            self.project_weights_()
        while self._step_hooks:
            self._step_hooks.pop().remove()
        self._anchors = {}
        self._compact = set()
        self._state_optimizers = []
        self._pending = 0
        self._stepping = False

    # -- evidence -------------------------------------------------------------------------------
    def _logits_on_probe(self, forward: Callable[..., Any]) -> Tensor:
        with eval_mode(self.model), torch.no_grad(), ieee_forward(self._device()):
            return output_logits(call_model(forward, self.probe)).detach().float().clone()

    def _probe_logits_then_and_now(
        self, forward: Callable[..., Any] | None
    ) -> tuple[Tensor, Tensor] | None:
        """The probe's logits when the bases were built and now (one forward), or ``None``."""
        if self._probe_logits is None:
            return None
        now = self._logits_on_probe(forward or self.model)
        return self._probe_logits.to(now.device), now

    def prediction_change(self, forward: Callable[..., Any] | None = None) -> float | None:
        """Fraction of the remaining probe whose predicted class changed since the bases were
        built (``None`` before :meth:`build`)."""
        logits = self._probe_logits_then_and_now(forward)
        return None if logits is None else _changed_share(*logits)

    def probe_accuracy(
        self, forward: Callable[..., Any] | None = None
    ) -> tuple[float, float] | None:
        """``(then, now)``: the accuracy on the remaining probe when the bases were built and
        now; ``None`` before :meth:`build`, or when the probe has no class labels that fit the
        logits (one class index per sample, below the number of logits)."""
        if self.probe_labels is None:
            return None
        logits = self._probe_logits_then_and_now(forward)
        return None if logits is None else self._accuracies(*logits)

    def output_drift(self, forward: Callable[..., Any] | None = None) -> float | None:
        """``||f(x) - f₀(x)|| / ||f₀(x)||`` on a fixed probe of remaining inputs (the first
        retain batch, at most 256 samples), ``f₀`` the model when the bases were built.

        Unlike a per-layer drift this sees every parameter, constrained or not.
        """
        logits = self._probe_logits_then_and_now(forward)
        return None if logits is None else _relative_change(*logits)

    def probe_evidence(
        self, forward: Callable[..., Any] | None = None
    ) -> tuple[float, float, tuple[float, float] | None] | None:
        """:meth:`output_drift`, :meth:`prediction_change` and :meth:`probe_accuracy` from one
        forward of the probe (``None`` before :meth:`build`)."""
        logits = self._probe_logits_then_and_now(forward)
        if logits is None:
            return None
        return _relative_change(*logits), _changed_share(*logits), self._accuracies(*logits)

    def _accuracies(self, then: Tensor, now: Tensor) -> tuple[float, float] | None:
        if self.probe_labels is None:
            return None
        labels = self.probe_labels.to(now.device)
        if now.dim() != 2 or labels.shape != now.shape[:1]:
            return None
        if int(labels.min()) < 0 or int(labels.max()) >= now.shape[1]:
            return None
        return (
            float((then.argmax(-1) == labels).float().mean()),
            float((now.argmax(-1) == labels).float().mean()),
        )

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
            "gram": [str(self.gram.dtype), self.gram.row_fraction, self.gram.seed],
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


#: optimizer state projected with the weights: SGD's momentum, a linear sum of past gradients.
#: Adam's ``exp_avg`` is not: projecting it moves momentum into coordinates whose ``exp_avg_sq``
#: is ~0, and ``m / (sqrt(v) + eps)`` then explodes (measured: remaining logits x6000 in a step).
_FIRST_MOMENTS = ("momentum_buffer",)


def _changed_share(then: Tensor, now: Tensor) -> float:
    return float((now.argmax(-1) != then.argmax(-1)).float().mean())


def _relative_change(then: Tensor, now: Tensor) -> float:
    norm = float(torch.linalg.vector_norm(then))
    return float(torch.linalg.vector_norm(now - then)) / max(norm, 1e-12)


def dense_grad(parameter: Tensor) -> Tensor | None:
    """``parameter.grad``, made dense first when it is sparse (``nn.Embedding(sparse=True)``):
    a projected gradient is dense in general. Gradients are projected for SGD (gradient mode,
    relative steps), which takes dense gradients as well; update mode, the choice for every
    other optimizer (``SparseAdam`` included), leaves gradients alone."""
    grad = parameter.grad
    if grad is not None and grad.is_sparse:
        grad = parameter.grad = grad.to_dense()
    return grad


def _project_matrix_(spec: Any, tensor: Tensor, projector: NullSpaceProjector) -> None:
    """Project ``tensor`` (weight-shaped) onto the null space in place, without a copy when
    ``spec.to_matrix`` is a plain view of it."""
    matrix = spec.to_matrix(tensor)
    if _is_view(spec, tensor, matrix):
        projector.project_matrix_(matrix)
    else:
        spec.write_matrix_(tensor, projector.project(matrix))


def _is_view(spec: Any, tensor: Tensor, matrix: Tensor | None = None) -> bool:
    """Whether ``spec.to_matrix(tensor)`` is all of ``tensor``'s storage (in-place ops write
    through)."""
    matrix = spec.to_matrix(tensor) if matrix is None else matrix
    return matrix.data_ptr() == tensor.data_ptr() and matrix.numel() == tensor.numel()


def _check_collectives(
    reduce: Reduce | None, gather: Gather | None, process: tuple[int, int] | None
) -> None:
    # ``build``'s cross-process arguments, before any pass over the data
    if gather is not None and not callable(gather):
        raise TypeError(
            f"`gather` must be callable (tensor -> tensor), got {type(gather).__name__}."
        )
    if process is not None:
        valid = (
            isinstance(process, tuple)
            and len(process) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in process)
            and 0 <= process[0] < process[1]
        )
        if not valid:
            raise ValueError(
                f"`process` must be (rank, world_size) with 0 <= rank < world_size, got "
                f"{process!r}; pass e.g. (fabric.global_rank, fabric.world_size)."
            )
    several = process is not None and process[1] > 1
    if reduce is None and (gather is not None or several):
        raise ValueError(
            "`gather` and `process` share work between processes and need `reduce` (the "
            "cross-process sum) as well; pass all three, or none in a single process."
        )
