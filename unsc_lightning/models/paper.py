"""The four architectures of the UNSC paper (Chen et al., IJCAI 2024), for 32x32 inputs.

=====================  ==============  =====================================================
model                  data set        source of the layout
=====================  ==============  =====================================================
:class:`AlexNetFMNIST` Fashion-MNIST   the UNSC authors' AlexNet variant (1 channel, 32x32)
:class:`AllCNN`        CIFAR-10        All-CNN-C at half width (Golatkar et al., UNSC code)
:class:`VGG11BN`       SVHN            VGG-11 with batch norm, 512-4096-4096 classifier
:class:`ResNet18CIFAR` CIFAR-100       CIFAR ResNet-18 (3x3 stem, no max-pool)
=====================  ==============  =====================================================

The module tree mirrors the authors' released model code (``features`` / ``fc`` sequentials with
the same indices, ResNet blocks with ``residual_function`` / ``shortcut``): the ``state_dict``
keys and shapes are the same, so their published checkpoints (saved as bare ``state_dict``)
load with ``model.load_state_dict(torch.load(path))``. Weights keep
PyTorch's default initialisation, as in the authors' code.

Every Conv/Linear layer sees a non-empty input at 32x32 (no layer is starved by padding or a
collapsed feature map), so every layer gets a non-empty remaining-subspace basis.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unsc_lightning.errors import UnlearningConfigError

#: VGG-11 ("configuration A"): conv widths, ``"M"`` = 2x2 max-pool.
VGG11_CONFIG: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)


class AlexNetFMNIST(nn.Module):
    """The UNSC authors' AlexNet variant for Fashion-MNIST resized to 32x32.

    Three blocks ``Conv (no bias) -> BatchNorm -> ReLU -> Dropout -> MaxPool(2)`` with 64/128/256
    channels and kernels 4/3/2, unpadded, then two 2048-wide hidden layers ``Linear (no bias) ->
    BatchNorm1d -> ReLU -> Dropout`` and a bias-free Linear head. No Conv/Linear has a bias.

    Feature maps for a 32x32 input (unpadded conv: ``s - k + 1``; pool: ``s // 2``)::

        1x32x32 -conv4-> 64x29x29 -pool-> 64x14x14 -conv3-> 128x12x12 -pool-> 128x6x6
                -conv2-> 256x5x5 -pool-> 256x2x2 -flatten-> 1024 -> 2048 -> 2048 -> classes

    Raw 28x28 images also end at 256x2x2 (28 -> 25 -> 12 -> 10 -> 5 -> 4 -> 2); the paper's
    pipeline resizes to 32x32 first. No padding is needed (none is used, as in the authors'
    model): every map stays at least as large as the next kernel, and each conv's patches, taken
    with its real (zero) padding, cover the whole map, so no layer is left without input rows.

    Args:
        num_classes: number of output classes.
        in_channels: image channels (1 for Fashion-MNIST).
        dropout: dropout of the third conv block and of both hidden layers (authors: 0.5).
        conv_dropout: dropout of the first two conv blocks (authors: 0.2).

    Example:
        >>> import torch
        >>> AlexNetFMNIST()(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.5,
        conv_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_alexnet_block(in_channels, 64, 4, conv_dropout),
            *_alexnet_block(64, 128, 3, conv_dropout),
            *_alexnet_block(128, 256, 2, dropout),
        )
        self.fc = nn.Sequential(
            *_hidden_linear(256 * 2 * 2, 2048, dropout),
            *_hidden_linear(2048, 2048, dropout),
            nn.Linear(2048, num_classes, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, C, 32, 32)``."""
        return self.fc(torch.flatten(self.features(x), 1))


def _alexnet_block(
    in_channels: int, out_channels: int, kernel: int, dropout: float
) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.MaxPool2d(2),
    ]


def _hidden_linear(in_features: int, out_features: int, dropout: float) -> list[nn.Module]:
    return [
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        nn.ReLU(),
        nn.Dropout(dropout),
    ]


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int, stride: int, batch_norm: bool
) -> nn.Sequential:
    # "Same" padding; the bias is redundant before BatchNorm and only kept without it.
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=(kernel - 1) // 2,
            bias=not batch_norm,
        )
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al., 2015) as used for unlearning by Golatkar et al. and UNSC.

    Eight ``Conv -> BatchNorm -> ReLU`` blocks with "same" padding and a Linear head, with
    ``n1 = int(96 * filters_percentage)`` and ``n2 = int(192 * filters_percentage)`` (48/96 at
    the paper's 0.5)::

        conv3x3 n1 | conv3x3 n1 | conv3x3 n2 stride 2 | [dropout]
        conv3x3 n2 | conv3x3 n2 | conv3x3 n2 stride 2 | [dropout]
        conv3x3 n2 | conv1x1 n2 | global average pool | Linear(n2, classes)

    Feature maps for 32x32 input: 32 -> 32 -> 16 -> 16 -> 16 -> 8 -> 8 -> 8 -> 1. This is the
    layout of the released code that produced the paper's CIFAR-10 numbers; Springenberg's
    original ninth layer (a 1x1 conv to the classes) is the Linear head here.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        filters_percentage: width multiplier (0.5 in the paper).
        dropout: insert ``Dropout(0.5)`` after each stride-2 block.
        batch_norm: use BatchNorm (convs then have no bias).

    Example:
        >>> import torch
        >>> AllCNN()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        filters_percentage: float = 0.5,
        dropout: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        n1 = int(96 * filters_percentage)
        n2 = int(192 * filters_percentage)
        if n1 < 1:
            raise UnlearningConfigError(
                f"Expected `filters_percentage` >= {1 / 96:.4f}, got {filters_percentage}."
            )

        def drop() -> nn.Module:
            return nn.Dropout(0.5) if dropout else nn.Identity()

        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, n1, 3, 1, batch_norm),
            _conv_bn_relu(n1, n1, 3, 1, batch_norm),
            _conv_bn_relu(n1, n2, 3, 2, batch_norm),
            drop(),
            _conv_bn_relu(n2, n2, 3, 1, batch_norm),
            _conv_bn_relu(n2, n2, 3, 1, batch_norm),
            _conv_bn_relu(n2, n2, 3, 2, batch_norm),
            drop(),
            _conv_bn_relu(n2, n2, 3, 1, batch_norm),
            _conv_bn_relu(n2, n2, 1, 1, batch_norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(n2, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        return self.fc(self.features(x))


class VGG11BN(nn.Module):
    """VGG-11 with batch norm for 32x32 inputs.

    Convolutions 3x3 with padding 1 (and bias, as in torchvision and the authors' code), widths
    ``64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M``; five 2x2 max-pools reduce 32x32 to
    a 512x1x1 map (last conv pair runs at 2x2), followed by ``512 -> 4096 -> 4096 -> classes``
    with ReLU and dropout.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        dropout: dropout probability in the classifier.

    Example:
        >>> import torch
        >>> VGG11BN()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in VGG11_CONFIG:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = int(entry)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(512, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, C, 32, 32)``."""
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut, ReLU after the sum.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv and of the projection shortcut.
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Return ``relu(residual(x) + shortcut(x))``."""
        return F.relu(self.residual_function(x) + self.shortcut(x))


class ResNet18CIFAR(nn.Module):
    """ResNet-18 for 32x32 images (He et al., 2016; CIFAR variant).

    3x3 stride-1 stem conv + BN + ReLU (no max-pool), four stages of two :class:`BasicBlock`
    with 64/128/256/512 channels (stride 1/2/2/2: maps 32/16/8/4), 1x1 conv+BN projection
    shortcuts where the shape changes, adaptive average pool and a Linear head.

    Args:
        num_classes: number of output classes (100 for CIFAR-100).
        in_channels: image channels.

    Example:
        >>> import torch
        >>> ResNet18CIFAR()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(BasicBlock(channels, width, stride), BasicBlock(width, width, 1))
            )
            channels = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            *stages,
        )
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(B, num_classes)`` for images ``(B, C, H, W)``."""
        return self.fc(torch.flatten(self.avg_pool(self.features(x)), 1))


#: Paper setting -> architecture, for configs and the benchmark scripts.
PAPER_MODELS: dict[str, type[nn.Module]] = {
    "fmnist": AlexNetFMNIST,
    "cifar10": AllCNN,
    "svhn": VGG11BN,
    "cifar100": ResNet18CIFAR,
}
