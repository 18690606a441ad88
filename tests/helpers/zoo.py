"""A zoo of small classifiers written the way their authors would, and the data they learn.

Nothing of ``unsc_lightning``'s null-space machinery is inside these models: they are what a
user already has. Each is trained (original on all training data, retrain without the forgotten
class) by :class:`PlainClassifier`, a LightningModule with nothing but ``forward``,
``training_step`` and ``configure_optimizers``. One definition serves the tests
(``from helpers.zoo import ...``) and ``benchmarks/zoo.py`` (which puts ``tests/`` on
``sys.path``).

Data: MNIST-1D (Greydanus 2020, generated offline) and scikit-learn's 8x8 digits, as 1x8x8
images, upsampled to 3x32x32 (for torchvision's ResNet-18), or as 64 intensity tokens in 0..16
(for the embedding model). Splits come from :class:`~unsc_lightning.UnlearningDataModule`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from unsc_lightning import UnlearningDataModule
from unsc_lightning.data.embedded import digits_bundle, mnist1d_bundle
from unsc_lightning.models import DigitsConvNet, MNIST1DConvNet

NUM_CLASSES = 10
MNIST1D_SAMPLES = 4000


# -- models written as their authors would --------------------------------------------------------
class ViTBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention, LayerNorm, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small Vision Transformer: Conv2d patch embedding, class token, learned positions."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv, channels-last LayerNorm, GELU MLP, layer scale."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        return residual + (self.gamma * x).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """A ConvNeXt-style net: patchify stem, two ConvNeXt blocks, pooled LayerNorm head."""

    def __init__(
        self, num_classes: int = NUM_CLASSES, in_channels: int = 1, dim: int = 32, depth: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, dim, kernel_size=2, stride=2)
        self.stem_norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stem_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x.mean(dim=(2, 3))))


class TokenClassifier(nn.Module):
    """Token sequence classifier: token and position embeddings, per-token MLP, mean pool."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        num_tokens: int = 17,
        seq_len: int = 64,
        dim: int = 32,
    ) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(num_tokens, dim)
        self.pos_embed = nn.Embedding(seq_len, dim)
        self.mixer = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU())
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token_embed(tokens) + self.pos_embed(positions)
        return self.head(self.mixer(h).mean(dim=1))


class SignalLSTM(nn.Module):
    """An LSTM reading a 1-D signal as a sequence of short windows; a linear head on its last
    state."""

    def __init__(
        self, num_classes: int = NUM_CLASSES, length: int = 40, steps: int = 10, hidden: int = 64
    ) -> None:
        super().__init__()
        self.steps = steps
        self.rnn = nn.LSTM(length // steps, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, signal: Tensor) -> Tensor:
        output, _ = self.rnn(signal.reshape(signal.shape[0], self.steps, -1))
        return self.head(output[:, -1])


def torchvision_resnet18() -> nn.Module:
    """torchvision's ResNet-18 as shipped (ImageNet stem), 10 classes, 3x32x32 inputs."""
    from torchvision.models import resnet18

    return resnet18(num_classes=NUM_CLASSES)


# -- the plain LightningModule a user would write ---------------------------------------------------
class PlainClassifier(L.LightningModule):
    """Cross-entropy training with Adam; nothing else (no ``num_classes``, no logging)."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# -- data --------------------------------------------------------------------------------------------
@cache
def zoo_tensors(data: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``"mnist1d"``, ``"digits"``, ``"digits32"``
    (3x32x32, bilinear) or ``"digits_tokens"`` (64 tokens in 0..16)."""
    if data == "mnist1d":
        bundle = mnist1d_bundle(num_samples=MNIST1D_SAMPLES)
    elif data in ("digits", "digits32", "digits_tokens"):
        bundle = digits_bundle()
    else:
        raise ValueError(f"Expected `data` in {sorted(DATA)}, got {data!r}.")
    train, test = bundle.train, bundle.test
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    if data == "digits32":
        x_train, x_test = (_upsample(x) for x in (x_train, x_test))
    elif data == "digits_tokens":
        x_train, x_test = ((16 * x).round().long().flatten(1) for x in (x_train, x_test))
    return x_train, y_train, x_test, y_test


def _upsample(images: Tensor) -> Tensor:
    return F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


DATA = ("mnist1d", "digits", "digits32", "digits_tokens")


def zoo_datamodule(
    data: str,
    forget_classes: list[int],
    train_on: str = "forget",
    batch_size: int = 64,
    seed: int = 0,
) -> UnlearningDataModule:
    """Forget / retain / test splits of ``data`` (see :func:`zoo_tensors`)."""
    x_train, y_train, x_test, y_test = zoo_tensors(data)
    return UnlearningDataModule(
        train_dataset=TensorDataset(x_train, y_train),
        test_dataset=TensorDataset(x_test, y_test),
        num_classes=NUM_CLASSES,
        forget_classes=forget_classes,
        train_on=train_on,  # type: ignore[arg-type]
        batch_size=batch_size,
        eval_batch_size=512,
        seed=seed,
    )


# -- the zoo -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: how to build it, its data, and how long :class:`PlainClassifier` trains it."""

    name: str
    data: str
    build: Callable[[], nn.Module]
    epochs: int
    lr: float = 3e-3


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("mnist1d_conv", "mnist1d", MNIST1DConvNet, epochs=20, lr=1e-2),
        ZooEntry("digits_conv", "digits", DigitsConvNet, epochs=8),
        ZooEntry("resnet18", "digits32", torchvision_resnet18, epochs=6, lr=1e-3),
        ZooEntry("vit", "digits", TinyViT, epochs=20),
        ZooEntry("convnext", "digits", TinyConvNeXt, epochs=15),
        ZooEntry(
            "tokens",
            "digits_tokens",
            TokenClassifier,
            epochs=30,
            lr=1e-2,
        ),
        ZooEntry("lstm", "mnist1d", SignalLSTM, epochs=25, lr=1e-2),
    )
}


def plain_trainer(max_epochs: int, accelerator: str | None = None, **kwargs: Any) -> L.Trainer:
    """The lab's quiet trainer (no logger, checkpoints, progress bar, summary or sanity check), on
    ``accelerator`` (default: the tests' own, ``helpers.problems.test_accelerator``)."""
    from helpers.problems import test_accelerator
    from unsc_lightning.lab.runs import make_trainer

    accelerator = accelerator or test_accelerator()
    callbacks = kwargs.pop("callbacks", None)
    kwargs.setdefault("deterministic", None)
    return make_trainer(max_epochs, callbacks, accelerator=accelerator, **kwargs)


def train_zoo_model(
    entry: ZooEntry,
    forget_classes: list[int],
    retrain: bool = False,
    seed: int = 0,
    accelerator: str | None = None,
) -> nn.Module:
    """Train ``entry``'s model with :class:`PlainClassifier`: the original on all training data,
    or (``retrain=True``) a model from scratch on the remaining data only. Returned in eval mode."""
    L.seed_everything(seed, verbose=False)
    model = entry.build()
    dm = zoo_datamodule(entry.data, forget_classes, "retain" if retrain else "all", seed=seed)
    plain_trainer(entry.epochs, accelerator).fit(PlainClassifier(model, lr=entry.lr), datamodule=dm)
    return model.cpu().eval()


@torch.no_grad()
def zoo_accuracy(model: nn.Module, dm: UnlearningDataModule) -> dict[str, float]:
    """Macro test accuracy (percent) over remaining (``acc_r``) and forgotten (``acc_f``) classes."""
    from unsc_lightning.lab.scoring import evaluate

    model = copy.deepcopy(model).cpu()
    results = evaluate(model, dm)
    return {"acc_r": results["acc_r"], "acc_f": results["acc_f"]}
