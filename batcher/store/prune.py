"""``batcher prune``: remove the files and ledger rows of tasks the manifest no longer has.

After a prompt edit the old prompt's tasks stay in the ledger, and so in results.jsonl and
index.html. Prune finds every row whose id the manifest (all of it: ``--only`` and ``--shard``
select what a run sends, not what the output keeps) no longer expands to, removes those rows,
then their files and sidecars, and writes the listings again (:mod:`batcher.store.stale`
decides what goes).

Order, against a crash at any point: the names to remove are first written to a journal
(``.batcher-prune.json``), then the rows go (each ledger in one transaction, and in a store
published), then the files, then the listings and the summary are written, then the journal
goes. Rows go before files so that no row ever names a missing file: a row whose files are
gone would be listed in results.jsonl and the contact sheet as ok, and ``status --verify``
would call the output damaged. Files left behind by a prune killed after its rows went are
named in the journal, and the next prune removes them (and writes the listings) first. A name
that a kept row uses is never removed (a name is never shared: see Ledger.claim; older
outputs are checked anyway).

One algorithm for a folder and an object store; a :class:`Site` is what differs. Prune holds
the lock of every ledger it rewrites (a folder's, each of a store's), so a run writing the
output makes it stop with exit 2, and a run cannot start while it works. A dry run only reads
and takes no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Protocol

from batcher.errors import UsageError
from batcher.location import StoreURL
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.store.ledger import Ledger
from batcher.store.listings import fresh_summary
from batcher.store.names import JOURNAL_NAME, SUMMARY_NAME
from batcher.store.stale import PruneSet, find_stale, journal_bytes, manifest_ids, read_journal
from batcher.store.working import merged_view

Announce = Callable[[PruneSet], None]


class Site(Protocol):
    """What prune needs of an output: its ledgers (locked unless a dry run), the names
    present, and small files to read, write and delete."""

    location: str
    scratch: Path  # where a merged view of several ledgers may be made

    def hold(self, *, dry_run: bool) -> contextlib.AbstractAsyncContextManager[list[Ledger]]:
        """The output's ledgers, its locks held unless ``dry_run``; none when it has none."""

    def present(self, name: str) -> bool: ...
    async def read(self, name: str) -> bytes | None: ...
    async def write(self, name: str, data: bytes) -> None:
        """Write a small file durably (the journal, the summary)."""

    async def publish(self, ledgers: list[Ledger]) -> None:
        """Make the ledgers' removed rows durable where they live."""

    async def delete(self, names: Iterable[str]) -> None: ...
    async def write_listings(self, ledger: Ledger) -> None: ...


def site_of(target: Path | StoreURL) -> Site:
    if isinstance(target, Path):
        from batcher.store.folder import FolderSite

        return FolderSite(target)
    from batcher.store.bucket import BucketSite

    return BucketSite(target)


async def prune(manifest: Manifest, target: Path | StoreURL, *, dry_run: bool,
                announce: Announce, required: bool = True, force: bool = False) -> PruneSet:
    """Prune the output; ``announce`` is told what goes before anything is removed. An output
    with no ledger is an error when ``required``, else has nothing to prune (``run --prune``
    into a new output)."""
    site = site_of(target)
    async with site.hold(dry_run=dry_run) as ledgers:
        if not ledgers:
            if not required:
                return PruneSet(site.location)
            raise UsageError(f"{site.location}: no ledger here (nothing has run into it yet)")
        journal = await site.read(JOURNAL_NAME)
        found = find_stale(ledgers, manifest_ids(manifest), manifest, site.location,
                           site.present, read_journal(journal), force=force)
        announce(found)
        if dry_run:
            return found
        removing = bool(found.tasks or found.names or journal is not None)
        if removing:
            await _remove(site, found, ledgers)
        async with _merged(ledgers, site.scratch) as view:
            if removing:  # before the journal goes: a kill here is redone
                await site.write_listings(view)
            fresh = fresh_summary(await site.read(SUMMARY_NAME),
                                  lambda: Selection().tasks(manifest), view)
            if fresh is not None:
                await site.write(SUMMARY_NAME, fresh)
        if removing:
            await site.delete([JOURNAL_NAME])  # last: a prune killed before this is redone
        return found


async def _remove(site: Site, found: PruneSet, ledgers: list[Ledger]) -> None:
    """The journal, then the rows, then the files."""
    await site.write(JOURNAL_NAME, journal_bytes(found.names))
    stale = {task.id for task in found.tasks}
    for ledger in ledgers:
        ledger.remove(stale)
    await site.publish(ledgers)
    await site.delete(sorted(found.names))


@contextlib.asynccontextmanager
async def _merged(ledgers: list[Ledger], scratch: Path) -> AsyncIterator[Ledger]:
    first, *others = ledgers
    view = merged_view(first, [ledger.path for ledger in others], scratch)
    try:
        yield view
    finally:
        if view is not first:
            view.close()
