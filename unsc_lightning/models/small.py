"""Small classifiers for the embedded data sets (MNIST-1D and digits); CPU-friendly."""

from __future__ import annotations

from torch import Tensor, nn


class MNIST1DConvNet(nn.Module):
    """1-D CNN for MNIST-1D inputs of shape ``(1, 40)``.

    Three Conv1d layers (kernel 5/3/3, the last two with stride 2) and a two-layer head.

    Args:
        num_classes: number of output classes.
        channels: convolution width.
        hidden: width of the hidden Linear layer.
        length: input length (40 for MNIST-1D).

    Example:
        >>> import torch
        >>> MNIST1DConvNet()(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, num_classes: int = 10, channels: int = 32, hidden: int = 128, length: int = 40
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        reduced = (length + 3) // 4
        self.classifier = nn.Sequential(
            nn.Linear(channels * reduced, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected classifier; flattens its input.

    Args:
        in_features: flattened input size.
        num_classes: number of output classes.
        hidden: widths of the hidden layers.
        batch_norm: add BatchNorm1d after each hidden Linear layer.

    Example:
        >>> import torch
        >>> MLP(in_features=40)(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 40,
        num_classes: int = 10,
        hidden: list[int] | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_features, *(hidden if hidden is not None else [256, 256])]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers.append(nn.Linear(width_in, width_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DigitsConvNet(nn.Module):
    """2-D CNN for scikit-learn's 8x8 digits (two Conv2d with BatchNorm, two Linear).

    Example:
        >>> import torch
        >>> DigitsConvNet()(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(channels * 16, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
