"""Keep the derived files of tasks already done in line with the manifest's ``outputs``.

``outputs`` is not part of a task's id: a run whose manifest changed them (a format, a size
added or removed), or that finds a derived file missing, makes them again from the kept
delivered image, with no request, and removes the derived files no longer wanted. The check
is one pass over the ledger's ok rows (and a stat of each derived file); only when it finds
something to do does it walk the manifest, in batches, for the tasks to redo.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from batcher.manifest import Manifest
from batcher.manifest.tasks import Task
from batcher.outputs import derived_files, entries
from batcher.plan import Selection
from batcher.records import Record
from batcher.store import sidecars
from batcher.store.derive import Deriver
from batcher.store.names import Layout
from batcher.store.output import Output

log = logging.getLogger(__name__)

BATCH = 256  # tasks redone at a time (their records are read together)


def stale_ids(output: Output, deriver: Deriver, done: set[str]) -> set[str]:
    """The done tasks whose derived files are not what their job now wants, or not all there."""
    stale = set()
    for task_id, job, derived in output.ledger.derived_states():
        if task_id not in done or job not in deriver.specs:
            continue  # a failed task, or a job the manifest no longer has (prune's business)
        have = derived.get("spec") if isinstance(derived, dict) else None
        if have != deriver.spec(job) or not all(_present(output, e) for e in entries(derived)):
            stale.add(task_id)
    return stale


def _present(output: Output, entry: dict[str, Any]) -> bool:
    try:
        return output.present(str(entry["path"]), int(entry["size"]))
    except (KeyError, TypeError, ValueError):  # an entry batcher did not write: make it again
        return False


async def refresh_derived(
    manifest: Manifest, selection: Selection, output: Output, deriver: Deriver,
    done: set[str], failed: Callable[[BaseException], None],
) -> int:
    """Re-derive every stale done task of the selection; returns how many were redone."""
    stale = stale_ids(output, deriver, done)
    if not stale:
        return 0
    redone = 0
    batch: list[Task] = []
    for task in selection.tasks(manifest):
        if task.id in stale:
            batch.append(task)
            if len(batch) >= BATCH:
                redone += await _redo(batch, output, deriver, failed)
                batch = []
    if batch:
        redone += await _redo(batch, output, deriver, failed)
    return redone


async def _redo(tasks: list[Task], output: Output, deriver: Deriver,
                failed: Callable[[BaseException], None]) -> int:
    by_id = {task.id: task for task in tasks}
    records = output.ledger.records_by_id(list(by_id))
    gate = asyncio.Semaphore(os.cpu_count() or 2)  # fetches from a store, too, a few at once

    async def redo(record: Record) -> bool:
        async with gate:
            for file in record.files:
                if not await output.fetch(file.path):
                    return False  # the delivered file is gone: the task runs again next time
            await replace_derived(output, deriver, by_id[record.id], record, failed)
            return True

    done = await asyncio.gather(*(redo(record) for record in records))
    return sum(done)


async def replace_derived(output: Output, deriver: Deriver, task: Task, record: Record,
                          failed: Callable[[BaseException], None]) -> None:
    """Make a kept task's derived files now, remove those of its old ``derived`` no longer
    wanted, and keep the record again (ledger, sidecar, store) with the new ones. The task
    itself is already kept: a kill in here loses derived files, which the next run makes
    again, never a paid image."""
    old = entries(record.derived)
    # A new record: the one passed in may still be on its way to the store and the ledger.
    record = replace(record, derived=await deriver.derive(task, record))
    keep = {str(e["path"]) for e in entries(record.derived)} | {f.path for f in record.files}
    layout = Layout(output.root)
    for entry in old:
        path = str(entry.get("path"))
        if path in keep or entry.get("role") == "input":
            continue
        try:
            layout.resolve(path)  # a ledger row never names a file outside the output
        except ValueError:
            log.warning("task %s: not removing %s: outside the output", record.id, path)
            continue
        await output.remove(path)
    sidecar = await asyncio.to_thread(sidecars.rewrite, output.root, record)
    # The ledger adds attempts up, and nothing was sent for this; the sidecar keeps the count.
    await output.keep(replace(record, attempts=0), sidecar, output.ledger.record, failed,
                      files=derived_files(record))
