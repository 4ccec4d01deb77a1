"""``batcher merge``: join the outputs of shards (files and ledgers) into one output folder.

Files are hard-linked where the file system allows, else copied, each through a temporary name
and a rename. Where two inputs hold the same task, an ok record wins over a failed one.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

from batcher.errors import UsageError
from batcher.ledger import LEDGER_NAME, Ledger
from batcher.outputs import entries
from batcher.reports.summary import SUMMARY_NAME, write_listings, write_text_atomic
from batcher.storage import Layout, lock_folder, temporary_name

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


def _check_files(folder: Path, row: sqlite3.Row) -> None:
    for path, size, _sha in json.loads(row["files"]):
        file = Layout(folder).resolve(path)
        if not file.is_file() or file.stat().st_size != size:
            raise UsageError(f"{folder}: {path} is missing or changed; the shard's ledger "
                             f"names it for task {row['id']} (run that shard again)")


def merge_outputs(inputs: list[Path], output: Path) -> int:
    """Merge shard outputs into ``output``; returns the number of tasks it now holds."""
    chosen: dict[str, tuple[Path, sqlite3.Row]] = {}
    for folder in inputs:
        if not (folder / LEDGER_NAME).is_file():
            raise UsageError(f"{folder}: no {LEDGER_NAME} here; is it a batcher output folder?")
        ledger = Ledger(folder / LEDGER_NAME, readonly=True)
        with ledger:
            for row in ledger.raw_rows():
                earlier = chosen.get(row["id"])
                if earlier is None or row["status"] == "ok":
                    chosen[row["id"]] = (folder, row)
    for folder, row in chosen.values():
        _check_files(folder, row)  # before anything is placed: no half-merged output
    target_layout = Layout(output)
    with lock_folder(output), Ledger(output / LEDGER_NAME) as merged:
        rows = []
        for folder, row in chosen.values():
            source = Layout(folder)
            for path, _size, _sha in json.loads(row["files"]):
                _place(source.resolve(path), target_layout.resolve(path))
            columns = row.keys()  # a sqlite3.Row: "in row" would search its values
            derived = json.loads(row["derived"]) if "derived" in columns and \
                row["derived"] else None
            for entry in entries(derived):  # one missing is made again by the next run
                if source.resolve(entry["path"]).is_file():
                    _place(source.resolve(entry["path"]), target_layout.resolve(entry["path"]))
            sidecar = source.record_sidecar(SimpleNamespace(
                id=row["id"], job=row["job"], model=row["model"], prompt=row["prompt"],
                seed=row["seed"]), (path for path, _size, _sha in json.loads(row["files"])))
            if source.resolve(sidecar).is_file():
                _place(source.resolve(sidecar), target_layout.resolve(sidecar))
            rows.append(row)
        merged.write_rows(rows)
        write_listings(output, merged)
    _merge_summaries(inputs, output)
    return len(chosen)


def _merge_summaries(inputs: list[Path], output: Path) -> None:
    summaries = []
    for folder in inputs:
        try:
            summaries.append(json.loads((folder / SUMMARY_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
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
    write_text_atomic(output / SUMMARY_NAME, [json.dumps(merged, indent=2), "\n"])
