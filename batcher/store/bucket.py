"""An object store's output as the commands other than ``run`` see it: every ledger there merged
into one read-only view (:class:`BucketView`), the store's locks (who holds them, ``unlock``),
the listings uploaded, and the half of prune that differs from a folder's (:class:`BucketSite`).
No reader takes a lock; prune takes every ledger's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

from batcher.errors import StoreError, UsageError
from batcher.location import StoreURL
from batcher.reports.sheet import Mark
from batcher.store import sidecars
from batcher.store.ledger import LEDGER_NAME, Ledger
from batcher.store.listings import LISTINGS, parse_summary, write_listings
from batcher.store.lock import Holder, Locks, StoreLock
from batcher.store.names import LEDGERS, SUMMARY_NAME
from batcher.store.objects import ObjectStore
from batcher.store.verify import Problems, verify
from batcher.store.working import (
    cache_root,
    first_listing,
    is_ledger,
    is_lock,
    lock_of,
    merged_view,
    restore_ledgers,
    run_names,
)

DELETES = 16  # objects deleted at once


class BucketView:
    """Every ledger of a store merged into one, with the store's listing (files and sizes)."""

    def __init__(self, store: ObjectStore, ledger: Ledger, listing: dict[str, int],
                 root: Path) -> None:
        self.store = store
        self.ledger = ledger
        self.listing = listing
        self.root = root  # a scratch folder for this reader
        self.location = str(store.url)

    def size(self, path: str) -> int | None:
        """A kept file's size as the store listed it (None: not there)."""
        return self.listing.get(path)

    def present(self, path: str, size: int) -> bool:
        return self.listing.get(path) == size

    async def read(self, name: str) -> bytes | None:
        got = await self.store.get_bytes(name)
        return None if got is None else got[0]

    async def verify(self) -> Problems:
        """Every ok task's objects streamed and hashed again."""
        return await verify(self.ledger, self.store.chunks)

    async def summary(self) -> dict[str, Any] | None:
        return parse_summary(await self.read(SUMMARY_NAME))

    async def locks(self) -> Locks:
        """Who holds the store's locks now, one entry per lock: a run is writing while any
        does."""
        found = []
        for name in sorted(name for name in self.listing if is_lock(name)):
            data = await self.read(name)
            if data is not None:
                holder = Holder.parse(data)
                found.append({"lock": name, "host": holder.host, "pid": holder.pid,
                              "started": holder.started, "lease_s": holder.lease,
                              "holder": holder.describe()})
        return Locks(bool(found), found)

    async def write_listings(self, marks: Mapping[str, Mark] | None = None) -> None:
        await upload_listings(self.store, self.root, self.ledger, marks)

    async def adopt_unaccounted(self) -> None:
        """Adopt into the view every sidecar in the listing no done row accounts for."""
        done, failed = self.ledger.statuses(self.present)
        found = sidecars.unaccounted(self.ledger, self.listing, done)
        await sidecars.adopt(self.ledger, found, self.read, self.present, done, failed)


@contextlib.asynccontextmanager
async def open_bucket_view(url: StoreURL, *, required: bool = True) -> AsyncIterator[BucketView]:
    """Every ledger in the store merged into one, read-only, no lock taken. Tasks only their
    sidecars tell of (a run killed before its first publish) are adopted into the view, as a
    run would adopt them. A store with neither a ledger nor a sidecar is an error when
    ``required``, else reads as an empty ledger."""
    store = ObjectStore(url)
    root = cache_root(url, f"read-{os.getpid()}")
    listing = await first_listing(store)
    paths = await restore_ledgers(store, root, sorted(n for n in listing if is_ledger(n)))
    if not paths and required and not any(sidecars.is_sidecar_name(n) for n in listing):
        shutil.rmtree(root, ignore_errors=True)
        raise UsageError(f"{url}: no ledger here (nothing has run into it yet)")
    first = Ledger(paths[0] if paths else root / LEDGER_NAME)
    ledger = merged_view(first, paths[1:], root)
    try:
        view = BucketView(store, ledger, listing, root)
        await view.adopt_unaccounted()
        yield view
    finally:
        ledger.close()
        if ledger is not first:
            first.close()
        shutil.rmtree(root, ignore_errors=True)


async def upload_listings(store: ObjectStore, root: Path, ledger: Ledger,
                          marks: Mapping[str, Mark] | None = None) -> None:
    """Write results.jsonl and index.html from ``ledger`` under ``root``, then upload them."""
    write_listings(root, ledger, title=store.url.title, marks=marks)
    for name in LISTINGS:
        await store.put_file(name, root / name)


async def write_store_listings(store: ObjectStore, root: Path, own: Ledger,
                               own_name: str) -> None:
    """results.jsonl and index.html over every ledger in the store, written and uploaded."""
    names = [name for name in await store.sizes(LEDGERS.rstrip("/")) if is_ledger(name)]
    names.append(LEDGER_NAME)
    others = await restore_ledgers(store, root / "others",
                                   [name for name in names if name != own_name])
    view = merged_view(own, others, root)
    try:
        await upload_listings(store, root, view)
    finally:
        if view is not own:
            view.close()


async def remove_lock(url: StoreURL, shard: tuple[int, int] | None) -> tuple[str, str | None]:
    """``batcher unlock``: delete the lock of a run (or shard); its name, and whose it was."""
    store = ObjectStore(url)
    name = run_names(shard)[1]
    try:
        got = await store.get_bytes(name)
        if got is not None:
            await store.delete(name)
    except StoreError as exc:  # a missing bucket, refused credentials, a store that is down
        raise UsageError(str(exc)) from None
    return name, None if got is None else Holder.parse(got[0]).describe()


class BucketSite:
    """Prune's view of a store: each ledger restored (after its lock is taken), published
    again once its rows went; objects deleted a few at a time."""

    def __init__(self, url: StoreURL) -> None:
        self.store = ObjectStore(url)
        self.location = str(url)
        self.scratch = cache_root(url, f"prune-{os.getpid()}")
        self._listing: dict[str, int] = {}
        self._names: dict[Path, str] = {}  # a restored ledger's path -> its store name

    @contextlib.asynccontextmanager
    async def hold(self, *, dry_run: bool) -> AsyncIterator[list[Ledger]]:
        self._listing = await first_listing(self.store)
        names = sorted(name for name in self._listing if is_ledger(name))
        locks: list[StoreLock] = []
        ledgers: list[Ledger] = []
        try:
            for name in names if not dry_run else ():
                lock = StoreLock(self.store, lock_of(name))
                await lock.acquire()
                lock.start_heartbeat()  # a run starting meanwhile sees prune is alive
                locks.append(lock)
            for name in names:  # read after locking: no run changes them from here on
                path = self.scratch / name.replace("/", "-")
                if await self.store.get_file(name, path):
                    self._names[path] = name
                    ledgers.append(Ledger(path))
            if names and not ledgers:
                raise UsageError(f"{self.location}: its ledgers went away while prune read "
                                 "them; try again")
            yield ledgers
        finally:
            for ledger in ledgers:
                ledger.close()
            for lock in locks:
                with contextlib.suppress(StoreError):
                    await lock.release()
            shutil.rmtree(self.scratch, ignore_errors=True)

    def present(self, name: str) -> bool:
        return name in self._listing

    async def read(self, name: str) -> bytes | None:
        got = await self.store.get_bytes(name)
        return None if got is None else got[0]

    async def write(self, name: str, data: bytes) -> None:
        await self.store.put_bytes(name, data)

    async def publish(self, ledgers: list[Ledger]) -> None:
        for ledger in ledgers:
            snapshot = self.scratch / ".ledger-publish.sqlite"
            snapshot.unlink(missing_ok=True)
            ledger.snapshot(snapshot)
            await self.store.put_file(self._names[ledger.path], snapshot)

    async def delete(self, names: Iterable[str]) -> None:
        gate = asyncio.Semaphore(DELETES)

        async def delete(name: str) -> None:
            async with gate:
                await self.store.delete(name)
        await asyncio.gather(*(delete(name) for name in names))

    async def write_listings(self, ledger: Ledger) -> None:
        await upload_listings(self.store, self.scratch, ledger)
