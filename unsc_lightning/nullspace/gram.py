"""The Gram products ``Σ x xᵀ`` of one block of rows, added into float64 sums.

- :func:`add_gram`: one product in the rows' dtype (IEEE float32 on CUDA, no TF32), in upper
  column blocks for wide layers;
- :func:`add_shifted_gram`: channels-last convolution rows, with the shift relation along the
  first spatial dimension and, for 2-d convolutions, the second (:func:`_shifted_top`), so that
  only the blocks with a tap below the stride on one side are multiplied
  (:func:`shifted_gram_pays`: for which blocks);
- :func:`buffer_rows`: how many rows a wide layer's small class blocks are gathered into before
  one product (the accumulator's row buffers);
- :func:`held_rows`: how many rows of one class a wide layer may keep as rows, never forming
  their ``d x d`` sums (the per-class rule then works on the rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from unsc_lightning.nullspace.context import ieee_float32
from unsc_lightning.nullspace.eigen import LOW_RANK_OVERSAMPLE

#: ``gram="auto"`` forms a batch's Gram products in float32 only for bases whose energy
#: threshold is at most this. Float32 products leave rounding noise of order ``1e-7 * trace``
#: spread over every direction, truly null ones included; a threshold of ``1 - 1e-3`` or less
#: leaves at least ``1e-3 * trace`` of energy outside the basis, four orders above that noise,
#: so the energy cut, not the ``RELATIVE_TOLERANCE`` of the eigenvalues, decides the rank. At
#: ``threshold=1.0`` every non-zero direction counts and float32 noise would add directions,
#: hence the float64 products there. ``tests/nullspace/test_gram.py`` bounds the difference.
FLOAT32_GRAM_MAX_THRESHOLD = 0.999

GramDtype = Literal["auto"] | torch.dtype


@dataclass(frozen=True)
class GramOptions:
    """How a basis pass forms the Gram products ``Σ x xᵀ`` of each batch.

    Whatever the choice, the sums are accumulated in float64 across batches.

    Attributes:
        dtype: ``"auto"`` (default): float32 products for a basis (per class, for the per-class
            rule) whose energy threshold is at most :data:`FLOAT32_GRAM_MAX_THRESHOLD`, float64
            otherwise (``threshold=1.0``, embeddings, a per-class schedule reaching near 1.0),
            so a threshold that keeps every non-zero direction never counts float32 noise.
            ``torch.float64``: every product in float64 (the reference; 2-3x slower on CPU).
            ``torch.float32``: every product in float32, even at ``threshold=1.0`` (then
            rounding noise near ``1e-7 * trace`` can be kept as directions). Rows in float64
            (a float64 model) always multiply in float64; float16/bfloat16 rows are widened
            first. On CUDA, TF32 is switched off for the products.
        row_fraction: opt-in subsampling, no longer exact (the basis then spans the remaining
            data's rows only approximately): a convolution keeps every
            ``round(1 / row_fraction)``-th row of output positions along its first spatial
            dimension, from a random offset drawn per batch (only those patches are copied);
            every other layer keeps a random ``ceil(row_fraction * n)`` of the ``n`` rows of
            each class and batch (for a Linear fed one vector per sample: of the samples).
            ``None`` = all rows.
        seed: seed of the subsampling (the same data in the same order give the same rows).
    """

    dtype: GramDtype = "auto"
    row_fraction: float | None = None
    seed: int = 0

    def dtype_for(self, threshold: float) -> torch.dtype:
        """The product dtype for a basis kept at energy ``threshold``."""
        if self.dtype == "auto":
            return torch.float32 if threshold <= FLOAT32_GRAM_MAX_THRESHOLD else torch.float64
        return self.dtype


#: class blocks of fewer rows take the plain product: the shifted Gram's extra small products
#: cost what it saves (measured on CPU: even at 1,020 rows x 96, 2.4x faster at 13,312 x 144)
SHIFTED_ROWS = 2048
#: ... unless the layer's stride is 1 along the shifted dimension and the block holds at least
#: this many entries (rows x width): the shift relation then skips ``(k - 1) / k`` of the
#: products per dimension, which pays from small blocks on (measured on CPU, one thread, plain
#: over shifted: 256 x 288 1.2x, 832 x 864 (AllCNN's 8 x 8 maps) 1.7x, 320 x 384 (1-d) 1.5x;
#: 256 x 144 0.55x). Stride-2 layers with 3-tap kernels gain at most 3 % at any size
SHIFTED_ENTRIES_STRIDE_1 = 65_536

#: ``(first, last, kernel size, stride)`` along one spatial dimension of a convolution
Border = tuple[Tensor, Tensor, int, int]
#: the first spatial dimension's :data:`Border`, and the second's for 2-d convolutions that
#: shift along it too (``None`` otherwise)
Borders = tuple[Tensor, Tensor, int, int, Border | None]


def add_shifted_gram(
    target: Tensor,
    rows: Tensor,
    first: Tensor,
    last: Tensor,
    kernel: int,
    stride: int,
    product: torch.dtype,
    inner: Border | None = None,
) -> None:
    """``target += rowsᵀ rows`` for channels-last convolution rows, from ``stride / kernel`` of
    the products: tap ``a >= stride`` (along the first spatial dimension) at output row ``i``
    reads what tap ``a - stride`` reads at row ``i + 1``, so block-row ``a`` of the Gram is
    block-row ``a - stride`` shifted, minus the row-0 terms (``first``) plus the row-``L``
    terms (``last``) (see :func:`conv_shift_borders`). With ``inner`` (a 2-d convolution's
    second dimension), the block-rows ``a < stride`` themselves follow the same relation along
    the second dimension (:func:`_shifted_top`)."""
    dtype = torch.float64 if rows.dtype == torch.float64 else product
    rows, first, last = (t.to(device=target.device, dtype=dtype) for t in (rows, first, last))
    dim = rows.shape[1]
    width = dim // kernel
    top = stride * width
    gram = torch.empty(dim, dim, dtype=dtype, device=target.device)
    with ieee_float32():
        if inner is None:
            gram[:top] = rows[:, :top].T @ rows
        else:
            _shifted_top(gram[:top], rows, stride, kernel, inner)
        gram[top:, :top] = gram[:top, top:].T
        for tap in range(stride, kernel):
            source = tap - stride
            here = slice(tap * width, (tap + 1) * width)
            there = slice(source * width, (source + 1) * width)
            span = slice(source * width, (kernel - stride) * width)
            block = gram[there, span] - first[:, there].T @ first[:, span]
            block += last[:, there].T @ last[:, span]
            gram[here, tap * width :] = block
            gram[(tap + 1) * width :, here] = block[:, width:].T
    target += gram


def shifted_gram_pays(rows: int, dim: int, stride: int) -> bool:
    """Whether :func:`add_shifted_gram` is expected to beat one plain product on the CPU for a
    class block of ``rows x dim`` convolution rows with ``stride`` along the first spatial
    dimension (:data:`SHIFTED_ROWS`, :data:`SHIFTED_ENTRIES_STRIDE_1`)."""
    return rows >= SHIFTED_ROWS or (stride == 1 and rows * dim >= SHIFTED_ENTRIES_STRIDE_1)


def _shifted_top(out: Tensor, rows: Tensor, taps: int, kernel: int, inner: Border) -> None:
    """``out = rows[:, :taps * kw * C]ᵀ rows`` for the rows of a 2-d convolution (columns
    ``(a, b, c)``: taps along the first and second dimension, channel), with the relation of
    :func:`_add_shifted_gram` along the second dimension: tap ``b >= s`` at output column ``j``
    reads what tap ``b - s`` reads at column ``j + 1``. Only the blocks with a tap ``b < s`` on
    one side are multiplied; the others are the blocks ``(b - s, b' - s)`` minus the column-0
    terms plus the column-``L`` terms (``inner``: :func:`conv_shift_borders` with ``dim=1``)."""
    first, last, wide, step = inner
    first, last = (t.to(device=rows.device, dtype=rows.dtype) for t in (first, last))
    dim = rows.shape[1]
    channels = dim // (kernel * wide)
    row = wide * channels  # the columns of one tap along the first dimension
    grid = out.view(taps, wide, channels, kernel, wide, channels)
    rest = wide - step
    for a in range(taps):
        base = a * row
        # taps (a, b < s) against every column
        out[base : base + step * channels] = rows[:, base : base + step * channels].T @ rows
        # taps (a, b >= s) against the columns of the taps (., b' < s)
        left = rows[:, base + step * channels : base + row]
        for other in range(kernel):
            right = rows[:, other * row : other * row + step * channels]
            grid[a, step:, :, other, :step, :] = (left.T @ right).view(
                rest, channels, step, channels
            )
        # taps (a, b >= s) against taps (., b' >= s), from the earlier taps (ascending b)
        for b in range(step, wide):
            source = b - step
            column = slice((a * rest + source) * channels, (a * rest + source + 1) * channels)
            correction = last[:, column].T @ last - first[:, column].T @ first
            grid[a, b, :, :, step:, :] = grid[a, source, :, :, :rest, :] + correction.view(
                channels, kernel, rest, channels
            )


def map_borders(borders: Borders, patches: Callable[[Tensor], Tensor]) -> Borders:
    """``borders`` with ``patches`` applied to each of its per-sample patch tensors (the first
    and last patches of either dimension), e.g. to reorder or cut them like the rows."""
    first, last, kernel, stride, inner = borders
    if inner is not None:
        inner = (patches(inner[0]), patches(inner[1]), inner[2], inner[3])
    return patches(first), patches(last), kernel, stride, inner


def buffer_rows(dim: int) -> int:
    """Rows of width ``dim`` that a class's small blocks are gathered into before their Gram
    product: ``dim // 8`` for layers at least 512 wide, 0 (no buffer) below.

    Adding a product into the ``d x d`` float64 sums is a pass over ``8 d²`` bytes of memory, as
    slow as the product of a few dozen rows (measured on CPU: 7 ms for d = 1728). A wide layer
    that receives a few rows per class and batch (a Linear head, a late convolution on 1x1
    maps: ResNet-18's d = 4608 at 32x32 inputs gets about 6 rows per class from a batch of 64)
    would spend its pass adding. A buffer of ``dim // 8`` rows holds an eighth of the class's
    sums in float64, and every product is that of one batch of at most that many rows.
    """
    return dim // 8 if dim >= 512 else 0


def held_rows(dim: int) -> int:
    """Rows of one class a layer at least 512 wide keeps as rows in a per-class basis pass
    (``dim // 3 - 8``; 0 below 512): beyond that, they are multiplied into the class's sums.

    A class with fewer rows than ``d`` has a covariance of rank at most its row count. Kept as
    rows ``R`` (``n x d``), the per-class rule needs no ``d x d`` product at all: the energy
    ``U`` captures is ``‖R U‖²``, and the residual's eigenpairs are the singular pairs of
    ``R - (R U) Uᵀ``, ``O(n d (n + r))`` instead of the ``O(d² n)`` of the sums' low-rank path
    (:func:`~unsc_lightning.nullspace.eigen.eigh_descending` with a rank bound, which applies
    below the same size: ``3 (n + 8) <= d``). Late layers of image models are wide and see few
    rows per sample: ResNet-18 at 32x32 gives one row per sample to its d = 4608 layers.
    """
    # the largest n with 3 (n + LOW_RANK_OVERSAMPLE) <= d: where the low-rank path would apply
    return dim // 3 - LOW_RANK_OVERSAMPLE if dim >= 512 else 0


def add_gram(target: Tensor, rows: Tensor) -> None:
    """``target += rowsᵀ rows``, the product in the rows' dtype (IEEE float32 on CUDA)."""
    if target.dtype == rows.dtype and _parts(rows) == 1:
        target.addmm_(rows.T, rows)
        return
    with ieee_float32():
        if _parts(rows) == 1:
            target.add_(torch.mm(rows.T, rows))
        else:
            _add_symmetric_gram(target, rows)


def _parts(rows: Tensor) -> int:
    # column blocks of a symmetric Gram: only the blocks on and above the diagonal are
    # multiplied (``p (p + 1) / 2`` of ``p²``); worth it for wide layers and many rows
    # (measured on CPU: 1.2x at d = 432, 1.7x at d = 864; a loss below d = 320)
    if rows.shape[0] < 256:
        return 1
    return max(1, min(4, rows.shape[1] // 160))


def _add_symmetric_gram(target: Tensor, rows: Tensor) -> None:
    """``target += rowsᵀ rows`` from the upper column blocks, each mirrored below."""
    dim = rows.shape[1]
    parts = _parts(rows)
    edges = [round(i * dim / parts) for i in range(parts + 1)]
    spans = [slice(edges[i], edges[i + 1]) for i in range(parts)]
    for i, first in enumerate(spans):
        for second in spans[i:]:
            block = torch.mm(rows[:, first].T, rows[:, second])
            target[first, second] += block
            if second != first:
                target[second, first] += block.T
