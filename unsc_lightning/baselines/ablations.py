"""UNSC's two ablations (Chen et al., IJCAI 2024, Sec. 5.4), built from the package's own parts.

- ``unsc_random_labels``: the null space kept, the pseudo-labels replaced by random remaining
  classes (``UnlearningModule(pseudo_labels="random")`` + :class:`NullSpaceCalibration`).
- ``unsc_no_nullspace``: the UNSC pseudo-labels kept, the null-space constraint dropped
  (``UnlearningModule`` without the callback).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from unsc_lightning.callback import NullSpaceCalibration
from unsc_lightning.module import UnlearningModule


def unsc_random_labels(
    model: nn.Module,
    num_classes: int,
    forget_classes: list[int] | None = None,
    lr: float = 0.05,
    seed: int = 0,
    **callback_options: Any,
) -> tuple[UnlearningModule, NullSpaceCalibration]:
    """Null space with random remaining labels: returns the module and the callback to attach.

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> module, callback = unsc_random_labels(MNIST1DConvNet(), 10, [3], threshold=0.97)
        >>> module.hparams.pseudo_labels
        'random'
    """
    module = UnlearningModule(
        model,
        num_classes,
        forget_classes,
        lr=lr,
        pseudo_labels="random",
        seed=seed,
        stop_at_target=False,
    )
    return module, NullSpaceCalibration(**callback_options)


def unsc_no_nullspace(
    model: nn.Module, num_classes: int, forget_classes: list[int] | None = None, lr: float = 0.05
) -> UnlearningModule:
    """UNSC pseudo-labels without the null space: a plain :class:`UnlearningModule` (no callback).

    Example:
        >>> from unsc_lightning.models import MNIST1DConvNet
        >>> unsc_no_nullspace(MNIST1DConvNet(), 10, [3]).hparams.pseudo_labels
        'unsc'
    """
    return UnlearningModule(
        model, num_classes, forget_classes, lr=lr, pseudo_labels="unsc", stop_at_target=False
    )
