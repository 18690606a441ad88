"""Per-class covariance cache: one pass over the training data serves every later forget request.

The bases of a class-wise forget request only need the covariances of the classes that remain
(the paper's Algorithm 1 reads them class by class; a pooled basis reads their sum). Accumulating
``C_{l,k}`` once per class ``k`` over *all* training data therefore answers any later request on
the same model by selecting (or summing) the remaining classes' covariances: no pass over the
data, only the eigendecompositions.

A cache is only valid for the exact model it was built on: every parameter and buffer feeds the
inputs of later layers, so the :func:`model_fingerprint` hashes all of them (plus the settings
that change which rows are accumulated). The stored layer dimensions must match the requested
layers; a request for fewer layers is served from a cache holding more.

Memory and disk: ``8 · num_classes · Σ_l d_l²`` bytes (float64), the same as the in-memory
per-class accumulator. The cache holds second-moment statistics of every class, forgotten ones
included: delete it (or those classes, :meth:`ClassCovarianceCache.drop_classes_`) when the
forgotten data must leave no trace.

Per-class rule states: the paper's rule extends one basis class by class in ascending id, so the
basis after the classes below the first forgotten one is the same for every request that keeps
them. The cache records, per layer and threshold schedule, the basis the rule built along one class
sequence (its columns in the order they were added and the width after each class, a few
``d x r`` floats); a later request reuses the longest prefix it shares and runs the rule only on
the classes after it. A recorded prefix is used only while every covariance it was built from is
unchanged (each class's trace and a fixed random quadratic form are checked), and dropping a class
removes every recorded direction that depended on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unsc_lightning.nullspace.context import eval_mode, ieee_forward
from unsc_lightning.nullspace.covariance import (
    CovarianceAccumulator,
    accumulate_covariances,
    layer_dims,
)
from unsc_lightning.nullspace.layers import BasisRule, build_bases, threshold_for
from unsc_lightning.nullspace.rules import BasisInfo, extend_by_class

#: Format version of the cache file; a file of another version is rebuilt, never reinterpreted.
CACHE_VERSION = 1


def model_fingerprint(model: nn.Module, settings: Mapping[str, Any] | None = None) -> str:
    """SHA-256 (hex, 16 characters) of every parameter and buffer of ``model`` and ``settings``.

    Names, dtypes, shapes and raw bytes all enter the hash, so any change of weights, running
    statistics or architecture gives another fingerprint. ``requires_grad`` and train/eval
    modes do not (they do not change the eval-mode forward pass the covariances come from).

    Args:
        model: the module whose forward pass produces the layer inputs.
        settings: JSON-serialisable options that change the accumulated rows (e.g. a batch limit).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{kind}:{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
            if data.numel():
                digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ClassCovarianceCache:
    """Per-class input covariances ``C_{l,k} = Σ x xᵀ`` of every constrained layer, on disk.

    Args:
        sums: ``layer name -> (num_classes, d, d)`` float64 per-class sums.
        samples_per_class: samples accumulated per class, shape ``(num_classes,)``.
        fingerprint: :func:`model_fingerprint` of the model the sums were accumulated on.
        rows_seen: representation rows accumulated per layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> data = TensorDataset(torch.randn(30, 6), torch.arange(30) % 3)
        >>> layers = {"0": net[0], "2": net[2]}
        >>> cache = ClassCovarianceCache.build(net, layers, DataLoader(data, batch_size=8), 3)
        >>> bases = cache.bases([0, 2], threshold=0.97)  # forget class 1, no pass over the data
        >>> sorted(bases), bases["0"][0].shape[0]
        (['0', '2'], 6)
    """

    def __init__(
        self,
        sums: Mapping[str, Tensor],
        samples_per_class: Tensor,
        fingerprint: str,
        rows_seen: Mapping[str, int] | None = None,
    ) -> None:
        if not sums:
            raise ValueError("`sums` is empty: a covariance cache needs at least one layer.")
        shapes = {tuple(total.shape[:1]) for total in sums.values()}
        if any(total.dim() != 3 for total in sums.values()) or len(shapes) != 1:
            raise ValueError("`sums` must map every layer to a (num_classes, d, d) tensor.")
        self.sums = dict(sums)
        self.samples_per_class = samples_per_class.detach().to("cpu", torch.long).clone()
        self.fingerprint = str(fingerprint)
        self.rows_seen = {name: int((rows_seen or {}).get(name, 0)) for name in self.sums}
        #: most rows one sample gave each layer (bounds each class's rank; 0 = unknown)
        self.rows_per_sample = {name: 0 for name in self.sums}
        #: per-class rule states, ``"layer|threshold|step" -> _RuleState`` (see the module doc)
        self.rule_states: dict[str, _RuleState] = {}
        #: whether ``rule_states`` changed since the cache was loaded or saved
        self.states_changed = False
        # per layer: every class's signatures (see _signatures_of)
        self._memo: dict[str, tuple[tuple[int, int], Tensor]] = {}

    # -- what the cache holds -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.samples_per_class.numel())

    @property
    def dims(self) -> dict[str, int]:
        """``layer name -> d``."""
        return {name: int(total.shape[-1]) for name, total in self.sums.items()}

    @property
    def classes(self) -> list[int]:
        """Class ids with at least one accumulated sample."""
        return [k for k in range(self.num_classes) if int(self.samples_per_class[k]) > 0]

    def missing_classes(self, classes: Iterable[int]) -> list[int]:
        """Those of ``classes`` the cache has no sample of."""
        held = set(self.classes)
        return sorted({int(k) for k in classes} - held)

    def serves(self, fingerprint: str, dims: Mapping[str, int], num_classes: int) -> bool:
        """Whether the cache was built on this model and holds these layers with these dims."""
        return (
            fingerprint == self.fingerprint
            and num_classes == self.num_classes
            and all(self.dims.get(name) == d for name, d in dims.items())
        )

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_accumulator(
        cls, accumulator: CovarianceAccumulator, fingerprint: str
    ) -> ClassCovarianceCache:
        """Wrap a per-class accumulator's sums (moved to CPU)."""
        if not accumulator.per_class:
            raise ValueError("A covariance cache needs a per-class accumulator (`num_classes=`).")
        return cls(
            {name: total.to("cpu") for name, total in accumulator.sums.items()},
            accumulator.samples_per_class,
            fingerprint,
            accumulator.rows_seen,
        )._with_rows_per_sample(accumulator.rows_per_sample)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        loader: Iterable[Any],
        num_classes: int,
        *,
        forward: Callable[[Tensor], Any] | None = None,
        device: torch.device | str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ClassCovarianceCache:
        """Accumulate per-class covariances over every ``(x, y, ...)`` batch of ``loader``.

        The model runs in eval mode without gradients (its modes are restored afterwards);
        batches are moved to ``device`` (default: the device of the model's first parameter),
        where the sums are accumulated.

        Args:
            model: the trained model; fingerprinted with ``settings``.
            layers: ``name -> module`` of the layers whose inputs are accumulated.
            loader: labelled batches over *all* classes a later request may keep.
            num_classes: number of classes.
            forward: what to call on a batch (default: ``model``).
            device: where to run and accumulate.
            settings: extra fingerprint inputs (see :func:`model_fingerprint`).

        Raises:
            RuntimeError: for unlabelled batches, NaN/inf layer inputs, or labels out of range.
        """
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else "cpu"
        accumulator = CovarianceAccumulator(layer_dims(layers), num_classes, device=device)

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise RuntimeError("A covariance cache needs labelled batches `(x, y, ...)`.")
                yield batch[0].to(device), batch[1].to(device)

        with eval_mode(model), ieee_forward(torch.device(device)):
            accumulate_covariances(forward or model, layers, batches(), accumulator)
        return cls.from_accumulator(accumulator, model_fingerprint(model, settings))

    def _with_rows_per_sample(self, rows: Mapping[str, int]) -> ClassCovarianceCache:
        self.rows_per_sample = {name: int(rows.get(name, 0)) for name in self.sums}
        return self

    def update_(self, other: ClassCovarianceCache) -> ClassCovarianceCache:
        """Take every class ``other`` holds samples of from ``other`` (same model and layers)."""
        if other.fingerprint != self.fingerprint or other.num_classes != self.num_classes:
            raise ValueError("Cannot merge covariance caches of different models or class counts.")
        if other.dims != self.dims:
            raise ValueError("Cannot merge covariance caches of different layer sets.")
        for k in other.classes:
            for name, total in self.sums.items():
                total[k] = other.sums[name][k].to(total.device)
            self.samples_per_class[k] = other.samples_per_class[k]
        for name in self.rows_seen:
            self.rows_seen[name] = max(self.rows_seen[name], other.rows_seen[name])
            self.rows_per_sample[name] = max(
                self.rows_per_sample[name], other.rows_per_sample[name]
            )
        return self

    def drop_classes_(self, classes: Iterable[int]) -> ClassCovarianceCache:
        """Zero the covariances of ``classes`` (e.g. forgotten data that must leave no trace)."""
        dropped = {int(k) for k in classes}
        for k in dropped:
            for total in self.sums.values():
                total[k].zero_()
            self.samples_per_class[k] = 0
        # no recorded direction may depend on a dropped class: keep only the prefixes before it
        for key, state in list(self.rule_states.items()):
            kept = next((i for i, k in enumerate(state.classes) if k in dropped), None)
            if kept is not None:
                self._set_state(key, state.truncated(kept))
        return self

    def _set_state(self, key: str, state: _RuleState | None) -> None:
        if state is None or not state.classes:
            if self.rule_states.pop(key, None) is not None:
                self.states_changed = True
            return
        self.rule_states[key] = state
        self.states_changed = True

    # -- bases ----------------------------------------------------------------------------------
    def accumulator(self, layers: Iterable[str] | None = None) -> CovarianceAccumulator:
        """A :class:`CovarianceAccumulator` view of the sums (no copy), optionally of some layers."""
        names = list(self.sums) if layers is None else list(layers)
        accumulator = CovarianceAccumulator.from_sums(
            {name: self.sums[name] for name in names},
            self.samples_per_class,
            {name: self.rows_seen[name] for name in names},
        )
        accumulator.rows_per_sample = {name: self.rows_per_sample[name] for name in names}
        return accumulator

    def bases(
        self,
        remaining_classes: Iterable[int],
        threshold: float | Mapping[str, float],
        rule: BasisRule = "per_class",
        class_threshold_step: float = 0.0,
        layers: Iterable[str] | None = None,
    ) -> dict[str, tuple[Tensor, BasisInfo]]:
        """Bases of the remaining subspace for a request keeping ``remaining_classes``.

        Args:
            remaining_classes: class ids that remain (every one must be held by the cache).
            threshold: energy fraction, or per-layer mapping (patterns allowed).
            rule: ``"per_class"`` (the paper's Algorithm 1) or ``"pooled"``.
            class_threshold_step: per-class schedule ``threshold + step * k``.
            layers: layer names to build (default: every cached layer).

        Returns:
            ``name -> (U, info)`` with ``U`` float64 ``d x r``, as :func:`build_bases`.

        The per-class rule starts from the recorded rule state that shares the longest prefix
        with ``remaining_classes`` and records its own run when that serves the held classes
        longer (``states_changed``; :meth:`save` writes the records with the sums).

        Raises:
            ValueError: when a remaining class has no sample in the cache.
        """
        remaining = sorted({int(k) for k in remaining_classes})
        missing = self.missing_classes(remaining)
        if missing:
            raise ValueError(
                f"The covariance cache holds no sample of the remaining classes {missing}; "
                "rebuild it from data that contain them."
            )
        if rule != "per_class" or not remaining:
            return build_bases(
                self.accumulator(layers), threshold, rule, remaining, class_threshold_step
            )
        names = list(self.sums) if layers is None else list(layers)
        return {
            name: self._per_class(
                name, remaining, threshold_for(threshold, name), class_threshold_step
            )
            for name in names
        }

    def prepare_rule_states(
        self,
        threshold: float | Mapping[str, float],
        class_threshold_step: float = 0.0,
        layers: Iterable[str] | None = None,
    ) -> None:
        """Record the per-class rule along every held class, for later requests to start from.

        A request that forgets class ``f`` then runs the rule only on the classes above ``f``.
        Costs one per-class basis build (less the prefix already recorded).
        """
        held = self.classes
        if held:
            for name in list(self.sums) if layers is None else list(layers):
                self._per_class(name, held, threshold_for(threshold, name), class_threshold_step)

    def _bounds(self, name: str, classes: list[int]) -> dict[int, int] | None:
        # as :func:`build_bases`: rank(C_k) <= rows summed into it
        per_sample = self.rows_per_sample.get(name, 0)
        if not per_sample:
            return None
        return {k: int(self.samples_per_class[k]) * per_sample for k in classes}

    def _signatures_of(self, name: str, classes: list[int]) -> Tensor:
        """:func:`_signatures` of ``classes``, from a table of every class computed once per
        layer and again only when its sums changed in place (their version counter, which
        views share, moves with ``update_``, ``drop_classes_`` or a user's own edit)."""
        sums = self.sums[name]
        stamp = (id(sums), sums._version)
        found = self._memo.get(name)
        if found is None or found[0] != stamp:
            found = (stamp, _signatures(sums, list(range(sums.shape[0]))))
            self._memo[name] = found
        return found[1][classes]

    def _per_class(
        self, name: str, remaining: list[int], eps: float, step: float
    ) -> tuple[Tensor, BasisInfo]:
        sums = self.sums[name]
        dim = sums.shape[-1]
        key = f"{name}|{float(eps)!r}|{float(step)!r}"
        bounds = self._bounds(name, remaining)
        signatures = self._signatures_of(name, remaining)
        stored = self.rule_states.get(key)
        matched = [] if stored is None else stored.shared_prefix(remaining, signatures, bounds)
        start = len(matched)
        widths = [] if stored is None else [stored.widths[i] for i in matched]
        if stored is not None and widths:
            basis = stored.basis[:, : widths[-1]].to(sums.device).contiguous()
        else:
            basis = torch.zeros(dim, 0, dtype=torch.float64, device=sums.device)
        for k in remaining[start:]:
            bound = None if bounds is None else bounds[k]
            basis = extend_by_class(basis, sums[k], min(eps + step * k, 1.0), bound)
            widths.append(basis.shape[1])
        if stored is None or start < len(remaining):
            candidate = _RuleState(
                list(remaining),
                widths,
                [-1 if bounds is None else bounds[k] for k in remaining],
                signatures,
                basis.detach().to("cpu"),
            )
            # keep the state that serves the held classes longest (it serves the most requests);
            # a stored class whose covariance changed ends what the stored state serves
            held = self.classes
            serves = 0
            if stored is not None:
                held_signatures = self._signatures_of(name, held)
                serves = len(stored.shared_prefix(held, held_signatures, self._bounds(name, held)))
            if stored is None or candidate.follows(held) > serves:
                self._set_state(key, candidate)
        summed = torch.zeros_like(sums[0], dtype=torch.float64)
        for k in remaining:
            summed += sums[k]
        summed = (summed + summed.T) / 2
        total = float(torch.trace(summed))
        kept = float(((summed @ basis) * basis).sum()) if basis.shape[1] else 0.0
        energy = kept / total if total > 0 else 1.0
        return basis, BasisInfo(dim=dim, rank=basis.shape[1], energy=energy)

    # -- storage --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the cache atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        payload = {
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "samples_per_class": self.samples_per_class,
            "rows_seen": self.rows_seen,
            "rows_per_sample": self.rows_per_sample,
            "sums": {name: total.to("cpu") for name, total in self.sums.items()},
            "rule_states": {key: state.to_payload() for key, state in self.rule_states.items()},
        }
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:  # full disk, file-size limit, no permission
            raise OSError(
                f"Could not write the covariance cache {str(path)!r}: {type(error).__name__}: "
                f"{error}. Free disk space or pass another `covariance_cache=` path."
            ) from error
        finally:
            tmp.unlink(missing_ok=True)
        self.states_changed = False
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], map_location: torch.device | str = "cpu"
    ) -> ClassCovarianceCache:
        """Read a cache written by :meth:`save`.

        Raises:
            ValueError: for a file of another format version.
        """
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        version = payload.get("version") if isinstance(payload, dict) else None
        if version != CACHE_VERSION:
            raise ValueError(
                f"Covariance cache {str(path)!r} has format version {version!r}, expected "
                f"{CACHE_VERSION}; it must be rebuilt."
            )
        cache = cls(
            payload["sums"],
            payload["samples_per_class"],
            payload["fingerprint"],
            payload["rows_seen"],
        )._with_rows_per_sample(payload.get("rows_per_sample", {}))
        states = payload.get("rule_states", {})
        for key, stored in states.items() if isinstance(states, dict) else ():
            state = _RuleState.from_payload(stored)
            # a malformed or foreign state is not used (the rule then runs in full)
            name = str(key).split("|", 1)[0]
            dim = cache.dims.get(name)
            if state is not None and dim is not None and state.basis.shape[0] == dim:
                cache.rule_states[str(key)] = state
        return cache


def _signatures(sums: Tensor, classes: list[int]) -> Tensor:
    """Per class: ``trace(C_k)`` and ``sᵀ C_k s`` for a fixed Gaussian ``s`` (float64, CPU)."""
    dim = sums.shape[-1]
    probe = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = probe.to(device=sums.device, dtype=sums.dtype)
    index = torch.tensor(classes, dtype=torch.long, device=sums.device)
    traces = sums.diagonal(dim1=-2, dim2=-1).sum(-1).index_select(0, index)
    forms = (sums @ probe).index_select(0, index) @ probe  # no copy of the selected sums
    return torch.stack([traces, forms], dim=1).to("cpu", torch.float64)


class _RuleState:
    """The per-class rule's basis along one class sequence (see the module doc)."""

    def __init__(
        self,
        classes: list[int],
        widths: list[int],
        bounds: list[int],
        signatures: Tensor,
        basis: Tensor,
    ) -> None:
        self.classes, self.widths, self.bounds = classes, widths, bounds
        self.signatures, self.basis = signatures, basis

    def shared_prefix(
        self, classes: list[int], signatures: Tensor, bounds: Mapping[int, int] | None
    ) -> list[int]:
        """Positions in this state of the leading classes of ``classes`` it can serve.

        A class of the state that ``classes`` lacks (a forgotten one) is passed over when it
        added no direction: the rule then met the next class with the same basis. A class is
        served only while its covariance (trace and probe form) and rank bound are unchanged.
        """
        mine, theirs = self.signatures.tolist(), signatures.tolist()
        matched: list[int] = []
        i = 0
        for j, k in enumerate(classes):
            while (
                i < len(self.classes)
                and self.classes[i] < k
                and self.widths[i] == (self.widths[i - 1] if i else 0)
            ):
                i += 1
            if i == len(self.classes) or self.classes[i] != k:
                break
            if self.bounds[i] != (-1 if bounds is None else bounds[k]):
                break
            if any(abs(a - b) > 1e-12 * (abs(a) + abs(b)) for a, b in zip(mine[i], theirs[j])):
                break
            matched.append(i)
            i += 1
        return matched

    def follows(self, classes: list[int]) -> int:
        """Length of the common prefix of this state's classes and ``classes``."""
        count = 0
        for mine, theirs in zip(self.classes, classes):
            if mine != theirs:
                break
            count += 1
        return count

    def truncated(self, count: int) -> _RuleState:
        """The state after its first ``count`` classes."""
        width = self.widths[count - 1] if count else 0
        return _RuleState(
            self.classes[:count],
            self.widths[:count],
            self.bounds[:count],
            self.signatures[:count].clone(),
            self.basis[:, :width].clone(),
        )

    def to_payload(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "widths": list(self.widths),
            "bounds": list(self.bounds),
            "signatures": self.signatures,
            "basis": self.basis,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> _RuleState | None:
        try:
            classes = [int(k) for k in payload["classes"]]
            widths = [int(w) for w in payload["widths"]]
            bounds = [int(b) for b in payload["bounds"]]
            signatures = payload["signatures"].to("cpu", torch.float64)
            basis = payload["basis"].to("cpu", torch.float64)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        consistent = (
            len(classes) == len(widths) == len(bounds) == signatures.shape[0]
            and tuple(signatures.shape[1:]) == (2,)
            and basis.dim() == 2
            and classes == sorted(set(classes))
            and widths == sorted(widths)
            and (not widths or widths[-1] == basis.shape[1])
        )
        return cls(classes, widths, bounds, signatures, basis) if consistent else None
