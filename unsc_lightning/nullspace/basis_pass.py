"""One basis build: passes over the data in ascending class groups, and the basis updates."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unsc_lightning.nullspace.batches import (
    BatchAdapter,
    batch_size_of,
    call_model,
    map_tensors,
)
from unsc_lightning.nullspace.covariance import ColumnOrder, CovarianceAccumulator, SiteRecorder
from unsc_lightning.nullspace.representations import channels_last_weight_index
from unsc_lightning.nullspace.rules import (
    BasisInfo,
    ClassRows,
    class_threshold_schedule,
    per_class_basis,
    pooled_basis,
    pooled_rows_basis,
)
from unsc_lightning.nullspace.settings import NullSpaceEngineError

if TYPE_CHECKING:
    from unsc_lightning.nullspace.engine import NullSpaceEngine

Reduce = Callable[[Tensor], Tensor]
#: every process's ``n_p x d`` tensor, concatenated in process order (the same on every process)
Gather = Callable[[Tensor], Tensor]
#: ``(layer, class id) -> rows`` of the classes whose basis step works on their rows
HeldRows = dict[tuple[str, int], Tensor]
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
        held_rows: ``layer -> classes`` (1 for the pooled rule) whose basis step worked on
            their rows, never forming their ``d x d`` sums (wide layers that saw few rows per
            class; :func:`~unsc_lightning.nullspace.gram.held_rows`).
        layers_built: layers whose bases this process computed (all of them in one process;
            with several, each layer's bases are computed by one process and shared).
        unused_layers: layers no remaining sample reached (their basis is the whole space:
            they are kept unchanged).
        functional_layers: layers whose rows came only from ``F.linear`` calls on their weight
            made without calling the layer (torchvision's Swin attention).
    """

    samples: int
    classes: list[int]
    passes: int
    peak_bytes: int
    estimate_bytes: int
    held_rows: dict[str, int] = field(default_factory=dict)
    layers_built: int = 0
    unused_layers: list[str] = field(default_factory=list)
    functional_layers: list[str] = field(default_factory=list)


class BasisPass:
    """One build: passes over the data, class groups in ascending order, basis updates.

    The first pass takes classes as their labels appear, holding the per-class sums of at most
    ``group`` classes (the lowest ids seen so far: a lower class evicts the highest). When more
    classes exist, later passes accumulate the next groups in ascending order; the per-class rule
    extends each basis group by group, so memory never holds more than one group's sums.

    A wide layer keeps a class's few rows as rows (:func:`~unsc_lightning.nullspace.gram.held_rows`)
    and the rule works on them; its ``d x d`` sums are never allocated when every class fits.
    Several processes agree per layer and class whether to gather those rows (``gather``) or to
    multiply them into sums that are all-reduced (``reduce``), and with ``process`` each layer's
    bases are computed by one process and all-reduced to the others.
    """

    def __init__(
        self,
        engine: NullSpaceEngine,
        device: torch.device,
        adapter: BatchAdapter,
        forward: Callable[..., Any],
        reduce: Reduce | None,
        gather: Gather | None = None,
        process: tuple[int, int] | None = None,
    ) -> None:
        self.engine = engine
        self.device = device
        self.adapter = adapter
        self.forward = forward
        self.reduce = reduce
        self.gather = gather
        # (this process, processes): with ``reduce``, each layer's bases are computed by one
        # process (:meth:`_owners`) and all-reduced to the others
        self.process = process if reduce is not None and process and process[1] > 1 else None
        self.held_classes: dict[str, int] = {}
        self.built: set[str] = set()
        self.dims = engine.dims
        self.used: dict[int, int] = {}  # samples used per class, across passes (for the cap)
        self.seen_keys: set[str] = set()
        self.functional_keys: set[str] = set()  # rows only from F.linear calls on the weight
        self.seen_classes: set[int] = set()
        self.class_samples: dict[int, int] = {}
        self.bases: dict[str, Tensor] = {}
        self.saturated: set[str] = set()
        self.peak = 0
        #: ``key -> (kernel_size, channels per group)`` of the sums kept channels-last
        self.column_orders: dict[str, ColumnOrder] = {}

    def _pass(
        self, batches: Iterable[Any], slots: _Slots, pooled_labels: bool
    ) -> CovarianceAccumulator:
        engine = self.engine
        accumulator = CovarianceAccumulator(
            self.dims, num_classes=0, device=self.device, gram=engine.gram
        )
        slots.bind(accumulator)
        # a class's (or the pooled rule's) few rows of a wide layer stay rows for the rule;
        # several processes share them with ``gather`` (without it they form and sum covariances)
        accumulator.keep_rows = self.reduce is None or self.gather is not None
        products = _ProductDtypes(engine, slots)
        accumulator.product_dtype = products.of_slot
        sites = engine.accounting.sites()
        recorder = SiteRecorder(
            sites,
            accumulator.add,
            accumulator.add_shared,
            row_dtype=products.of_rows,
            channels_last=True,
            row_fraction=engine.gram.row_fraction,
            seed=engine.gram.seed,
            shift_gram=True,
        )
        accumulator.channels_last_(recorder.column_orders)
        # the sums stay channels-last; the bases are permuted to weight order at the end of run
        self.column_orders = dict(recorder.column_orders)

        def forward(inputs: Any, slot: Tensor) -> None:
            accumulator.set_labels(slot.to(self.device))
            recorder.batch_size = int(slot.numel())
            call_model(self.forward, inputs)
            recorder.narrow_functional()
            accumulator.check_finite()
            self._peak(accumulator)

        merged = MergedBatches(forward, self.device)
        # the held inputs carry slot numbers of the classes held now: forward them before a
        # slot changes class
        slots.before_evict = merged.flush
        with recorder:
            for batch in batches:
                inputs, labels = self.adapter(batch)
                size = batch_size_of(inputs, labels)
                if size == 0:
                    continue
                if labels is None and not pooled_labels:
                    raise _Unlabelled()
                known = labels  # the probe's labels, before the pooled rule sets them to zero
                if labels is None or pooled_labels:
                    labels = torch.zeros(size, dtype=torch.long)
                labels = labels.reshape(-1).long().cpu()
                slot = self._slots(labels, slots)
                if isinstance(inputs, Tensor):
                    # the kept samples, class blocks contiguous (one product per class): one
                    # stable sort by slot and one gather (none when already in that order)
                    slot, order = torch.sort(slot, stable=True)
                    skipped = int((slot < 0).sum())
                    slot, order = slot[skipped:], order[skipped:]
                    if slot.numel() == 0:
                        continue
                    if engine.probe is None:  # the first kept samples, in batch order
                        first = order.sort().values[:_PROBE_SAMPLES]
                        probe = inputs.index_select(0, first.to(inputs.device))
                        engine.probe = probe.to(self.device)
                        engine.probe_labels = _probe_labels(known, first, size)
                    if skipped or bool((order[1:] < order[:-1]).any()):
                        inputs = inputs.index_select(0, order.to(inputs.device))
                    # small batches are merged up to a bounded size before the forward
                    merged.push(inputs, slot, recorder.row_bytes_per_sample)
                else:
                    merged.flush()
                    if not bool((slot >= 0).any()):
                        continue
                    if engine.probe is None:
                        engine.probe = map_tensors(
                            inputs, lambda t: t[:_PROBE_SAMPLES].to(self.device)
                        )
                        engine.probe_labels = _probe_labels(
                            known, torch.arange(min(size, _PROBE_SAMPLES)), size
                        )
                    forward(map_tensors(inputs, lambda t: t.to(self.device)), slot)
            merged.flush()
            slots.before_evict = None
            self.seen_keys |= recorder.seen
            self.functional_keys |= recorder.functional_only
        return accumulator

    def _slots(self, labels: Tensor, slots: _Slots) -> Tensor:
        """Each sample's slot, ``-1`` for a sample not taken (class not held, or at its cap).

        Classes are assigned in ascending order (a class taken in this batch is never evicted
        by a later label of it); within a class the first samples in batch order are taken.
        """
        cap = self.engine.max_samples_per_class
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.seen_classes.update(classes.tolist())
        assigned = slots.assign_all(classes.tolist(), self.used)
        taken = []
        for label, count, slot in zip(classes.tolist(), counts.tolist(), assigned):
            room = 0 if slot < 0 else count
            if cap is not None:
                room = max(0, min(room, cap - self.used.get(label, 0)))
            if room:
                self.used[label] = self.used.get(label, 0) + room
            taken.append(room)
        # rank of each sample among the samples of its class, in batch order
        order = torch.argsort(inverse, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(labels.numel()) - starts[inverse[order]]
        keep = rank < torch.tensor(taken, dtype=torch.long)[inverse]
        slot_of = torch.tensor(assigned, dtype=torch.long)[inverse]
        return torch.where(keep, slot_of, torch.full_like(slot_of, -1))

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
        self._check_process()
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
                held, dense = self._take(first, list(slots.classes))
                # per-class sums in slot order; aligned to ``group`` where another process may
                # hold other slots (the all-reduce needs the same layout everywhere)
                if self.reduce is None and sorted(slots.classes) == group:
                    accumulator, group = first, list(slots.classes)
                else:
                    accumulator = slots.aligned(first, group)
                del first
            else:
                accumulator = self._pass(batches, _Slots(len(group), fixed=group), False)
                held, dense = self._take(accumulator, group)
            held, summed = self._share(held, dense, accumulator, group)
            self._account(accumulator, group, summed)
            self._extend(bases, energy, total, accumulator, group, per_class, held)
            del accumulator, held
        samples = sum(self.class_samples.values())
        if samples == 0:
            raise RuntimeError(
                "The remaining (retain) data are empty: no sample was read, so no basis can be "
                "built. Check the forget specification and the retain dataloader."
            )
        # a layer no remaining sample reached in this eval-mode forward (a torchvision GoogLeNet's
        # or Inception's auxiliary heads run in training only; a branch the remaining data never
        # take) has no remaining rows to constrain it by: the report names it, and the engine
        # keeps it unchanged (NullSpaceEngine._set_bases)
        unseen = [key for key in self.dims if key not in self.seen_keys]
        for key, order in self.column_orders.items():  # channels-last rows to weight order
            to_weight = channels_last_weight_index(*order).to(bases[key].device)
            bases[key] = bases[key].index_select(0, to_weight)
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
            held_rows=dict(self.held_classes),
            layers_built=len(self.built),
            unused_layers=unseen,
            functional_layers=sorted(self.functional_keys),
        )
        return result, report

    def _take(
        self, accumulator: CovarianceAccumulator, classes: list[int]
    ) -> tuple[HeldRows, set[tuple[str, int]]]:
        # the rows held per (layer, class id) (``classes``: the class of each slot), and the
        # (layer, class) pairs whose sums received products here
        taken = accumulator.take_rows()
        held = {(name, classes[slot]): rows for (name, slot), rows in taken.items()}
        dense = {
            (name, k)
            for name in self.dims
            if accumulator.held_limit(name)
            for slot, k in enumerate(classes)
            if accumulator.is_dense(name, slot)
        }
        return held, dense

    def _share(
        self,
        held: HeldRows,
        dense: set[tuple[str, int]],
        accumulator: CovarianceAccumulator,
        group: list[int],
    ) -> tuple[HeldRows, list[str] | None]:
        """Several processes: the rows of a (layer, class) are gathered from every process when
        no process formed its sums and their total stays within ``held_rows``; otherwise each
        process multiplies its rows into the sums, which are all-reduced.

        Returns:
            the rows every process now holds, and the layers whose sums must be all-reduced
            (``None``: one process, nothing to reduce).
        """
        if self.reduce is None:
            return held, None
        wide = [name for name in self.dims if accumulator.held_limit(name)]
        if self.gather is None or not wide:
            return held, list(self.dims)
        flags = torch.zeros(len(wide), len(group), 2, dtype=torch.float64, device=self.device)
        for i, name in enumerate(wide):
            for j, k in enumerate(group):
                flags[i, j, 0] = float((name, k) in dense)
                rows = held.get((name, k))
                flags[i, j, 1] = 0.0 if rows is None else float(rows.shape[0])
        flags = self.reduce(flags).cpu()
        shared: HeldRows = {}
        summed = [name for name in self.dims if name not in wide]
        for i, name in enumerate(wide):
            dim = self.dims[name]
            for j, k in enumerate(group):
                anywhere, count = bool(flags[i, j, 0] > 0), int(flags[i, j, 1])
                local = held.get((name, k))
                if not anywhere and 0 < count <= accumulator.held_limit(name):
                    # float64 everywhere (exact for the float32 rows): every process sends the
                    # same dtype, also one without rows of this class
                    rows = torch.zeros(0, dim, dtype=torch.float64, device=self.device)
                    rows = rows if local is None else local.to(self.device, torch.float64)
                    shared[(name, k)] = self.gather(rows)
                elif anywhere or count:
                    if local is not None:
                        accumulator.add_rows_(name, j, local)
                    if name not in summed:
                        summed.append(name)
        return shared, summed

    def _account(
        self, accumulator: CovarianceAccumulator, group: list[int], summed: list[str] | None
    ) -> None:
        if self.reduce is not None:
            accumulator.samples_per_class = accumulator.samples_per_class.to(self.device)
            accumulator.reduce_(self.reduce, summed)
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
        held: HeldRows,
    ) -> None:
        engine = self.engine
        start = time.perf_counter()
        owners = self._owners(accumulator, held, len(group) if per_class else 1)
        me = 0 if self.process is None else self.process[0]
        kept: dict[str, float] = {}  # energy the new bases capture, of the layers built here
        held = dict(held)  # each layer's rows leave it (and the peak) once that layer is done
        for key, dim in self.dims.items():
            rows = {k: ClassRows(held.pop((name, k))) for name, k in list(held) if name == key}
            if rows:
                self.held_classes[key] = self.held_classes.get(key, 0) + len(rows)
            # ``None``: every row of this layer is held as rows, no ``d x d`` sums exist
            sums = accumulator.layer_sums(key)
            trace = 0.0 if sums is None else float(sums.diagonal(dim1=-2, dim2=-1).sum())
            trace += sum(held_rows.trace() for held_rows in rows.values())
            total[key] += trace
            if owners[key] != me:
                continue
            self.built.add(key)
            none = ClassRows(torch.zeros(0, dim, dtype=torch.float64, device=self.device))
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
                covariances: dict[int, Tensor | ClassRows] = {
                    k: rows.get(k, none if sums is None else sums[i]) for i, k in enumerate(group)
                }
                bases[key], info = per_class_basis(covariances, schedule, bases[key], bounds)
            elif group[0] in rows or sums is None:
                bases[key], info = pooled_rows_basis(rows.get(group[0], none), eps)
            else:
                bound = None if bounds is None else sum(bounds.values())
                bases[key], info = pooled_basis(sums[0], eps, bound)
            kept[key] = info.energy * trace
            waiting = [r.rows for r in rows.values()] + list(held.values())
            self._peak(accumulator, bases, sum(r.numel() * r.element_size() for r in waiting))
        if self.process is not None:
            kept = self._share_bases(bases, kept, owners)
        for key, value in kept.items():
            energy[key] += value
        engine.timings["bases"] += time.perf_counter() - start

    def _check_process(self) -> None:
        # every process must name itself once in ``0 .. world - 1``: otherwise a layer's owner
        # may be no process, and its bases would be the zeros the others contribute
        if self.process is None:
            return
        assert self.reduce is not None
        rank, world = self.process
        present = torch.zeros(world, dtype=torch.float64, device=self.device)
        present[rank] = 1.0
        counts = [int(c) for c in self.reduce(present).tolist()]
        if counts != [1] * world:
            raise RuntimeError(
                f"`process` was {self.process} here, but the processes do not name each rank of "
                f"0 .. {world - 1} once (processes per rank: {counts}); pass each process its own "
                "(global_rank, world_size)."
            )

    def _owners(
        self, accumulator: CovarianceAccumulator, held: HeldRows, classes: int
    ) -> dict[str, int]:
        """The process that computes each layer's bases: the costliest layers first, each to
        the least loaded process (the same answer on every process: the costs come from the
        dimensions, the all-reduced sums and the gathered rows, which every process holds)."""
        if self.process is None:
            return dict.fromkeys(self.dims, 0)
        cost: dict[str, float] = {}
        for key, dim in self.dims.items():
            counts = [r.shape[0] for (name, _), r in held.items() if name == key]
            cost[key] = float(sum(n * n * dim for n in counts))
            if accumulator.layer_sums(key) is not None:  # one d x d eigenproblem per class
                cost[key] += float(classes) * dim**3
        load = [0.0] * self.process[1]
        owners: dict[str, int] = {}
        for key in sorted(self.dims, key=lambda k: (-cost[k], k)):
            least = min(range(len(load)), key=lambda p: (load[p], p))
            owners[key] = least
            load[least] += cost[key]
        return owners

    def _share_bases(
        self, bases: dict[str, Tensor], kept: dict[str, float], owners: dict[str, int]
    ) -> dict[str, float]:
        """Every layer's bases (and captured energy) from its owner to every process: one
        all-reduce of the widths, one per layer of the bases (zeros from the others: exact)."""
        assert self.reduce is not None and self.process is not None
        me = self.process[0]
        names = list(self.dims)
        mine = [owners[key] == me for key in names]
        widths = torch.tensor(
            [float(bases[key].shape[1]) if own else 0.0 for key, own in zip(names, mine)],
            dtype=torch.float64,
            device=self.device,
        )
        energies = torch.tensor(
            [kept.get(key, 0.0) for key in names], dtype=torch.float64, device=self.device
        )
        shared_widths = self.reduce(widths).tolist()
        shared_energies = self.reduce(energies).tolist()
        for key, own, width in zip(names, mine, shared_widths):
            if own:
                basis = bases[key].contiguous()
            else:
                basis = torch.zeros(self.dims[key], int(width), dtype=torch.float64)
            bases[key] = self.reduce(basis.to(self.device))
        return dict(zip(names, shared_energies))

    def _peak(
        self,
        accumulator: CovarianceAccumulator,
        bases: Mapping[str, Tensor] | None = None,
        rows: int = 0,
    ) -> None:
        # ``rows``: bytes of the class rows taken out of the accumulator (``take_rows``)
        held = accumulator.held_bytes() + rows  # without adding the buffered rows (no flush)
        held += 8 * sum(t.numel() for t in (bases if bases is not None else self.bases).values())
        self.peak = max(self.peak, held)


class _Slots:
    """Which class each slot of a per-class accumulator holds (lowest ids first)."""

    def __init__(self, capacity: int, fixed: list[int] | None) -> None:
        self.capacity = capacity
        self.classes: list[int] = list(fixed or [])
        self.fixed = fixed is not None
        self.accumulator: CovarianceAccumulator | None = None
        #: called before a slot changes class (the pass forwards what it holds for the slots)
        self.before_evict: Callable[[], None] | None = None

    def bind(self, accumulator: CovarianceAccumulator) -> None:
        self.accumulator = accumulator
        self._grow(len(self.classes))

    def _grow(self, count: int) -> None:
        # every class new in a batch at once: one copy of the sums, not one per class
        assert self.accumulator is not None
        self.accumulator.add_classes_(count)

    def assign_all(self, labels: list[int], used: dict[int, int]) -> list[int]:
        """Slots of ``labels`` (ascending), assigning, evicting and growing as needed."""
        result = []
        fresh = 0
        for label in labels:
            if label in self.classes:
                result.append(self.classes.index(label))
            elif self.fixed:
                result.append(-1)
            elif len(self.classes) < self.capacity:
                self.classes.append(label)
                fresh += 1
                result.append(len(self.classes) - 1)
            elif label > max(self.classes):
                result.append(-1)
            else:
                # evict the highest class (it comes back in a later pass); labels ascend, so
                # the highest is never a class appended in this batch (those are below label)
                highest = max(self.classes)
                slot = self.classes.index(highest)
                if self.before_evict is not None:
                    self.before_evict()
                assert self.accumulator is not None
                self.accumulator.clear_class_(slot)
                used[highest] = 0
                self.classes[slot] = label
                result.append(slot)
        self._grow(fresh)
        return result

    def aligned(
        self, accumulator: CovarianceAccumulator, group: list[int]
    ) -> CovarianceAccumulator:
        """The first pass's sums in the order of ``group`` (zeros for a class not held here);
        a layer without sums (its rows all taken) stays without.

        ``accumulator`` is consumed: it is returned as it is when its slots already hold
        ``group`` in order (the usual case: the first batch had every class), and otherwise
        each layer's sums are released as soon as their aligned copy exists, so that memory
        holds one layer twice at most, not every layer.
        """
        if self.classes == group:
            return accumulator
        aligned = CovarianceAccumulator(
            accumulator.dims, num_classes=len(group), device=accumulator.device
        )
        for key in accumulator.dims:
            total = accumulator.layer_sums(key)
            if total is None:
                continue
            d = total.shape[-1]
            rows = [
                total[self.classes.index(k)]
                if k in self.classes
                else torch.zeros(d, d, dtype=total.dtype, device=total.device)
                for k in group
            ]
            aligned._sums[key] = torch.stack(rows)
            del rows, total
            accumulator._sums.pop(key)
        counts = torch.tensor(
            [
                int(accumulator.samples_per_class[self.classes.index(k)])
                if k in self.classes
                else 0
                for k in group
            ],
            dtype=torch.long,
        )
        aligned.samples_per_class = counts
        aligned.rows_per_sample = dict(accumulator.rows_per_sample)
        return aligned


class _ProductDtypes:
    """The dtype of each Gram product: from the engine's ``gram`` setting and the energy
    threshold of the basis (per class under the per-class schedule ``threshold + step * k``)."""

    def __init__(self, engine: NullSpaceEngine, slots: _Slots) -> None:
        self.engine = engine
        self.slots = slots
        self._cache: dict[tuple[str, int], torch.dtype] = {}
        self._rows: dict[str, torch.dtype] = {}

    def of_class(self, key: str, label: int) -> torch.dtype:
        found = self._cache.get((key, label))
        if found is None:
            engine = self.engine
            eps = engine.threshold_of(key) + engine.class_threshold_step * label
            found = self._cache[(key, label)] = engine.gram.dtype_for(min(eps, 1.0))
        return found

    def of_slot(self, key: str, slot: int) -> torch.dtype:
        return self.of_class(key, self.slots.classes[slot])

    def of_rows(self, key: str) -> torch.dtype:
        # float64 rows when every class of ``key`` multiplies in float64 (the schedule only
        # rises with the class id, so class 0 decides); float32 (widened from half) otherwise
        found = self._rows.get(key)
        if found is None:
            found = self._rows[key] = self.of_class(key, 0)
        return found


class _Unlabelled(Exception):
    """The data have no labels: the per-class rule falls back to the pooled one."""


def unused_layers_message(keys: list[str]) -> str:
    """The warning naming constrained layers that no remaining sample reached."""
    return (
        f"NullSpaceEngine: layers {keys} received no input while the remaining data ran "
        "through the model in eval mode: auxiliary heads that run only in training, a branch "
        "remaining samples never take, or weights the model uses without calling the layer "
        "other than through `F.linear` (whose calls are recorded). With no remaining rows to "
        "constrain them they are kept unchanged (a full basis: every update projected to zero). "
        "`exclude_layers=` leaves them free, which is safe only when no remaining output "
        "depends on their weights (the first two cases)."
    )


#: a basis pass merges consecutive small batches of plain tensor inputs into one forward of
#: at most this many samples ...
MERGE_SAMPLES = 512
#: ... at most this many bytes of one layer's rows (what the merged batch costs beyond the
#: user's own batches); measured on CPU, MNIST-1D CNN, 6,400 samples: pass 0.70 s from
#: batches of 32, 0.26 s from 128, 0.15 s from 512 or more ...
MERGE_ROW_BYTES = 64 << 20
#: ... and at most this many bytes of input: a model whose constrained layers are small (a
#: Linear head on a large backbone) keeps its activations near the user's batch size. Large
#: inputs gain nothing from merging (the per-batch work is small beside their forward)
MERGE_INPUT_BYTES = 16 << 20


class MergedBatches:
    """Consecutive batches' kept inputs (each class-sorted) and slots, forwarded as one batch.

    A user's retain loader often has a training batch size (32, 128): per-batch work (the
    forward's dispatch, one Gram product per class and layer, adding into the sums) is then
    paid many times over for few rows. Merging changes only how the rows are blocked: the sums
    are the same up to float rounding. Only tensors of equal trailing shape, dtype and device
    are merged; the first batch is forwarded alone, so that its rows' size per sample bounds
    the merged size (:data:`MERGE_ROW_BYTES`, :data:`MERGE_INPUT_BYTES`,
    :data:`MERGE_SAMPLES`).

    Args:
        forward: called with the merged inputs (on ``device``) and their slots.
        device: where the merged inputs go.
    """

    def __init__(self, forward: Callable[[Tensor, Tensor], None], device: torch.device) -> None:
        self.forward = forward
        self.device = device
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.count = 0

    @staticmethod
    def limit(row_bytes_per_sample: float, input_bytes_per_sample: float) -> int:
        """Samples a merged batch may hold: 1 (no merging) before any rows were seen."""
        if row_bytes_per_sample <= 0:
            return 1
        rows = MERGE_ROW_BYTES // row_bytes_per_sample
        inputs = MERGE_INPUT_BYTES // max(input_bytes_per_sample, 1.0)
        return max(1, min(MERGE_SAMPLES, int(rows), int(inputs)))

    def push(self, inputs: Tensor, slot: Tensor, row_bytes_per_sample: float) -> None:
        """Hold one batch's kept inputs and slots, forwarding what is held first when they do
        not fit with it, and everything once the limit is reached."""
        size = inputs[0].numel() * inputs.element_size() if inputs.shape[0] else 0
        limit = self.limit(row_bytes_per_sample, size)
        if self.parts and not self._fits(inputs, limit):
            self.flush()
        self.parts.append((inputs, slot))
        self.count += inputs.shape[0]
        if self.count >= limit:
            self.flush()

    def flush(self) -> None:
        """Forward what is held (nothing when empty)."""
        if self.parts:
            self.forward(*self.take())

    def _fits(self, inputs: Tensor, limit: int) -> bool:
        held = self.parts[0][0]
        return (
            self.count + inputs.shape[0] <= limit
            and inputs.shape[1:] == held.shape[1:]
            and inputs.dtype == held.dtype
            and inputs.device == held.device
        )

    def take(self) -> tuple[Tensor, Tensor]:
        """The merged inputs on :attr:`device` and their slots, class blocks contiguous (the
        earlier batch's samples first within a class); nothing is held afterwards."""
        parts, self.parts, self.count = self.parts, [], 0
        if len(parts) == 1:
            inputs, slot = parts[0]
            return inputs.to(self.device), slot
        inputs = torch.cat([p[0] for p in parts])
        slot, order = torch.sort(torch.cat([p[1] for p in parts]), stable=True)
        return inputs.index_select(0, order.to(inputs.device)).to(self.device), slot


def _threshold_for(threshold: Threshold, key: str) -> float:
    from fnmatch import fnmatchcase

    if isinstance(threshold, Mapping):
        layer = key
        for pattern, value in threshold.items():
            if pattern == layer or fnmatchcase(layer, pattern):
                return float(value)
        raise KeyError(key)
    return float(threshold)


def _probe_labels(labels: Tensor | None, index: Tensor, size: int) -> Tensor | None:
    """The probe samples' class labels (CPU, long), or ``None`` when the batch has none or they
    are not one class index per sample."""
    if labels is None or labels.numel() != size or labels.is_floating_point():
        return None
    return labels.detach().reshape(-1).cpu().index_select(0, index.cpu()).long()
