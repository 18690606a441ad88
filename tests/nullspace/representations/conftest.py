"""Parametrizes the handler properties (``helpers.representations.HandlerProperties``) of each
test class with the class's ``CASES``."""

from __future__ import annotations

import pytest
from helpers.representations import case_ids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cases = getattr(metafunc.cls, "CASES", None)
    if cases is not None and "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=case_ids(cases))
