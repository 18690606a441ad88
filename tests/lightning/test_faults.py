"""Faults: a process killed (SIGKILL) mid-way or a full disk never leaves a partial file that is
later read as valid, never changes a file the user owns, and a rerun works.

Each case runs a small unlearning fit in a subprocess (`_CHILD` below) that stops at the named
moment -- during the basis pass, while the covariance cache is written, while a checkpoint is
saved -- and is killed there with SIGKILL. A full disk is a file-size limit
(`RLIMIT_FSIZE`, with SIGXFSZ ignored so that writes fail with an `OSError`).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

_CHILD = textwrap.dedent(
    """
    import io, os, resource, signal, sys, time
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader, Dataset

    from helpers.problems import FORGET_CLASS, NUM_CLASSES, make_subspace_problem, mlp, quiet_trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from unsc_lightning import NullSpaceCalibration, UnlearningModule

    phase, work = sys.argv[1], Path(sys.argv[2])
    marker = work / "reached"

    def stop_here():
        marker.write_text(phase)
        time.sleep(600)  # the parent kills us here

    problem = make_subspace_problem()

    class Retain(Dataset):
        def __len__(self):
            return len(problem.retain_y)

        def __getitem__(self, i):
            if phase == "basis" and i == 20:
                stop_here()
            return problem.retain_x[i], problem.retain_y[i]

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if phase == "cache" and str(f).endswith(".tmp"):
            Path(f).write_bytes(b"PK\\x03\\x04 half a covariance cache")
            stop_here()
        real_save(obj, f, *args, **kwargs)
        if phase == "checkpoint" and isinstance(f, io.BytesIO):
            stop_here()  # Lightning has serialised the checkpoint, the file is not yet written

    torch.save = save
    if phase == "full-disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    torch.manual_seed(0)
    model = mlp()
    model.load_state_dict(torch.load(work / "user" / "weights.pt", weights_only=True))
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    callback = NullSpaceCalibration(
        threshold=1.0,
        retain_dataloader=DataLoader(Retain(), batch_size=8),
        covariance_cache=str(work / "cache" / "covariances.pt"),
    )
    checkpoint = ModelCheckpoint(dirpath=work / "checkpoints", filename="unlearned")
    trainer = quiet_trainer(1, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=problem.forget_loader())
    print("FIT DONE")
    """
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def work(tmp_path: Path) -> Path:
    from helpers.problems import mlp

    (tmp_path / "user").mkdir()
    torch.manual_seed(0)
    torch.save(mlp().state_dict(), tmp_path / "user" / "weights.pt")
    (tmp_path / "user" / "notes.txt").write_text("the user's own file\n")
    (tmp_path / "child.py").write_text(_CHILD)
    return tmp_path


def _start(work: Path, phase: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, str(work / "child.py"), phase, str(work)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(work: Path, phase: str) -> subprocess.CompletedProcess[str]:
    process = _start(work, phase)
    stdout, stderr = process.communicate(timeout=240)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_when_reached(work: Path, phase: str) -> None:
    process = _start(work, phase)
    deadline = time.monotonic() + 240
    while not (work / "reached").exists():
        if process.poll() is not None:
            pytest.fail(f"the child ended before reaching {phase!r}:\n{process.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the child never reached {phase!r}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    (work / "reached").unlink()


@pytest.mark.parametrize("phase", ["basis", "cache", "checkpoint"])
def test_sigkill_leaves_no_partial_file_and_a_rerun_works(work, phase):
    user_before = _digest(work / "user")
    _kill_when_reached(work, phase)

    cache = work / "cache" / "covariances.pt"
    checkpoint = work / "checkpoints" / "unlearned.ckpt"
    from unsc_lightning.nullspace.cache import ClassCovarianceCache

    # a file the kill interrupted does not exist under its real name; one written before is whole
    if phase == "checkpoint":
        assert ClassCovarianceCache.load(cache).classes == [0, 1, 2, 3]
    else:
        assert not cache.exists()
    assert not checkpoint.exists()
    assert _digest(work / "user") == user_before

    rerun = _run(work, "rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "FIT DONE" in rerun.stdout
    # what the rerun wrote is complete and readable
    assert ClassCovarianceCache.load(cache).classes == [0, 1, 2, 3]
    assert "NullSpaceCalibration" in str(torch.load(checkpoint, weights_only=False)["callbacks"])
    assert _digest(work / "user") == user_before


def test_full_disk_names_the_path_and_leaves_no_partial_file(work):
    user_before = _digest(work / "user")
    result = _run(work, "full-disk")
    assert result.returncode != 0
    cache = work / "cache" / "covariances.pt"
    assert f"Could not write the covariance cache {str(cache)!r}" in result.stderr
    assert not cache.exists()
    assert not any(p.name.endswith(".tmp") for p in (work / "cache").iterdir())
    assert _digest(work / "user") == user_before


def test_full_disk_while_the_demo_writes_its_report_names_the_path(tmp_path):
    script = textwrap.dedent(
        f"""
        import resource, signal
        from pathlib import Path
        from unsc_lightning.lab.files import atomic_write_text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        atomic_write_text(Path({str(tmp_path / "report.json")!r}), "x" * 4096)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"Could not write {str(tmp_path / 'report.json')!r}" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither a partial report nor a temporary file
