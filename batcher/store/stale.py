"""What ``batcher prune`` removes: the ledger rows of tasks the manifest no longer has, and
the names (files, derived files, sidecars) only they use; and the prunes it refuses as likely
mistakes. The removing itself, in the order that survives a crash, is :mod:`batcher.store.prune`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from batcher.errors import UsageError
from batcher.manifest import Manifest
from batcher.outputs import derived_files
from batcher.plan import Selection
from batcher.records import Record
from batcher.store.ledger import Ledger
from batcher.store.names import Layout


@dataclass(frozen=True, slots=True)
class StaleTask:
    """A ledger row the manifest no longer has, and the names of its files and sidecar."""

    id: str
    job: str
    model: str
    prompt: str
    seed: int | None
    status: str
    names: tuple[str, ...]
    provider: str = ""  # the provider the row was made with


@dataclass(slots=True)
class PruneSet:
    """What a prune removes: rows, and names (relative to the output) no kept row uses."""

    location: str
    tasks: list[StaleTask] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    kept: int = 0  # rows that stay
    leftover: int = 0  # names an earlier, interrupted prune did not get to remove


def manifest_ids(manifest: Manifest) -> set[str]:
    """Every task id of the whole manifest."""
    return {task.id for task in Selection().tasks(manifest)}


def task_names(record: Record) -> tuple[str, ...]:
    """A row's files, its derived files and its sidecar (which failed tasks do not have;
    removing none is fine). An edit's input thumbnails are shared by every task of the same
    input: they go only with the last row that names them."""
    sidecar = Layout(Path(".")).record_sidecar(record, (f.path for f in record.files))
    return (*(f.path for f in record.files), *(f.path for f in derived_files(record)), sidecar)


def find_stale(
    ledgers: Iterable[Ledger], ids: set[str], manifest: Manifest, location: str,
    present: Callable[[str], bool], leftover: Iterable[str] = (), *, force: bool = False,
) -> PruneSet:
    """The rows of ``ledgers`` whose ids are not in ``ids``, with the names only they use
    that are ``present`` (a failed task has no sidecar, a file may have gone by hand).

    Unless ``force``, refuses (``UsageError``) a prune that looks like a mistake rather than
    an edit (see :func:`refuse_mistakes`): nothing is removed then.
    """
    found = PruneSet(location)
    kept_ids: set[str] = set()
    kept_names: set[str] = set()
    kept_jobs: set[str] = set()
    stale: dict[str, StaleTask] = {}  # a task may have a row in several ledgers (shards)
    for ledger in ledgers:
        for record in ledger.records():
            if record.id in ids:
                kept_ids.add(record.id)
                kept_jobs.add(record.job)
                kept_names.update(task_names(record))
            elif record.id in stale:
                task = stale[record.id]
                names = tuple(dict.fromkeys(task.names + task_names(record)))
                stale[record.id] = StaleTask(task.id, task.job, task.model, task.prompt,
                                             task.seed, task.status, names, task.provider)
            else:
                stale[record.id] = StaleTask(record.id, record.job, record.model, record.prompt,
                                             record.seed, record.status, task_names(record),
                                             record.provider)
    found.kept, found.tasks = len(kept_ids), list(stale.values())
    if not force:
        refuse_mistakes(found.tasks, kept_jobs, manifest, location)
    wanted = {name for task in found.tasks for name in task.names}
    leftover_names = set(leftover) - wanted
    # A ledger can arrive from elsewhere (a store, a merge): a name that leads out of the
    # output is never removed, whatever a row says.
    found.names = {name for name in (wanted | leftover_names) - kept_names
                   if _safe(name) and present(name)}
    found.leftover = len(leftover_names & found.names)
    return found


def refuse_mistakes(stale: list[StaleTask], kept_jobs: set[str], manifest: Manifest,
                    location: str) -> None:
    """Raise ``UsageError`` (exit 2) for a prune that would remove paid results the manifest
    most likely still wants: no row of the output belongs to a job of the manifest (the wrong
    manifest or output), or every task of a job the manifest still has would go, or ok rows
    of a job were made with another provider than the manifest's job uses. Each of these is
    what a flag left off looks like (``--provider`` for a JSONL file: the provider is part of
    every id-less task's id), or changed params or vars; ``--force`` prunes anyway."""
    if not stale:
        return
    providers = {job.name: job.provider for job in manifest.jobs}
    if not {task.job for task in stale} & providers.keys() and not kept_jobs & providers.keys():
        raise UsageError(
            f"{location}: none of its {len(stale)} tasks belongs to a job of "
            f"{manifest.path} (jobs: {', '.join(sorted(providers))}); is this the manifest of "
            "that output? Nothing was removed (--force removes them anyway)")
    paid: dict[str, int] = {}  # job -> its ok rows that would go
    made_with: dict[str, set[str]] = {}  # job -> other providers its ok rows were made with
    for task in stale:
        if task.job not in providers or task.status != "ok":
            continue  # a job the manifest dropped goes whole: that is what prune is for
        paid[task.job] = paid.get(task.job, 0) + 1
        if task.provider and task.provider != providers[task.job]:
            made_with.setdefault(task.job, set()).add(task.provider)
    emptied = sorted(job for job in paid if job not in kept_jobs)
    moved = sorted(made_with)
    if not emptied and not moved:
        return
    job = (emptied or moved)[0]
    what = (f"every task of job {job} ({paid[job]} ok)" if job in emptied else
            f"{paid[job]} ok tasks of job {job}")
    cause = "a different provider, params or vars"
    if job in made_with:
        other = sorted(made_with[job])[0]
        flag = f" (--provider {other})" if manifest.path.suffix.lower() in {
            ".jsonl", ".ndjson"} else ""
        cause = (f"a different provider: they were made with {other}, the manifest's job "
                 f"uses {providers[job]}{flag}; or different params or vars")
    raise UsageError(
        f"{location}: prune would remove {what}, which the manifest still has; their ids "
        f"changed, most likely because of {cause}. Nothing was removed; run with the options "
        "the output was made with, or pass --force to prune anyway")


def read_journal(data: bytes | None) -> list[str]:
    """The names a journal lists (none when there is no journal or it is unreadable)."""
    if not data:
        return []
    with contextlib.suppress(ValueError):
        names = json.loads(data)
        if isinstance(names, list):
            return [name for name in names if isinstance(name, str) and _safe(name)]
    return []


def journal_bytes(names: Iterable[str]) -> bytes:
    return json.dumps(sorted(names), indent=0).encode()


def _safe(name: str) -> bool:
    """A name a ledger could hold: relative, no way out of the output."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts
