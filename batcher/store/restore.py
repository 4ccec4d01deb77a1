"""What a store run finds when it starts: the tasks done and failed over every ledger in the
store (files checked against the store's listing), the finished tasks only a sidecar tells of
(adopted, not paid for again), and those an earlier run on this machine paid for but did not
upload (uploaded from the working copy, no request sent)."""

from __future__ import annotations

from pathlib import Path

from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.store import sidecars
from batcher.store.ledger import Ledger
from batcher.store.objects import ObjectStore
from batcher.store.uploads import Uploads
from batcher.store.working import is_ledger, merged_view, restore_ledgers

Costs = dict[str, tuple[str, float | None]]  # task id -> (job, cost) of an ok row


async def earlier(store: ObjectStore, root: Path, own: Ledger, own_name: str,
                  listing: dict[str, int]) -> tuple[set[str], set[str], Costs]:
    """Done and failed over every ledger in the store (``own`` is this run's), and the costs
    of the ok tasks the other ledgers hold."""
    others = [name for name in listing if is_ledger(name) and name != own_name]
    view = merged_view(own, await restore_ledgers(store, root / "others", others), root)
    costs: Costs = {}
    try:
        done, failed = view.statuses(lambda path, size: listing.get(path) == size)
        if view is not own:  # the costs of tasks the other ledgers did
            costs = {task_id: (job, cost) for task_id, job, cost in view.ok_costs()}
    finally:
        if view is not own:
            view.close()
    return done, failed, costs


async def adopt(store: ObjectStore, root: Path, ledger: Ledger, listing: dict[str, int],
                manifest: Manifest, selection: Selection, done: set[str],
                failed: set[str]) -> int:
    """Adopt into ``ledger`` the tasks a run would send whose sidecar in the store says they
    finished with every file there; returns how many."""
    async def read(name: str) -> bytes | None:
        got = await store.get_bytes(name)
        return None if got is None else got[0]

    found = sidecars.wanted(manifest, selection, root, done, failed, listing.__contains__,
                            filter(sidecars.is_sidecar_name, listing))
    return await sidecars.adopt(ledger, found, read,
                                lambda path, size: listing.get(path) == size, done, failed)


async def upload_left_behind(uploads: Uploads, ledger: Ledger, listing: dict[str, int],
                             manifest: Manifest, selection: Selection, done: set[str],
                             failed: set[str]) -> int:
    """Tasks an earlier run on this machine paid for but did not upload (a signal cut its
    uploads short): their files and sidecar are in the working copy. Upload each whose
    files match its sidecar (size and sha256), files first, then record it."""
    root = uploads.root
    found = sidecars.wanted(manifest, selection, root, done, failed,
                            sidecars.local_exists(root), sidecars.folder_sidecars(root))
    records = [(name, record) for task_id, name in found
               if (record := sidecars.finished_here(root, name, task_id)) is not None]
    for name, record in records:
        for path in [*(file.path for file in record.files), name]:
            await uploads.put(path)
            listing[path] = (root / path).stat().st_size
        ledger.record(record)
        done.add(record.id)
        failed.discard(record.id)
    ledger.flush()
    return len(records)
