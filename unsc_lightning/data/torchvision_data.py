"""The paper's image data sets: Fashion-MNIST, CIFAR-10, SVHN and CIFAR-100.

Files are read from the layout torchvision's downloaders leave on disk, by small readers of those
exact formats (idx-ubyte, CIFAR python pickles, SVHN ``.mat``), so any directory holding the
extracted files works offline and nothing is re-verified or re-downloaded. ``download=True``
fetches missing files through the torchvision dataset classes, which verify their checksums.

Normalisation and augmentation follow the UNSC authors' released code; the one deliberate change
is that SVHN is not flipped (mirrored digits are not digits).

=================  ==================================  ===================================
data module        files under ``root``                train augmentation (``augment``)
=================  ==================================  ===================================
Fashion-MNIST      ``FashionMNIST/raw/*-idx?-ubyte``   none by default (paper); resized to 32
CIFAR-10           ``cifar-10-batches-py/``            RandomCrop(32, 4) + horizontal flip
SVHN               ``train_32x32.mat``, ``test_...``   RandomCrop(32, 4)
CIFAR-100          ``cifar-100-python/``               RandomCrop(32, 4) + horizontal flip
=================  ==================================  ===================================
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from unsc_lightning.data.base import DatasetBundle, UnlearningDataModule
from unsc_lightning.data.forget import ForgetSpec
from unsc_lightning.data.registry import register_datamodule

Transform = Callable[[Image.Image], Any]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class DatasetNotFoundError(FileNotFoundError, RuntimeError):
    """The data set's files are not under ``root`` (catchable as either base class)."""


@dataclass
class ImageArrays:
    """Images as ``uint8`` ``(N, H, W)`` or ``(N, H, W, C)`` and integer labels ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise RuntimeError(f"Got {len(self.images)} images but {len(self.labels)} labels.")


class ImageArrayDataset(Dataset):
    """In-memory images returned as PIL images through ``transform``, like torchvision's datasets.

    Args:
        arrays: the images and labels (shared, not copied, between datasets).
        transform: applied to each ``PIL.Image``; ``None`` returns the image itself.

    Example:
        >>> import numpy as np
        >>> data = ImageArrayDataset(ImageArrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 1])))
        >>> data.targets.tolist(), data[1][0].size
        ([0, 1], (4, 4))
    """

    def __init__(self, arrays: ImageArrays, transform: Transform | None = None) -> None:
        self.images = arrays.images
        self.targets: Tensor = torch.as_tensor(np.asarray(arrays.labels, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.targets[index])


# -- readers of the on-disk formats -------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (MNIST / Fashion-MNIST format), optionally gzipped.

    Returns:
        ``uint8`` array whose shape is the dimensions stored in the header.
    """
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise RuntimeError(
            f"{str(path)!r} is not an idx file of unsigned bytes (bad magic number)."
        )
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise RuntimeError(f"{str(path)!r} holds {values.size} values; its header says {dims}.")
    return values.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return directory / stem


def read_fashion_mnist(raw_dir: str | Path) -> tuple[ImageArrays, ImageArrays]:
    """Train and test arrays from torchvision's ``FashionMNIST/raw`` directory."""
    raw_dir = Path(raw_dir)
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(raw_dir, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(raw_dir, f"{prefix}-labels-idx1-ubyte"))
        splits.append(ImageArrays(images, labels.astype(np.int64)))
    return splits[0], splits[1]


def _unpickle(path: Path) -> dict[str, Any]:
    # The official batches were pickled by Python 2: ``latin1`` restores their NumPy arrays; keys
    # are ``str`` then, ``bytes`` for files pickled by Python 3 with byte keys.
    with path.open("rb") as handle:
        entry = pickle.load(handle, encoding="latin1")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _names(values: Sequence[str | bytes]) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def read_cifar_batches(files: Sequence[str | Path], label_key: str) -> ImageArrays:
    """Concatenate CIFAR python batches (``data`` rows of 3072 bytes, channel-major) to NHWC."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for path in files:
        entry = _unpickle(Path(path))
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(label) for label in entry[label_key])
    stacked = np.concatenate(images).transpose(0, 2, 3, 1)
    return ImageArrays(np.ascontiguousarray(stacked), np.asarray(labels, dtype=np.int64))


def read_svhn(path: str | Path) -> ImageArrays:
    """SVHN cropped digits from a ``*_32x32.mat`` file; label 10 (digit 0) becomes 0."""
    from scipy.io import loadmat

    content = loadmat(str(path))
    images = np.ascontiguousarray(np.transpose(content["X"], (3, 0, 1, 2)).astype(np.uint8))
    labels = content["y"].reshape(-1).astype(np.int64)
    labels[labels == 10] = 0
    return ImageArrays(images, labels)


# -- data modules ---------------------------------------------------------------------------------
class TorchvisionDataModule(UnlearningDataModule):
    """Common loading logic of the paper's data modules; subclasses name files and transforms.

    Args:
        forget_classes: forgotten class ids (shorthand for ``forget``).
        forget: full forget specification.
        root: directory holding the data set in torchvision's layout.
        download: fetch missing files with torchvision (needs internet; checksums verified).
        train_on: ``"forget"``, ``"retain"`` or ``"all"`` (see :class:`UnlearningDataModule`).
        val_fraction: share of the training set held out for validation (paper: 0.1).
        batch_size: training batch size (paper: 512).
        eval_batch_size: batch size of the evaluation and retain loaders.
        num_workers: DataLoader workers.
        seed: seed of the validation split and of shuffling.
        augment: apply the paper's training augmentation to the training loader.

    Raises:
        DatasetNotFoundError: at ``setup`` when the files are missing and ``download=False``.
        RuntimeError: at ``setup`` or ``prepare_data`` when a download fails.
    """

    #: Human-readable name used in messages.
    dataset_name: ClassVar[str] = ""
    #: Directory (relative to ``root``) the files live in; ``""`` for ``root`` itself.
    subdirectory: ClassVar[str] = ""
    #: What ``root`` must hold, for the error message.
    expected_content: ClassVar[str] = ""
    num_classes_total: ClassVar[int] = 10
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()

    def __init__(
        self,
        forget_classes: list[int] | None = None,
        forget: ForgetSpec | None = None,
        root: str = "data",
        download: bool = False,
        train_on: str = "forget",
        val_fraction: float = 0.1,
        batch_size: int = 512,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(
            forget_classes=forget_classes,
            forget=forget,
            train_on=train_on,  # type: ignore[arg-type]
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = root
        self.download = download
        self.augment = augment

    # -- subclass interface -----------------------------------------------------------------------
    def required_files(self) -> list[Path]:
        """Paths that must exist for :meth:`read_arrays` to succeed."""
        raise NotImplementedError

    def read_arrays(self) -> tuple[ImageArrays, ImageArrays, list[str]]:
        """Train arrays, test arrays and class names read from :attr:`data_dir`."""
        raise NotImplementedError

    def torchvision_download(self) -> None:
        """Fetch the files with the torchvision dataset class (``download=True``)."""
        raise NotImplementedError

    def augmentation(self) -> list[Transform]:
        """Training-only transforms, applied after :meth:`resize` and before ``ToTensor``."""
        return []

    def resize(self) -> list[Transform]:
        """Transforms applied first to every image (train and eval)."""
        return []

    # -- shared logic ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """Directory holding the files."""
        return Path(self.root) / self.subdirectory

    def eval_transform(self) -> Transform:
        """Resize (if any), ``ToTensor`` and the data set's normalisation."""
        return T.Compose([*self.resize(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self) -> Transform:
        """:meth:`eval_transform` preceded by the augmentation when ``augment=True``."""
        if not self.augment or not self.augmentation():
            return self.eval_transform()
        return T.Compose(
            [*self.resize(), *self.augmentation(), T.ToTensor(), T.Normalize(self.mean, self.std)]
        )

    def missing_files(self) -> list[Path]:
        """Required files that do not exist."""
        return [path for path in self.required_files() if not path.is_file()]

    def prepare_data(self) -> None:
        """Download the files (once, on one process) when ``download=True`` and they are missing."""
        if self.download and self.missing_files():
            self._download()

    def _download(self) -> None:
        try:
            self.torchvision_download()
        except Exception as error:  # network errors, checksum mismatches, disk errors
            raise RuntimeError(
                f"Downloading {self.dataset_name} into {str(self.root)!r} failed ({error}); check the "
                f"connection, or download it elsewhere and point `root` to a directory holding "
                f"{self.expected_content}."
            ) from error

    def _check_files(self) -> None:
        missing = self.missing_files()
        if missing and self.download:
            self._download()
            missing = self.missing_files()
        if missing:
            names = ", ".join(path.name for path in missing)
            raise DatasetNotFoundError(
                f"{self.dataset_name} not found in {str(self.data_dir)!r} (missing: {names}); pass "
                f"`download=True` (internet needed) or point `root` to a directory holding "
                f"{self.expected_content}."
            )

    def build_datasets(self) -> DatasetBundle:
        """Read the files into memory; ``train_eval`` is the training set without augmentation."""
        self._check_files()
        train, test, class_names = self.read_arrays()
        eval_transform = self.eval_transform()
        return DatasetBundle(
            train=ImageArrayDataset(train, self.train_transform()),
            test=ImageArrayDataset(test, eval_transform),
            num_classes=self.num_classes_total,
            train_eval=ImageArrayDataset(train, eval_transform),
            class_names=class_names,
        )


def _crop() -> Transform:
    return T.RandomCrop(32, padding=4)


@register_datamodule("fmnist")
class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (60k/10k 28x28 grey images) resized to 32x32 for the AlexNet variant.

    Normalised with mean 0.286 and std 0.353. The paper trains without augmentation, so
    ``augment`` defaults to ``False``; ``True`` adds RandomCrop(32, padding=4) and horizontal
    flips. Files: ``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or
    ``.gz``).

    Constructor arguments are those of :class:`TorchvisionDataModule`.

    Example:
        >>> dm = FashionMNISTDataModule(root="data", forget_classes=[6])  # doctest: +SKIP
    """

    dataset_name = "Fashion-MNIST"
    subdirectory = "FashionMNIST/raw"
    expected_content = "`FashionMNIST/raw/` with the idx-ubyte files"
    num_classes_total = 10
    mean = (0.286,)
    std = (0.353,)

    def __init__(
        self,
        forget_classes: list[int] | None = None,
        forget: ForgetSpec | None = None,
        root: str = "data",
        download: bool = False,
        train_on: str = "forget",
        val_fraction: float = 0.1,
        batch_size: int = 512,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(
            forget_classes=forget_classes,
            forget=forget,
            root=root,
            download=download,
            train_on=train_on,
            val_fraction=val_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            augment=augment,
        )

    def required_files(self) -> list[Path]:
        stems = [
            f"{p}-{k}"
            for p in ("train", "t10k")
            for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]
        return [_find_idx(self.data_dir, stem) for stem in stems]

    def read_arrays(self) -> tuple[ImageArrays, ImageArrays, list[str]]:
        train, test = read_fashion_mnist(self.data_dir)
        return train, test, list(FASHION_MNIST_CLASSES)

    def torchvision_download(self) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(self.root, train=True, download=True)

    def resize(self) -> list[Transform]:
        return [T.Resize(32)]

    def augmentation(self) -> list[Transform]:
        return [_crop(), T.RandomHorizontalFlip()]


@register_datamodule("cifar10")
class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (50k/10k 32x32 colour images) from the python pickle batches.

    Normalised with the statistics of the authors' code (mean 0.485/0.456/0.406, std
    0.229/0.224/0.225); training augmentation RandomCrop(32, padding=4) + horizontal flip. Files:
    ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.

    Constructor arguments are those of :class:`TorchvisionDataModule`.
    """

    dataset_name = "CIFAR-10"
    subdirectory = "cifar-10-batches-py"
    expected_content = "the extracted python batches (`cifar-10-batches-py/`)"
    num_classes_total = 10
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    train_files: ClassVar[tuple[str, ...]] = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files: ClassVar[tuple[str, ...]] = ("test_batch",)
    meta_file: ClassVar[str] = "batches.meta"
    label_key: ClassVar[str] = "labels"
    names_key: ClassVar[str] = "label_names"

    def required_files(self) -> list[Path]:
        return [self.data_dir / name for name in (*self.train_files, *self.test_files)]

    def read_arrays(self) -> tuple[ImageArrays, ImageArrays, list[str]]:
        train = read_cifar_batches([self.data_dir / n for n in self.train_files], self.label_key)
        test = read_cifar_batches([self.data_dir / n for n in self.test_files], self.label_key)
        meta = self.data_dir / self.meta_file
        if meta.is_file():
            class_names = _names(_unpickle(meta)[self.names_key])
        else:
            class_names = [str(k) for k in range(self.num_classes_total)]
        return train, test, class_names

    def torchvision_download(self) -> None:
        from torchvision.datasets import CIFAR10

        CIFAR10(self.root, train=True, download=True)

    def augmentation(self) -> list[Transform]:
        return [_crop(), T.RandomHorizontalFlip()]


@register_datamodule("cifar100")
class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (50k/10k 32x32 colour images, 100 fine classes) from the python pickles.

    Normalised with mean 0.507/0.487/0.441 and std 0.267/0.256/0.276; training augmentation
    RandomCrop(32, padding=4) + horizontal flip. Files: ``root/cifar-100-python/{train,test,meta}``.

    Constructor arguments are those of :class:`TorchvisionDataModule`.
    """

    dataset_name = "CIFAR-100"
    subdirectory = "cifar-100-python"
    expected_content = "the extracted python files (`cifar-100-python/`)"
    num_classes_total = 100
    mean = (0.507, 0.487, 0.441)
    std = (0.267, 0.256, 0.276)
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"

    def torchvision_download(self) -> None:
        from torchvision.datasets import CIFAR100

        CIFAR100(self.root, train=True, download=True)


@register_datamodule("svhn")
class SVHNDataModule(TorchvisionDataModule):
    """SVHN cropped digits (73,257 train / 26,032 test 32x32 colour images), labels 0-9.

    Normalised with mean 0.437/0.443/0.472 and std 0.198/0.201/0.197; training augmentation
    RandomCrop(32, padding=4) without flips (the authors' code also flips, which mirrors digits).
    The ``extra`` split is not used, as in the paper. Files: ``root/{train,test}_32x32.mat``.

    Constructor arguments are those of :class:`TorchvisionDataModule`.
    """

    dataset_name = "SVHN"
    subdirectory = ""
    expected_content = "`train_32x32.mat` and `test_32x32.mat`"
    num_classes_total = 10
    mean = (0.437, 0.443, 0.472)
    std = (0.198, 0.201, 0.197)

    def required_files(self) -> list[Path]:
        return [self.data_dir / "train_32x32.mat", self.data_dir / "test_32x32.mat"]

    def read_arrays(self) -> tuple[ImageArrays, ImageArrays, list[str]]:
        train_path, test_path = self.required_files()
        return read_svhn(train_path), read_svhn(test_path), [str(k) for k in range(10)]

    def torchvision_download(self) -> None:
        from torchvision.datasets import SVHN

        for split in ("train", "test"):
            SVHN(self.root, split=split, download=True)

    def augmentation(self) -> list[Transform]:
        return [_crop()]


#: Paper setting -> data module (Fashion-MNIST/AlexNet, CIFAR-10/AllCNN, SVHN/VGG, CIFAR-100/ResNet).
PAPER_DATAMODULES: dict[str, type[TorchvisionDataModule]] = {
    "fmnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "svhn": SVHNDataModule,
    "cifar100": CIFAR100DataModule,
}
