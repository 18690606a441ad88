"""Constrained layers no remaining sample reaches in the eval-mode basis pass: a torchvision
GoogLeNet's or Inception's auxiliary heads (run in training only), a branch remaining data never
take, a layer ``forward`` never calls. There are no remaining rows to constrain them by: each is
kept unchanged (the whole space as its basis), named in one warning and in
``engine.report.unused_layers``, and left free with ``exclude_layers``. Before, the fit stopped
in ``on_fit_start`` ("received no input") at the default settings. A Linear weight used through
``F.linear`` without calling its layer (Swin's attention) has its rows recorded instead
(``engine.report.functional_layers``) and is constrained like a called layer."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    IN_FEATURES,
    NUM_CLASSES,
    BoringClassifier,
    SubspaceProblem,
    make_subspace_problem,
    quiet_trainer,
)
from torch import Tensor, nn
from torch.nn import functional as F

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.nullspace import NullSpaceEngine

WARNING = r"received no input while the remaining data ran through the model in eval mode"


class _AuxNet(nn.Module):
    """Returns ``(logits, aux_logits)`` in training and ``logits`` in eval, as torchvision's
    GoogLeNet and Inception-v3 do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(IN_FEATURES, 32)
        self.head = nn.Linear(32, NUM_CLASSES)
        self.aux = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))

    def forward(self, x: Tensor) -> Any:
        hidden = F.relu(self.body(x))
        logits = self.head(hidden)
        return (logits, self.aux(hidden)) if self.training else logits


class _AuxLoss(BoringClassifier):
    """A user's module training the auxiliary head too (loss + 0.3 x auxiliary loss)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch[0], batch[1]
        logits, aux = self(inputs)
        return F.cross_entropy(logits, targets) + 0.3 * F.cross_entropy(aux, targets)


@pytest.fixture
def problem() -> SubspaceProblem:
    return make_subspace_problem()


def _aux_weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("aux")}


@pytest.mark.parametrize("cache", [False, True], ids=["pass", "covariance_cache"])
def test_auxiliary_head_is_kept_unchanged_with_a_warning_at_the_defaults(problem, tmp_path, cache):
    torch.manual_seed(0)
    model = _AuxNet()
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    before = _aux_weights(model)
    body = model.body.weight.detach().clone()
    options: dict[str, Any] = {"retain_dataloader": problem.retain_loader()}
    if cache:
        options["covariance_cache"] = str(tmp_path / "covariances.pt")
    callback = NullSpaceCalibration(**options)

    with pytest.warns(UserWarning, match=WARNING) as caught:
        quiet_trainer(2, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    named = [str(w.message) for w in caught if "received no input" in str(w.message)]
    assert len(named) == 1 and "'model.aux.0', 'model.aux.2'" in named[0]
    engine = callback.engine
    assert engine is not None and engine.report is not None
    assert engine.report.unused_layers == ["model.aux.0", "model.aux.2"]
    for key, dim in (("model.aux.0", 32), ("model.aux.2", 16)):
        info = engine.layer_infos[key]
        assert (info.dim, info.rank) == (dim, dim)
    assert engine.layer_infos["model.body"].rank < IN_FEATURES  # an ordinary basis
    for name, value in _aux_weights(model).items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(model.body.weight, body)  # the rest did train


def test_a_user_loss_on_the_auxiliary_head_leaves_it_unchanged_unless_excluded(problem):
    # the user's own module trains the auxiliary head; it is kept unchanged by default and
    # trains freely once excluded (no remaining output in eval mode depends on it)
    results = {}
    for exclude in (False, True):
        torch.manual_seed(0)
        module = _AuxLoss(_AuxNet(), lr=0.1)
        before = _aux_weights(module.model)
        callback = NullSpaceCalibration(
            retain_dataloader=problem.retain_loader(),
            exclude_layers=["model.aux.*"] if exclude else [],
        )
        with pytest.warns() as caught:
            quiet_trainer(2, [callback]).fit(module, train_dataloaders=problem.forget_loader())
        warned = any("received no input" in str(w.message) for w in caught)
        moved = any(not torch.equal(v, before[n]) for n, v in _aux_weights(module.model).items())
        results[exclude] = (warned, moved)
    assert results == {False: (True, False), True: (False, True)}


class _NeverCalled(BoringClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(IN_FEATURES, IN_FEATURES)  # trainable, never called by forward


def test_a_layer_forward_never_calls_is_named_and_kept(problem):
    torch.manual_seed(0)
    module = _NeverCalled()
    weight = module.unused.weight.detach().clone()
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())

    with pytest.warns(UserWarning, match=r"layers \['unused'\] received no input"):
        quiet_trainer(1, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    assert callback.engine is not None and callback.engine.report is not None
    assert callback.engine.report.unused_layers == ["unused"]
    assert torch.equal(module.unused.weight, weight)


class _FunctionalWeight(nn.Module):
    """Uses ``proj``'s weight without calling ``proj`` (as torchvision's Swin attention calls
    ``F.linear(x, qkv.weight)``): its hooks never fire, yet remaining outputs depend on it.
    ``called=True``: the same model calling the layer."""

    def __init__(self, called: bool = False, width: int = 32) -> None:
        super().__init__()
        self.called = called
        self.body = nn.Linear(IN_FEATURES, width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(self.body(x))
        if self.called:
            hidden = F.relu(self.proj(hidden))
        else:
            hidden = F.relu(F.linear(hidden, self.proj.weight, self.proj.bias))
        return self.head(hidden)


def test_functional_linear_rows_equal_the_rows_of_calling_the_layer(problem):
    """The basis pass records ``F.linear(x, proj.weight)`` as ``proj``'s rows: the same bases as
    the model that calls ``proj`` (and every other layer's rows counted once)."""
    bases = {}
    for called in (False, True):
        torch.manual_seed(0)
        engine = NullSpaceEngine(_FunctionalWeight(called), threshold=0.97, gram=torch.float64)
        engine.build(problem.retain_loader())
        assert engine.report is not None
        assert engine.report.unused_layers == []
        assert engine.report.functional_layers == ([] if called else ["proj"])
        assert engine.report.samples == len(problem.retain_x)
        bases[called] = dict(engine.bases)
    for key, basis in bases[True].items():
        functional = bases[False][key]
        assert functional.shape == basis.shape, key
        gap = (functional @ functional.T - basis @ basis.T).abs().max()
        assert float(gap) < 1e-6, key


def test_functional_linear_weight_is_constrained_by_its_rows_and_remaining_outputs_hold(problem):
    torch.manual_seed(0)
    model = _FunctionalWeight(width=64)  # 32 remaining samples leave `proj` room to move
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    weight = model.proj.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        retain_before = model(problem.retain_x)
        forget_before = model(problem.forget_x)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(3, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    assert not [w for w in caught if "received no input" in str(w.message)]
    report = callback.engine.report if callback.engine is not None else None
    assert report is not None
    assert report.functional_layers == ["model.proj"] and report.unused_layers == []
    # its basis is that of its rows (at most 32 directions of 64): constrained, not frozen
    assert callback.engine is not None
    assert 0 < callback.engine.layer_infos["model.proj"].rank <= 32
    assert not torch.equal(model.proj.weight, weight)
    model.eval()
    with torch.no_grad():
        retain_after = model(problem.retain_x)
        forget_after = model(problem.forget_x)
    # left free, `proj` moves every remaining output (35 % here with `exclude_layers`); in its
    # null space the remaining outputs hold
    assert (retain_after - retain_before).norm() <= 1e-4 * retain_before.norm()
    assert (forget_after - forget_before).norm() >= 0.05 * forget_before.norm()


class _FunctionalConv(nn.Module):
    """Uses a convolution's weight through ``F.conv1d`` without calling the layer: not recorded
    (only ``F.linear`` is), so the layer is kept unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * IN_FEATURES, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.relu(F.conv1d(x.unsqueeze(1), self.conv.weight, self.conv.bias, padding=1))
        return self.head(hidden.flatten(1))


def test_other_functional_weights_are_kept_unchanged_and_remaining_outputs_hold(problem):
    torch.manual_seed(0)
    model = _FunctionalConv()
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    weight = model.conv.weight.detach().clone()
    model.eval()
    with torch.no_grad():
        retain_before = model(problem.retain_x)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=problem.retain_loader())

    with pytest.warns(UserWarning, match=r"layers \['model.conv'\] received no input"):
        quiet_trainer(3, [callback]).fit(module, train_dataloaders=problem.forget_loader())

    assert torch.equal(model.conv.weight, weight)
    model.eval()
    with torch.no_grad():
        retain_after = model(problem.retain_x)
    assert (retain_after - retain_before).norm() <= 1e-4 * retain_before.norm()
