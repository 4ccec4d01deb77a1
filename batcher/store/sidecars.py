"""Sidecars: each finished task's record beside its files, and adopting tasks from them.

A sidecar (``<stem>.json``, images and completions alike) carries what the task's ledger row
carries; it is written (and, in a store, uploaded) after every file of the task. So when a
ledger is lost or was never published (a kill -9 before the first publish, a deleted
``ledger.sqlite``), the sidecars say what finished: a task whose sidecar is there, is ok and
names files present at their sizes is adopted into a ledger instead of being paid for again.

One codec and one adoption for folders and stores, for ``run`` and for the readers (``status``,
``plan``, ``report``): a run adopts the sidecars of the tasks it would send; a reader, with no
manifest to go by, every sidecar no ok row of its ledger accounts for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from batcher import fastjson
from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.records import Record
from batcher.store.atomic import FileWriter, atomic_open
from batcher.store.ledger import FilePresent, Ledger
from batcher.store.names import Layout

log = logging.getLogger(__name__)

READS = 16  # sidecars read at once
ReadSidecar = Callable[[str], Awaitable[bytes | None]]  # a name's bytes, None when missing


def encode(record: Record, request: Mapping[str, Any] | None) -> bytes:
    """A task's sidecar: everything its ledger row says, and the request as sent (input images
    named by sha256)."""
    return fastjson.dumps_bytes({**record.as_dict(), "request": request})


async def write(files: FileWriter, layout: Layout, record: Record,
                request: Mapping[str, Any]) -> str:
    """Write a finished task's first ``<stem>.json`` through the run's file writer: everything
    its ledger row says, and the request as sent (input images by sha256). A run on another
    machine adopts the task from it instead of paying for it again. Returns its name."""
    name = layout.sidecar_name(record)
    await files.write(layout.path(name), encode(record, request))
    return name


def rewrite(root: Path, record: Record) -> str:
    """The task's sidecar under ``root`` with its record updated (its request kept); returns
    its name."""
    name = Layout(root).record_sidecar(record, (f.path for f in record.files))
    path = root / name
    data: Any = {}
    with contextlib.suppress(OSError, ValueError):  # missing or unreadable: the record alone
        data = fastjson.loads(path.read_bytes())
    request = data.get("request") if isinstance(data, dict) else None
    with atomic_open(path) as handle:
        handle.write(encode(record, request))
    return name


def decode(data: bytes) -> Record:
    """The record a sidecar carries; raises ``ValueError`` when it is not a sidecar."""
    return Record.from_dict(fastjson.loads(data))


def finished(data: bytes, present: FilePresent, task_id: str | None = None) -> Record | None:
    """The record of a sidecar that says its task finished ok with every file present (and,
    when given, is ``task_id``'s); else None."""
    try:
        record = decode(data)
    except ValueError:
        return None
    if task_id is not None and record.id != task_id:
        return None  # another task's: names carry only a part of the id
    if record.status != "ok" or not all(present(f.path, f.size) for f in record.files):
        return None  # its files did not all arrive, or one went away since
    return record


def finished_here(root: Path, name: str, task_id: str | None) -> Record | None:
    """The record of the sidecar ``name`` under ``root`` when it says its task finished ok
    and every file it names is under ``root`` with its size and sha256; else None."""
    try:
        data = (root / name).read_bytes()
    except OSError:
        return None

    def intact(path: str, size: int) -> bool:
        file = root / path
        return file.is_file() and file.stat().st_size == size
    record = finished(data, intact, task_id)
    if record is None or not all(_sha256(root / f.path) == f.sha256 for f in record.files):
        return None
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_sidecar_name(name: str) -> bool:
    """Whether a name could be a task's sidecar: ``<job>/<model>/<stem>.json``."""
    return name.endswith(".json") and name.count("/") == 2


def wanted(manifest: Manifest, selection: Selection, root: Path, done: set[str],
           failed: set[str], exists: Callable[[str], bool],
           held: Iterable[str]) -> list[tuple[str | None, str]]:
    """(task id, sidecar name) of the tasks a run would send whose sidecar exists (under
    today's name, or an older batcher's 8-character one). ``held``: the sidecar names the
    output holds, read lazily; an output that holds none (a first run) costs no walk of the
    manifest's tasks."""
    if next(iter(held), None) is None:
        return []
    layout = Layout(root)
    found: dict[str, str] = {}  # task id -> its sidecar, the current name before the older one
    for task, sends in selection.walk(manifest, done, failed):
        if not sends:
            continue
        for name in (layout.sidecar_name(task), layout.legacy_sidecar_name(task)):
            if exists(name):
                found.setdefault(task.id, name)
    return list(found.items())


def unaccounted(ledger: Ledger, names: Iterable[str],
                done: set[str]) -> list[tuple[str | None, str]]:
    """The sidecars among ``names`` that no done row of ``ledger`` accounts for (a reader's
    candidates: it has no manifest to go by)."""
    layout = Layout(Path("."))
    left = {name for name in names if is_sidecar_name(name)}
    for record in ledger.records() if left else ():
        if record.id in done:
            left.discard(layout.record_sidecar(record, (file.path for file in record.files)))
    return [(None, name) for name in sorted(left)]


async def adopt(ledger: Ledger, found: list[tuple[str | None, str]], read: ReadSidecar,
                present: FilePresent, done: set[str], failed: set[str]) -> int:
    """Read the sidecars ``found``, a few at a time, and record each finished task's record in
    ``ledger`` (``done`` and ``failed`` follow); returns how many were adopted."""
    gate = asyncio.Semaphore(READS)

    async def one(task_id: str | None, name: str) -> bool:
        async with gate:
            data = await read(name)
        record = None if data is None else finished(data, present, task_id)
        if record is None:
            if data is not None and task_id is not None and not _decodes(data):
                log.warning("%s is not a task sidecar; the task runs again", name)
            return False
        if task_id is None and record.id in done:
            return False  # two sidecars of one task (should not happen): the first wins
        ledger.record(record)
        done.add(record.id)
        failed.discard(record.id)
        return True
    adopted = sum(await asyncio.gather(*(one(*item) for item in found)))
    ledger.flush()
    return adopted


def _decodes(data: bytes) -> bool:
    try:
        decode(data)
    except ValueError:
        return False
    return True


def local_exists(root: Path) -> Callable[[str], bool]:
    """Whether a name is a file in the folder ``root``, each ``<job>/<model>/`` folder listed
    once: a run's start asks this of every task it would send, and a listing costs far less
    than a stat per task (a folder that does not exist costs one failed listing)."""
    listed: dict[str, frozenset[str]] = {}

    def exists(name: str) -> bool:
        folder, _, base = name.rpartition("/")
        if folder not in listed:
            try:
                with os.scandir(root / folder) as entries:
                    listed[folder] = frozenset(e.name for e in entries if e.is_file())
            except OSError:
                listed[folder] = frozenset()
        return base in listed[folder]
    return exists


def local_reader(root: Path) -> ReadSidecar:
    """Reads sidecars from a folder."""
    async def read(name: str) -> bytes | None:
        try:
            return (root / name).read_bytes()
        except OSError:
            return None
    return read


def folder_sidecars(root: Path) -> Iterator[str]:
    """The names of the sidecars in a folder (``<job>/<model>/<stem>.json``)."""
    for path in root.glob("*/*/*.json"):
        yield path.relative_to(root).as_posix()
