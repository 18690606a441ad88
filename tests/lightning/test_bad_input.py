"""Bad input, one test each: the run fails at once (or warns once) with a message naming the problem.

Inputs whose branch `test_errors.py` already walks are not written twice: `test_covered_in_test_errors`
runs that file's case for each of them (by id), so this file lists every bad input of the issue
in one place. The others -- inputs the error table does not reach -- have their own tests below.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.problems import (
    FORGET_CLASS,
    IN_FEATURES,
    NUM_CLASSES,
    BoringClassifier,
    make_subspace_problem,
    mlp,
    quiet_trainer,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningConfigError, UnlearningModule

PROBLEM = make_subspace_problem()


def fit(
    module: Any = None, retain: Any = None, train: DataLoader | None = None, **callback_kwargs: Any
) -> NullSpaceCalibration:
    callback_kwargs.setdefault("threshold", 1.0)
    callback = NullSpaceCalibration(
        retain_dataloader=retain if retain is not None else PROBLEM.retain_loader(),
        **callback_kwargs,
    )
    module = module if module is not None else BoringClassifier()
    quiet_trainer(1, [callback]).fit(
        module, train_dataloaders=train if train is not None else PROBLEM.forget_loader()
    )
    return callback


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def test_empty_forget_dataloader_raises_instead_of_returning_the_model_unchanged():
    empty = DataLoader(
        TensorDataset(torch.zeros(0, IN_FEATURES), torch.zeros(0, dtype=torch.long)), batch_size=8
    )
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    with pytest.raises(
        RuntimeError,
        match=r"The forget data are empty: the training dataloader yielded no batch, so nothing was unlearned",
    ):
        fit(module, train=empty)


def test_inf_activations_while_building_bases():
    x = PROBLEM.retain_x.clone()
    x[5, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"Layer `model\.0` received NaN or inf inputs") as info:
        fit(retain=DataLoader(TensorDataset(x, PROBLEM.retain_y), batch_size=8))
    assert not isinstance(info.value, UnlearningConfigError)


def test_retain_inputs_the_model_cannot_run():
    retain = DataLoader(
        TensorDataset(torch.randn(16, 7), torch.arange(16) % FORGET_CLASS), batch_size=8
    )
    with pytest.raises(
        RuntimeError,
        match=r"The remaining \(retain\) data could not be run through `BoringClassifier\.forward` \(a batch of inputs of shape \(8, 7\), torch\.float32\); check that the retain dataloader",
    ) as info:
        fit(retain=retain)
    assert info.value.__cause__ is not None  # the original error is chained


class _PooledConvNet(nn.Module):
    """Accepts sequences of any length: a wrong retain length would go unnoticed."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 4, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_retain_input_shape_differs_from_training_data():
    generator = torch.Generator().manual_seed(0)
    retain = DataLoader(
        TensorDataset(torch.randn(16, 1, 12, generator=generator), torch.arange(16) % FORGET_CLASS),
        batch_size=8,
    )
    train = DataLoader(
        TensorDataset(torch.randn(16, 1, 16, generator=generator), torch.full((16,), FORGET_CLASS)),
        batch_size=8,
    )
    module = BoringClassifier(_PooledConvNet())
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(
        UnlearningConfigError,
        match=r"retain\) data have per-sample input shape \(1, 12\) but the training batches have \(1, 16\)",
    ):
        fit(module, retain=retain, train=train)
    # raised at the first batch, before any step
    assert all(torch.equal(value, module.state_dict()[name]) for name, value in before.items())


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
class _WithUnconstrainedParameters(nn.Module):
    """A raw offset parameter, a layer type without a handler and a parametrized Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(IN_FEATURES))
        self.prelu = nn.PReLU()
        self.scaled = torch.nn.utils.parametrizations.weight_norm(
            nn.Linear(IN_FEATURES, IN_FEATURES)
        )
        self.head = mlp()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.scaled(self.prelu(x + self.offset)))


def test_unconstrained_parameters_frozen_and_listed_in_one_warning():
    model = _WithUnconstrainedParameters()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(BoringClassifier(model))
    messages = [str(w.message) for w in caught if "have no null-space basis" in str(w.message)]
    assert len(messages) == 1
    for name, reason in [
        ("model.offset", "unsupported"),
        ("model.prelu.weight", "unsupported"),
        ("model.scaled.parametrizations.weight.original0", "parametrized"),
        ("model.scaled.parametrizations.weight.original1", "parametrized"),
    ]:
        assert f"`{name}` ({reason})" in messages[0]
        assert torch.equal(
            dict(model.named_parameters())[name.removeprefix("model.")],
            before[name.removeprefix("model.")],
        )
    assert "`freeze_unconstrained=False`" in messages[0]
    assert all(p.requires_grad for p in model.parameters())  # restored after the fit


def test_unconstrained_parameters_left_free_on_request_warn_by_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(BoringClassifier(_WithUnconstrainedParameters()), freeze_unconstrained=False)
    messages = [str(w.message) for w in caught if "are NOT constrained" in str(w.message)]
    assert len(messages) == 1 and "`model.offset` (unsupported)" in messages[0]


# --------------------------------------------------------------------------------------------
# Checkpoints of another model
# --------------------------------------------------------------------------------------------
@pytest.fixture
def unlearning_checkpoint(tmp_path: Path) -> Path:
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=PROBLEM.retain_loader())
    trainer = quiet_trainer(1, [callback])
    trainer.fit(
        UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS]),
        train_dataloaders=PROBLEM.forget_loader(),
    )
    path = tmp_path / "unlearning.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_resume_from_checkpoint_of_another_architecture(unlearning_checkpoint):
    # the network's weights are restored before the callback state: Lightning's strict load names it
    other = UnlearningModule(mlp(hidden=32), NUM_CLASSES, [FORGET_CLASS])
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=PROBLEM.retain_loader())
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for model\.0\.weight: copying a param with shape torch\.Size\(\[64, 20\]\)",
    ):
        quiet_trainer(2, [callback]).fit(
            other, train_dataloaders=PROBLEM.forget_loader(), ckpt_path=unlearning_checkpoint
        )


def test_resume_with_callback_state_of_other_layers(unlearning_checkpoint):
    callback = NullSpaceCalibration(
        threshold=1.0, layers=["model.0", "model.2"], retain_dataloader=PROBLEM.retain_loader()
    )
    module = UnlearningModule(mlp(), NUM_CLASSES, [FORGET_CLASS])
    with pytest.raises(
        UnlearningConfigError,
        match=r"state in this checkpoint was built for another model, layer set or settings",
    ):
        quiet_trainer(2, [callback]).fit(
            module, train_dataloaders=PROBLEM.forget_loader(), ckpt_path=unlearning_checkpoint
        )


def test_original_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "original.ckpt"
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in mlp(hidden=32).state_dict().items()}}, path
    )
    with pytest.raises(
        UnlearningConfigError,
        match=r"(?s)The weights in `original_checkpoint='.*original\.ckpt'` do not fit Sequential: .*size mismatch for 0\.weight",
    ):
        UnlearningModule(mlp(hidden=64), NUM_CLASSES, [FORGET_CLASS], original_checkpoint=str(path))
