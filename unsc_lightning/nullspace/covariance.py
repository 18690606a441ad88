"""Forward-hook recorder and streaming (uncentered) covariance accumulator.

The covariance ``C = Σ x xᵀ`` over representation rows is all the basis needs: its eigenvectors
are the left singular vectors of the stacked rows (``σ² = λ``), memory is ``O(d²)`` however many
samples are seen, and sums from different batches, workers or DDP ranks merge by addition.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from unsc_lightning.nullspace import gram as gram_rules
from unsc_lightning.nullspace.gram import (
    Border,
    Borders,
    GramOptions,
    add_gram,
    add_shifted_gram,
    buffer_rows,
    held_rows,
    map_borders,
)
from unsc_lightning.nullspace.representations import (
    WeightRows,
    channels_last_gram_to_weight_order,
    channels_last_padded,
    conv_forward_rows,
    conv_rows_channels_last,
    conv_shift_borders,
    layer_rows,
    linear_forward_rows,
    representation_dim,
)

RowsCallback = Callable[[str, Tensor], None]


class _HookOwner:
    """Owns forward pre-hook handles: registered on ``__enter__``, removed on exit or error."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def _register(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            self._register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


class ActivationRecorder(_HookOwner):
    """Attach forward pre-hooks to named layers and hand each layer's rows to a callback.

    The recorder owns its hook handles: they are removed when the ``with`` block ends, whether
    it ends normally or by an exception, so nothing is left registered on the user's model.

    Args:
        layers: mapping ``name -> module`` (names from ``named_modules()``).
        on_rows: called as ``on_rows(name, rows)`` with the detached rows of every forward call.
        dtype: cast each layer input to this dtype *before* forming its rows (exact for a wider
            dtype): a convolution's rows are then copied once, straight in that dtype, instead
            of being formed in the activation dtype and cast afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> seen = {}
        >>> with ActivationRecorder({"0": net[0]}, lambda n, r: seen.setdefault(n, r.shape)):
        ...     _ = net(torch.randn(5, 4))
        >>> seen["0"], len(net[0]._forward_pre_hooks)
        (torch.Size([5, 4]), 0)
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        on_rows: RowsCallback,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = dict(layers)
        self.on_rows = on_rows
        self.dtype = dtype
        self.seen: set[str] = set()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.seen.add(name)
            inputs = args[0].detach()
            if self.dtype is not None and inputs.is_floating_point():
                inputs = inputs.to(self.dtype)
            self.on_rows(name, layer_rows(module, inputs))

        return hook

    def _register(self) -> None:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))


class CovarianceAccumulator:
    """Streaming sums ``Σ x xᵀ`` per layer, pooled or split by class label.

    Rows are cast to ``dtype`` (float64 by default) *before* the product, so low-precision
    activations (bf16/fp16 autocast) lose nothing beyond their own rounding.

    Args:
        dims: mapping ``layer name -> row dimension d``.
        num_classes: if given, keep one covariance per class (shape ``(num_classes, d, d)``);
            labels must then be set with :meth:`set_labels` before each forward pass.
        device: where the sums live (the model's device for speed).
        dtype: accumulation dtype.

    Raises:
        RuntimeError: from :meth:`check_finite` (called after every batch by
            :func:`accumulate_covariances`) when a layer's inputs contain NaN or inf; from
            :meth:`set_labels` for labels outside ``[0, num_classes)``.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        gram: GramOptions | None = None,
    ) -> None:
        self.dims = dict(dims)
        self.num_classes = num_classes
        self.dtype = dtype
        self.device = torch.device("cpu" if device is None else device)
        #: a layer's sums are allocated when a product first goes into them: a wide layer whose
        #: classes are all held as rows (:attr:`keep_rows`) never allocates its ``d x d`` sums
        self._sums: dict[str, Tensor] = _LazySums(self._zeros)
        #: ``(layer, class slot or None) -> (rows buffer, rows filled)``: small class blocks wait
        #: here until :func:`buffer_rows` of them make one product (see :meth:`add`)
        self._pending: dict[tuple[str, int | None], tuple[Tensor, int]] = {}
        #: ``layer -> whether every row that went into its buffers was finite`` (a 0-d tensor)
        self._buffered_finite: dict[str, Tensor] = {}
        #: keep each class's rows of a wide layer as rows, up to :meth:`held_limit` of them, for
        #: :meth:`take_rows` (the basis pass sets it; ``sums`` stays complete either way)
        self.keep_rows = False
        #: ``(layer, class slot)`` whose sums have received a product (their rows are not all held)
        self._dense: set[tuple[str, int | None]] = set()
        self.rows_seen: dict[str, int] = dict.fromkeys(self.dims, 0)
        #: the most rows one sample contributed per layer: ``samples x this`` bounds a rank
        self.rows_per_sample: dict[str, int] = dict.fromkeys(self.dims, 0)
        self.samples_per_class = torch.zeros(num_classes or 1, dtype=torch.long)
        self._labels: Tensor | None = None
        self._class_counts: list[int] = []
        self._skipped = 0
        self._order: Tensor | None = None
        #: ``(layer, class slot) -> product dtype`` of a batch's Gram (``None``: ``dtype``)
        self.product_dtype: Callable[[str, int], torch.dtype] | None = None
        self.row_fraction = None if gram is None else gram.row_fraction
        seed = 0 if gram is None else gram.seed
        self._generator = torch.Generator().manual_seed(seed)
        self._float32_products = False
        #: ``layer -> (kernel_size, channels per group)`` for rows that come channels-last
        #: (:class:`SiteRecorder` ``channels_last``): their sums stay in that order until
        #: :meth:`weight_order_`
        self.column_orders: dict[str, ColumnOrder] = {}
        #: layers whose rows arrive already subsampled (not subsampled again here)
        self.presampled: set[str] = set()

    def _zeros(self, name: str) -> Tensor:
        shape = (self.num_classes,) if self.num_classes is not None else ()
        d = self.dims[name]
        return torch.zeros(*shape, d, d, dtype=self.dtype, device=self.device)

    @classmethod
    def from_sums(
        cls,
        sums: Mapping[str, Tensor],
        samples_per_class: Tensor,
        rows_seen: Mapping[str, int] | None = None,
    ) -> CovarianceAccumulator:
        """An accumulator around existing sums (shared, not copied), e.g. from a cache.

        Args:
            sums: ``layer name -> (num_classes, d, d)`` per-class sums, or ``(d, d)`` pooled sums.
            samples_per_class: samples counted per class (one entry when pooled).
            rows_seen: rows accumulated per layer (zero when unknown).
        """
        first = next(iter(sums.values()))
        per_class = first.dim() == 3
        accumulator = cls({}, num_classes=first.shape[0] if per_class else None, dtype=first.dtype)
        accumulator.dims = {name: int(total.shape[-1]) for name, total in sums.items()}
        accumulator.device = first.device
        accumulator.sums = dict(sums)
        accumulator.rows_seen = {name: int((rows_seen or {}).get(name, 0)) for name in sums}
        accumulator.samples_per_class = samples_per_class.detach().to("cpu", torch.long).clone()
        return accumulator

    @property
    def sums(self) -> dict[str, Tensor]:
        """``layer -> Σ x xᵀ`` (``(num_classes, d, d)`` per class, ``(d, d)`` pooled), complete:
        rows still waiting in a buffer are multiplied and added first."""
        self.flush_()
        for name in self.dims:
            self._sums[name]  # noqa: B018  (allocates the sums of a layer that had none yet)
        return self._sums

    @sums.setter
    def sums(self, value: dict[str, Tensor]) -> None:
        self.flush_()
        self._sums = value

    def layer_sums(self, name: str) -> Tensor | None:
        """The complete sums of one layer (buffered rows added), or ``None`` when nothing was
        ever added into them (every row it received was taken by :meth:`take_rows`)."""
        self.flush_()
        return self._sums.get(name)

    def held_bytes(self) -> int:
        """Bytes of the sums and of the row buffers (without adding the buffered rows)."""
        held = sum(t.numel() * t.element_size() for t in self._sums.values())
        return held + sum(b.numel() * b.element_size() for b, _ in self._pending.values())

    def flush_(self) -> None:
        """Multiply and add every buffered block of rows (:meth:`add`) into the sums.

        Raises:
            RuntimeError: when a buffered row held NaN or inf (the check :meth:`check_finite`
                makes for the sums, made here for the rows it had not seen yet).
        """
        if not self._pending:
            return
        for key in list(self._pending):
            self._flush_one(key)

    def _flush_one(self, key: tuple[str, int | None]) -> None:
        buffer, filled = self._pending.pop(key)
        if not filled:
            return
        name, slot = key
        target = self._sums[name] if slot is None else self._sums[name][slot]
        self._dense.add(key)
        add_gram(target, buffer[:filled])
        if not bool(torch.isfinite(target.diagonal()).all()):
            raise self._non_finite(name)

    @property
    def per_class(self) -> bool:
        return self.num_classes is not None

    def set_labels(self, labels: Tensor | None) -> None:
        """Labels of the batch about to be forwarded (required when split by class)."""
        if self.per_class:
            if labels is None:
                raise RuntimeError(
                    "Per-class covariance needs labels: the retain batches must be `(x, y)`."
                )
            labels = labels.reshape(-1).long()
            host = labels.cpu()  # one host copy per batch; ``add`` then never synchronises
            num_classes = int(self.num_classes or 0)
            if host.numel() and not -1 <= int(host.min()) <= int(host.max()) < num_classes:
                raise RuntimeError(
                    f"Labels must lie in [0, {num_classes}) for a per-class covariance, got "
                    f"labels in [{int(host.min())}, {int(host.max())}]; check `num_classes`."
                )
            # label -1 marks a sample whose rows are skipped (another pass's class, or a class
            # already at its sample cap); sorted first, its rows form the leading block
            skip = host < 0
            self._skipped = int(skip.sum())
            counts = torch.bincount(host[~skip], minlength=num_classes)
            self.samples_per_class += counts
            self._class_counts = counts.tolist()
            # Rows of one class must be contiguous for ``add``; `accumulate_covariances` sorts
            # the batch by label so this order is only needed for batches forwarded unsorted.
            ordered = bool((host[1:] >= host[:-1]).all())
            self._order = None if ordered else torch.argsort(labels, stable=True)
        elif labels is not None:
            self.samples_per_class[0] += labels.numel()
        self._labels = labels

    def add(self, name: str, rows: Tensor, borders: Borders | None = None) -> None:
        """Add the rows of one forward call of layer ``name``.

        Per class, the rows of each class are one contiguous block (batches sorted by label, or
        gathered once), so each class costs one product on a view: no boolean masks, no copy
        per class and no device synchronisation. Each block's Gram is formed in the dtype
        :attr:`product_dtype` gives (default: :attr:`dtype`, straight into the sums with
        ``addmm_``); a float32 Gram is added into the float64 sums. Non-finite rows are
        detected afterwards by :meth:`check_finite` from the diagonal of the sums (``O(d)``
        instead of a pass over the rows).

        ``borders`` (channels-last convolution rows only, from :class:`SiteRecorder` with
        ``shift_gram``): the patches of the output rows ``0`` and ``L`` and the layer's first
        kernel size and stride; the Gram blocks of the taps ``>= stride`` then follow from the
        others (:func:`conv_shift_borders`), so only ``stride / kernel`` of the products run.
        """
        if not self.per_class:
            self._accumulate(name, None, self._rows(name, rows), self._product(name, 0))
            return
        samples = sum(self._class_counts) + self._skipped
        if samples == 0 or rows.shape[0] % samples:
            raise RuntimeError(
                f"Layer `{name}` received {rows.shape[0]} rows for a batch of {samples} labelled "
                "samples; a per-class covariance needs the layer's input batch to be the samples'."
            )
        rows_per_sample = rows.shape[0] // samples
        self.rows_per_sample[name] = max(self.rows_per_sample[name], rows_per_sample)
        if self._order is not None:
            order = self._order.to(rows.device)
            rows = rows.reshape(samples, -1).index_select(0, order).reshape(-1, rows.shape[1])
            if borders is not None:  # the patches are per sample, like the rows
                borders = map_borders(
                    borders,
                    lambda t: t.reshape(samples, -1).index_select(0, order).reshape(-1, t.shape[1]),
                )
        start = self._skipped * rows_per_sample
        sample = self._skipped
        for cls, count in enumerate(self._class_counts):
            if count:
                block = rows[start : start + count * rows_per_sample]
                product = self._product(name, cls)
                # the shifted Gram trades multiply-adds for more, smaller products: a gain on
                # the CPU only (an H200's AllCNN pass took 1.45 s with it, 1.04 s without)
                if (
                    borders is None
                    or block.is_cuda
                    or not gram_rules.shifted_gram_pays(block.shape[0], block.shape[1], borders[3])
                ):
                    self._accumulate(name, cls, self._rows(name, block), product)
                else:
                    cut = functools.partial(_sample_range, total=samples, start=sample, count=count)
                    first, last, kernel, stride, inner = map_borders(borders, cut)
                    self.rows_seen[name] += block.shape[0]
                    self._float32_products |= product == torch.float32
                    self._dense.add((name, cls))
                    add_shifted_gram(
                        self._sums[name][cls], block, first, last, kernel, stride, product, inner
                    )
                start += count * rows_per_sample
                sample += count

    def _product(self, name: str, slot: int) -> torch.dtype:
        return self.dtype if self.product_dtype is None else self.product_dtype(name, slot)

    def _rows(self, name: str, rows: Tensor) -> Tensor:
        # the opt-in subsampling: a random ``ceil(fraction * n)`` of the block's rows, in order
        if self.row_fraction is None or self.row_fraction >= 1.0 or name in self.presampled:
            return rows
        count = rows.shape[0]
        keep = math.ceil(self.row_fraction * count)
        if keep >= count:
            return rows
        index = torch.randperm(count, generator=self._generator)[:keep].sort().values
        return rows.index_select(0, index.to(rows.device))

    def _accumulate(self, name: str, slot: int | None, rows: Tensor, product: torch.dtype) -> None:
        # Rows in the product dtype (a float32 Gram from half-precision rows widened exactly
        # first, or the sums' dtype). A block of a wide layer smaller than ``buffer_rows`` waits
        # in a buffer with the next blocks of its class (and layer), so that one product and one
        # addition into the ``d x d`` sums serve many batches; every product is then one of at
        # most ``buffer_rows`` rows, the precision of a batch of that size.
        self.rows_seen[name] += rows.shape[0]
        dtype = self.dtype if product == self.dtype or rows.dtype == torch.float64 else product
        rows = rows.to(device=self.device, dtype=dtype)
        if dtype != self.dtype:
            self._float32_products = True
        key = (name, slot)
        count, dim = rows.shape
        limit = self._row_limit(key, dim)
        pending = self._pending.get(key)
        if pending is not None and (pending[0].dtype != dtype or pending[1] + count > limit):
            self._flush_one(key)
            pending = None
            limit = self._row_limit(key, dim)
        if count >= limit:
            self._dense.add(key)
            target = self._sums[name]
            add_gram(target if slot is None else target[slot], rows)
            return
        if pending is None:
            size = min(limit, max(buffer_rows(dim), count))
            pending = (torch.empty(size, dim, dtype=dtype, device=self.device), 0)
        buffer, filled = pending
        if filled + count > buffer.shape[0]:  # a class's held rows grow by doubling
            size = min(limit, max(2 * buffer.shape[0], filled + count))
            grown = torch.empty(size, dim, dtype=dtype, device=self.device)
            grown[:filled].copy_(buffer[:filled])
            buffer = grown
        buffer[filled : filled + count].copy_(rows)
        self._pending[key] = (buffer, filled + count)
        # :meth:`check_finite` sees these rows before they reach the sums (no sync here)
        finite = torch.isfinite(rows).all()
        previous = self._buffered_finite.get(name)
        self._buffered_finite[name] = finite if previous is None else previous & finite

    def _row_limit(self, key: tuple[str, int | None], dim: int) -> int:
        # rows a key's buffer may gather: a class whose sums are untouched keeps up to
        # :meth:`held_limit` under :attr:`keep_rows` (never fewer than ``buffer_rows``)
        if self.keep_rows and key[1] is not None and key not in self._dense:
            return self.held_limit(key[0]) or buffer_rows(dim)
        return buffer_rows(dim)

    def take_rows(self) -> dict[tuple[str, int], Tensor]:
        """Remove and return every class's rows that never reached its sums (:attr:`keep_rows`).

        Returns:
            ``(layer, class slot) -> rows`` (``n x d``, in the product dtype). The sums of these
            classes stay zero: their covariance is ``rowsᵀ rows``, and nothing else is held
            for them. Rows were checked for NaN/inf by :meth:`check_finite`.
        """
        taken: dict[tuple[str, int], Tensor] = {}
        for key in list(self._pending):
            name, slot = key
            if not self.keep_rows or slot is None or key in self._dense:
                continue
            if not self.held_limit(name):
                continue
            buffer, filled = self._pending.pop(key)
            if filled:
                taken[(name, slot)] = buffer[:filled]
        return taken

    def held_limit(self, name: str) -> int:
        """Rows of one class this layer may keep as rows under :attr:`keep_rows` (0: none):
        :func:`held_rows`, or the row buffer where that is longer."""
        dim = self.dims[name]
        return max(held_rows(dim), buffer_rows(dim)) if held_rows(dim) else 0

    def is_dense(self, name: str, slot: int) -> bool:
        """Whether a product went into the sums of this layer and class slot."""
        return (name, slot) in self._dense

    def add_rows_(self, name: str, slot: int, rows: Tensor) -> None:
        """Multiply rows (e.g. returned by :meth:`take_rows`) into one class slot's sums."""
        self._dense.add((name, slot))
        add_gram(self._sums[name][slot], rows.to(self.device))

    def add_classes_(self, count: int) -> None:
        """Append ``count`` empty class slots (per-class sums; buffered rows stay buffered)."""
        if count <= 0:
            return
        for name, total in self._sums.items():
            d = total.shape[-1]
            fresh = torch.zeros(count, d, d, dtype=total.dtype, device=total.device)
            self._sums[name] = torch.cat([total, fresh]) if total.shape[0] else fresh
        held = self.num_classes or 0
        self.samples_per_class = torch.cat(
            [self.samples_per_class[:held], torch.zeros(count, dtype=torch.long)]
        )
        self.num_classes = held + count

    def clear_class_(self, slot: int) -> None:
        """Empty one class slot: its sums, its buffered rows and its sample count."""
        for total in self._sums.values():
            total[slot].zero_()
        for name in self.dims:
            self._pending.pop((name, slot), None)
            self._dense.discard((name, slot))
        self.samples_per_class[slot] = 0

    def channels_last_(self, orders: Mapping[str, ColumnOrder]) -> None:
        """Take the rows of the keys in ``orders`` channels-last (a :class:`SiteRecorder`'s
        :attr:`~SiteRecorder.column_orders`): their sums stay in that order until
        :meth:`weight_order_`, and their rows arrive already subsampled."""
        self.column_orders = dict(orders)
        self.presampled = set(orders)

    def weight_order_(self) -> CovarianceAccumulator:
        """Permute the sums of channels-last layers (:attr:`column_orders`) to weight order."""
        sums = self.sums
        for name, order in self.column_orders.items():
            sums[name] = channels_last_gram_to_weight_order(sums[name], *order)
        self.column_orders = {}
        return self

    def add_shared(self, name: str, rows: Tensor) -> None:
        """Add rows that every sample of the batch shares (a layer fed an input without the
        batch dimension, e.g. ``position_embedding(arange(L))``): each sample contributes them."""
        target = self._sums[name]  # independent of the buffered rows: no flush
        rows = rows.to(device=target.device, dtype=self.dtype)
        gram = rows.T @ rows
        self.rows_per_sample[name] = max(self.rows_per_sample[name], rows.shape[0])
        pooled = [1 if self._labels is None else int(self._labels.numel())]
        counts = self._class_counts if self.per_class else pooled
        self.rows_seen[name] += rows.shape[0] * int(sum(counts))
        if not self.per_class:
            target.add_(gram, alpha=max(1, int(sum(counts))))
            return
        for cls, count in enumerate(counts):
            if count:
                self._dense.add((name, cls))
                target[cls].add_(gram, alpha=count)

    def check_finite(self) -> None:
        """Raise if any layer received NaN or inf inputs (one device synchronisation in all).

        A non-finite row makes the diagonal of its covariance non-finite (``Σ x_i²``), so the
        diagonal is a complete and ``O(d)`` test; the first such layer (in layer order) is named.

        Raises:
            RuntimeError: naming the first layer whose covariance is not finite.
        """
        names = list(self.dims)
        if not names:
            return
        flags = []
        for name in names:  # without a flush: buffered rows carry their own flag
            total = self._sums.get(name)
            flag = torch.ones((), dtype=torch.bool, device=self.device)
            if total is not None:
                flag = torch.isfinite(total.diagonal(dim1=-2, dim2=-1)).all().to(self.device)
            buffered = self._buffered_finite.get(name)
            flags.append(flag if buffered is None else flag & buffered.to(self.device))
        finite = torch.stack(flags).tolist()
        for name, ok in zip(names, finite):
            if not ok:
                raise self._non_finite(name)

    def _non_finite(self, name: str) -> RuntimeError:
        overflow = (
            " (or its float32 Gram products overflowed: build with `gram=torch.float64`)"
            if self._float32_products
            else ""
        )
        return RuntimeError(
            f"Layer `{name}` received NaN or inf inputs{overflow} while building the "
            "remaining-data bases; check the retain data and the model (e.g. with "
            "`torch.autograd.set_detect_anomaly`)."
        )

    def merge_(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's sums into this one (same layers and layout)."""
        for name, total in self.sums.items():
            total += other.sums[name].to(total.device)
            self.rows_seen[name] += other.rows_seen[name]
        self.samples_per_class += other.samples_per_class
        return self

    def reduce_(
        self, reduce_fn: Callable[[Tensor], Tensor], layers: Iterable[str] | None = None
    ) -> CovarianceAccumulator:
        """Apply a cross-process sum (e.g. a DDP all-reduce) to every sum in place.

        Args:
            reduce_fn: the sum over processes.
            layers: only these layers' sums (every process must pass the same ones; the others
                stay unallocated: all their rows were taken by :meth:`take_rows` everywhere).
        """
        self.flush_()
        for name in self.dims if layers is None else layers:
            self._sums[name] = reduce_fn(self._sums[name])
        self.samples_per_class = reduce_fn(self.samples_per_class)
        return self

    def class_covariances(self, name: str, classes: Iterable[int]) -> dict[int, Tensor]:
        """Per-class covariances of layer ``name`` for the given class ids."""
        if not self.per_class:
            raise RuntimeError(
                "This accumulator was built pooled; per-class covariances are not available."
            )
        return {int(k): self.sums[name][int(k)] for k in classes}

    def pooled_covariance(self, name: str, classes: Iterable[int] | None = None) -> Tensor:
        """Covariance of layer ``name`` summed over ``classes`` (all classes when ``None``)."""
        total = self.sums[name]
        if not self.per_class:
            return total
        if classes is None:
            return total.sum(0)
        # Summed one class at a time: one extra ``d x d`` buffer, not one per selected class.
        pooled = torch.zeros_like(total[0])
        for k in sorted({int(k) for k in classes}):
            pooled += total[k]
        return pooled


class _LazySums(dict):  # type: ignore[type-arg]
    # ``layer -> sums``, allocated by ``factory(layer)`` on first access
    def __init__(self, factory: Callable[[str], Tensor]) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, name: str) -> Tensor:
        value = self[name] = self.factory(name)
        return value


def _sample_range(patches: Tensor, total: int, start: int, count: int) -> Tensor:
    # the per-sample patches of samples ``start .. start + count`` of a batch of ``total``
    per = patches.shape[0] // total
    return patches[start * per : (start + count) * per]


def layer_dims(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """Row dimension of each layer."""
    return {name: representation_dim(layer) for name, layer in layers.items()}


@contextmanager
def recording(
    layers: Mapping[str, nn.Module], accumulator: CovarianceAccumulator
) -> Iterator[ActivationRecorder]:
    """Context in which every forward call through ``layers`` feeds ``accumulator``."""
    with ActivationRecorder(layers, accumulator.add, dtype=accumulator.dtype) as recorder:
        yield recorder


@torch.no_grad()
def accumulate_covariances(
    forward: Callable[[Tensor], Any],
    layers: Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor | None]],
    accumulator: CovarianceAccumulator,
) -> set[str]:
    """Run ``forward`` on every ``(x, y)`` batch and accumulate the layers' input covariances.

    Returns:
        The names of the layers that received input at least once.
    """
    with recording(layers, accumulator) as recorder:
        for inputs, labels in batches:
            if accumulator.per_class and labels is not None:
                inputs, labels = _sorted_by_label(inputs, labels)
            accumulator.set_labels(labels)
            forward(inputs)
            accumulator.check_finite()
    accumulator.flush_()
    return recorder.seen


def _sorted_by_label(inputs: Any, labels: Tensor) -> tuple[Any, Tensor]:
    # Forwarding the batch sorted by label (a stable sort: order within a class is kept) makes
    # every layer's rows of one class contiguous. Outputs are per sample in eval mode, so only
    # the order of the rows changes.
    labels = labels.reshape(-1)
    if not isinstance(inputs, Tensor) or inputs.shape[0] != labels.numel():
        return inputs, labels
    labels, order = torch.sort(labels, stable=True)
    return inputs.index_select(0, order.to(inputs.device)), labels


#: ``(basis key, layer, weight spec)``: one place where a constrained weight meets its inputs.
Site = tuple[str, nn.Module, WeightRows]


class SiteRecorder(_HookOwner):
    """Forward pre-hooks (with keyword arguments) that hand every site's rows to a callback.

    Several sites may share a key (a weight used by two layers): their rows feed one
    covariance, so the basis spans the inputs of every use. The recorder owns its hook handles
    and removes them when the ``with`` block ends, however it ends.

    Args:
        sites: ``(key, layer, spec)`` triples; one hook per layer serves all its sites.
        on_rows: called as ``on_rows(key, rows)``.
        on_shared_rows: called instead for a layer whose input has no batch dimension (neither
            its first nor second dimension is :attr:`batch_size`): its rows belong to every
            sample of the batch.
        row_dtype: ``key -> dtype`` the rows of that key are wanted in: a Linear's or a
            convolution's input of a narrower floating dtype is widened to it *before* its rows
            are formed (exact), so a convolution's patches are copied once, straight in that
            dtype, instead of formed and cast afterwards. Never narrows. ``None``: as they come.
        channels_last: hand a convolution's rows in ``(*kernel, channel)`` column order
            (:func:`~unsc_lightning.nullspace.representations.conv_rows_channels_last`, several
            times faster to form) for the keys listed in :attr:`column_orders`; the consumer
            must permute their sums back
            (:meth:`CovarianceAccumulator.weight_order_`, given ``column_orders``).
        row_fraction: with ``channels_last``, form only every ``round(1 / row_fraction)``-th
            row of output positions of those convolutions (the opt-in subsampling).
        seed: seed of those draws.
    """

    def __init__(
        self,
        sites: Iterable[Site],
        on_rows: RowsCallback,
        on_shared_rows: RowsCallback | None = None,
        row_dtype: Callable[[str], torch.dtype] | None = None,
        channels_last: bool = False,
        row_fraction: float | None = None,
        seed: int = 0,
        shift_gram: bool = False,
    ) -> None:
        super().__init__()
        self.row_fraction = row_fraction
        self._generator = torch.Generator().manual_seed(seed)
        # per key: the channels-last input buffer (its zero border written once), reused from
        # batch to batch; per dtype and device: one rows buffer that every layer reuses, as the
        # largest layer needs it (``on_rows`` consumes the rows before the next call overwrites
        # them, so one forward holds one rows buffer, not one per layer)
        self._workspaces: dict[str, dict[str, Tensor]] = {}
        self._rows_workspaces: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}
        self.on_shared_rows = on_shared_rows
        self.row_dtype = row_dtype
        #: samples of the batch being forwarded (set by the caller; ``None`` = unknown)
        self.batch_size: int | None = None
        #: the most bytes of rows one layer produced per sample of a batch so far (what a
        #: larger batch would cost in row memory; 0 before a batch with a known size)
        self.row_bytes_per_sample = 0.0
        self.by_layer: dict[nn.Module, list[tuple[str, WeightRows]]] = {}
        layouts: dict[str, set[ColumnOrder | None]] = {}
        for key, layer, spec in sites:
            self.by_layer.setdefault(layer, []).append((key, spec))
            layouts.setdefault(key, set()).add(_column_order(layer, spec))
        #: ``key -> (kernel_size, channels per group)`` of the keys whose rows come channels-last
        self.column_orders: dict[str, ColumnOrder] = {}
        if channels_last:
            for key, found in layouts.items():
                order = next(iter(found))
                if len(found) == 1 and order is not None:
                    self.column_orders[key] = order
        #: keys whose rows come with :func:`conv_shift_borders` (``on_rows(key, rows, borders)``)
        self.shifted: set[str] = set()
        if shift_gram and row_fraction is None:
            self.shifted = {
                key
                for key in self.column_orders
                if all(
                    _shiftable(layer)
                    for layer, specs in self.by_layer.items()
                    if any(k == key for k, _ in specs)
                )
            }
        self.on_rows = on_rows
        self.seen: set[str] = set()
        #: keys whose layer's own forward ran (module hooks), and keys whose rows came from
        #: ``F.linear`` calls on their weight made without calling the layer
        #: (:class:`_FunctionalLinear`; e.g. torchvision's Swin attention)
        self.via_module: set[str] = set()
        self.via_function: set[str] = set()
        self._functional: _FunctionalLinear | None = None

    @property
    def functional_only(self) -> set[str]:
        """Keys recorded only from functional uses of their weight: module hooks (e.g. a
        per-layer drift probe) never see these layers."""
        return self.via_function - self.via_module

    def _hook(
        self, specs: list[tuple[str, WeightRows]]
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        record = self._recorder(specs)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.via_module.update(key for key, _ in specs)
            record(module, args, kwargs)

        return hook

    def _recorder(
        self, specs: list[tuple[str, WeightRows]]
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            shared = self.on_shared_rows is not None and _without_batch(
                args, kwargs, self.batch_size
            )
            for key, spec in specs:
                self.seen.add(key)
                widened = self._widened(key, spec, args)
                if key in self.column_orders:
                    inputs = cast(Tensor, widened[0] if widened else kwargs["input"])
                    workspace = self._workspaces.setdefault(key, {})
                    padded = channels_last_padded(module, inputs.detach(), workspace)
                    fraction = None if shared else self.row_fraction
                    rows_workspace = self._rows_workspaces.setdefault(
                        (padded.dtype, padded.device), {}
                    )
                    rows = conv_rows_channels_last(
                        module, inputs, fraction, self._generator, padded, rows_workspace
                    )
                    self._note(rows, shared)
                    if key in self.shifted and not shared:
                        conv = cast(nn.modules.conv._ConvNd, module)
                        first, last = conv_shift_borders(module, inputs, padded)
                        inner: Border | None = None
                        if _inner_shiftable(conv):
                            first1, last1 = conv_shift_borders(module, inputs, padded, dim=1)
                            inner = (first1, last1, conv.kernel_size[1], conv.stride[1])
                        borders = (first, last, conv.kernel_size[0], conv.stride[0], inner)
                        cast(Any, self.on_rows)(key, rows, borders)
                        continue
                else:
                    rows = spec.rows(module, widened, kwargs).detach()
                    self._note(rows, shared)
                if shared and self.on_shared_rows is not None:
                    self.on_shared_rows(key, rows)
                else:
                    self.on_rows(key, rows)

        return hook

    def _note(self, rows: Tensor, shared: bool) -> None:
        if not shared and self.batch_size:
            size = rows.numel() * rows.element_size() / self.batch_size
            self.row_bytes_per_sample = max(self.row_bytes_per_sample, size)

    def _widened(self, key: str, spec: WeightRows, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.row_dtype is None or spec.rows not in _WIDENABLE or not args:
            return args
        first = args[0]
        if not isinstance(first, Tensor) or not first.is_floating_point():
            return args
        dtype = self.row_dtype(key)
        if first.dtype == dtype or torch.finfo(first.dtype).bits >= torch.finfo(dtype).bits:
            return args
        return (first.detach().to(dtype), *args[1:])

    def _register(self) -> None:
        for layer, specs in self.by_layer.items():
            handle = layer.register_forward_pre_hook(self._hook(specs), with_kwargs=True)
            self._handles.append(handle)
        # plain Linear weights the model may use without calling their layer
        watched = {
            id(layer.weight): (specs[0][0], layer, self._recorder(specs))
            for layer, specs in self.by_layer.items()
            if isinstance(layer, nn.Linear)
            and len(specs) == 1
            and specs[0][1].rows is linear_forward_rows
        }
        if watched:
            self._functional = _FunctionalLinear(self, watched)
            self._functional.__enter__()

    def narrow_functional(self) -> None:
        """After a forward: stop watching ``F.linear`` calls on the weights of layers whose own
        forward ran (their rows come from module hooks), and leave the function mode once
        none is left. Its dispatch costs every torch call of the pass, the recorder's own
        products included (15 % of the MNIST-1D CNN's pass): only models that use a weight
        without calling its layer keep paying it."""
        functional = self._functional
        if functional is None:
            return
        functional.watched = {
            ident: found
            for ident, found in functional.watched.items()
            if found[0] not in self.via_module
        }
        if not functional.watched:
            self._functional = None
            functional.__exit__(None, None, None)

    def remove(self) -> None:
        """Remove every hook this recorder registered, and leave its function mode
        (idempotent)."""
        super().remove()
        functional, self._functional = self._functional, None
        if functional is not None:
            functional.__exit__(None, None, None)


class _FunctionalLinear(TorchFunctionMode):
    """Hands a constrained ``nn.Linear``'s rows to the recorder when the model calls
    ``F.linear(x, layer.weight, ...)`` without calling the layer (torchvision's Swin attention
    passes ``qkv.weight`` and ``proj.weight`` to its attention function): module hooks never see
    those inputs, yet the remaining outputs depend on the weight.

    A call inside the layer's own forward is not recorded twice: once the layer's module hook
    has fired (``via_module``), its weight's functional calls are left to it. Active only while
    the recorder is (a basis or cache pass), and after the first forward only while some
    watched layer was not called (:meth:`SiteRecorder.narrow_functional`); other calls pass
    through unchanged.
    """

    def __init__(
        self,
        recorder: SiteRecorder,
        watched: Mapping[int, tuple[str, nn.Module, Callable[..., None]]],
    ) -> None:
        super().__init__()
        self.recorder = recorder
        self.watched = dict(watched)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            found = self.watched.get(id(weight))
            if found is not None and found[0] not in self.recorder.via_module:
                key, layer, record = found
                inputs = args[0] if args else kwargs["input"]
                self.recorder.via_function.add(key)
                record(layer, (inputs,), {})
        return func(*args, **kwargs)


#: ``(kernel_size, channels per group)``: how channels-last convolution rows are laid out
ColumnOrder = tuple[tuple[int, ...], int]


def _column_order(layer: nn.Module, spec: WeightRows) -> ColumnOrder | None:
    if spec.rows is not conv_forward_rows or not isinstance(layer, nn.modules.conv._ConvNd):
        return None
    return tuple(layer.kernel_size), int(layer.in_channels // layer.groups)


def _shiftable(layer: nn.Module) -> bool:
    # the shifted Gram: ungrouped, undilated and overlapping along the first spatial dimension,
    # and wide enough that one product saved outweighs the two small border products
    if not isinstance(layer, nn.modules.conv._ConvNd) or layer.groups != 1:
        return False
    kernel, stride = layer.kernel_size[0], layer.stride[0]
    width = layer.in_channels * math.prod(layer.kernel_size[1:])
    return layer.dilation[0] == 1 and kernel > stride and width >= 16


def _inner_shiftable(conv: nn.modules.conv._ConvNd) -> bool:
    # the second dimension of a 2-d convolution shifts too (see :func:`_shifted_top`)
    return (
        len(conv.kernel_size) == 2
        and conv.dilation[1] == 1
        and conv.kernel_size[1] > conv.stride[1]
    )


#: rows that are a reshaping or windowing of the first input alone: widening that input first
#: gives the same rows, copied once
_WIDENABLE = (linear_forward_rows, conv_forward_rows)


def _without_batch(args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int | None) -> bool:
    # the first tensor input carries the batch in dimension 0 (or 1, sequence-first); positions
    # such as ``arange(L)`` or ``(1, L)`` carry none
    if batch_size is None:
        return False
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if first is None:
        return False
    if first.dim() == 0:
        return True
    return first.shape[0] != batch_size and (first.dim() < 2 or first.shape[1] != batch_size)
