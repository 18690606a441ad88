"""Contexts the null-space code runs in: a model briefly in eval mode, IEEE float32 products, and
SciPy's BLAS on torch's thread count.

- :func:`eval_mode`: one save-and-restore of train/eval modes, used wherever a model runs in eval
  mode briefly (every submodule's own mode is restored after, also on error);
- :func:`ieee_float32` and :func:`ieee_forward`: float32 products and convolutions without TF32
  (or bfloat16 passes), whatever the user set, the user's flags restored exactly;
- :func:`torch_threads`: SciPy's OpenBLAS starts one thread per core whatever
  ``torch.set_num_threads`` says, so a process limited to one torch thread (a DDP rank, a
  benchmark, a shared machine) would still run the partial eigensolvers' LAPACK calls on every
  core; inside the block they run on ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode; every submodule's own mode is restored after,
    also on error (a user's frozen, eval-mode submodule stays in eval)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


#: float32 matrix-product flags of the newer API that ``torch.set_float32_matmul_precision`` sets
#: (cuBLAS on CUDA; oneDNN on the CPU, where ``"medium"`` allows bfloat16 products)
_FP32_FLAGS = (("cuda", "matmul"), ("mkldnn", "matmul"))
_EXACT = ("none", "ieee")


def _flag(backend: str, op: str) -> object | None:
    return getattr(
        getattr(getattr(torch.backends, backend, None), op, None), "fp32_precision", None
    )


#: per thread, how deep each kind of :class:`_ExactFlags` context is nested (``kind -> depth``)
_NESTING = threading.local()


class _ExactFlags:
    """Switch one backend's float32 products to IEEE and restore the user's flags exactly: its
    legacy switch (read by ``get``, written by ``set``; ``exact`` its IEEE value, which the legacy
    setter writes consistently into the newer per-op flags) and those per-op ``fp32_precision``
    flags (``(backend, op)`` under ``torch.backends``). A class, not a generator: it is entered
    per Gram product and per projection (a generator-based context manager cost 4 µs a time).

    Inside an enclosing context of the same ``kind`` (the basis pass's forward holds one around
    every Gram product of its hooks) entering and leaving touch no flag: the enclosing context
    set them and restores them. The flags read there are those the enclosing context set, so code
    that changes them inside it (a model whose forward sets its own precision) is not corrected.
    """

    __slots__ = ("_exact", "_flags", "_get", "_kind", "_saved", "_set")

    def __init__(
        self,
        kind: str,
        get: Callable[[], object],
        set_: Callable[[Any], None],
        exact: object,
        flags: tuple[tuple[str, str], ...],
    ) -> None:
        self._kind = kind
        self._get, self._set, self._exact, self._flags = get, set_, exact, flags
        self._saved: tuple[object | None, dict[tuple[str, str], object | None]] | None = None

    def __enter__(self) -> None:
        depth = getattr(_NESTING, self._kind, 0)
        if not depth:
            flags = {key: _flag(*key) for key in self._flags}
            try:  # raises once the user mixed the legacy and the new API: the new flags restore it
                legacy: object | None = self._get()
            except RuntimeError:
                legacy = None
            if legacy != self._exact or any(
                value not in (None, *_EXACT) for value in flags.values()
            ):
                self._set(self._exact)
                self._saved = (legacy, flags)
        setattr(_NESTING, self._kind, depth + 1)  # counted once the flags are set (no raise after)

    def __exit__(self, *exc: object) -> None:
        setattr(_NESTING, self._kind, getattr(_NESTING, self._kind) - 1)
        if self._saved is None:
            return
        legacy, flags = self._saved
        self._saved = None
        if legacy is not None:
            self._set(legacy)
        for (backend, op), value in flags.items():
            if value is not None and _flag(backend, op) != value:
                getattr(getattr(torch.backends, backend), op).fp32_precision = value


def ieee_float32() -> _ExactFlags:
    """Float32 matrix products in IEEE float32 (no TF32 on CUDA, no bfloat16 passes on the CPU),
    whatever the user set (``torch.set_float32_matmul_precision("high")``, ``allow_tf32``, or the
    newer ``torch.backends.*.matmul.fp32_precision``); the user's settings are restored exactly.

    TF32 rounds the products' inputs to 10 mantissa bits (relative error ~1e-3): Gram sums and
    projections computed so would break the null-space guarantee. The flags are process-wide;
    with the default settings nothing is changed. cuBLAS checks that the legacy and the new flags
    agree: the legacy setter writes both.
    """
    return _ExactFlags(
        "matmul",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
        "highest",
        _FP32_FLAGS,
    )


def _set_cudnn_tf32(value: Any) -> None:
    torch.backends.cudnn.allow_tf32 = value


def _cudnn_ieee() -> _ExactFlags:
    """cuDNN convolutions and RNNs without TF32 (on by default), the user's flags restored."""
    return _ExactFlags(
        "cudnn",
        lambda: torch.backends.cudnn.allow_tf32,
        _set_cudnn_tf32,
        False,
        (("cudnn", "conv"), ("cudnn", "rnn")),
    )


@contextmanager
def ieee_forward(device: torch.device) -> Iterator[None]:
    """:func:`ieee_float32` and, on CUDA, cuDNN convolutions without TF32: around the basis pass
    and the drift probe, so that the bases and the probe describe the model's float32 outputs
    (TF32, on by default for cuDNN convolutions, would give activations ~1e-3 off them, and a
    null space of those leaks about as much of every update onto the float32 outputs). The
    user's cuDNN settings are restored exactly; off CUDA only :func:`ieee_float32` applies."""
    with ieee_float32():
        if device.type != "cuda":
            yield
            return
        with _cudnn_ieee():
            yield


@cache
def _controller() -> Any:
    from scipy.linalg import lapack  # noqa: F401  (loads SciPy's OpenBLAS before listing it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def torch_threads() -> Iterator[None]:
    """Run SciPy's BLAS/LAPACK on ``torch.get_num_threads()`` threads inside the block.

    Example:
        >>> import torch
        >>> from threadpoolctl import threadpool_info
        >>> with torch_threads():
        ...     scipy_blas = [i for i in threadpool_info() if "scipy" in i["filepath"]]
        ...     all(i["num_threads"] == torch.get_num_threads() for i in scipy_blas)
        True
    """
    with _controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        yield
