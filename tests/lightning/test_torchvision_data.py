"""The paper's data modules on tiny synthetic files written in the real on-disk formats."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fakedata import (  # writers of the on-disk formats, independent of the package's readers
    N_TEST,
    N_TRAIN,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_idx,
    write_svhn,
)
from PIL import Image
from torchvision import transforms as T

from unsc_lightning.data.base import UnlearningDataModule
from unsc_lightning.data.torchvision_data import (
    PAPER_DATAMODULES,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    ImageArrayDataset,
    SVHNDataModule,
    read_idx,
)


# -- references ------------------------------------------------------------------------------------
def normalised(chw: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    image = torch.from_numpy(chw.astype(np.float32) / 255.0)
    return (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def loader_labels(loader) -> set[int]:
    return {int(y) for _, ys in loader for y in ys}


def check_splits(dm: UnlearningDataModule, forget_class: int, n_forget_train: int) -> None:
    sizes = dm.split_sizes()
    n_val = round(0.1 * N_TRAIN)
    assert sizes["val_retain"] + sizes["val_forget"] == n_val
    assert sizes["train_retain"] + sizes["train_forget"] == N_TRAIN - n_val
    assert sizes["test_retain"] + sizes["test_forget"] == N_TEST
    assert 0 < sizes["train_forget"] <= n_forget_train
    assert sizes["test_forget"] == N_TEST // 10
    assert loader_labels(dm.forget_dataloader()) == {forget_class}
    assert loader_labels(dm.train_dataloader()) == {forget_class}
    assert forget_class not in loader_labels(dm.retain_dataloader())
    x, y = next(iter(dm.retain_dataloader()))
    assert y.dtype == torch.int64
    assert x.dtype == torch.float32
    assert x.shape[1:] == (1 if isinstance(dm, FashionMNISTDataModule) else 3, 32, 32)


# -- tests -------------------------------------------------------------------------------------------
def test_fashion_mnist(tmp_path):
    data = write_fashion_mnist(tmp_path, np.random.default_rng(0))
    dm = FashionMNISTDataModule(root=str(tmp_path), forget_classes=[6], batch_size=8)
    dm.setup("fit")
    check_splits(dm, 6, N_TRAIN // 10)
    bundle = dm.bundle
    assert bundle.num_classes == 10 and bundle.class_names[6] == "Shirt"
    assert bundle.train.targets.tolist() == data["train_y"].tolist()
    assert bundle.test.targets.tolist() == data["test_y"].tolist()
    # Reference: PIL bilinear resize 28 -> 32 (what torchvision's Resize does on PIL), then normalise.
    resized = np.asarray(Image.fromarray(data["train_x"][3]).resize((32, 32), Image.BILINEAR))
    expected = normalised(resized[None], (0.286,), (0.353,))
    torch.testing.assert_close(bundle.train_eval[3][0], expected, atol=1e-6, rtol=0)
    # The paper trains Fashion-MNIST without augmentation: train and eval samples coincide.
    torch.testing.assert_close(bundle.train[3][0], expected, atol=1e-6, rtol=0)


def test_fashion_mnist_gzipped_and_augmented(tmp_path):
    import gzip

    write_fashion_mnist(tmp_path, np.random.default_rng(1))
    raw = tmp_path / "FashionMNIST" / "raw"
    for path in list(raw.iterdir()):
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    dm = FashionMNISTDataModule(root=str(tmp_path), forget_classes=[0], augment=True)
    dm.setup()
    assert dm.bundle.train[0][0].shape == (1, 32, 32)
    kinds = {type(t) for t in dm.train_transform().transforms}
    assert {T.Resize, T.RandomCrop, T.RandomHorizontalFlip} <= kinds


@pytest.mark.parametrize(
    ("cls", "writer", "forget_class", "mean", "std"),
    [
        (CIFAR10DataModule, write_cifar10, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        (CIFAR100DataModule, write_cifar100, 19, (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    ],
    ids=["cifar10", "cifar100"],
)
def test_cifar(tmp_path, cls, writer, forget_class, mean, std):
    data = writer(tmp_path, np.random.default_rng(2))
    dm = cls(root=str(tmp_path), forget_classes=[forget_class], batch_size=8)
    dm.setup("fit")
    check_splits(dm, forget_class, N_TRAIN // 10)
    bundle = dm.bundle
    assert bundle.num_classes == (100 if cls is CIFAR100DataModule else 10)
    assert bundle.class_names[forget_class] == ("fine19" if cls is CIFAR100DataModule else "class3")
    assert bundle.train.targets.tolist() == data["train_y"].tolist()
    assert bundle.test.targets.tolist() == data["test_y"].tolist()
    # A CIFAR row holds the red, green and blue 32x32 planes in that order.
    expected = normalised(data["train_x"][5].reshape(3, 32, 32), mean, std)
    torch.testing.assert_close(bundle.train_eval[5][0], expected, atol=1e-6, rtol=0)
    kinds = [type(t) for t in bundle.train.transform.transforms]
    assert kinds[:2] == [T.RandomCrop, T.RandomHorizontalFlip]
    assert bundle.train[5][0].shape == (3, 32, 32)
    assert not any(isinstance(t, T.RandomCrop) for t in bundle.train_eval.transform.transforms)


def test_svhn(tmp_path):
    data = write_svhn(tmp_path, np.random.default_rng(3))
    dm = SVHNDataModule(root=str(tmp_path), forget_classes=[0], batch_size=8)
    dm.setup("fit")
    check_splits(dm, 0, N_TRAIN // 10)  # digit 0 is stored as label 10
    bundle = dm.bundle
    assert bundle.train.targets.tolist() == (data["train_y"].reshape(-1) % 10).tolist()
    assert bundle.test.targets.tolist() == (data["test_y"].reshape(-1) % 10).tolist()
    assert 10 not in bundle.train.targets.tolist()
    x = data["train_x"][..., 7].transpose(2, 0, 1)  # (H, W, C) of sample 7 -> (C, H, W)
    expected = normalised(x, (0.437, 0.443, 0.472), (0.198, 0.201, 0.197))
    torch.testing.assert_close(bundle.train_eval[7][0], expected, atol=1e-6, rtol=0)
    kinds = [type(t) for t in bundle.train.transform.transforms]
    assert T.RandomCrop in kinds and T.RandomHorizontalFlip not in kinds  # digits are not mirrored


def test_augment_false_uses_eval_transform(tmp_path):
    write_cifar10(tmp_path, np.random.default_rng(4))
    dm = CIFAR10DataModule(root=str(tmp_path), forget_classes=[3], augment=False)
    bundle = dm.bundle
    torch.testing.assert_close(bundle.train[0][0], bundle.train_eval[0][0])


@pytest.mark.parametrize(
    ("cls", "location"),
    [
        (FashionMNISTDataModule, "FashionMNIST/raw"),
        (CIFAR10DataModule, "cifar-10-batches-py"),
        (SVHNDataModule, "train_32x32.mat"),
        (CIFAR100DataModule, "cifar-100-python"),
    ],
)
def test_missing_files_error_names_path_and_download(tmp_path, cls, location):
    dm = cls(root=str(tmp_path / "nowhere"), forget_classes=[1])
    with pytest.raises(DatasetNotFoundError, match=r"download=True") as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and location in message
    assert cls.dataset_name in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FileNotFoundError)


def test_download_is_used_when_files_are_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):  # stands in for torchvision's verified download
        calls.append(self.root)
        write_cifar10(Path(self.root), np.random.default_rng(5))

    monkeypatch.setattr(CIFAR10DataModule, "torchvision_download", fake_download)
    dm = CIFAR10DataModule(root=str(tmp_path), forget_classes=[3], download=True)
    dm.prepare_data()
    dm.prepare_data()  # files present now: no second download
    dm.setup()
    assert calls == [str(tmp_path)]
    assert len(dm.bundle.train) == N_TRAIN


def test_failed_download_raises_runtime_error(tmp_path, monkeypatch):
    def failing_download(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(SVHNDataModule, "torchvision_download", failing_download)
    dm = SVHNDataModule(root=str(tmp_path), forget_classes=[3], download=True)
    with pytest.raises(RuntimeError, match=r"Downloading SVHN .* failed \(network unreachable\)"):
        dm.setup()


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)  # float idx
    with pytest.raises(RuntimeError, match="not an idx file"):
        read_idx(path)
    write_idx(path, np.zeros((2, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(RuntimeError, match="header says"):
        read_idx(path)


def test_paper_defaults_and_registry():
    assert {
        "fmnist": FashionMNISTDataModule,
        "cifar10": CIFAR10DataModule,
        "svhn": SVHNDataModule,
        "cifar100": CIFAR100DataModule,
    } == PAPER_DATAMODULES
    for cls in PAPER_DATAMODULES.values():
        dm = cls(forget_classes=[1])
        assert (dm.batch_size, dm.val_fraction, dm.root, dm.download) == (512, 0.1, "data", False)
        assert dm.augment is (cls is not FashionMNISTDataModule)


def test_datamodules_are_cli_configurable():
    from jsonargparse import ArgumentParser

    for cls in PAPER_DATAMODULES.values():
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "data")
        config = parser.parse_args(
            ["--data.root=/tmp/x", "--data.forget_classes=[3]", "--data.augment=false"]
        )
        assert config.data.root == "/tmp/x" and config.data.forget_classes == [3]


def test_image_array_dataset_exposes_targets():
    from unsc_lightning.data.torchvision_data import ImageArrays

    images = np.zeros((3, 32, 32, 3), np.uint8)
    dataset = ImageArrayDataset(ImageArrays(images, np.array([2, 0, 1])), T.ToTensor())
    assert dataset.targets.tolist() == [2, 0, 1]
    x, y = dataset[0]
    assert x.shape == (3, 32, 32) and y == 2
