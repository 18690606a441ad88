"""Every code block of the README runs as written.

Python blocks run as scripts (so `if __name__ == "__main__":` guards work, e.g. for DDP); shell
blocks run line by line in a scratch directory holding a copy of `configs/`. The package is
already installed by the test command, so a leading `pip install ... &&` is skipped; the test
command itself must be the line `.ci/run` executes. `bibtex` blocks are citations, not code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
BLOCKS = [(language, body) for language, body in BLOCK.findall((ROOT / "README.md").read_text())]
PIP_PREFIX = re.compile(r"^pip install [^&]+&&\s*")


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    return env


def test_readme_has_the_two_command_quickstart() -> None:
    shell = [body.strip() for language, body in BLOCKS if language == "bash"]
    assert "pip install . && unsc-lightning demo" in shell
    assert 'pip install -e ".[dev]" && python -m pytest -q -n 2' in shell
    assert (
        'pip install -e ".[dev]" && python -m pytest -q -n 2' in (ROOT / ".ci" / "run").read_text()
    )


def test_every_block_has_a_known_language() -> None:
    assert {language for language, _ in BLOCKS} <= {"python", "bash", "bibtex"}


@pytest.mark.parametrize(
    "index",
    [i for i, (language, _) in enumerate(BLOCKS) if language == "python"],
    ids=lambda i: f"python-{i}",
)
def test_python_block_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + BLOCKS[index][1])
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize(
    "index",
    [i for i, (language, _) in enumerate(BLOCKS) if language == "bash"],
    ids=lambda i: f"bash-{i}",
)
def test_shell_block_runs(index: int, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    for line in BLOCKS[index][1].strip().splitlines():
        command = PIP_PREFIX.sub("", line.strip())
        if command.startswith("python -m pytest"):
            continue  # the test command itself: checked against .ci/run above
        result = subprocess.run(
            command,
            shell=True,
            cwd=tmp_path,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, (
            f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        if command.startswith("unsc-lightning demo"):
            report = json.loads((tmp_path / "outputs" / "demo" / "report.json").read_text())
            assert set(report["methods"]) == {"original", "retrain", "unsc"}
            for result_of in report["methods"].values():
                assert {"acc_r", "acc_f", "mia_efficacy", "seconds"} <= set(result_of)
            assert report["methods"]["unsc"]["acc_f"] < report["methods"]["original"]["acc_f"]
            assert (tmp_path / "outputs" / "demo" / "per_class_accuracy.png").stat().st_size > 0
