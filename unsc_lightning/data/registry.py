"""Data modules by name: one table the data-set modules register into when they are imported.

``unsc_lightning.data`` imports every data-set module, so the table is complete as soon as the
package is. This module imports no data module itself: :mod:`unsc_lightning.data.base` looks
names up here and the data-set modules add to it, so neither needs the other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from lightning.pytorch import LightningDataModule

from unsc_lightning.errors import UnlearningConfigError

DataModuleType = TypeVar("DataModuleType", bound=type[LightningDataModule])

#: Name -> data module class, filled by :func:`register_datamodule`.
DATAMODULES: dict[str, type[LightningDataModule]] = {}


def register_datamodule(name: str) -> Callable[[DataModuleType], DataModuleType]:
    """Class decorator: make ``UnlearningDataModule.from_name(name)`` build this class.

    Raises:
        UnlearningConfigError: if ``name`` already names another class.

    Example:
        >>> from unsc_lightning.data import UnlearningDataModule
        >>> @register_datamodule("example")
        ... class ExampleDataModule(UnlearningDataModule):
        ...     pass
        >>> datamodule_class("example").__name__
        'ExampleDataModule'
        >>> del DATAMODULES["example"]
    """

    def register(cls: DataModuleType) -> DataModuleType:
        known = DATAMODULES.get(name)
        if known is not None and known is not cls:
            raise UnlearningConfigError(
                f"`name={name!r}` already names {known.__qualname__}; pick another name."
            )
        DATAMODULES[name] = cls
        return cls

    return register


def datamodule_class(name: str) -> type[LightningDataModule]:
    """The data module class registered under ``name``.

    Raises:
        UnlearningConfigError: for a name nothing is registered under.
    """
    if not isinstance(name, str) or name not in DATAMODULES:
        raise UnlearningConfigError(
            f"Expected `name` to be one of {sorted(DATAMODULES)}, got {name!r}."
        )
    return DATAMODULES[name]
