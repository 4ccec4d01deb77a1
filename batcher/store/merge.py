"""``batcher merge``: join the outputs of shards (files and ledgers) into one output folder.

Files are hard-linked where the file system allows, else copied, each through a temporary name
and a rename. Where two inputs (or an input and the output) hold the same task, an ok record
wins over a failed one (:meth:`Ledger.absorb`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from batcher.errors import UsageError
from batcher.outputs import entries
from batcher.records import Record
from batcher.store.atomic import temporary_name
from batcher.store.folderlock import lock_folder
from batcher.store.ledger import LEDGER_NAME, Ledger
from batcher.store.listings import read_summary, write_listings, write_summary
from batcher.store.names import Layout

_COUNTS = ("total", "ok", "failed", "pending", "skipped", "ran", "requests", "retries",
           "rate_limited")


def _place(source: Path, target: Path) -> None:
    """Put ``source`` at ``target``: a hard link where possible, else a copy; atomic."""
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _check_files(folder: Path, record: Record) -> None:
    for file in record.files:
        path = Layout(folder).resolve(file.path)
        if not path.is_file() or path.stat().st_size != file.size:
            raise UsageError(f"{folder}: {file.path} is missing or changed; the shard's ledger "
                             f"names it for task {record.id} (run that shard again)")


def merge_outputs(inputs: list[Path], output: Path) -> int:
    """Merge shard outputs into ``output``; returns the number of tasks the inputs hold.

    Rows meet as they meet everywhere (:meth:`Ledger.absorb`: ok wins, else the later), the
    output's own rows included: a shard whose task failed never replaces an ok one."""
    for folder in inputs:
        if not (folder / LEDGER_NAME).is_file():
            raise UsageError(f"{folder}: no {LEDGER_NAME} here; is it a batcher output folder?")
    with lock_folder(output):
        winners = _winners(inputs, output)
        chosen: list[tuple[Path, Record]] = []
        for folder in inputs:
            ids = [task_id for task_id, source in winners.items() if source == folder]
            with Ledger(folder / LEDGER_NAME, readonly=True) as ledger:
                chosen.extend((folder, record) for record in ledger.records_by_id(ids))
        for folder, record in chosen:
            _check_files(folder, record)  # before anything is placed: no half-merged output
        for folder, record in chosen:
            _place_task(folder, output, record)
        with Ledger(output / LEDGER_NAME) as merged:
            for folder in inputs:  # the same order as _winners: the same rows win
                merged.absorb(folder / LEDGER_NAME)
            write_listings(output, merged)
    _merge_summaries(inputs, output)
    return _count_tasks(inputs)


def _winners(inputs: list[Path], output: Path) -> dict[str, Path]:
    """Which input's row each task takes in the merged ledger (tasks whose row in ``output``
    stays are left out), decided on a scratch copy so that nothing is written before every
    file is checked."""
    scratch = temporary_name(output / LEDGER_NAME)
    try:
        existing = Ledger.open_existing(output)
        if existing is not None:
            with existing:
                existing.snapshot(scratch)
        winners: dict[str, Path] = {}
        with Ledger(scratch) as view:
            for folder in inputs:
                winners.update(dict.fromkeys(view.absorb(folder / LEDGER_NAME), folder))
        return winners
    finally:
        for suffix in ("", "-wal", "-shm"):
            scratch.with_name(scratch.name + suffix).unlink(missing_ok=True)


def _place_task(source_root: Path, output: Path, record: Record) -> None:
    """A task's files, its derived files (those present) and its sidecar, into ``output``."""
    source, target = Layout(source_root), Layout(output)
    for file in record.files:
        _place(source.resolve(file.path), target.resolve(file.path))
    for entry in entries(record.derived):  # one missing is made again by the next run
        if source.resolve(entry["path"]).is_file():
            _place(source.resolve(entry["path"]), target.resolve(entry["path"]))
    sidecar = source.record_sidecar(record, (file.path for file in record.files))
    if source.resolve(sidecar).is_file():
        _place(source.resolve(sidecar), target.resolve(sidecar))


def _count_tasks(inputs: list[Path]) -> int:
    ids: set[str] = set()
    for folder in inputs:
        with Ledger(folder / LEDGER_NAME, readonly=True) as ledger:
            ids.update(record.id for record in ledger.records())
    return len(ids)


def _merge_summaries(inputs: list[Path], output: Path) -> None:
    summaries = [summary for folder in inputs if (summary := read_summary(folder)) is not None]
    merged: dict[str, object] = {key: sum(int(s.get(key, 0)) for s in summaries) for key in _COUNTS}
    jobs: dict[str, dict[str, int]] = {}
    for summary in summaries:
        for name, counts in summary.get("jobs", {}).items():
            job = jobs.setdefault(name, dict.fromkeys(_COUNTS[:6], 0))
            for key in job:
                job[key] += int(counts.get(key, 0))
    merged["elapsed_s"] = max((float(s.get("elapsed_s", 0)) for s in summaries), default=0.0)
    merged["exit_code"] = max((int(s.get("exit_code", 0)) for s in summaries), default=0)
    merged["jobs"] = jobs
    merged["merged_from"] = [str(folder) for folder in inputs]
    write_summary(output, merged)
