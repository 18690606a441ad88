"""``nn.Embedding(sparse=True)`` gives sparse gradients: the callback must project them (made
dense) instead of failing inside the projection with a message about sparse dimensions."""

from __future__ import annotations

import pytest
import torch
from helpers.problems import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import NullSpaceCalibration, UnlearningModule


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(40, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(1))


@pytest.mark.parametrize("options", [{}, {"lr": 0.5, "optimizer": "sgd"}], ids=["relative", "sgd"])
def test_sparse_embedding_gradients_are_projected(options):
    generator = torch.Generator().manual_seed(0)
    retain_tokens = torch.randint(0, 20, (60, 4), generator=generator)  # tokens 0..19
    forget_tokens = torch.randint(10, 40, (20, 4), generator=generator)  # also 20..39
    retain = DataLoader(TensorDataset(retain_tokens, torch.randint(1, 3, (60,))), batch_size=20)
    forget = DataLoader(
        TensorDataset(forget_tokens, torch.zeros(20, dtype=torch.long)), batch_size=10
    )
    torch.manual_seed(0)
    model = Bag()
    before = model(retain_tokens).detach()
    seen_rows = model.embedding.weight.detach()[:20].clone()
    module = UnlearningModule(model, 3, [0], stop_at_target=False, **options)
    callback = NullSpaceCalibration(threshold=1.0, retain_dataloader=retain)

    quiet_trainer(3, [callback]).fit(module, train_dataloaders=forget)

    assert callback.active_mode == "gradient"
    weight = model.embedding.weight.detach()
    assert torch.equal(weight[:20], seen_rows)  # rows of tokens seen in remaining data
    assert float((weight[20:] - module.original.embedding.weight[20:]).abs().max()) > 0
    after = model(retain_tokens).detach()
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_gradient_norms_of_sparse_gradients_equal_their_dense_norms():
    # a sparse embedding gradient repeats an index once per occurrence (uncoalesced): its norm
    # is that of the summed rows, the norm of the dense gradient
    from unsc_lightning.module import gradient_norms

    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([[1, 1, 4], [4, 7, 1]])).pow(2).sum().backward()
    sparse = embedding.weight.grad
    assert sparse is not None and sparse.is_sparse and not sparse.is_coalesced()
    dense = torch.randn(4, 5)
    got = gradient_norms([dense, sparse, dense])
    assert torch.allclose(got[1], sparse.to_dense().norm())
    assert torch.allclose(got[0], dense.norm()) and torch.equal(got[2], got[0])
