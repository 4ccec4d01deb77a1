"""The interface a run writes through (from :mod:`batcher.run.course`), and how a run opens
its output."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from batcher.location import StoreURL
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.records import FileRecord, Record
from batcher.store.ledger import Ledger


class Output(Protocol):
    """Where a run keeps its results. Files are written under ``root`` (the output folder, or
    a store's local working copy); ``ledger`` is the run's own."""

    @property
    def root(self) -> Path: ...
    @property
    def ledger(self) -> Ledger: ...
    @property
    def location(self) -> str:
        """For messages: the folder or the store URL."""

    async def statuses(self, manifest: Manifest, selection: Selection) -> tuple[set[str], set[str]]:
        """The ids done (ok, files present) and failed before this run."""

    def ok_costs(self) -> Iterable[tuple[str, str, float | None]]:
        """(id, job, cost) of every ok task in every ledger of the output (a store's shards
        too), this run's rows last; read after :meth:`statuses`."""

    async def gate(self) -> None:
        """Before each request: raise (a :class:`~batcher.errors.StoreError`) when this run
        may no longer start one (a store's lock lost to another run, or removed)."""

    async def keep(
        self, record: Record, sidecar: str | None, kept: Callable[[Record], None],
        failed: Callable[[BaseException], None], *, files: list[FileRecord] | None = None,
    ) -> None:
        """Make a finished task's files durable, then call ``kept`` (maybe later); on a store
        failure call ``failed`` instead, and the task stays pending. ``files``: only these
        are new (a task kept again with its derived files); default, all of the record's."""

    async def drain(self) -> None:
        """Wait until every task handed to :meth:`keep` is kept or failed."""

    def present(self, path: str, size: int) -> bool:
        """Whether a file named in the ledger is kept at its recorded size."""

    async def fetch(self, path: str) -> bool:
        """Make a kept file present under ``root`` (a store's may be only in the store);
        False when it is nowhere."""

    async def remove(self, path: str) -> None:
        """Delete a file no longer wanted (a derived file of an old ``outputs``)."""

    async def finish(self, summary: dict[str, Any]) -> None:
        """Write (and publish) the summary, the listings and the ledger at the end of a run."""


@contextlib.asynccontextmanager
async def open_output(
    target: Path | StoreURL, *, shard: tuple[int, int] | None = None,
    sync_every: float | None = None, store_timeout: float | None = None, slots: int = 8,
) -> AsyncIterator[Output]:
    """Hold ``target`` for one run: a folder (its lock and ledger), or a store (its lock, the
    working copy, the ledgers restored)."""
    if isinstance(target, Path):
        from batcher.store.folder import open_folder

        async with open_folder(target) as folder:
            yield folder
        return
    from batcher.store.mirror import DEFAULT_SYNC_EVERY, open_store_output
    from batcher.store.objects import DEFAULT_TIMEOUT

    async with open_store_output(
        target, shard=shard, sync_every=sync_every or DEFAULT_SYNC_EVERY,
        store_timeout=store_timeout or DEFAULT_TIMEOUT, slots=slots,
    ) as store:
        yield store
