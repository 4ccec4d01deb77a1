"""``batcher prune`` on an object store: every ledger there (the unsharded one and each shard's)
loses the rows of tasks the manifest no longer has, then the store loses their objects.

The order is the folder's (see :mod:`batcher.prune`): the journal object, then each pruned
ledger published, then the objects deleted, then the listings uploaded, then the journal
deleted. Prune holds the lock of every
ledger it rewrites, so a run writing to the store (any shard) makes it stop with exit 2, and a
run cannot start while it works. A dry run reads only and takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path

from batcher.errors import StoreError, UsageError
from batcher.ledger import LEDGER_NAME, Ledger
from batcher.location import StoreURL
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.prune import (
    JOURNAL_NAME,
    Announce,
    PruneSet,
    find_stale,
    journal_bytes,
    manifest_ids,
    read_journal,
)
from batcher.reports.summary import SUMMARY_NAME, summary_for_manifest
from batcher.store.lock import StoreLock
from batcher.store.mirror import (
    LOCK_NAME,
    cache_root,
    first_listing,
    is_ledger,
    merged_view,
    upload_listings,
)
from batcher.store.objects import ObjectStore

DELETES = 16  # objects deleted at once


def _lock_of(ledger_name: str) -> str:
    """The lock object guarding a ledger (``ledgers/shard-1-of-2.sqlite`` -> ``....lock``)."""
    if ledger_name == LEDGER_NAME:
        return LOCK_NAME
    return ledger_name.removesuffix(".sqlite") + ".lock"


async def prune_store(manifest: Manifest, url: StoreURL, *, dry_run: bool,
                      announce: Announce, required: bool = True,
                      force: bool = False) -> PruneSet:
    """Prune every ledger in the store and the objects only stale rows name; ``announce`` is
    told what goes before anything is removed. A store with no ledger is an error when
    ``required``, else has nothing to prune."""
    store = ObjectStore(url)
    listing = await first_listing(store)
    names = sorted(name for name in listing if is_ledger(name))
    if not names:
        if not required:
            return PruneSet(str(url))
        raise UsageError(f"{url}: no ledger here (nothing has run into it yet)")
    ids = manifest_ids(manifest)
    root = cache_root(url, f"prune-{os.getpid()}")
    locks: list[StoreLock] = []
    ledgers: dict[str, Ledger] = {}
    try:
        if not dry_run:
            for name in names:
                lock = StoreLock(store, _lock_of(name))
                await lock.acquire()
                lock.start_heartbeat()  # a run starting meanwhile sees prune is alive
                locks.append(lock)
        for name in names:  # read after locking: no run changes them from here on
            path = root / name.replace("/", "-")
            if await store.get_file(name, path):
                ledgers[name] = Ledger(path)
        if not ledgers:
            raise UsageError(f"{url}: its ledgers went away while prune read them; try again")
        got = await store.get_bytes(JOURNAL_NAME)
        found = find_stale(ledgers.values(), ids, manifest, str(url), listing.__contains__,
                           read_journal(got[0] if got else None), force=force)
        announce(found)
        if not dry_run and (found.tasks or found.names or got is not None):
            await _remove(store, found, ledgers, root)
        if not dry_run:
            await _rewrite_summary(store, manifest, ledgers, root)
        return found
    finally:
        for ledger in ledgers.values():
            ledger.close()
        for lock in locks:
            with contextlib.suppress(StoreError):
                await lock.release()
        shutil.rmtree(root, ignore_errors=True)


async def _rewrite_summary(store: ObjectStore, manifest: Manifest, ledgers: dict[str, Ledger],
                           root: Path) -> None:
    """The store's summary.json brought in line with the manifest (see
    :func:`batcher.reports.summary.summary_for_manifest`), over every ledger's rows."""
    got = await store.get_bytes(SUMMARY_NAME)
    try:
        summary = json.loads(got[0]) if got else None
    except ValueError:
        return
    if not isinstance(summary, dict):
        return
    first, *others = ledgers.values()
    view = merged_view(first, [ledger.path for ledger in others], root)
    try:
        fresh = summary_for_manifest(summary, lambda: Selection().tasks(manifest), view)
    finally:
        if view is not first:
            view.close()
    await store.put_bytes(SUMMARY_NAME, json.dumps(fresh, indent=2).encode() + b"\n")


async def _remove(store: ObjectStore, found: PruneSet, ledgers: dict[str, Ledger],
                  root: Path) -> None:
    """Journal, rows (each ledger published), objects, listings, and the journal last."""
    await store.put_bytes(JOURNAL_NAME, journal_bytes(found.names))
    stale = {task.id for task in found.tasks}
    for name, ledger in ledgers.items():
        ledger.remove(stale)
        snapshot = root / ".ledger-publish.sqlite"
        snapshot.unlink(missing_ok=True)
        ledger.snapshot(snapshot)
        await store.put_file(name, snapshot)
    gate = asyncio.Semaphore(DELETES)

    async def delete(name: str) -> None:
        async with gate:
            await store.delete(name)
    await asyncio.gather(*(delete(name) for name in sorted(found.names)))
    first, *others = ledgers.values()
    view = merged_view(first, [ledger.path for ledger in others], root)
    try:
        await upload_listings(store, root, view)
    finally:
        if view is not first:
            view.close()
    await store.delete(JOURNAL_NAME)  # last: a prune killed before this is redone
