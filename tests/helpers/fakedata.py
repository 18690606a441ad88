"""Tiny synthetic data sets written in the real on-disk formats of torchvision's downloads.

Shared by tests that need files for the paper's data modules (Fashion-MNIST idx-ubyte files,
CIFAR-10/100 python pickles, SVHN ``.mat``). The writers are independent of the package's
readers; they mirror those in ``tests/test_torchvision_data.py``. Labels cycle through the
classes so every class (every tenth class for CIFAR-100, from 9 to 99) has samples.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.io import savemat

N_TRAIN, N_TEST = 40, 20


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(content, handle)


def write_fashion_mnist(
    root: Path, rng: np.random.Generator, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, np.ndarray]:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    data = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": np.arange(n_train) % 10,
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": np.arange(n_test) % 10,
    }
    for prefix, split in (("train", "train"), ("t10k", "test")):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", data[f"{split}_x"])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", data[f"{split}_y"])
    return data


def write_cifar10(
    root: Path, rng: np.random.Generator, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)  # R, G, B planes per row
    labels = np.arange(n_train + n_test) % 10
    per_batch = n_train // 5
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        write_pickle(
            folder / f"data_batch_{i + 1}", {b"data": rows[part], b"labels": labels[part].tolist()}
        )
    test = slice(n_train, None)
    write_pickle(folder / "test_batch", {b"data": rows[test], b"labels": labels[test].tolist()})
    # The official meta file was pickled by Python 2 (str keys once loaded with latin1).
    write_pickle(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)]})
    return {"train_x": rows[:n_train], "train_y": labels[:n_train], "test_y": labels[n_train:]}


def write_cifar100(
    root: Path, rng: np.random.Generator, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    fine = (np.arange(n_train + n_test) % 10) * 10 + 9  # classes 9, 19, ..., 99
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        content = {
            b"data": rows[part],
            b"fine_labels": fine[part].tolist(),
            b"coarse_labels": (fine[part] // 5).tolist(),
        }
        write_pickle(folder / name, content)
    names = [f"fine{k}".encode() for k in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    return {"train_x": rows[:n_train], "train_y": fine[:n_train], "test_y": fine[n_train:]}


def write_svhn(
    root: Path, rng: np.random.Generator, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, where 10 is digit 0
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        data[f"{split}_x"], data[f"{split}_y"] = x, y
    return data


#: Paper setting (config prefix) -> writer of its files under ``root``.
WRITERS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "fmnist": write_fashion_mnist,
    "cifar10": write_cifar10,
    "svhn": write_svhn,
    "cifar100": write_cifar100,
}
