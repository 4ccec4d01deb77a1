"""A run's output in an object store, through a local working copy.

The working copy (:mod:`.working`) holds the run's ledger and the files it writes. At the start
the ledgers are restored from the store and tasks found finished are adopted (:mod:`.restore`);
each finished task's files, then its sidecar, are uploaded before the task counts as ok
(:mod:`.uploads`); the run's ledger is published every ``sync_every`` seconds, at the end and
on a signal (:mod:`.publisher`); at the end the summary and the listings of every ledger there
(:mod:`.bucket`). A task that finished on a machine that died before publishing is found by its
sidecar in the store and adopted, not paid for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from batcher.errors import StoreError, UsageError
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.records import FileRecord, Record
from batcher.store import restore
from batcher.store.bucket import write_store_listings
from batcher.store.folderlock import lock_folder
from batcher.store.layouts import claim_layout
from batcher.store.ledger import LEDGER_NAME, Ledger
from batcher.store.listings import LISTINGS, write_summary
from batcher.store.lock import LockLost, StoreLock
from batcher.store.objects import ObjectStore, StoreURL
from batcher.store.publisher import LedgerPublisher
from batcher.store.restore import Costs
from batcher.store.uploads import Uploads
from batcher.store.working import cache_root, run_names

log = logging.getLogger(__name__)

DEFAULT_SYNC_EVERY = 30.0
RELEASE_WITHIN = 5.0  # seconds the lock's release (a read and a delete) may take at the end


class StoreOutput:
    """One run's (or shard's) output in an object store."""

    def __init__(self, store: ObjectStore, root: Path, *, shard: tuple[int, int] | None,
                 sync_every: float, slots: int) -> None:
        self.store = store
        self.root = root
        self.location = str(store.url)
        self.ledger_name, lock_name, self.summary_name, _ = run_names(shard)
        self.lock = StoreLock(store, lock_name, on_lost=self._lock_lost)
        self.uploads = Uploads(store, root, self.lock, slots)
        self.publisher = LedgerPublisher(store, root, self.ledger_name, self.lock, sync_every)
        self._ledger: Ledger | None = None
        self._finishing = False
        self._had_listings = False
        self._adopted = 0
        self._listing: dict[str, int] = {}  # the store's files and sizes when the run began
        self._earlier_costs: Costs = {}  # other ledgers' ok rows

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "open() first"
        return self._ledger

    @property
    def failure(self) -> BaseException | None:
        """The store went down, or the lock was lost: the run stops."""
        return self.uploads.failure

    # ------------------------------------------------------------------ start

    async def open(self) -> None:
        """Take the lock (and the prefix from runs whose tasks could overlap), restore this
        run's ledger, start publishing it."""
        try:
            await self.lock.acquire(phase="starting")
            self.lock.start_heartbeat()
            await claim_layout(self.store, self.lock)
        except StoreError as exc:  # nothing was sent yet: the store or its credentials are off
            raise UsageError(str(exc)) from None
        except FileNotFoundError:
            raise UsageError(f"{self.store.url}: no such bucket or container") from None
        path = self.root / LEDGER_NAME
        for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)  # the store's copy is the truth
        _found, self.publisher.version = await self.store.get_file_version(self.ledger_name, path)
        self._ledger = Ledger(path)
        self.publisher.start(self._ledger)

    async def statuses(self, manifest: Manifest, selection: Selection) -> tuple[set[str], set[str]]:
        """Done and failed over every ledger in the store, files checked against the store's
        listing; finished tasks that only a sidecar tells of are adopted into this ledger, and
        those this machine paid for but did not upload are uploaded (:mod:`.restore`)."""
        listing = self._listing = await self.store.sizes()
        self._had_listings = all(name in listing for name in LISTINGS)
        done, failed, self._earlier_costs = await restore.earlier(
            self.store, self.root, self.ledger, self.ledger_name, listing)
        adopted = self._adopted = await restore.adopt(
            self.store, self.root, self.ledger, listing, manifest, selection, done, failed)
        if adopted:
            log.info("adopted %d finished tasks from their sidecars in %s", adopted,
                     self.store.url)
        uploaded = await restore.upload_left_behind(
            self.uploads, self.ledger, listing, manifest, selection, done, failed)
        if uploaded:
            log.info("uploaded %d tasks paid by an earlier run on this machine whose uploads "
                     "were cut short (no request sent)", uploaded)
            self._adopted += uploaded
        return done, failed

    def ok_costs(self) -> Iterator[tuple[str, str, float | None]]:
        costs = dict(self._earlier_costs)
        costs.update((task_id, (job, cost)) for task_id, job, cost in self.ledger.ok_costs())
        return ((task_id, job, cost) for task_id, (job, cost) in costs.items())

    # ------------------------------------------------------------------ per task

    async def gate(self) -> None:
        """No request starts unless the lock is known to be this run's (see
        :meth:`StoreLock.ensure`); once it is lost, none starts at all."""
        try:
            await self.lock.ensure()
        except LockLost as exc:
            self.uploads.failure = self.uploads.failure or exc
            raise

    async def keep(
        self, record: Record, sidecar: str | None, kept: Callable[[Record], None],
        failed: Callable[[BaseException], None], *, files: list[FileRecord] | None = None,
    ) -> None:
        """Upload an ok task's files, then its sidecar, then call ``kept`` (:class:`Uploads`)."""
        await self.uploads.keep(record, sidecar, kept, failed, files=files)

    def present(self, path: str, size: int) -> bool:
        return self._listing.get(path) == size

    async def fetch(self, path: str) -> bool:
        local = self.root / path
        return local.is_file() or await self.store.get_file(path, local)

    async def remove(self, path: str) -> None:
        await self.store.delete(path)
        (self.root / path).unlink(missing_ok=True)

    async def drain(self) -> None:
        await self.uploads.drain()

    # ------------------------------------------------------------------ publishing

    def _lock_lost(self, exc: LockLost) -> None:
        """Another run writes here now (or `unlock` removed the lock): stop, write nothing."""
        self.uploads.stop(exc)

    async def publish(self) -> None:
        await self.publisher.publish(self.ledger)

    async def finish(self, summary: dict[str, Any]) -> None:
        """Publish the ledger and summary, then the listings of every ledger in the store.
        After a store failure only the working copy gets the summary: the store has already
        had its retry deadline once, and the run's exit code says it stopped."""
        self._finishing = True  # its publish is the last: close() does not try it again
        await self.drain()
        data = write_summary(self.root, summary)
        if self.failure is not None:
            return
        await self.publish()
        await self.lock.ensure()
        await self.store.put_bytes(self.summary_name, data)
        if summary["ran"] or self.uploads.kept or self._adopted or not self._had_listings:
            await write_store_listings(self.store, self.root, self.ledger, self.ledger_name)

    async def close(self) -> None:
        """Publish what finished if :meth:`finish` never ran (a crash of batcher's own), then
        release the lock: always, even when a signal cuts the publish short, and within
        ``RELEASE_WITHIN`` seconds of its own."""
        try:
            await self.publisher.stop()
            if self._ledger is not None and not self._finishing and self.failure is None:
                with contextlib.suppress(StoreError):
                    await self.drain()
                    await self.publish()
        finally:
            if self._ledger is not None:
                self._ledger.close()
            with contextlib.suppress(StoreError, TimeoutError):
                # stops the heartbeat; removes the lock if still ours
                await asyncio.wait_for(self.lock.release(), RELEASE_WITHIN)


@contextlib.asynccontextmanager
async def open_store_output(url: StoreURL, *, shard: tuple[int, int] | None, sync_every: float,
                            store_timeout: float, slots: int) -> AsyncIterator[StoreOutput]:
    store = ObjectStore(url, timeout=store_timeout)
    root = cache_root(url, run_names(shard)[3])
    with lock_folder(root):  # two runs of one shard on this machine share a working copy
        output = StoreOutput(store, root, shard=shard, sync_every=sync_every, slots=slots)
        try:
            await output.open()
            yield output
        finally:
            await output.close()
