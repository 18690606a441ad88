"""SciPy's OpenBLAS (the partial eigensolvers' LAPACK) runs on torch's thread count, not on
one thread per core, and the setting is restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from scipy.linalg import lapack
from threadpoolctl import threadpool_info

from unsc_lightning.nullspace import eigen
from unsc_lightning.nullspace.context import torch_threads


def _scipy_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_scipy_blas_follows_torch_threads_inside_the_block(one_torch_thread):
    before = _scipy_threads()
    assert before
    with torch_threads():
        assert set(_scipy_threads()) == {1}
    assert _scipy_threads() == before


def test_the_partial_eigensolver_runs_on_torch_threads(one_torch_thread, monkeypatch):
    seen: list[list[int]] = []
    original = lapack.dsytrd

    def recording(*args, **kwargs):
        seen.append(_scipy_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(lapack, "dsytrd", recording)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 40, generator=generator, dtype=torch.float64)
    found = eigen.top_vectors(rows.T @ rows, 0.9)
    assert found is not None and seen == [[1] * len(seen[0])]
