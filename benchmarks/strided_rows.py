"""Convolution rows from a strided view (``Tensor.unfold``) instead of ``F.unfold`` (im2col).

A *proposed* replacement for ``conv1d_rows`` / ``conv2d_rows`` of
``unsc_lightning/nullspace/representation.py``, kept here so the benchmarks can compare both:
``F.unfold`` on CPU is a slow im2col (over 100x slower for the stride-2 Conv1d of
``MNIST1DConvNet``), while a strided view plus one ``reshape`` copy gives bitwise the same rows
(:func:`check` compares them on grouped, dilated, strided and reflect-padded layers).

Use :func:`installed` to swap the handlers of ``REPRESENTATIONS`` for a block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from unsc_lightning.nullspace.representation import REPRESENTATIONS, _padded


def _windows(inputs: Tensor, dim: int, kernel: int, stride: int, dilation: int) -> Tensor:
    # windows of the dilated span along `dim`, appended as the last dimension, then every
    # `dilation`-th element of each window: exactly the taps a dilated kernel reads
    span = (kernel - 1) * dilation + 1
    windows = inputs.unfold(dim, span, stride)
    return windows[..., ::dilation] if dilation > 1 else windows


def strided_conv1d_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv1d layer, ``(B * L * groups, in_channels / groups * k)``."""
    if inputs.dim() == 2:
        inputs = inputs.unsqueeze(0)
    (kernel,), (stride,), (dilation,) = layer.kernel_size, layer.stride, layer.dilation  # type: ignore[misc]
    windows = _windows(_padded(layer, inputs), 2, kernel, stride, dilation)  # (B, C, L, k)
    batch, channels, locations, _ = windows.shape
    groups = int(layer.groups)  # type: ignore[arg-type]
    windows = windows.reshape(batch, groups, channels // groups, locations, kernel)
    return windows.permute(0, 3, 1, 2, 4).reshape(-1, channels // groups * kernel)


def strided_conv2d_rows(layer: nn.Module, inputs: Tensor) -> Tensor:
    """Rows of a Conv2d layer, ``(B * L * groups, in_channels / groups * kh * kw)``."""
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation  # type: ignore[misc]
    windows = _windows(_padded(layer, inputs), 2, kh, sh, dh)  # (B, C, Lh, W, kh)
    windows = _windows(windows, 3, kw, sw, dw)  # (B, C, Lh, Lw, kh, kw)
    batch, channels, rows, cols = windows.shape[:4]
    groups = int(layer.groups)  # type: ignore[arg-type]
    windows = windows.reshape(batch, groups, channels // groups, rows, cols, kh, kw)
    return windows.permute(0, 3, 4, 1, 2, 5, 6).reshape(-1, channels // groups * kh * kw)


@contextmanager
def installed() -> Iterator[None]:
    """Use the strided handlers for Conv1d and Conv2d inside the block."""
    saved = dict(REPRESENTATIONS)
    REPRESENTATIONS[nn.Conv1d] = strided_conv1d_rows
    REPRESENTATIONS[nn.Conv2d] = strided_conv2d_rows
    try:
        yield
    finally:
        REPRESENTATIONS.clear()
        REPRESENTATIONS.update(saved)


def check() -> None:
    """The strided rows equal ``F.unfold``'s bitwise on a set of awkward layers."""
    from unsc_lightning.nullspace.representation import conv1d_rows, conv2d_rows

    torch.manual_seed(0)
    cases = [
        (
            nn.Conv1d(32, 32, 3, stride=2, padding=1),
            torch.randn(4, 32, 20),
            conv1d_rows,
            strided_conv1d_rows,
        ),
        (
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            torch.randn(3, 4, 21),
            conv1d_rows,
            strided_conv1d_rows,
        ),
        (
            nn.Conv1d(2, 4, 4, padding="same", padding_mode="circular"),
            torch.randn(2, 9),
            conv1d_rows,
            strided_conv1d_rows,
        ),
        (nn.Conv2d(8, 8, 3, padding=1), torch.randn(2, 8, 9, 7), conv2d_rows, strided_conv2d_rows),
        (
            nn.Conv2d(
                4,
                6,
                (3, 2),
                stride=(2, 1),
                padding=(2, 1),
                dilation=(2, 3),
                groups=2,
                padding_mode="reflect",
            ),
            torch.randn(3, 4, 11, 13),
            conv2d_rows,
            strided_conv2d_rows,
        ),
        (nn.Conv2d(3, 5, 1, stride=2), torch.randn(3, 6, 6), conv2d_rows, strided_conv2d_rows),
    ]
    for layer, inputs, reference, strided in cases:
        expected = reference(layer, inputs)
        got = strided(layer, inputs)
        if not torch.equal(expected, got):
            raise AssertionError(f"strided rows differ from F.unfold for {layer}")


if __name__ == "__main__":
    check()
    print("strided rows equal F.unfold rows on every case")
