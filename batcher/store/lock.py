"""One writer per ledger in an object store: a lock object made with a create-only put.

The lock names its holder (host, pid, start time) and the time it was last refreshed; the run
refreshes it each time it publishes its ledger, as an update of the version it wrote, so a run
whose lock was taken over finds out at its next publish. A lock not refreshed for
``stale_after`` seconds is taken over with a warning (a runner killed by a CI timeout never
releases its lock).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from obstore.exceptions import AlreadyExistsError, PreconditionError

from batcher.errors import StoreError, UsageError
from batcher.store.objects import ObjectStore

log = logging.getLogger(__name__)

MIN_STALE = 600.0  # seconds: a lock younger than this is never taken over


class LockLost(StoreError):
    """Another run took this run's lock over (it was stale): this run must stop writing."""


class StoreLock:
    """The lock object ``name`` in ``store``, held by this process once :meth:`acquire` returns."""

    def __init__(self, store: ObjectStore, name: str, *, stale_after: float) -> None:
        self.store = store
        self.name = name
        self.stale_after = max(stale_after, MIN_STALE)
        self.started = time.time()
        self._etag: str | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "refreshed": time.time()}).encode()

    async def acquire(self) -> None:
        """Take the lock, or raise :class:`UsageError` naming the run that holds it."""
        for _ in range(3):  # the holder may release or take it between our calls
            try:
                self._etag = await self.store.put_bytes(self.name, self._body(), mode="create")
                return
            except AlreadyExistsError:
                pass
            current = await self.store.get_bytes(self.name)
            if current is None:
                continue
            data, etag = current
            holder = _holder(data)
            age = time.time() - float(holder.get("refreshed") or 0)
            if age < self.stale_after:
                raise UsageError(
                    f"{self.store.url}: another batcher run holds {self.name} "
                    f"({_describe(holder)}, refreshed {age:.0f} s ago); it is stale and may "
                    f"be taken over after {self.stale_after:.0f} s")
            log.warning("%s: taking over the stale lock %s (%s, not refreshed for %.0f s)",
                        self.store.url, self.name, _describe(holder), age)
            try:
                self._etag = await self.store.put_bytes(self.name, self._body(),
                                                        mode={"e_tag": etag})
                return
            except PreconditionError:
                continue  # another run took it over first: look again
        raise UsageError(f"{self.store.url}: {self.name} keeps changing hands; is another run "
                         f"starting on this store?")

    async def refresh(self) -> None:
        """Say we are alive; raises :class:`StoreError` if another run took the lock over."""
        if self._etag is None:
            return
        try:
            self._etag = await self.store.put_bytes(self.name, self._body(),
                                                    mode={"e_tag": self._etag})
        except (PreconditionError, FileNotFoundError) as exc:
            self._etag = None
            raise LockLost(f"{self.store.url}: another run took over {self.name}; this run "
                           f"stops writing to the store") from exc

    async def release(self) -> None:
        """Remove the lock if it is still ours (best effort: a stale lock also expires)."""
        if self._etag is None:
            return
        current = await self.store.get_bytes(self.name)
        if current is not None and current[1] == self._etag:
            await self.store.delete(self.name)
        self._etag = None


def _holder(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(started)))
            if isinstance(started, int | float) else "an unknown time")
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"
