"""The package's layering (DESIGN.md section 2) holds, and each import-linter contract bites.

`lint-imports` reads the contracts from `pyproject.toml`. The second half copies the package,
adds one forbidden import to the copy and checks that `lint-imports` then names the broken
contract, so a contract that silently matches nothing cannot pass for a kept one.
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).parents[2]
PACKAGE = "unsc_lightning"
CONFIG = ROOT / "pyproject.toml"
#: `lint-imports` is a console script; run its entry point with this interpreter instead.
LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(source_root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports --config pyproject.toml` on the package found under ``source_root``."""
    env = {**os.environ, "PYTHONPATH": str(source_root), "COLUMNS": "400"}  # no wrapped lines
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--config", str(CONFIG), "--no-cache"],
        cwd=source_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def contracts() -> dict[str, dict]:
    config = tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in config["contracts"]}


def top_level_modules() -> set[str]:
    return {f"{PACKAGE}.{info.name}" for info in pkgutil.iter_modules([str(ROOT / PACKAGE)])}


def test_the_layering_holds() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_nullspace_contract_forbids_every_other_module() -> None:
    (nullspace,) = [
        c for c in contracts().values() if c.get("source_modules") == [f"{PACKAGE}.nullspace"]
    ]
    forbidden = set(nullspace["forbidden_modules"])
    assert forbidden == top_level_modules() - {f"{PACKAGE}.nullspace"} | {"lightning"}


#: (file of the package, line appended to it, start of the contract name it breaks)
BREACHES = [
    ("nullspace/basis.py", "import lightning", "nullspace is pure torch"),
    (
        "nullspace/projection.py",
        "from unsc_lightning.errors import UnlearningConfigError",
        "nullspace is pure torch",
    ),
    ("metrics/accuracy.py", "import unsc_lightning.module", "metrics know nothing"),
    ("module.py", "def _lab():\n    from unsc_lightning.lab import runs", "only the CLI uses"),
    ("lab/runs.py", "import unsc_lightning.cli", "only the CLI uses"),
    ("extra.py", '"""A new top-level module no layer names."""', "only the CLI uses"),
    ("__init__.py", "import unsc_lightning.lab.bench", "the package's public API"),
    (
        "data/base.py",
        "def _embedded():\n    from unsc_lightning.data import embedded",
        "no import cycles",
    ),
]


@pytest.mark.parametrize(("path", "line", "contract"), BREACHES, ids=[b[0] for b in BREACHES])
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, path: str, line: str, contract: str
) -> None:
    assert any(name.startswith(contract) for name in contracts())
    shutil.copytree(
        ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__")
    )
    target = tmp_path / PACKAGE / path
    existing = target.read_text() if target.exists() else ""
    target.write_text(existing + "\n\n" + line + "\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-4000:]
    broken = [line for line in result.stdout.splitlines() if line.endswith(" BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout[-4000:]
