"""Model zoo: small nets for the embedded data and the paper's architectures."""

from unsc_lightning.models.small import MLP, DigitsConvNet, MNIST1DConvNet

__all__ = ["MLP", "DigitsConvNet", "MNIST1DConvNet"]
