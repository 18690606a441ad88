"""Any model, out of the box (issue 12): UNSC at default settings on models nobody here wrote.

Each zoo model (``helpers/zoo.py``: MNIST-1D and digits CNNs, a ViT with ``nn.MultiheadAttention``,
class token and position parameters, a ConvNeXt-style net with depthwise convs and layer scale,
an ``nn.Embedding`` token classifier, and -- with ``UNSC_ZOO_RESNET=1`` -- torchvision's ResNet-18)
is trained briefly by a plain LightningModule, then one class is unlearned with
``NullSpaceCalibration()`` and ``UnlearningModule(model, num_classes, forget_classes=[k])``, both
without any other argument, under a Trainer that only caps the epochs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from helpers.zoo import NUM_CLASSES, ZOO, ZooEntry, plain_trainer, train_zoo_model, zoo_datamodule
from torch import nn

from unsc_lightning import NullSpaceCalibration, UnlearningModule
from unsc_lightning.baselines.stopping import loader_accuracy

FORGET = [3]
EPOCH_CAP = 200  # a cap only: unlearning must stop by itself long before

# torchvision's ResNet-18 has 512-channel 3x3 convs: each basis is an eigendecomposition of a
# 4608 x 4608 covariance (about half a minute on one thread), too slow for the default run.
SLOW = {"resnet18"}
MODELS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name in SLOW and not os.environ.get("UNSC_ZOO_RESNET"),
            reason="slow (minutes on one thread); set UNSC_ZOO_RESNET=1",
        ),
    )
    for name in ZOO
]
# ResNet-18's remaining logits at threshold 1.0 moved by 17.8 % with relative steps projected
# once, by 3.7e-4 (and 2.6 % on another run) projected twice: its last stage's gradients lie wholly
# in the remaining subspace, and the rescaling blew the rounding that projection leaves up to a
# full step. `drop_null_gradients_` now holds such a weight still (drift 0.0).


@pytest.fixture(scope="session")
def zoo_originals() -> dict[str, nn.Module]:
    """Each zoo model trained for a third of its recipe (enough to know the forgotten class)."""
    return {}


def original(zoo_originals: dict[str, nn.Module], name: str) -> tuple[ZooEntry, nn.Module]:
    entry = ZOO[name]
    if name not in zoo_originals:
        with torch.random.fork_rng():
            zoo_originals[name] = train_zoo_model(
                replace(entry, epochs=max(2, entry.epochs // 3)), FORGET
            )
    return entry, copy.deepcopy(zoo_originals[name])


def trainable(module: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_forgets_a_class_at_defaults(zoo_originals: dict[str, nn.Module], name: str):
    entry, model = original(zoo_originals, name)
    dm = zoo_datamodule(entry.data, FORGET)
    dm.setup("fit")
    assert loader_accuracy(model, dm.forget_dataloader(), torch.device("cpu")) > 0.5
    module = UnlearningModule(model, NUM_CLASSES, forget_classes=FORGET)
    flags = trainable(module)
    trainer = plain_trainer(EPOCH_CAP, callbacks=[NullSpaceCalibration()])

    trainer.fit(module, datamodule=dm)

    assert loader_accuracy(model, dm.forget_dataloader(), torch.device("cpu")) <= 0.01
    assert module.stopped_at_epoch is not None and trainer.current_epoch < EPOCH_CAP
    assert trainable(module) == flags  # nothing left frozen (or unfrozen) after the fit


# -- needs the engine rewrite ---------------------------------------------------------------------
# The two tests below use the lead's `NullSpaceCalibration.engine` API (`constrained_parameters`,
# `frozen_parameters`: full parameter names as in `pl_module.named_parameters()`) and its
# handlers for MultiheadAttention / Embedding and its freezing of raw parameters (class token,
# positions, layer scale). They fail until that rewrite lands.
@torch.no_grad()
def logits_on(model: nn.Module, loader: object) -> torch.Tensor:
    model.eval()
    return torch.cat([model(batch[0]) for batch in loader])  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_remaining_outputs_do_not_move_at_threshold_one(
    zoo_originals: dict[str, nn.Module], name: str
):
    # needs the engine rewrite (ViT: attention; ConvNeXt, tokens: raw parameters move today)
    entry, model = original(zoo_originals, name)
    dm = zoo_datamodule(entry.data, FORGET)
    dm.setup("fit")
    before = logits_on(model, dm.retain_dataloader())
    module = UnlearningModule(model, NUM_CLASSES, forget_classes=FORGET)
    trainer = plain_trainer(3, callbacks=[NullSpaceCalibration(threshold=1.0)])

    trainer.fit(module, datamodule=dm)

    after = logits_on(model, dm.retain_dataloader())
    assert float((after - before).norm() / before.norm()) <= 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_zoo_every_trainable_parameter_is_constrained_or_frozen(
    zoo_originals: dict[str, nn.Module], name: str
):
    # needs the engine rewrite (`callback.engine` does not exist today)
    entry, model = original(zoo_originals, name)
    module = UnlearningModule(model, NUM_CLASSES, forget_classes=FORGET)
    callback = NullSpaceCalibration()
    trainer = plain_trainer(1, callbacks=[callback], limit_train_batches=1)

    trainer.fit(module, datamodule=zoo_datamodule(entry.data, FORGET))

    wanted = {n for n, p in module.named_parameters() if p.requires_grad}
    constrained = set(callback.engine.constrained_parameters)
    frozen = set(callback.engine.frozen_parameters)
    assert constrained & frozen == set()
    assert constrained | frozen == wanted
