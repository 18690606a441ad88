"""unsc_lightning: machine unlearning via Null Space Calibration (UNSC) for PyTorch Lightning."""

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.data import ForgetSpec, UnlearningDataModule
from unsc_lightning.errors import UnlearningConfigError
from unsc_lightning.module import ClassifierModule, UnlearningModule

__version__ = "0.1.0"

__all__ = [
    "ClassifierModule",
    "ForgetSpec",
    "NullSpaceCalibration",
    "UnlearningConfigError",
    "UnlearningDataModule",
    "UnlearningModule",
    "__version__",
]
