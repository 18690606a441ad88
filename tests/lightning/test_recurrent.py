"""Recurrent classifiers (``nn.LSTM``, ``nn.GRU``) trained by a plain LightningModule: the callback
constrains their input and hidden-to-hidden weights (not only the head), and a projected fit
leaves the outputs on remaining sequences unchanged while forgotten ones move."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.problems import (
    FORGET_CLASS,
    NUM_CLASSES,
    logits_of,
    make_subspace_problem,
    max_relative_change,
    mean_relative_change,
    quiet_trainer,
)
from helpers.zoo import PlainClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule


class SequenceClassifier(nn.Module):
    """A recurrent encoder and a linear head on its last step, as a user writes one."""

    def __init__(
        self, cell: Callable[..., nn.RNNBase], layers: int = 1, bidirectional: bool = False
    ):
        super().__init__()
        self.rnn = cell(20, 12, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(12 * (2 if bidirectional else 1), NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        output, _ = self.rnn(x)
        return self.head(output[:, -1])


def sequences(x: Tensor) -> Tensor:
    # three steps per sample, each in the span of the sample's own vector: remaining sequences
    # stay in the problem's 5-dimensional subspace, forgotten ones anywhere
    return torch.stack([x, -0.5 * x, 0.25 * x], dim=1)


class SequenceForgetting(PlainClassifier):
    """Cross-entropy towards another class on forget batches (a plain user's own unlearning)."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), (targets + 1) % NUM_CLASSES)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def forget_at_threshold_one(
    model: nn.Module,
    retain: tuple[Tensor, Tensor],
    forget: tuple[Tensor, Tensor],
    **calibration: Any,
) -> tuple[set[str], float, float]:
    """Fit :class:`SequenceForgetting` on ``forget`` with a calibration at threshold 1.0 from
    ``retain``: the constrained parameters, the largest relative change of the remaining
    logits and the mean relative change of the forgotten ones."""
    (retain_x, retain_y), (forget_x, forget_y) = retain, forget
    before_retain, before_forget = logits_of(model, retain_x), logits_of(model, forget_x)
    callback = NullSpaceCalibration(
        threshold=1.0,
        retain_dataloader=DataLoader(TensorDataset(retain_x, retain_y), batch_size=16),
        **calibration,
    )
    loader = DataLoader(TensorDataset(forget_x, forget_y), batch_size=8, shuffle=True)
    quiet_trainer(20, [callback]).fit(SequenceForgetting(model, lr=0.5), loader)
    assert callback.engine is not None
    return (
        set(callback.engine.constrained_parameters),
        max_relative_change(before_retain, logits_of(model, retain_x)),
        mean_relative_change(before_forget, logits_of(model, forget_x)),
    )


@pytest.mark.parametrize(
    ("cell", "layers", "bidirectional"),
    [(nn.LSTM, 1, False), (nn.GRU, 2, True)],
    ids=["lstm", "gru-2-layers-bidirectional"],
)
def test_projected_fit_leaves_remaining_sequences_unchanged(cell, layers, bidirectional):
    problem = make_subspace_problem()
    retain_x, forget_x = sequences(problem.retain_x), sequences(problem.forget_x)
    torch.manual_seed(0)
    model = SequenceClassifier(cell, layers, bidirectional)

    constrained, retain_change, forget_change = forget_at_threshold_one(
        model, (retain_x, problem.retain_y), (forget_x, problem.forget_y), rule="pooled"
    )

    recurrent = {name for name in constrained if ".rnn.weight_" in name}
    directions = ("", "_reverse") if bidirectional else ("",)
    assert recurrent == {
        f"model.rnn.weight_{kind}_l{k}{d}"
        for kind in ("ih", "hh")
        for k in range(layers)
        for d in directions
    }
    assert retain_change < 1e-5
    assert forget_change > 0.1
    # the first layer's input weights moved (in the null space of the remaining inputs)
    torch.manual_seed(0)
    original = SequenceClassifier(cell, layers, bidirectional)
    moved = (model.rnn.weight_ih_l0 - original.rnn.weight_ih_l0).detach().norm()
    assert float(moved) > 1e-3


def test_unlearning_module_forgets_a_class_with_an_lstm():
    problem = make_subspace_problem()
    retain_x, forget_x = sequences(problem.retain_x), sequences(problem.forget_x)
    torch.manual_seed(0)
    model = SequenceClassifier(nn.LSTM)
    # a model that knows the forget class: trained on remaining and forget sequences
    everything = TensorDataset(
        torch.cat([retain_x, forget_x]), torch.cat([problem.retain_y, problem.forget_y])
    )
    quiet_trainer(30).fit(
        PlainClassifier(model, lr=1e-2), DataLoader(everything, batch_size=16, shuffle=True)
    )
    assert float((logits_of(model, forget_x).argmax(1) == FORGET_CLASS).float().mean()) > 0.9
    before_retain = logits_of(model, retain_x)
    module = UnlearningModule(model, NUM_CLASSES, [FORGET_CLASS], stop_at_target=False)
    retain = DataLoader(TensorDataset(retain_x, problem.retain_y), batch_size=16)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=retain)
    forget = DataLoader(TensorDataset(forget_x, problem.forget_y), batch_size=8, shuffle=True)

    quiet_trainer(40, [callback]).fit(module, forget)

    assert max_relative_change(before_retain, logits_of(model, retain_x)) < 1e-5
    assert float((logits_of(model, forget_x).argmax(1) == FORGET_CLASS).float().mean()) < 0.2


class PackedTextClassifier(nn.Module):
    """Token ids padded with 0, packed by their lengths before an LSTM (a text classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        self.rnn = nn.LSTM(16, 12, batch_first=True)
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (hidden, _) = self.rnn(packed)
        return self.head(hidden[-1])


def token_sequences(count: int, vocabulary: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocabulary, (count, 6), generator=generator)
    lengths = torch.randint(2, 7, (count,), generator=generator)
    return tokens * (torch.arange(6) < lengths[:, None])  # padded with 0 after each length


def test_packed_sequences_fit_leaves_remaining_sequences_unchanged():
    # remaining texts use tokens 1..8, forgotten ones any of 1..19: the LSTM's input weights
    # have a null space (8 of 16 embedding directions), the unseen tokens' embeddings move
    retain_x, forget_x = token_sequences(40, 9, seed=0), token_sequences(16, 20, seed=1)
    retain_y = torch.arange(40) % FORGET_CLASS
    torch.manual_seed(0)
    model = PackedTextClassifier()

    constrained, retain_change, forget_change = forget_at_threshold_one(
        model, (retain_x, retain_y), (forget_x, torch.full((16,), FORGET_CLASS))
    )

    assert {"model.rnn.weight_ih_l0", "model.rnn.weight_hh_l0"} <= constrained
    assert retain_change < 1e-5
    assert forget_change > 0.1


class CellLoopClassifier(nn.Module):
    """An LSTMCell stepped by hand over the sequence (as decoders are often written)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(20, 12)
        self.head = nn.Linear(12, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        for step in x.unbind(1):
            state = self.cell(step, state)
        assert state is not None
        return self.head(state[0])


def test_cell_loop_fit_leaves_remaining_sequences_unchanged():
    problem = make_subspace_problem()
    retain_x, forget_x = sequences(problem.retain_x), sequences(problem.forget_x)
    torch.manual_seed(0)
    model = CellLoopClassifier()

    constrained, retain_change, forget_change = forget_at_threshold_one(
        model, (retain_x, problem.retain_y), (forget_x, problem.forget_y)
    )

    assert {"model.cell.weight_ih", "model.cell.weight_hh"} <= constrained
    assert retain_change < 1e-5
    assert forget_change > 0.1
