"""Checkpoints for the CLI workflow: read an original model's weights, pick the best original.

The unlearning stage starts from a model trained by another run. :func:`load_model_state` reads
its weights from a Lightning checkpoint (what :class:`~unsc_lightning.ClassifierModule` runs
write) or from a plain ``state_dict`` file (e.g. the UNSC authors' released ``.pth`` files). The
file is opened read-only and never written: the unlearning run's own checkpoints go to its own
log directory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from unsc_lightning.errors import UnlearningConfigError

#: Prefix of the wrapped network's weights in checkpoints of our LightningModules (``self.model``).
MODEL_PREFIX = "model."


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def extract_model_state(
    checkpoint: Mapping[str, Any], prefix: str = MODEL_PREFIX
) -> dict[str, Tensor]:
    """The network's ``state_dict`` inside a loaded checkpoint.

    Args:
        checkpoint: a Lightning checkpoint (a mapping with a ``state_dict`` entry) or a plain
            ``state_dict``.
        prefix: in a Lightning checkpoint, the attribute path of the network (``"model."`` for
            :class:`~unsc_lightning.ClassifierModule` and :class:`~unsc_lightning.UnlearningModule`);
            keys without it (the frozen ``original.`` copy, metric states) are dropped. A plain
            ``state_dict`` is used as it is, without the ``module.`` prefix ``DataParallel``
            adds.

    Raises:
        UnlearningConfigError: when a Lightning checkpoint holds no key under ``prefix``.
    """
    state = checkpoint.get("state_dict")
    if isinstance(state, Mapping):
        selected = {
            key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)
        }
        if not selected:
            raise UnlearningConfigError(
                f"The checkpoint's `state_dict` has no key under `{prefix}` (first keys: "
                f"{list(state)[:5]}); it was not written by a module that keeps its network in "
                f"`self.{prefix.rstrip('.')}`."
            )
        return selected
    plain = {key: value for key, value in checkpoint.items() if isinstance(value, Tensor)}
    if plain and all(key.startswith("module.") for key in plain):
        plain = {key[len("module.") :]: value for key, value in plain.items()}
    return plain


def load_model_state(
    model: nn.Module,
    path: str | Path,
    prefix: str = MODEL_PREFIX,
    argument: str = "original_checkpoint",
) -> str:
    """Load a trained network's weights from ``path`` into ``model`` (strictly); the file is only read.

    Args:
        model: the network, built with the same architecture and arguments as the trained one.
        path: a Lightning ``.ckpt`` or a ``torch.save``-d ``state_dict``.
        prefix: see :func:`extract_model_state`.
        argument: the argument name used in error messages.

    Returns:
        The SHA-256 digest of the file, so a run can record exactly which weights it started from.

    Raises:
        UnlearningConfigError: when the file does not exist or its weights do not fit ``model``.

    Example:
        >>> import tempfile, torch
        >>> from unsc_lightning.models import MLP
        >>> trained, fresh = MLP(in_features=4, hidden=[8]), MLP(in_features=4, hidden=[8])
        >>> path = tempfile.mkdtemp() + "/original.ckpt"
        >>> torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, path)
        >>> _ = load_model_state(fresh, path)
        >>> torch.equal(fresh.net[1].weight, trained.net[1].weight)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise UnlearningConfigError(
            f"Expected `{argument}` to be an existing checkpoint file, got {str(path)!r}; train the "
            "original model first (e.g. `unsc-lightning fit --config configs/mnist1d_original.yaml`) "
            "or fix the path."
        )
    digest = file_sha256(path)
    checkpoint = _read_checkpoint(path, argument)
    if not isinstance(checkpoint, Mapping):
        raise UnlearningConfigError(
            f"`{argument}={str(path)!r}` holds a {type(checkpoint).__name__}, not a checkpoint or a "
            "`state_dict`."
        )
    state = extract_model_state(checkpoint, prefix)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UnlearningConfigError(
            f"The weights in `{argument}={str(path)!r}` do not fit {type(model).__name__}: "
            f"{str(error).strip().rstrip('.')}. "
            "Build the model with the same class and arguments as the run that wrote the checkpoint."
        ) from error
    rank_zero_info(f"Loaded the original model from {path} (sha256 {digest[:16]}).")
    return digest


def _read_checkpoint(path: Path, argument: str) -> Any:
    """``torch.load`` with ``weights_only=True``, its failures told as what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error) and "Weights only" not in str(error):
            raise _not_a_checkpoint(path, argument, error) from error
        raise UnlearningConfigError(
            f"`{argument}={str(path)!r}` holds pickled Python objects (e.g. a whole model saved "
            "with `torch.save(model, path)`), which are not loaded: unpickling can run arbitrary "
            "code. Save the weights instead, `torch.save(model.state_dict(), path)` (or use the "
            "`.ckpt` a Lightning run wrote), and pass that file."
        ) from None
    except Exception as error:
        raise _not_a_checkpoint(path, argument, error) from error


def _not_a_checkpoint(path: Path, argument: str, error: Exception) -> UnlearningConfigError:
    return UnlearningConfigError(
        f"`{argument}={str(path)!r}` is not a PyTorch checkpoint ({type(error).__name__}: "
        f"{str(error)[:200]}); pass a Lightning `.ckpt` or a file written by "
        "`torch.save(model.state_dict(), path)`."
    )


class MeanMetric(Callback):
    """Log the mean of already-logged metrics under a new name, in time for checkpointing.

    The modules log per-class validation accuracy (``val/acc_class_k``); their mean is the
    accuracy over *all* classes (macro), which is how the authors pick the best original model.
    The mean is added to ``trainer.callback_metrics`` in ``on_validation_end`` — after the
    module has logged, before :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (always run
    last) reads its monitor — and sent to the loggers.

    Args:
        pattern: ``fnmatch`` pattern of the metrics to average.
        name: name of the mean.

    Example:
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> callbacks = [MeanMetric("val/acc_class_*", "val/acc"),
        ...              ModelCheckpoint(monitor="val/acc", mode="max", filename="best")]
    """

    def __init__(self, pattern: str = "val/acc_class_*", name: str = "val/acc") -> None:
        if fnmatch.fnmatchcase(name, pattern):
            raise UnlearningConfigError(
                f"Expected `name` not to match `pattern`, got name={name!r} and pattern={pattern!r}."
            )
        self.pattern = pattern
        self.name = name

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = [
            value
            for key, value in trainer.callback_metrics.items()
            if fnmatch.fnmatchcase(key, self.pattern)
        ]
        if not values:
            return
        mean = torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in values]).mean()
        trainer.callback_metrics[self.name] = mean
        for logger in trainer.loggers:
            logger.log_metrics(
                {self.name: float(mean), "epoch": trainer.current_epoch}, step=trainer.global_step
            )
