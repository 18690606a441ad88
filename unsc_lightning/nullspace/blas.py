"""SciPy's BLAS/LAPACK (the CPU partial eigensolvers) on torch's thread count.

SciPy's OpenBLAS starts one thread per core whatever ``torch.set_num_threads`` says, so a
process limited to one torch thread (a DDP rank, a benchmark, a shared machine) would still run
the LAPACK calls of :mod:`unsc_lightning.nullspace.basis` on every core, next to whatever else
runs there. :func:`torch_threads` limits SciPy's BLAS to torch's thread count for the duration
of a decomposition and restores it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch


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
