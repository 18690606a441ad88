"""Model zoo: small nets for the embedded data and the paper's architectures."""

from unsc_lightning.models.paper import PAPER_MODELS, VGG11BN, AlexNetFMNIST, AllCNN, ResNet18CIFAR
from unsc_lightning.models.small import MLP, DigitsConvNet, MNIST1DConvNet

__all__ = [
    "MLP",
    "PAPER_MODELS",
    "VGG11BN",
    "AlexNetFMNIST",
    "AllCNN",
    "DigitsConvNet",
    "MNIST1DConvNet",
    "ResNet18CIFAR",
]
