"""``status --verify``: every ok task's files hashed again where they are kept (a folder's files
read, a store's objects streamed) and compared with the sha256 the ledger recorded."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

from batcher.outputs import derived_files
from batcher.records import FileRecord, Record
from batcher.store.ledger import Ledger

Problems = dict[str, list[dict[str, str]]]  # task id -> its files missing or changed
Chunks = Callable[[str], AsyncIterator[bytes]]  # a kept file's bytes; FileNotFoundError: none


def problem(record: Record, file: FileRecord, actual: str | None) -> list[dict[str, str]]:
    """What ``--verify`` says of a file whose sha256 is ``actual`` (``None``: missing)."""
    if actual is None:
        return [{"id": record.id, "path": file.path, "problem": "missing"}]
    if actual != file.sha256:
        return [{"id": record.id, "path": file.path, "problem": "changed"}]
    return []


async def verify(ledger: Ledger, chunks: Chunks) -> Problems:
    """The problems of every ok task's files (and derived files), by task."""
    found: Problems = {}
    for record in ledger.records():
        for file in [*record.files, *derived_files(record)] if record.status == "ok" else ():
            found.setdefault(record.id, []).extend(
                problem(record, file, await _digest(chunks, file.path)))
    return found


async def _digest(chunks: Chunks, path: str) -> str | None:
    hasher = hashlib.sha256()
    try:
        async for chunk in chunks(path):
            hasher.update(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest()
