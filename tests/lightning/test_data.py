"""`UnlearningDataModule`, `ForgetSpec` and the embedded (offline) data sets."""

from __future__ import annotations

import random
import socket

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from unsc_lightning import ForgetSpec, UnlearningConfigError, UnlearningDataModule
from unsc_lightning.data import (
    PAPER_DATAMODULES,
    DigitsDataModule,
    MNIST1DDataModule,
    dataset_targets,
    mnist1d_bundle,
)
from unsc_lightning.data.registry import DATAMODULES, register_datamodule

NUM_TRAIN = 300
NUM_TEST = 120
NUM_CLASSES = 5


def indexed_datasets() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train/test sets whose first feature is the sample's index; ``train_eval`` is marked by +0.5."""
    train_x = torch.zeros(NUM_TRAIN, 3)
    train_x[:, 0] = torch.arange(NUM_TRAIN, dtype=torch.float32)
    train_y = (torch.arange(NUM_TRAIN) * 7) % NUM_CLASSES
    test_x = torch.zeros(NUM_TEST, 3)
    test_x[:, 0] = torch.arange(NUM_TEST, dtype=torch.float32)
    test_y = (torch.arange(NUM_TEST) * 3) % NUM_CLASSES
    train_eval_x = train_x.clone()
    train_eval_x[:, 1] = 0.5
    return (
        TensorDataset(train_x, train_y),
        TensorDataset(test_x, test_y),
        TensorDataset(train_eval_x, train_y),
    )


def datamodule(**kwargs) -> UnlearningDataModule:
    train, test, train_eval = indexed_datasets()
    return UnlearningDataModule(
        train_dataset=train, test_dataset=test, train_eval_dataset=train_eval, **kwargs
    )


def loader_indices(loader: DataLoader) -> Tensor:
    return torch.cat([batch[0][:, 0] for batch in loader]).long()


def loader_marks(loader: DataLoader) -> set[float]:
    return set(torch.cat([batch[0][:, 1] for batch in loader]).tolist())


def as_set(indices: Tensor) -> set[int]:
    return set(indices.tolist())


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(ForgetSpec(kind="class", classes=[1, 3]), id="class"),
        pytest.param(ForgetSpec(kind="random", fraction=0.1, seed=4), id="random"),
    ],
)
def test_splits_are_disjoint_and_complete(spec):
    dm = datamodule(forget=spec, val_fraction=0.2)
    dm.setup("fit")
    splits = {name: as_set(index) for name, index in dm.splits.items()}
    train_parts = ["train_forget", "train_retain", "val_retain", "val_forget"]

    for i, first in enumerate(train_parts):
        for second in train_parts[i + 1 :]:
            assert not splits[first] & splits[second], (first, second)
    assert set().union(*(splits[p] for p in train_parts)) == set(range(NUM_TRAIN))
    assert not splits["test_retain"] & splits["test_forget"]
    assert splits["test_retain"] | splits["test_forget"] == set(range(NUM_TEST))
    assert len(splits["val_retain"] | splits["val_forget"]) == round(0.2 * NUM_TRAIN)
    for name, index in dm.splits.items():
        assert torch.equal(index, index.sort().values), name  # fixed, sorted order
    sizes = dm.split_sizes()
    assert sizes == {name: len(split) for name, split in splits.items()}


def test_class_forgetting_splits_by_class():
    forget = [1, 3]
    dm = datamodule(forget_classes=forget)
    dm.setup()
    train_y = dataset_targets(dm.bundle.train)
    test_y = dataset_targets(dm.bundle.test)

    assert set(train_y[dm.splits["train_forget"]].tolist()) == set(forget)
    assert set(dm.forget_targets().tolist()) == set(forget)
    assert set(train_y[dm.splits["train_retain"]].tolist()) == {0, 2, 4}
    assert set(train_y[dm.splits["val_retain"]].tolist()) == {0, 2, 4}
    assert set(train_y[dm.splits["val_forget"]].tolist()) <= set(forget)
    assert set(test_y[dm.splits["test_forget"]].tolist()) == set(forget)
    assert set(test_y[dm.splits["test_retain"]].tolist()) == {0, 2, 4}
    # every training sample of a forgotten class outside validation is forgotten
    in_val = as_set(dm.splits["val_retain"]) | as_set(dm.splits["val_forget"])
    expected = {i for i in range(NUM_TRAIN) if int(train_y[i]) in forget and i not in in_val}
    assert as_set(dm.splits["train_forget"]) == expected
    assert dm.forget_classes == forget and dm.num_classes == NUM_CLASSES


def test_random_forgetting_selects_exact_seeded_fraction():
    def forgotten(seed: int) -> Tensor:
        dm = datamodule(forget=ForgetSpec(kind="random", fraction=0.1, seed=seed), val_fraction=0.1)
        dm.setup()
        return dm.splits["train_forget"]

    dm = datamodule(forget=ForgetSpec(kind="random", fraction=0.1, seed=0), val_fraction=0.1)
    dm.setup()
    candidates = NUM_TRAIN - round(0.1 * NUM_TRAIN)
    assert dm.splits["train_forget"].numel() == round(0.1 * candidates)
    assert torch.equal(forgotten(0), dm.splits["train_forget"])  # reproducible
    assert not torch.equal(forgotten(0), forgotten(1))  # and seeded
    assert dm.forget_classes == []
    # classes remain: every class still has remaining samples, and nothing is held-out "forget"
    train_y = dataset_targets(dm.bundle.train)
    assert set(train_y[dm.splits["train_retain"]].tolist()) == set(range(NUM_CLASSES))
    assert dm.splits["test_forget"].numel() == 0 and dm.splits["val_forget"].numel() == 0
    # the forget evaluation loader holds the forgotten training samples themselves
    loaders = dict(zip(dm.eval_loader_names, dm.val_dataloader()))
    assert torch.equal(loader_indices(loaders["forget"]), dm.splits["train_forget"])


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_on", ["forget", "retain", "all"])
def test_train_loader_yields_the_stage_samples(train_on):
    dm = datamodule(forget_classes=[2], train_on=train_on, batch_size=32)
    dm.setup("fit")
    expected = {
        "forget": as_set(dm.splits["train_forget"]),
        "retain": as_set(dm.splits["train_retain"]),
        "all": as_set(dm.splits["train_forget"]) | as_set(dm.splits["train_retain"]),
    }[train_on]

    loader = dm.train_dataloader()
    seen = loader_indices(loader)

    assert seen.numel() == len(expected)  # each once
    assert as_set(seen) == expected
    assert loader_marks(loader) == {0.0}  # training transforms (`train`, not `train_eval`)
    assert torch.equal(seen, loader_indices(dm.train_dataloader()))  # seeded shuffle


def test_retain_and_eval_loaders():
    dm = datamodule(forget_classes=[0], eval_batch_size=50)
    retain = dm.retain_dataloader()
    assert torch.equal(loader_indices(retain), dm.splits["train_retain"])  # fixed order
    assert loader_marks(retain) == {0.5}  # evaluation transforms
    assert torch.equal(loader_indices(dm.forget_dataloader()), dm.splits["train_forget"])

    names = dm.eval_loader_names
    assert names[:2] == ("retain", "forget")  # dataloader_idx 0 and 1
    for stage, loaders in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert len(loaders) == len(names)
        by_name = dict(zip(names, loaders))
        assert torch.equal(loader_indices(by_name["retain"]), dm.splits[f"{stage}_retain"])
        assert torch.equal(loader_indices(by_name["forget"]), dm.splits[f"{stage}_forget"])
        if "member" in by_name:  # MIA members: remaining training samples, as many as held out
            members = loader_indices(by_name["member"])
            assert as_set(members) <= as_set(dm.splits["train_retain"])
            assert members.numel() == min(
                dm.splits[f"{stage}_retain"].numel(), dm.splits["train_retain"].numel()
            )
        if "forget_train" in by_name:
            assert torch.equal(loader_indices(by_name["forget_train"]), dm.splits["train_forget"])


def test_explicit_tensor_datasets_infer_num_classes():
    generator = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(80, 4, generator=generator), torch.arange(80) % 4)
    test = TensorDataset(torch.randn(40, 4, generator=generator), torch.arange(40) % 4)
    dm = UnlearningDataModule(
        train_dataset=train, test_dataset=test, forget_classes=[3], val_fraction=0.0
    )
    dm.setup("fit")
    assert dm.num_classes == 4
    assert dm.split_sizes() == {
        "train_forget": 20,
        "train_retain": 60,
        "val_retain": 0,
        "val_forget": 0,
        "test_retain": 30,
        "test_forget": 10,
    }
    inputs, targets = next(iter(dm.retain_dataloader()))
    assert inputs.shape == (60, 4) and 3 not in targets.tolist()


# --------------------------------------------------------------------------------------------
# Embedded data
# --------------------------------------------------------------------------------------------
def test_mnist1d_generation_restores_global_random_state():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()

    bundle = mnist1d_bundle(num_samples=200, seed=7)  # not cached by any other test

    assert random.getstate() == py_state
    after = np.random.get_state()
    assert (
        after[0] == np_state[0]
        and np.array_equal(after[1], np_state[1])
        and after[2:] == np_state[2:]
    )
    assert bundle.num_classes == 10
    assert bundle.train[0][0].shape == (1, 40)
    assert len(bundle.train) + len(bundle.test) == 200
    # control: the generator itself does reseed the global state (what the wrapper undoes)
    args = get_dataset_args()
    args.num_samples, args.seed = 200, 7
    make_dataset(args)
    assert not np.array_equal(np.random.get_state()[1], np_state[1])
    again = mnist1d_bundle(num_samples=200, seed=7)
    assert torch.equal(again.train.tensors[0], bundle.train.tensors[0])


def test_mnist1d_datamodule_forget_split():
    dm = MNIST1DDataModule(num_samples=200, data_seed=7, forget_classes=[3])
    dm.setup()
    assert set(dm.forget_targets().tolist()) == {3}
    assert dm.num_classes == 10


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_digits_load_offline(no_network):
    dm = UnlearningDataModule.from_name("digits", forget_classes=[3])
    assert isinstance(dm, DigitsDataModule)
    dm.setup("fit")
    sizes = dm.split_sizes()
    assert (
        sum(sizes[name] for name in ("train_forget", "train_retain", "val_retain", "val_forget"))
        == 1347
    )
    assert sizes["test_retain"] + sizes["test_forget"] == 450
    inputs, targets = next(iter(dm.retain_dataloader()))
    assert inputs.shape[1:] == (1, 8, 8)
    assert float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0
    assert 3 not in targets.tolist()


def test_from_name_builds_every_registered_data_module() -> None:
    assert {"mnist1d": MNIST1DDataModule, "digits": DigitsDataModule} | dict(
        PAPER_DATAMODULES
    ) == DATAMODULES
    for name, cls in DATAMODULES.items():
        dm = UnlearningDataModule.from_name(name, forget_classes=[3])
        assert type(dm) is cls and dm.forget_classes == [3]


def test_register_datamodule_refuses_a_taken_name() -> None:
    with pytest.raises(
        UnlearningConfigError, match="`name='digits'` already names DigitsDataModule"
    ):
        register_datamodule("digits")(MNIST1DDataModule)
    assert register_datamodule("digits")(DigitsDataModule) is DigitsDataModule
