"""Exception types shared by the package.

Configuration mistakes raise :class:`UnlearningConfigError`, which is both a Lightning
``MisconfigurationException`` and a ``ValueError`` so that either ``except`` clause catches it.
Problems with the data itself (an empty forget set, NaN activations) raise ``RuntimeError``.
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException


class UnlearningConfigError(MisconfigurationException, ValueError):
    """A constructor argument or a combination of settings is invalid.

    The message names the argument in backticks, shows the value received and says what to do.
    """
