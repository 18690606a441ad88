"""Relearning time and linear-probe recovery: references, head discovery, and a model that
truly never saw a class against one whose class is only masked at the head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.metrics import (
    extract_features,
    find_feature_layer,
    linear_probe_accuracy,
    relearning_time,
    select_per_class,
    steps_to_reach,
)
from unsc_lightning.models import MNIST1DConvNet

FORGET = [2]


def _blobs(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes in R^3, class c around 3 * e_c."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(3).repeat_interleave(per_class)
    inputs = 3 * torch.eye(3)[targets] + 0.5 * torch.randn(len(targets), 3, generator=generator)
    return inputs, targets


def _two_layer(features: torch.Tensor) -> nn.Sequential:
    """ReLU features ``features @ x``, a head that predicts classes 0 and 1 and never class 2."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight.copy_(features)
        model[0].bias.zero_()
        model[2].weight.copy_(2 * torch.eye(3))
        model[2].weight[2].zero_()  # class 2's row of the head: never predicted
        model[2].bias.copy_(torch.tensor([0.0, 0.0, -5.0]))
    return model


def masked_model() -> nn.Sequential:
    """Features that separate all three classes; class 2 hidden only at the head."""
    return _two_layer(torch.eye(3))


def never_saw_model() -> nn.Sequential:
    """Features of a model that never needed class 2: it lands on class 0's feature."""
    return _two_layer(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, ...]:
    return (*_blobs(40, seed=0), *_blobs(40, seed=1))


def test_steps_to_reach_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        curve = np.cumsum(rng.uniform(0, 0.1, size=rng.integers(1, 30)))
        target = float(rng.uniform(0, 1.5))
        hits = np.flatnonzero(curve >= target)
        assert steps_to_reach(curve.tolist(), target) == (int(hits[0]) if hits.size else None)


def test_select_per_class_draws_k_of_each_class() -> None:
    targets = torch.tensor([0, 1, 2] * 5 + [2, 2])
    index = select_per_class(targets, [0, 2], per_class=3, seed=4)
    assert sorted(targets[index].tolist()) == [0, 0, 0, 2, 2, 2]
    assert len(set(index.tolist())) == 6
    assert torch.equal(index, select_per_class(targets, [0, 2], per_class=3, seed=4))
    assert len(select_per_class(targets, [1], per_class=50)) == 5  # fewer when fewer exist
    with pytest.raises(UnlearningConfigError, match="`per_class`"):
        select_per_class(targets, [0], per_class=-1)


class _TorchvisionStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x)))


class _TimmStyle(nn.Module):
    """timm keeps the classifier inside a head module: ``head.fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(8)
        self.head.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.head.norm(self.stem(x)))


class _NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(1)), "2"),
        (MNIST1DConvNet(), "classifier.2"),
        (_TorchvisionStyle(), "fc"),
        (_TimmStyle(), "head.fc"),
    ],
)
def test_find_feature_layer(model: nn.Module, expected: str) -> None:
    assert find_feature_layer(model) == expected


def test_find_feature_layer_on_torchvision_resnet() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert find_feature_layer(torchvision.models.resnet18(num_classes=3)) == "fc"


def test_missing_head_asks_for_feature_layer() -> None:
    with pytest.raises(UnlearningConfigError, match="feature_layer="):
        find_feature_layer(_NoHead())
    x, y = _blobs(5, seed=0)
    with pytest.raises(UnlearningConfigError, match="`feature_layer`.*'nope'"):
        linear_probe_accuracy(_NoHead(), x, y, x, y, FORGET, feature_layer="nope")
    x4 = torch.cat([x, x[:, :1]], dim=1)
    result = linear_probe_accuracy(_NoHead(), x4, y, x4, y, FORGET, feature_layer="proj")
    assert result.feature_layer == "proj"


def test_extract_features_is_the_head_input_and_restores_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 2)).train()
    x = torch.randn(7, 3)
    features = extract_features(model, x, batch_size=3)
    torch.testing.assert_close(features, torch.relu(model[0](x)).detach())
    assert all(m.training for m in model.modules())
    assert not model[3]._forward_pre_hooks


def test_probe_matches_sklearn_reference(blobs: tuple[torch.Tensor, ...]) -> None:
    train_x, train_y, test_x, test_y = blobs
    model = masked_model()
    result = linear_probe_accuracy(model, train_x, train_y, test_x, test_y, FORGET)
    with torch.no_grad():
        train_f = torch.relu(model[0](train_x)).double().numpy()
        test_f = torch.relu(model[0](test_x)).double().numpy()
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    predictions = reference.fit(train_f, train_y.numpy()).predict(test_f)
    y = test_y.numpy()
    per_class = [np.mean(predictions[y == k] == k) for k in range(3)]
    assert result.forget_acc == pytest.approx(per_class[2])
    assert result.retain_acc == pytest.approx(np.mean(per_class[:2]))


def test_probe_and_relearning_tell_hidden_from_never_seen(
    blobs: tuple[torch.Tensor, ...],
) -> None:
    train_x, train_y, test_x, test_y = blobs
    hidden, never = masked_model(), never_saw_model()
    with torch.no_grad():  # both heads never predict class 2: accuracy alone cannot tell them apart
        assert not (hidden(test_x).argmax(1) == 2).any()
        assert not (never(test_x).argmax(1) == 2).any()
    probe_hidden = linear_probe_accuracy(hidden, train_x, train_y, test_x, test_y, FORGET)
    probe_never = linear_probe_accuracy(never, train_x, train_y, test_x, test_y, FORGET)
    assert probe_hidden.forget_acc > 0.95
    assert probe_never.forget_acc < 0.75
    before = [p.detach().clone() for p in hidden.parameters()]
    relearn_hidden = relearning_time(
        hidden, train_x, train_y, test_x, test_y, FORGET, original_accuracy=1.0
    )
    relearn_never = relearning_time(
        never, train_x, train_y, test_x, test_y, FORGET, original_accuracy=1.0
    )
    assert all(torch.equal(a, b) for a, b in zip(before, hidden.parameters()))  # ran on a copy
    assert relearn_hidden.target == 0.5 and relearn_hidden.accuracies[0] == 0.0
    assert relearn_hidden.steps is not None and relearn_hidden.steps > 0
    assert relearn_never.steps is None or relearn_never.steps > 2 * relearn_hidden.steps


def test_relearning_arguments_are_checked(blobs: tuple[torch.Tensor, ...]) -> None:
    train_x, train_y, test_x, test_y = blobs
    model = masked_model()
    with pytest.raises(UnlearningConfigError, match="`original_accuracy`.*80"):
        relearning_time(model, train_x, train_y, test_x, test_y, FORGET, original_accuracy=80)
    with pytest.raises(UnlearningConfigError, match="`forget_classes`"):
        relearning_time(model, train_x, train_y, test_x, test_y, [], original_accuracy=0.5)
    with pytest.raises(UnlearningConfigError, match="`max_steps`.*0"):
        relearning_time(
            model, train_x, train_y, test_x, test_y, FORGET, original_accuracy=0.5, max_steps=0
        )
    with pytest.raises(RuntimeError, match="no sample of the forgotten classes"):
        keep = train_y != 2
        relearning_time(model, train_x[keep], train_y[keep], test_x, test_y, FORGET, 0.5)
