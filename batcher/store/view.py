"""One reading interface for a finished or running output, a folder or a store alike: what
``status``, ``plan``, ``report`` and publish read, so no command branches on where an output
lives. The folder half is :mod:`batcher.store.folder`, the store half :mod:`batcher.store.bucket`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from batcher.errors import UsageError
from batcher.location import StoreURL
from batcher.reports.sheet import Mark
from batcher.store.ledger import Ledger
from batcher.store.lock import Locks
from batcher.store.verify import Problems


class View(Protocol):
    """An output for reading; nothing of it is written but its listings, on request."""

    @property
    def location(self) -> str:
        """For messages: the folder or the store URL."""

    @property
    def ledger(self) -> Ledger:
        """Every ledger of the output merged (a store's shards too), with the tasks only a
        sidecar tells of adopted; a copy, never the output's own."""

    def size(self, path: str) -> int | None:
        """The size a kept file has where it is kept (None: it is not there)."""

    def present(self, path: str, size: int) -> bool:
        """Whether a file named in the ledger is kept at its recorded size."""

    async def verify(self) -> Problems:
        """Every ok task's files hashed again: those missing or changed, by task id."""

    async def summary(self) -> dict[str, Any] | None:
        """The output's summary.json, when it has a readable one."""

    async def locks(self) -> Locks: ...

    async def write_listings(self, marks: Mapping[str, Mark] | None = None) -> None:
        """Write results.jsonl and index.html again from :attr:`ledger`."""


@contextlib.asynccontextmanager
async def open_view(target: Path | StoreURL, *, required: bool = True) -> AsyncIterator[View]:
    """``target`` for reading; one nothing has run into is an error when ``required``, else
    reads as an empty ledger."""
    if isinstance(target, Path):
        from batcher.store.folder import open_folder_view

        async with open_folder_view(target, required=required) as folder:
            yield folder
        return
    from batcher.store.bucket import open_bucket_view

    async with open_bucket_view(target, required=required) as bucket:
        yield bucket


async def unlock(target: Path | StoreURL,
                 shard: tuple[int, int] | None) -> tuple[str, str | None]:
    """``batcher unlock``: remove a store's lock (a run's, or its shard's); its name, and whose
    it was (None: there was none)."""
    if isinstance(target, Path):
        raise UsageError(f"{target}: unlock is for store outputs (s3://, gs://, az://); a "
                         "folder's lock ends with the process that holds it")
    from batcher.store.bucket import remove_lock

    return await remove_lock(target, shard)
