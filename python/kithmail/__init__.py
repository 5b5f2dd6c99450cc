"""kithmail: an inbound email security gateway.

The hot tables live in the Rust extension ``kithmail._core``; this package is
the control plane around them.
"""

from kithmail._core import (
    ConfigMismatchError,
    Core,
    CoreError,
    InvalidInputError,
    MapFullError,
    StorageError,
    __version__,
)

__all__ = [
    "ConfigMismatchError",
    "Core",
    "CoreError",
    "InvalidInputError",
    "MapFullError",
    "StorageError",
    "__version__",
]
