"""One save-and-restore of train/eval modes, used wherever a model runs in eval mode briefly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode; every submodule's own mode is restored after,
    also on error (a user's frozen, eval-mode submodule stays in eval)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)
