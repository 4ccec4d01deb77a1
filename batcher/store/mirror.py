"""A run's output in an object store, through a local working copy.

The working copy (``$XDG_CACHE_HOME/batcher/...``) holds the run's ledger and the files it
writes. At the start the ledgers are restored from the store; each finished task's files, then
its sidecar, are uploaded before the task counts as ok; the run's ledger is published every
``sync_every`` seconds, at the end and on a signal. A task that finished on a machine that died
before publishing is found by its sidecar in the store and adopted, not paid for again.

The store's layout is a folder's: ``ledger.sqlite`` (``ledgers/shard-I-of-N.sqlite`` for a
shard, each with its own lock), ``summary.json``, ``results.jsonl``, ``index.html`` and the files
with their sidecars. Every run, ``status`` and ``report`` read every ledger there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from obstore.exceptions import AlreadyExistsError, PreconditionError

from batcher.errors import StoreError, UsageError
from batcher.ledger import LEDGER_NAME, FileRecord, Ledger, Record
from batcher.manifest import Manifest
from batcher.outputs import derived_files
from batcher.plan import Selection
from batcher.store import sidecars
from batcher.store.bucket import write_store_listings
from batcher.store.folderlock import lock_folder
from batcher.store.layouts import claim_layout
from batcher.store.listings import write_summary
from batcher.store.lock import LockLost, StoreLock
from batcher.store.names import INDEX_NAME, RESULTS_NAME, Layout
from batcher.store.objects import ObjectStore, StoreURL
from batcher.store.working import cache_root, is_ledger, merged_view, restore_ledgers, run_names

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
        self.sync_every = sync_every
        self.lock = StoreLock(store, lock_name, on_lost=self._lock_lost)
        self.layout = Layout(root)
        self._ledger: Ledger | None = None
        self._ledger_version: str | None = None  # the store's ledger as this run last saw it
        self._slots = asyncio.Semaphore(max(slots, 1))
        self._uploads: set[asyncio.Task[None]] = set()
        self._publishing = asyncio.Lock()
        self._publisher: asyncio.Task[None] | None = None
        self._finishing = False
        self._had_listings = False
        self._adopted = 0
        self._listing: dict[str, int] = {}  # the store's files and sizes when the run began
        self._earlier_costs: dict[str, tuple[str, float | None]] = {}  # other ledgers' ok rows
        self._kept = 0  # tasks uploaded by this run (ran, or derived files made again)
        self.failure: BaseException | None = None  # the store went down, or the lock was lost
        self._on_failure: Callable[[BaseException], None] | None = None

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "open() first"
        return self._ledger

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
        _found, self._ledger_version = await self.store.get_file_version(self.ledger_name, path)
        self._ledger = Ledger(path)
        self._publisher = asyncio.create_task(self._publish_every())

    async def statuses(self, manifest: Manifest, selection: Selection) -> tuple[set[str], set[str]]:
        """Done and failed over every ledger in the store, files checked against the store's
        listing; finished tasks that only a sidecar tells of are adopted into this ledger."""
        listing = self._listing = await self.store.sizes()
        self._had_listings = RESULTS_NAME in listing and INDEX_NAME in listing
        others = [name for name in listing if is_ledger(name) and name != self.ledger_name]
        view = merged_view(self.ledger, await restore_ledgers(
            self.store, self.root / "others", others), self.root)
        try:
            done, failed = view.statuses(lambda path, size: listing.get(path) == size)
            if view is not self.ledger:  # the costs of tasks the other ledgers did
                self._earlier_costs = {task_id: (job, cost)
                                       for task_id, job, cost in view.ok_costs()}
        finally:
            if view is not self.ledger:
                view.close()
        found = sidecars.wanted(manifest, selection, self.root, done, failed,
                                listing.__contains__)
        adopted = self._adopted = await sidecars.adopt(
            self.ledger, found, self._read, self.present, done, failed)
        if adopted:
            log.info("adopted %d finished tasks from their sidecars in %s", adopted,
                     self.store.url)
        uploaded = await self._upload_left_behind(manifest, selection, done, failed)
        if uploaded:
            log.info("uploaded %d tasks paid by an earlier run on this machine whose uploads "
                     "were cut short (no request sent)", uploaded)
            self._adopted += uploaded
        return done, failed

    async def _upload_left_behind(self, manifest: Manifest, selection: Selection,
                                  done: set[str], failed: set[str]) -> int:
        """Tasks an earlier run on this machine paid for but did not upload (a signal cut its
        uploads short): their files and sidecar are in the working copy. Upload each whose
        files match its sidecar (size and sha256), files first, then record it."""
        found = sidecars.wanted(manifest, selection, self.root, done, failed,
                                sidecars.local_exists(self.root))
        records = [(name, record) for task_id, name in found
                   if (record := sidecars.finished_here(self.root, name, task_id)) is not None]
        for name, record in records:
            for path in [*(file.path for file in record.files), name]:
                await self._put_kept(path)
                self._listing[path] = (self.root / path).stat().st_size
            self.ledger.record(record)
            done.add(record.id)
            failed.discard(record.id)
        self.ledger.flush()
        return len(records)

    def ok_costs(self) -> Iterator[tuple[str, str, float | None]]:
        costs = dict(self._earlier_costs)
        costs.update((task_id, (job, cost)) for task_id, job, cost in self.ledger.ok_costs())
        return ((task_id, job, cost) for task_id, (job, cost) in costs.items())

    async def _read(self, name: str) -> bytes | None:
        got = await self.store.get_bytes(name)
        return None if got is None else got[0]

    # ------------------------------------------------------------------ per task

    async def gate(self) -> None:
        """No request starts unless the lock is known to be this run's (see
        :meth:`StoreLock.ensure`); once it is lost, none starts at all."""
        try:
            await self.lock.ensure()
        except LockLost as exc:
            self.failure = self.failure or exc
            raise

    async def keep(
        self, record: Record, sidecar: str | None, kept: Callable[[Record], None],
        failed: Callable[[BaseException], None], *, files: list[FileRecord] | None = None,
    ) -> None:
        """Upload an ok task's files, then its sidecar, then call ``kept``; a failure has no
        files and is kept at once. Waits only while every upload slot is taken."""
        if record.status != "ok":
            kept(record)
            return
        await self._slots.acquire()
        if files is None:
            files = [*record.files, *derived_files(record)]
        upload = asyncio.create_task(self._upload(files, record, sidecar, kept, failed))
        self._uploads.add(upload)
        upload.add_done_callback(self._uploads.discard)

    async def _upload(self, files: list[FileRecord], record: Record, sidecar: str | None,
                      kept: Callable[[Record], None],
                      failed: Callable[[BaseException], None]) -> None:
        self._on_failure = failed
        try:
            if self.failure is not None:  # the store is down or the lock lost: stopping
                failed(self.failure)
                return
            for file in files:
                await self._put_kept(file.path)
            if sidecar is not None:  # last: its presence says every file arrived
                await self._put_kept(sidecar)
        except Exception as exc:  # the store stayed down, or the working copy lost a file
            self.failure = self.failure or exc
            failed(exc)
        else:
            self._kept += 1
            kept(record)
        finally:
            self._slots.release()

    async def _put_kept(self, name: str) -> None:
        """Upload a task's file or sidecar create-only: a put that a run sent before it lost
        its lock (paused, its store slow) lands after the new holder's and changes nothing.
        An object already there (a put of ours whose answer was lost, a derived file made
        again, a task run again) is overwritten only once the lock is confirmed ours again, by
        the rule of :meth:`StoreLock.ensure`: a heartbeat confirmed within half a lease (no
        taker can have waited out a whole one since), else a refresh. So a run paused past
        its lease finds the lock lost here and overwrites nothing, and re-deriving thousands
        of files does not cost a lock write each."""
        await self.lock.ensure()  # a run that lost its lock writes nothing more
        try:
            await self.store.put_file(name, self.root / name, create=True)
        except AlreadyExistsError:
            await self.lock.ensure()
            await self.store.put_file(name, self.root / name)

    def present(self, path: str, size: int) -> bool:
        return self._listing.get(path) == size

    async def fetch(self, path: str) -> bool:
        local = self.root / path
        return local.is_file() or await self.store.get_file(path, local)

    async def remove(self, path: str) -> None:
        await self.store.delete(path)
        (self.root / path).unlink(missing_ok=True)

    async def drain(self) -> None:
        """Wait for the uploads under way (each bounded by the store's retry deadline)."""
        while self._uploads:
            await asyncio.gather(*list(self._uploads), return_exceptions=True)

    # ------------------------------------------------------------------ publishing

    def _lock_lost(self, exc: LockLost) -> None:
        """Another run writes here now (or `unlock` removed the lock): stop, write nothing."""
        self.failure = self.failure or exc
        if self._on_failure is not None:
            self._on_failure(exc)

    async def publish(self) -> None:
        """Put a consistent copy of this run's ledger in the store, only while the lock is
        this run's and over the version this run last saw."""
        async with self._publishing:
            snapshot = self.root / ".ledger-publish.sqlite"
            snapshot.unlink(missing_ok=True)
            self.ledger.snapshot(snapshot)
            await self.lock.check()
            self._ledger_version = await self._put_ledger(snapshot.read_bytes())

    async def _put_ledger(self, data: bytes) -> str | None:
        mode: Any = "create" if self._ledger_version is None else {"e_tag": self._ledger_version}
        try:
            return await self.store.put_bytes(self.ledger_name, data, mode=mode)
        except (PreconditionError, AlreadyExistsError):
            # Only the lock's holder writes the ledger: if the lock is still ours, the version
            # we did not expect is our own put whose answer was lost.
            await self.lock.check()
            now = await self.store.version(self.ledger_name)
            return await self.store.put_bytes(
                self.ledger_name, data, mode="create" if now is None else {"e_tag": now})

    async def _publish_every(self) -> None:
        while True:
            await asyncio.sleep(self.sync_every)
            try:
                await self.publish()
            except LockLost:  # the heartbeat or the check said so: _lock_lost stops the run
                return
            except StoreError as exc:
                log.warning("publishing the ledger failed: %s; trying again in %.0f s", exc,
                            self.sync_every)

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
        if summary["ran"] or self._kept or self._adopted or not self._had_listings:  # else same
            await write_store_listings(self.store, self.root, self.ledger, self.ledger_name)

    async def close(self) -> None:
        """Publish what finished if :meth:`finish` never ran (a crash of batcher's own), then
        release the lock: always, even when a signal cuts the publish short, and within
        ``RELEASE_WITHIN`` seconds of its own."""
        try:
            if self._publisher is not None:
                self._publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._publisher
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
