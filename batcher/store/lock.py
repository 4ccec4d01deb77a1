"""One writer per ledger in an object store: a lock object held by a lease.

The lock is created with a create-only put and names its holder: host, pid, start time, a
nonce and its lease (default 60 s). The holder heartbeats it every few seconds, apart from
publishing, as an update of the version it wrote; a run whose lock was taken over or removed
finds out at its next heartbeat, or before its next request or write (see
:meth:`StoreLock.ensure`).

A starting run that finds the lock held watches it on its own monotonic clock: if it changes,
the holder is alive and the run stops (exit 2) naming it; if it stays unchanged for the holder's
whole lease, the holder is dead and the run takes it over with a warning. No decision compares
two machines' clocks. On the holder's own machine, a holder whose pid is gone is taken over at
once. The nonce tells this run's own lock from another's when the answer to one of its own
puts was lost after the store applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from obstore.exceptions import AlreadyExistsError, PreconditionError

from batcher.errors import StoreError, UsageError
from batcher.store.objects import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_LEASE = 60.0  # seconds a lock may stay unchanged before its holder counts as dead
LEASE_ENV = "BATCHER_LOCK_LEASE"  # seconds, for tests and for stores slower than usual
MAX_BEAT = 5.0  # seconds between heartbeats at most


class LockLost(StoreError):
    """Another run took this run's lock over, or `batcher unlock` removed it: this run must
    stop writing to the store."""


def lease_from_env() -> float:
    """The lease this machine's runs write into their locks."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return DEFAULT_LEASE
    try:
        lease = float(text)
    except ValueError:
        lease = -1.0
    if not 0.5 <= lease <= 86400:
        raise UsageError(f"{LEASE_ENV}={text!r}: a lock lease is a number of seconds from 0.5 "
                         "to 86400")
    return lease


@functools.cache
def _machine() -> str:
    """This machine and pid namespace: a pid means the same process only within it (two
    containers may share a host name)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as handle:
            parts.append(handle.read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class Holder:
    """What a lock object says about the run holding it."""

    host: str
    pid: int | None
    started: float | None
    nonce: str | None
    lease: float
    machine: str | None
    phase: str  # "starting" while its run checks the prefix's other locks, then "running"

    @classmethod
    def parse(cls, data: bytes) -> Holder:
        """A lock's body; fields missing (an older batcher, or no JSON) take safe defaults."""
        try:
            body = json.loads(data)
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}

        def number(key: str) -> float | None:
            value = body.get(key)
            return float(value) if isinstance(value, int | float) else None
        lease = number("lease")
        pid = body.get("pid")
        return cls(host=str(body.get("host", "?")), pid=pid if isinstance(pid, int) else None,
                   started=number("started"), nonce=_text(body.get("nonce")),
                   lease=lease if lease is not None and lease > 0 else DEFAULT_LEASE,
                   machine=_text(body.get("machine")), phase=str(body.get("phase", "running")))

    def describe(self) -> str:
        when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
                if self.started is not None else "an unknown time")
        return f"host {self.host}, pid {self.pid if self.pid is not None else '?'}, started {when}"

    def gone_from_this_machine(self) -> bool:
        """The holder ran on this machine and its process is gone: dead, no need to wait."""
        if self.machine is None or self.machine != _machine() or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return False


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Locks:
    """What an output's locks say: whether a run writes it now, and (a store's) who holds
    each lock, for ``status`` and ``unlock``; None where a lock names no holder."""

    running: bool
    holders: list[dict[str, Any]] | None


class StoreLock:
    """The lock object ``name`` in ``store``, held by this process once :meth:`acquire` returns.

    ``on_lost`` is called (once) when a heartbeat finds the lock taken over or removed."""

    def __init__(self, store: ObjectStore, name: str, *, lease: float | None = None,
                 on_lost: Callable[[LockLost], None] | None = None) -> None:
        self.store = store
        self.name = name
        self.lease = lease if lease is not None else lease_from_env()
        self.beat_every = min(MAX_BEAT, self.lease / 6)
        self.started = time.time()
        self.nonce = secrets.token_hex(12)
        self.lost: LockLost | None = None
        self.on_lost = on_lost
        self._phase = "running"
        self._beats = 0
        self._etag: str | None = None
        self._confirmed = 0.0  # monotonic time a write of ours was sent that the store confirmed
        self._writing = asyncio.Lock()
        self._heart: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None and self.lost is None

    def _body(self) -> bytes:
        self._beats += 1
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
            "nonce": self.nonce, "lease": self.lease, "machine": _machine(),
            "phase": self._phase, "beat": self._beats}).encode()

    # ------------------------------------------------------------------ taking it

    async def acquire(self, *, phase: str = "running") -> None:
        """Take the lock, waiting out a silent holder's lease; raise :class:`UsageError`
        naming a holder that is alive."""
        self._phase = phase
        for _ in range(5):  # the holder may release or take it between our calls
            sent = time.monotonic()
            try:
                self._etag = await self.store.put_bytes(self.name, self._body(), mode="create")
                self._confirmed = sent
                return
            except AlreadyExistsError:
                pass
            current = await self.store.get_bytes(self.name)
            if current is None:
                continue  # released meanwhile
            data, etag = current
            holder = Holder.parse(data)
            if holder.nonce == self.nonce:  # our create arrived; its answer did not
                self._etag, self._confirmed = etag, sent
                return
            if holder.gone_from_this_machine():
                reason = "its process is gone from this machine"
            elif await self._silent_for_its_lease(holder, etag):
                reason = f"it stayed unchanged for its whole lease of {holder.lease:g} s"
            else:
                continue  # it went away while we watched: try to create it again
            if await self._take_over(etag):
                log.warning("%s: taking over the lock %s from the run that held it (%s): %s",
                            self.store.url, self.name, holder.describe(), reason)
                return
        raise UsageError(f"{self.store.url}: {self.name} keeps changing hands; is another run "
                         f"starting on this store?")

    async def _silent_for_its_lease(self, holder: Holder, etag: str | None) -> bool:
        """Watch a held lock: True when it stays unchanged for the holder's lease, False when
        it goes away; raises :class:`UsageError` naming the holder when it changes."""
        log.warning("%s: %s is held by another batcher run (%s); waiting up to %.0f s to see "
                    "whether it is alive", self.store.url, self.name, holder.describe(),
                    holder.lease)
        return await watch(self.store, self.name, holder, etag, on_change=lambda now: UsageError(
            f"{self.store.url}: another batcher run holds {self.name} and is alive "
            f"({now.describe()}); wait for it to finish, or stop it first"))

    async def _take_over(self, etag: str | None) -> bool:
        """Replace the dead holder's version; False when someone else changed it first."""
        sent = time.monotonic()
        try:
            self._etag = await self.store.put_bytes(self.name, self._body(),
                                                    mode={"e_tag": etag})
        except (PreconditionError, FileNotFoundError):
            return await self._is_ours(sent)  # maybe our put arrived and its answer did not
        self._confirmed = sent
        return True

    async def _is_ours(self, sent: float) -> bool:
        """Whether the lock now carries our nonce (a write of ours whose answer was lost)."""
        current = await self.store.get_bytes(self.name)
        if current is None or Holder.parse(current[0]).nonce != self.nonce:
            return False
        self._etag, self._confirmed = current[1], sent
        return True

    # ------------------------------------------------------------------ holding it

    def start_heartbeat(self) -> None:
        """Refresh the lock every ``beat_every`` seconds until :meth:`release`."""
        if self._heart is None:
            self._heart = asyncio.create_task(self._beat_forever())

    async def _beat_forever(self) -> None:
        while self.lost is None:
            await asyncio.sleep(self.beat_every)
            try:
                await self.refresh()
            except LockLost:
                return
            except StoreError as exc:  # ensure() will not let a write pass on an old heartbeat
                log.warning("%s: refreshing the lock %s failed: %s", self.store.url,
                            self.name, exc)

    async def set_phase(self, phase: str) -> None:
        """Say what this run is doing (``running`` once the prefix is checked) in the lock."""
        self._phase = phase
        await self.refresh()

    async def refresh(self, *, unless_fresh: bool = False) -> None:
        """Say we are alive; raises :class:`LockLost` if the lock was taken over or removed.
        ``unless_fresh``: skip it when another refresh was confirmed meanwhile (many callers
        of :meth:`ensure` waiting at once make one write, not one each)."""
        async with self._writing:  # one write at a time: each updates the version before
            if self.lost is not None:
                raise self.lost
            if self._etag is None or (unless_fresh and not self._stale()):
                return
            sent = time.monotonic()
            try:
                self._etag = await self.store.put_bytes(self.name, self._body(),
                                                        mode={"e_tag": self._etag})
            except (PreconditionError, FileNotFoundError):
                if not await self._is_ours(sent):
                    raise await self._lose() from None
                return
            self._confirmed = sent

    def _stale(self) -> bool:
        """No write of ours was confirmed within half a lease on this machine's monotonic
        clock (which runs on while the process is paused: SIGSTOP, a suspended laptop)."""
        return time.monotonic() - self._confirmed > self.lease / 2

    async def ensure(self) -> None:
        """Before a request to a provider and before a write to the store: raise
        :class:`LockLost` unless the lock is ours. Free while a heartbeat was confirmed within
        half a lease (no taker can have waited out a whole one since); else it refreshes first
        (a run paused, or a slow store), so a run resumed after its lease finds out before it
        starts anything."""
        if self.lost is not None:
            raise self.lost
        if self._etag is not None and self._stale():
            await self.refresh(unless_fresh=True)

    async def check(self) -> None:
        """Read the lock: raise :class:`LockLost` unless it is still this run's."""
        if self.lost is not None:
            raise self.lost
        current = await self.store.get_bytes(self.name)
        if current is None or (current[1] != self._etag
                               and Holder.parse(current[0]).nonce != self.nonce):
            raise await self._lose(current)

    async def _lose(self, current: tuple[bytes, str | None] | None | bool = False) -> LockLost:
        if current is False:
            with contextlib.suppress(StoreError):
                current = await self.store.get_bytes(self.name)
        if isinstance(current, tuple):
            how = f"another run ({Holder.parse(current[0]).describe()}) took over {self.name}"
        else:  # an unlock, or a taker that finished and released it: the store cannot say
            how = (f"{self.name} was removed (batcher unlock, or a run that took it over and "
                   "finished)")
        self.lost = LockLost(f"{self.store.url}: {how}; this run stops writing to the store")
        self._etag = None
        if self.on_lost is not None:
            self.on_lost(self.lost)
        return self.lost

    async def release(self) -> None:
        """Stop the heartbeat; remove the lock if it is still ours (a dead run's lock is
        waited out or taken over by the next run)."""
        if self._heart is not None:
            self._heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
            self._heart = None
        if not self.held:
            return
        current = await self.store.get_bytes(self.name)
        if current is not None and (current[1] == self._etag
                                    or Holder.parse(current[0]).nonce == self.nonce):
            await self.store.delete(self.name)
        self._etag = None


async def watch(store: ObjectStore, name: str, holder: Holder, etag: str | None, *,
                on_change: Callable[[Holder], Exception],
                keep_watching: Callable[[Holder], bool] = lambda _now: False) -> bool:
    """Watch the lock ``name`` (seen as ``holder`` at ``etag``) on this machine's monotonic
    clock: True when it stays unchanged for the holder's whole lease, False when it goes away.
    When it changes, raise ``on_change(new holder)``, unless ``keep_watching(new holder)``:
    then the watch starts again from the new version."""
    poll = min(1.0, max(holder.lease / 12, 0.05))
    since = time.monotonic()
    while time.monotonic() - since < holder.lease:
        await asyncio.sleep(poll)
        current = await store.get_bytes(name)
        if current is None:
            return False
        if current[1] != etag:
            now = Holder.parse(current[0])
            if not keep_watching(now):
                raise on_change(now)
            holder, etag, since = now, current[1], time.monotonic()
    return True
