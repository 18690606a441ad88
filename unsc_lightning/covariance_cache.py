"""The callback's ``covariance_cache=``: serve a class-wise request from a per-class file.

The first fit accumulates per-class covariances over *all* training data (the DataModule's
``retain_dataloader()`` and ``forget_dataloader()``, or only ``retain_dataloader=`` when given)
and writes them atomically; a later fit on the same model that forgets other classes builds its
bases from the file without reading any data (see
:class:`~unsc_lightning.nullspace.cache.ClassCovarianceCache`). The package never overwrites a
file it did not write: an existing path that is not a covariance cache is refused.

A file also records the per-class rule's basis along the held classes (a few ``d x r`` floats per
layer, see :class:`~unsc_lightning.nullspace.cache.ClassCovarianceCache`): a later request that
forgets class ``f`` runs the rule only on the classes above ``f``. The file is rewritten (rank
zero, atomically) when a request added such a record.

Deletion hygiene: unless the callback has ``keep_forgotten_statistics=True``, the forgotten data
are not read into the cache, and statistics of the classes a request forgets that an earlier
request left in the file are zeroed before the bases are used and the file is written back, so
the file holds second moments of remaining data only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from unsc_lightning.diagnostics import log_bases
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.basis_pass import MergedBatches
from unsc_lightning.nullspace.cache import ClassCovarianceCache, model_fingerprint
from unsc_lightning.nullspace.context import eval_mode
from unsc_lightning.nullspace.covariance import CovarianceAccumulator, SiteRecorder
from unsc_lightning.nullspace.engine import call_model, map_tensors
from unsc_lightning.retain import RankShare, find_retain_loader

if TYPE_CHECKING:
    from unsc_lightning.callback import NullSpaceCalibration


@dataclass
class _Plan:
    path: Path
    remaining: list[int]
    num_classes: int
    fingerprint: str
    hit: bool
    cache: ClassCovarianceCache | None  # a valid file (possibly missing some remaining class)


def serve(callback: NullSpaceCalibration, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Set the callback engine's bases from the cache (building or completing it first).

    Returns:
        ``False`` when the cache cannot serve this request (no class-wise forgetting): the
        caller then builds the bases from the retain data.
    """
    plan = _plan(callback, trainer, pl_module)
    if plan is None:
        return False
    engine = callback.engine
    assert engine is not None
    cache = plan.cache
    if not plan.hit:
        cache = _accumulate(callback, trainer, pl_module, plan)
    elif cache is None:
        cache = ClassCovarianceCache.load(plan.path, map_location=pl_module.device)
    bases = cache.bases(
        plan.remaining,
        callback.threshold,
        callback.rule,
        callback.class_threshold_step,
        engine.keys,
    )
    dropped = _drop_forgotten(callback, cache, plan)
    if trainer.is_global_zero:
        if not plan.hit and callback.rule == "per_class":
            # a data pass was needed anyway: record the rule along every held class, so a later
            # request forgetting class f runs it only on the classes above f
            cache.prepare_rule_states(
                callback.threshold, callback.class_threshold_step, engine.keys
            )
        if dropped or cache.states_changed:
            cache.save(plan.path)
        if dropped:
            rank_zero_info(
                f"NullSpaceCalibration: dropped the statistics of the forgotten classes {dropped} "
                f"from the covariance cache {plan.path} (`keep_forgotten_statistics=True` keeps "
                "them)."
            )
    # a layer no remaining sample reached (no rows counted and no energy: a cache built without
    # row counts still serves its sums): the engine keeps it unchanged, as after its own pass
    unused = [
        key
        for key in engine.keys
        if cache.rows_seen.get(key, 0) == 0
        and ((sums := cache.sums.get(key)) is None or not bool(sums.any()))
    ]
    samples = int(cache.samples_per_class[plan.remaining].sum())
    engine.set_bases(bases, samples=samples, classes=plan.remaining, unused_layers=unused)
    del cache  # release the per-class d x d covariances
    if plan.hit:
        rank_zero_info(
            f"NullSpaceCalibration: bases for the remaining classes {plan.remaining} from the "
            f"covariance cache {plan.path} (no pass over the data)."
        )
    log_bases(engine, trainer, callback.rule)
    return True


def _drop_forgotten(
    callback: NullSpaceCalibration, cache: ClassCovarianceCache, plan: _Plan
) -> list[int]:
    """Zero the statistics of every class this request does not keep; the classes dropped.

    The caller rewrites the file when any were dropped.
    """
    if callback.keep_forgotten_statistics:
        return []
    kept = set(plan.remaining)
    forgotten = [k for k in cache.classes if k not in kept]
    if forgotten:
        cache.drop_classes_(forgotten)
    return forgotten


def _num_classes(pl_module: L.LightningModule, trainer: L.Trainer) -> int:
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        value = getattr(owner, "num_classes", None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnlearningConfigError(
        "`covariance_cache` needs the number of classes: give your LightningModule or DataModule a "
        "`num_classes` attribute."
    )


def check_writable(path: Path) -> None:
    """Refuse a path the cache could not be written to, before any pass over the data."""
    if path.is_dir():
        raise UnlearningConfigError(
            f"`covariance_cache={str(path)!r}` is a directory; pass a file path inside it."
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UnlearningConfigError(
            f"`covariance_cache={str(path)!r}` cannot be written: {str(parent)!r} is not a "
            "writable directory. Choose a path in a writable folder."
        )


def _plan(
    callback: NullSpaceCalibration, trainer: L.Trainer, pl_module: L.LightningModule
) -> _Plan | None:
    remaining = _remaining_classes(callback, trainer, pl_module)
    if remaining is None:
        rank_zero_warn(
            "NullSpaceCalibration: `covariance_cache` needs to know which whole classes remain, "
            "but no class is forgotten (`forget_classes` of the module and DataModule are empty: "
            "sample-level or sub-class forgetting); building the bases from the retain data "
            "without the cache. Pass `remaining_classes=` for class-wise forgetting."
        )
        return None
    engine = callback.engine
    assert engine is not None
    composite = [k for k in engine.keys if len(engine.accounting.constraints[k].sites) > 1]
    if composite or any(c.spec.suffix for c in engine.accounting.constraints.values()):
        raise UnlearningConfigError(
            "`covariance_cache` supports models whose constrained weights each belong to one "
            "Linear or convolution layer; leave it unset (None) for this model."
        )
    num_classes = _num_classes(pl_module, trainer)
    if remaining[-1] >= num_classes:
        raise UnlearningConfigError(
            f"Expected `remaining_classes` in [0, {num_classes}), got {remaining}."
        )
    path = Path(callback.covariance_cache or "")
    check_writable(path)
    settings = {"max_retain_batches": callback.max_retain_batches}
    fingerprint = model_fingerprint(pl_module, settings)
    cache: ClassCovarianceCache | None = None
    if path.exists():
        try:
            cache = ClassCovarianceCache.load(path, map_location=pl_module.device)
        except Exception as error:
            raise UnlearningConfigError(
                f"`covariance_cache={str(path)!r}` exists but is not a covariance cache written "
                f"by this package ({type(error).__name__}: {error}); it is left untouched. Pass "
                "another path, or delete the file if it is a stale cache."
            ) from error
    if cache is not None and not cache.serves(fingerprint, engine.dims, num_classes):
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
    return _Plan(path, remaining, num_classes, fingerprint, hit, cache)


def _remaining_classes(
    callback: NullSpaceCalibration, trainer: L.Trainer, pl_module: L.LightningModule
) -> list[int] | None:
    if callback.remaining_classes is not None:
        return list(callback.remaining_classes)
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        forgotten = getattr(owner, "forget_classes", None)
        if forgotten:  # class-wise forgetting: whole classes leave, the others remain
            num_classes = _num_classes(pl_module, trainer)
            gone = {int(k) for k in forgotten}
            return [k for k in range(num_classes) if k not in gone]
    return None


def _loaders(callback: NullSpaceCalibration, trainer: L.Trainer) -> list[Any]:
    # with `keep_forgotten_statistics`, every class a later request may keep: the remaining *and*
    # the forgotten training data; otherwise the forgotten data never enter the cache
    retain = find_retain_loader(callback.retain_dataloader, trainer)
    forget = getattr(getattr(trainer, "datamodule", None), "forget_dataloader", None)
    if (
        callback.keep_forgotten_statistics
        and callback.retain_dataloader is None
        and callable(forget)
    ):
        return [retain, forget()]
    return [retain]


@torch.no_grad()
def _accumulate(
    callback: NullSpaceCalibration,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    plan: _Plan,
) -> ClassCovarianceCache:
    engine = callback.engine
    assert engine is not None
    device = pl_module.device
    accumulator = CovarianceAccumulator(engine.dims, num_classes=plan.num_classes, device=device)
    with (
        eval_mode(pl_module),
        trainer.precision_plugin.forward_context(),
        SiteRecorder(
            engine.accounting.sites(),
            accumulator.add,
            accumulator.add_shared,
            channels_last=True,  # the engine's fast rows; products stay float64 (any threshold)
            shift_gram=True,
        ) as recorder,
    ):
        accumulator.channels_last_(recorder.column_orders)
        # bound methods: the accumulator itself is deleted below once the cache holds its sums
        set_labels, check_finite = accumulator.set_labels, accumulator.check_finite

        def forward(inputs: Any, labels: torch.Tensor) -> None:
            set_labels(labels.to(device))
            recorder.batch_size = int(labels.numel())
            call_model(pl_module, inputs)
            recorder.narrow_functional()
            check_finite()

        merged = MergedBatches(forward, device)  # small batches together, as in the basis pass

        for loader in _loaders(callback, trainer):
            for batch in RankShare(loader, trainer, callback.max_retain_batches):
                inputs, labels = callback.batch_adapter(batch)
                if labels is None:
                    raise UnlearningConfigError(
                        "`covariance_cache` needs labelled retain batches `(x, y)`."
                    )
                labels = labels.reshape(-1).long().cpu()
                if not isinstance(inputs, torch.Tensor):
                    merged.flush()
                    forward(map_tensors(inputs, lambda t: t.to(device)), labels)
                    continue
                labels, order = torch.sort(labels, stable=True)
                inputs = inputs.index_select(0, order.to(inputs.device))
                merged.push(inputs, labels, recorder.row_bytes_per_sample)
        merged.flush()
        accumulator.weight_order_()  # the cache stores sums in the weights' order
    world = trainer.world_size
    if world > 1:
        accumulator.samples_per_class = accumulator.samples_per_class.to(device)
        accumulator.reduce_(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        # every rank must bound the ranks alike and agree on the layers no sample reached (the
        # bases must be identical on all ranks)
        names = list(engine.dims)
        counts = [
            [float(accumulator.rows_per_sample.get(k, 0)) for k in names],
            [float(accumulator.rows_seen.get(k, 0)) for k in names],
        ]
        reduced = trainer.strategy.reduce(torch.tensor(counts, device=device), reduce_op="sum")
        per_sample, seen_rows = (list(map(int, r)) for r in reduced.tolist())
        accumulator.rows_per_sample = dict(zip(names, per_sample))
        accumulator.rows_seen = dict(zip(names, seen_rows))
    built = ClassCovarianceCache.from_accumulator(accumulator, plan.fingerprint)
    del accumulator
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
    return cache
