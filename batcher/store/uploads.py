"""A store run's keep queue: each finished task's files, then its sidecar, uploaded from the
working copy before the task counts as kept; a few uploads at a time, a new one waiting only
while every slot is taken. The first failure (the store down past its retry deadline, the lock
lost) stops the queue: every task handed in after it is told it failed, and stays pending."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from obstore.exceptions import AlreadyExistsError

from batcher.outputs import derived_files
from batcher.records import FileRecord, Record
from batcher.store.lock import StoreLock
from batcher.store.objects import ObjectStore

Failed = Callable[[BaseException], None]


class Uploads:
    """The uploads under way for one run, and the first failure that stopped them."""

    def __init__(self, store: ObjectStore, root: Path, lock: StoreLock, slots: int) -> None:
        self.store = store
        self.root = root
        self.lock = lock
        self.failure: BaseException | None = None  # the store went down, or the lock was lost
        self.kept = 0  # tasks uploaded by this run (ran, or derived files made again)
        self._slots = asyncio.Semaphore(max(slots, 1))
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_failure: Failed | None = None

    def stop(self, exc: BaseException) -> None:
        """Stop for ``exc`` (the first reason stays), and tell the run at once."""
        self.failure = self.failure or exc
        if self._on_failure is not None:
            self._on_failure(exc)

    async def keep(self, record: Record, sidecar: str | None, kept: Callable[[Record], None],
                   failed: Failed, *, files: list[FileRecord] | None = None) -> None:
        """Upload an ok task's files, then its sidecar, then call ``kept``; a failure has no
        files and is kept at once. Waits only while every upload slot is taken."""
        if record.status != "ok":
            kept(record)
            return
        await self._slots.acquire()
        if files is None:
            files = [*record.files, *derived_files(record)]
        upload = asyncio.create_task(self._upload(files, record, sidecar, kept, failed))
        self._tasks.add(upload)
        upload.add_done_callback(self._tasks.discard)

    async def _upload(self, files: list[FileRecord], record: Record, sidecar: str | None,
                      kept: Callable[[Record], None], failed: Failed) -> None:
        self._on_failure = failed
        try:
            if self.failure is not None:  # the store is down or the lock lost: stopping
                failed(self.failure)
                return
            for file in files:
                await self.put(file.path)
            if sidecar is not None:  # last: its presence says every file arrived
                await self.put(sidecar)
        except Exception as exc:  # the store stayed down, or the working copy lost a file
            self.failure = self.failure or exc
            failed(exc)
        else:
            self.kept += 1
            kept(record)
        finally:
            self._slots.release()

    async def put(self, name: str) -> None:
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

    async def drain(self) -> None:
        """Wait for the uploads under way (each bounded by the store's retry deadline)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
