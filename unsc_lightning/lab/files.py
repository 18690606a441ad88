"""Files the experiment code writes: atomically, and with the path in every error.

A file is written to a temporary name in its own folder and moved into place with
``os.replace``: a process killed mid-write leaves the previous file (or none), never a partial
one under the real name. A failed write (full disk, file-size limit, no permission) raises an
``OSError`` naming the path and removes the temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` with the same suffix (some writers pick the format by it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` and move the result to ``path``.

    Raises:
        OSError: naming ``path`` when writing fails.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        raise OSError(
            f"Could not write {str(path)!r}: {type(error).__name__}: {error}. Free disk space or "
            "choose another output folder."
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_folder(out: Path, argument: str = "--out") -> None:
    """Refuse an output folder that is a file or cannot be created / written, creating nothing.

    Raises:
        OSError: naming the path and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"`{argument} {str(out)!r}` is an existing file, not a folder; pass a folder path "
            "(it is created when missing). The file is left untouched."
        )
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"`{argument} {str(out)!r}` cannot be written: {str(existing)!r} is not a writable "
            "folder. Choose an output folder you can write to."
        )
