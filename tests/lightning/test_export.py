"""Deletion hygiene: the exported model and the covariance cache hold no forgotten information."""

from __future__ import annotations

import hashlib

import lightning.pytorch as L
import pytest
import torch
from helpers.problems import quiet_trainer, single_thread, tensor_datamodule
from torch import nn

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.cli import main as cli_main
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.nullspace.cache import ClassCovarianceCache

FORGET = [3]
NUM_CLASSES = 4


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def _unlearn(tmp_path, keep: bool = False) -> tuple[UnlearningModule, L.Trainer]:
    dm = tensor_datamodule(forget_classes=FORGET, batch_size=32)
    module = UnlearningModule(
        _net(), num_classes=NUM_CLASSES, forget_classes=FORGET, lr=0.5, stop_at_target=False
    )
    callback = NullSpaceCalibration(
        covariance_cache=str(tmp_path / "cache.pt"), keep_forgotten_statistics=keep
    )
    trainer = quiet_trainer(2, [callback])
    with single_thread():
        trainer.fit(module, datamodule=dm)
    return module, trainer


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside a loaded file, however nested."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value)]
    return []


def _holds(tensors: list[torch.Tensor], wanted: torch.Tensor) -> bool:
    return any(t.shape == wanted.shape and torch.equal(t, wanted) for t in tensors)


def test_export_and_cache_hold_no_forgotten_information(tmp_path) -> None:
    module, trainer = _unlearn(tmp_path)
    original = {name: p.detach().clone() for name, p in module.original.named_parameters()}
    changed = {
        name: value
        for name, value in original.items()
        if not torch.equal(value, module.model.get_parameter(name))
    }
    # biases are frozen, and the first layer's 6-dim input space is all remaining subspace: what
    # unlearning changed is the head; an unchanged tensor is the unlearned model's own as well
    assert "2.weight" in changed

    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    in_checkpoint = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert any(key.startswith("original.") for key in in_checkpoint)  # why the export exists

    exported = module.export(str(tmp_path / "unlearned.pt"))
    assert cli_main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "cli.pt")]) == 0
    written = [exported.path, tmp_path / "cli.pt", tmp_path / "cache.pt"]
    for path in written[:2]:
        state = torch.load(path, weights_only=True)
        assert set(state) == set(module.model.state_dict())
        for name, value in module.model.state_dict().items():
            assert torch.equal(state[name], value)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.with_name(path.name + ".sha256").read_text() == f"{digest}  {path.name}\n"
    assert exported.sha256 == hashlib.sha256(exported.path.read_bytes()).hexdigest()

    for path in written:
        tensors = _tensors(torch.load(path, weights_only=True))
        for name, value in changed.items():
            assert not _holds(tensors, value), (path, name)

    cache = ClassCovarianceCache.load(tmp_path / "cache.pt")
    assert cache.classes == [0, 1, 2]
    assert int(cache.samples_per_class[FORGET].sum()) == 0
    for total in cache.sums.values():
        assert not total[FORGET].any()


def test_cache_keeps_forgotten_statistics_only_on_request(tmp_path) -> None:
    _unlearn(tmp_path, keep=True)
    assert ClassCovarianceCache.load(tmp_path / "cache.pt").classes == [0, 1, 2, 3]
    _unlearn(tmp_path)  # a default request on the same original drops what the file held
    cache = ClassCovarianceCache.load(tmp_path / "cache.pt")
    assert cache.classes == [0, 1, 2]
    assert all(not total[FORGET].any() for total in cache.sums.values())


def test_export_never_overwrites(tmp_path, capsys) -> None:
    model = _net()
    out = tmp_path / "model.pt"
    UnlearningModule(model, num_classes=NUM_CLASSES, forget_classes=FORGET).export(str(out))
    before = out.read_bytes()
    with pytest.raises(UnlearningConfigError, match="`path=.*model.pt'.*never overwritten"):
        UnlearningModule(_net(), num_classes=NUM_CLASSES, forget_classes=FORGET).export(str(out))
    (tmp_path / "other.pt.sha256").write_text("stale")
    with pytest.raises(UnlearningConfigError, match="other.pt.sha256"):
        UnlearningModule(model, num_classes=NUM_CLASSES).export(str(tmp_path / "other.pt"))
    assert not (tmp_path / "other.pt").exists() and out.read_bytes() == before
    assert cli_main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", "x.pt"]) == 2
    assert "`ckpt`" in capsys.readouterr().err


def test_keep_forgotten_statistics_is_validated() -> None:
    with pytest.raises(UnlearningConfigError, match="`keep_forgotten_statistics`.*'yes'"):
        NullSpaceCalibration(keep_forgotten_statistics="yes")  # type: ignore[arg-type]
