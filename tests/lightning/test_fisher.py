"""Fisher forgetting: the diagonal Fisher against per-example autograd, and the noise it adds."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.problems import single_thread
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import UnlearningConfigError
from unsc_lightning.baselines import FisherForgetting, fisher_diagonal, fisher_noise_variance
from unsc_lightning.lab.runs import make_trainer


def _tiny_model(seed: int = 0, batch_norm: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def _reference_fisher(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_x Σ_y p(y|x) (∇ log p(y|x))², one backward pass per example and class."""
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in inputs:
        log_probs = torch.log_softmax(model(x.unsqueeze(0)), dim=-1).squeeze(0)
        for y in range(log_probs.numel()):
            model.zero_grad()
            log_probs[y].backward(retain_graph=True)
            p_y = log_probs[y].exp().item()
            for name, parameter in model.named_parameters():
                fisher[name] += p_y * parameter.grad.square()
    return fisher


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_fisher_diagonal_matches_per_example_autograd(batch_norm: bool, chunk_size: int) -> None:
    model = _tiny_model(batch_norm=batch_norm)
    if batch_norm:  # non-trivial running statistics, used in eval mode
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 4) * 3 + 1)
    model.eval()
    inputs = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    expected = _reference_fisher(copy.deepcopy(model), inputs)
    got = fisher_diagonal(model, inputs, chunk_size=chunk_size)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_fisher_skips_frozen_parameters() -> None:
    model = _tiny_model()
    model[0].weight.requires_grad_(False)
    fisher = fisher_diagonal(model, torch.randn(5, 4))
    assert "0.weight" not in fisher and "2.weight" in fisher
    expected = _reference_fisher(copy.deepcopy(model), torch.randn(0, 4))
    assert set(expected) >= set(fisher)


def test_noise_variance_is_clipped_inverse_fisher() -> None:
    fisher = torch.tensor([0.0, 1e-6, 0.5, 4.0])
    variance = fisher_noise_variance(fisher, alpha=0.1, max_variance=100.0)
    expected = 0.1 * torch.minimum(1 / (fisher + 1e-8), torch.tensor(100.0))
    torch.testing.assert_close(variance, expected)


def _loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(48, 4, generator=generator)
    labels = torch.randint(0, 2, (48,), generator=generator)  # remaining classes 0 and 1
    retain = DataLoader(TensorDataset(inputs, labels), batch_size=16)
    return retain, retain


def test_fisher_forgetting_adds_noise_shaped_by_the_fisher() -> None:
    with single_thread():
        model = _tiny_model()
        original = copy.deepcopy(model)
        retain, _ = _loaders()
        module = FisherForgetting(model, num_classes=3, forget_classes=[2], alpha=1e-3, seed=0)
        make_trainer(1).fit(module, train_dataloaders=retain)
    assert module.fisher_samples == 48
    inputs = torch.cat([batch[0] for batch in retain])
    fisher = fisher_diagonal(original, inputs)
    changes = {n: (p - original.state_dict()[n]) for n, p in model.state_dict().items()}
    assert all(c.abs().sum() > 0 for c in changes.values())
    # the noise's scale follows sqrt(alpha / F): compare with the draw of the same generator
    generator = torch.Generator().manual_seed(0)
    for name, parameter in original.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        std = fisher_noise_variance(fisher[name] / 48, 1e-3, 1e3).sqrt()
        expected = std * noise
        if name.startswith("2."):  # the head: forgotten class row reset around zero
            expected = expected.clone()
            expected[2] = 0.0
            changed = model.state_dict()[name]
            assert changed[2].abs().max() < 1e-3 * 5  # N(0, alpha * 1e-4): std 3e-4
            torch.testing.assert_close(changes[name][:2], expected[:2], rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(changes[name], expected, rtol=1e-4, atol=1e-6)
    # the forgotten class is no longer predicted
    with torch.no_grad():
        assert (model(torch.randn(64, 4)).argmax(1) == 2).float().mean() < 0.5


def test_max_samples_bounds_the_fisher_pass() -> None:
    with single_thread():
        retain, _ = _loaders()
        module = FisherForgetting(_tiny_model(), 3, [2], max_samples=20)
        make_trainer(1).fit(module, train_dataloaders=retain)
    assert module.fisher_samples == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "`alpha` > 0, got 0.0"),
        ({"max_variance": -1.0}, "`max_variance` > 0, got -1.0"),
        ({"max_samples": 0}, "`max_samples`.*0"),
        ({"chunk_size": 0}, "`chunk_size`.*0"),
        ({"reset_forget_head": "yes"}, "`reset_forget_head`.*'yes'"),
        ({"head_layer": 3}, "`head_layer`.*3"),
    ],
)
def test_misconfiguration(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UnlearningConfigError, match=match):
        FisherForgetting(_tiny_model(), num_classes=3, forget_classes=[2], **kwargs)


def test_head_layer_must_be_the_classifier() -> None:
    retain, _ = _loaders()
    module = FisherForgetting(_tiny_model(), 3, [2], head_layer="0")
    with pytest.raises(UnlearningConfigError, match="`head_layer='0'` has no weight"):
        make_trainer(1).fit(module, train_dataloaders=retain)
