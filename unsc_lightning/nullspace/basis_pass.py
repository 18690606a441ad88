"""One basis build: passes over the data in ascending class groups, and the basis updates."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unsc_lightning.nullspace.basis import (
    BasisInfo,
    class_threshold_schedule,
    per_class_basis,
    pooled_basis,
)
from unsc_lightning.nullspace.batches import (
    BatchAdapter,
    batch_size_of,
    call_model,
    map_tensors,
    select_samples,
)
from unsc_lightning.nullspace.covariance import CovarianceAccumulator, SiteRecorder
from unsc_lightning.nullspace.settings import NullSpaceEngineError

if TYPE_CHECKING:
    from unsc_lightning.nullspace.engine import NullSpaceEngine

Reduce = Callable[[Tensor], Tensor]
Threshold = float | Mapping[str, float]
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


class BasisPass:
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
                    inputs, slot = select_samples(inputs, keep, size), slot[keep]
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
        group_size = engine.classes_per_pass(self.device) if per_class else 1
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
            estimate_bytes=engine.estimate_bytes(min(group_size, len(classes)) if per_class else 1),
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
