"""A run's output read for an asset set (publish, review, keep, status): its ok ledger rows
whose files are there, and the bytes of those files, from a folder or a store alike.
No lock is taken: reading is safe while a run writes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from batcher.errors import UsageError
from batcher.location import StoreURL
from batcher.outputs import derived_files
from batcher.records import Record
from batcher.store.ledger import FilePresent, Ledger, on_disk

if TYPE_CHECKING:
    from batcher.store.objects import ObjectStore


class RunFiles:
    """The ok records of an output by task id, and a way to read their files."""

    def __init__(self, location: str, records: dict[str, Record],
                 seen: set[str] | None = None) -> None:
        self.location = location
        self.records = records
        self.seen = seen if seen is not None else set(records)  # ids with any row

    def ok_record(self, task_id: str) -> Record | None:
        return self.records.get(task_id)

    async def read(self, path: str) -> bytes | None:
        raise NotImplementedError


class FolderFiles(RunFiles):
    def __init__(self, root: Path, records: dict[str, Record], seen: set[str]) -> None:
        super().__init__(str(root), records, seen)
        self.root = root

    async def read(self, path: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self.root / path).read_bytes)
        except OSError:
            return None


class StoreFiles(RunFiles):
    def __init__(self, store: ObjectStore, url: StoreURL, records: dict[str, Record],
                 seen: set[str]) -> None:
        super().__init__(str(url), records, seen)
        self.store = store
        self.url = url

    async def read(self, path: str) -> bytes | None:
        got = await self.store.get_bytes(path)
        return None if got is None else got[0]


def ok_records(ledger: Ledger, present: FilePresent) -> tuple[dict[str, Record], set[str]]:
    """Ok rows whose delivered and derived files are all there, by task id; and every id
    the ledger has a row for."""
    records: dict[str, Record] = {}
    seen: set[str] = set()
    for record in ledger.records():
        seen.add(record.id)
        files = [*record.files, *derived_files(record)]
        if record.status == "ok" and record.files and all(present(f.path, f.size)
                                                          for f in files):
            records[record.id] = record
    return records, seen


def seen_ids(files: RunFiles) -> set[str]:
    return files.seen


@contextlib.asynccontextmanager
async def open_run_files(target: Path | StoreURL, *,
                         required: bool = True) -> AsyncIterator[RunFiles]:
    """The output of a run; with ``required`` false an output nothing ran into reads empty."""
    if isinstance(target, StoreURL):
        from batcher.store.bucket import open_bucket_view

        async with open_bucket_view(target, required=required) as view:
            records, seen = ok_records(view.ledger, view.present)
            yield StoreFiles(view.store, target, records, seen)
        return
    found = Ledger.open_existing(target)
    if found is None:
        if required:
            raise UsageError(f"{target}: no ledger here (run the manifest first)")
        yield FolderFiles(target, {}, set())
        return
    with found:
        yield FolderFiles(target, *ok_records(found, on_disk(target)))
