"""batcher's own version, as installed: for ``--version``, the metadata of derived files, and
anything else that records which batcher made it."""

from __future__ import annotations

import functools
import importlib.metadata


@functools.cache
def version() -> str:
    """The installed version; ``unknown`` when run from a source tree that is not installed."""
    try:
        return importlib.metadata.version("batcher")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
