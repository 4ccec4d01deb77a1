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

from batcher.errors import UsageError
from batcher.ledger import LEDGER_NAME, Ledger
from batcher.report import SUMMARY_NAME, write_listings, write_text_atomic
from batcher.storage import TMP_PREFIX, Layout

_COUNTS = ("total", "ok", "failed", "pending", "skipped", "ran", "requests", "retries",
           "rate_limited")


def _place(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}merge-{os.getpid()}-{target.name}")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def merge_outputs(inputs: list[Path], output: Path) -> int:
    """Merge shard outputs into ``output``; returns the number of tasks it now holds."""
    chosen: dict[str, tuple[Path, sqlite3.Row]] = {}
    for folder in inputs:
        ledger = Ledger.open_existing(folder)
        if ledger is None:
            raise UsageError(f"{folder}: no {LEDGER_NAME} here; is it a batcher output folder?")
        with ledger:
            for row in ledger.raw_rows():
                earlier = chosen.get(row["id"])
                if earlier is None or row["status"] == "ok":
                    chosen[row["id"]] = (folder, row)
    output.mkdir(parents=True, exist_ok=True)
    target_layout = Layout(output)
    with Ledger(output / LEDGER_NAME) as merged:
        rows = []
        for folder, row in chosen.values():
            source = Layout(folder)
            for path, _size, _sha in json.loads(row["files"]):
                _place(source.resolve(path), target_layout.resolve(path))
                sidecar = source.resolve(path).with_suffix(".json")
                if sidecar.is_file() and not path.endswith(".txt"):
                    _place(sidecar, target_layout.resolve(Path(path).with_suffix(".json")))
            rows.append(row)
        merged.write_rows(rows)
        write_listings(output, merged)
    _merge_summaries(inputs, output)
    return len(chosen)


def _merge_summaries(inputs: list[Path], output: Path) -> None:
    summaries = []
    for folder in inputs:
        try:
            summaries.append(json.loads((folder / SUMMARY_NAME).read_text()))
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
