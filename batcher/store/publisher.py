"""A store run's ledger, published from the working copy: every ``sync_every`` seconds, at the
end and on a signal; only while the run holds the lock, and over the version it last saw."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from obstore.exceptions import AlreadyExistsError, PreconditionError

from batcher.errors import StoreError
from batcher.store.ledger import Ledger
from batcher.store.lock import LockLost, StoreLock
from batcher.store.objects import ObjectStore

log = logging.getLogger(__name__)


class LedgerPublisher:
    """Puts consistent copies of one run's ledger in the store under ``name``."""

    def __init__(self, store: ObjectStore, root: Path, name: str, lock: StoreLock,
                 sync_every: float) -> None:
        self.store = store
        self.root = root
        self.name = name
        self.lock = lock
        self.sync_every = sync_every
        self.version: str | None = None  # the store's ledger as this run last saw it
        self._publishing = asyncio.Lock()
        self._every: asyncio.Task[None] | None = None

    def start(self, ledger: Ledger) -> None:
        self._every = asyncio.create_task(self._publish_every(ledger))

    async def stop(self) -> None:
        if self._every is not None:
            self._every.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._every

    async def publish(self, ledger: Ledger) -> None:
        """Put a consistent copy of ``ledger`` in the store, only while the lock is this
        run's and over the version this run last saw."""
        async with self._publishing:
            snapshot = self.root / ".ledger-publish.sqlite"
            snapshot.unlink(missing_ok=True)
            ledger.snapshot(snapshot)
            await self.lock.check()
            self.version = await self._put(snapshot.read_bytes())

    async def _put(self, data: bytes) -> str | None:
        mode: Any = "create" if self.version is None else {"e_tag": self.version}
        try:
            return await self.store.put_bytes(self.name, data, mode=mode)
        except (PreconditionError, AlreadyExistsError):
            # Only the lock's holder writes the ledger: if the lock is still ours, the version
            # we did not expect is our own put whose answer was lost.
            await self.lock.check()
            now = await self.store.version(self.name)
            return await self.store.put_bytes(
                self.name, data, mode="create" if now is None else {"e_tag": now})

    async def _publish_every(self, ledger: Ledger) -> None:
        while True:
            await asyncio.sleep(self.sync_every)
            try:
                await self.publish(ledger)
            except LockLost:  # the heartbeat or the check said so: the run is stopped
                return
            except StoreError as exc:
                log.warning("publishing the ledger failed: %s; trying again in %.0f s", exc,
                            self.sync_every)
