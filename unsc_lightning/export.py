"""Export the unlearned model alone: a plain ``state_dict`` file and its SHA-256, nothing else.

What a user ships after an unlearning request must not carry the forgotten data's influence.
An :class:`~unsc_lightning.UnlearningModule` checkpoint does: it holds the frozen original
(``original.*``, which still knows the forgotten classes) next to the unlearned network
(``model.*``). :func:`export_model` writes the network's ``state_dict`` only (every tensor copied
out of its storage, so no view drags a larger buffer along), and :func:`export_checkpoint` does
the same from a checkpoint file. Each writes ``<out>.sha256`` beside the file in ``sha256sum``
format (``sha256sum -c`` checks it) and refuses to overwrite an existing file.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from unsc_lightning.checkpoint import MODEL_PREFIX, extract_model_state
from unsc_lightning.errors import UnlearningConfigError


@dataclass(frozen=True)
class ExportedModel:
    """Where :func:`export_model` wrote the weights, and their digest."""

    path: Path
    sha256_path: Path
    sha256: str


def _check_free(path: Path, argument: str) -> Path:
    checksum = path.with_name(path.name + ".sha256")
    for target in (path, checksum):
        if target.exists():
            raise UnlearningConfigError(
                f"`{argument}={str(path)!r}`: {str(target)!r} exists and is never overwritten; "
                "choose a new path or delete the old file."
            )
    if not path.parent.is_dir():
        raise UnlearningConfigError(
            f"`{argument}={str(path)!r}`: the folder {str(path.parent)!r} does not exist."
        )
    return checksum


def export_state(
    state: Mapping[str, Tensor], path: str | Path, argument: str = "path"
) -> ExportedModel:
    """Write ``state`` (tensors only, copied to CPU) to ``path`` and its SHA-256 beside it.

    Raises:
        UnlearningConfigError: when ``path`` or ``<path>.sha256`` exists, or its folder does not.
    """
    path = Path(path)
    checksum = _check_free(path, argument)
    plain = {name: tensor.detach().to("cpu").clone() for name, tensor in state.items()}
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    with path.open("xb") as handle:  # "x": fails instead of replacing a file created meanwhile
        handle.write(payload)
    with checksum.open("x") as handle:
        handle.write(f"{digest}  {path.name}\n")
    return ExportedModel(path, checksum, digest)


def export_model(model: nn.Module, path: str | Path) -> ExportedModel:
    """Write ``model.state_dict()`` alone to ``path`` (load it with ``model.load_state_dict``).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "unlearned.pt"
        >>> exported = export_model(nn.Linear(3, 2), out)
        >>> sorted(torch.load(out, weights_only=True))
        ['bias', 'weight']
    """
    return export_state(model.state_dict(), path)


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, prefix: str = MODEL_PREFIX
) -> ExportedModel:
    """Export the network of a Lightning checkpoint (keys under ``prefix``, e.g. ``model.``).

    The frozen original (``original.*``), metric states, optimizer and callback states are left
    behind; the checkpoint is only read.

    Raises:
        UnlearningConfigError: for a missing checkpoint, one without ``prefix`` keys, or an
            existing ``out``.
    """
    source = Path(checkpoint)
    if not source.is_file():
        raise UnlearningConfigError(
            f"Expected `ckpt` to be an existing checkpoint file, got {str(source)!r}."
        )
    _check_free(Path(out), "out")
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise UnlearningConfigError(
            f"`ckpt={str(source)!r}` holds a {type(loaded).__name__}, not a checkpoint."
        )
    return export_state(extract_model_state(loaded, prefix), out, argument="out")
