"""The files an output keeps for people and tools, written here and only here: summary.json
(one writer, one format), results.jsonl and index.html. :mod:`batcher.reports` renders them;
this module puts them in the output folder (or a store's working copy) atomically."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from batcher.manifest.tasks import Task
from batcher.reports.sheet import ContactSheet, Mark
from batcher.reports.summary import result_lines, summary_for_manifest
from batcher.store.atomic import atomic_open
from batcher.store.ledger import Ledger
from batcher.store.names import INDEX_NAME, RESULTS_NAME, SUMMARY_NAME

LISTINGS = (RESULTS_NAME, INDEX_NAME)


def _write_text(path: Path, chunks: Iterable[str]) -> None:
    """Write text in pieces to a temporary name beside ``path``, flush, then rename."""
    with atomic_open(path, "w") as handle:
        for chunk in chunks:
            handle.write(chunk)


def summary_bytes(summary: Mapping[str, Any]) -> bytes:
    """summary.json as every writer writes it: indented, a newline at the end."""
    return json.dumps(summary, indent=2).encode() + b"\n"


def parse_summary(data: bytes | None) -> dict[str, Any] | None:
    """A summary.json's contents, when ``data`` is a readable one."""
    if data is None:
        return None
    try:
        summary = json.loads(data)
    except (ValueError, TypeError):
        return None
    return summary if isinstance(summary, dict) else None


def write_summary(root: Path, summary: Mapping[str, Any]) -> bytes:
    """Write ``root``'s summary.json; returns its bytes (a store uploads the same)."""
    data = summary_bytes(summary)
    with atomic_open(root / SUMMARY_NAME) as handle:
        handle.write(data)
    return data


def read_summary(root: Path) -> dict[str, Any] | None:
    """The summary.json of an output folder, if it has a readable one."""
    try:
        return parse_summary((root / SUMMARY_NAME).read_bytes())
    except OSError:
        return None


def fresh_summary(data: bytes | None, tasks: Callable[[], Iterable[Task]],
                  ledger: Ledger) -> bytes | None:
    """A summary.json brought in line with the manifest after a prune (see
    :func:`batcher.reports.summary.summary_for_manifest`); None when there is none."""
    summary = parse_summary(data)
    return None if summary is None else summary_bytes(summary_for_manifest(summary, tasks, ledger))


def write_listings(root: Path, ledger: Ledger, title: str | None = None,
                   marks: Mapping[str, Mark] | None = None) -> None:
    """results.jsonl and index.html from the ledger alone, in one read of it; ``marks``: the
    asset set's names and decisions by task id (batcher.publish), for the sheet."""
    sheet = ContactSheet(marks)
    records = (sheet.add(record) for record in ledger.records())
    with atomic_open(root / RESULTS_NAME) as handle:  # bytes as encoded: no copy per line
        for chunk in result_lines(records):
            handle.write(chunk)
    _write_text(root / INDEX_NAME, sheet.render(root, title))


def write_reports(
    root: Path, ledger: Ledger, summary: dict[str, Any], *, rewrite: bool = False
) -> None:
    """Write summary.json, and results.jsonl and index.html when ``rewrite`` or a task ran, or
    a record is newer than them (a re-run of a finished run then reads no rows)."""
    write_summary(root, summary)
    if rewrite or summary["ran"] or _listings_stale(root, ledger):
        write_listings(root, ledger)


def _listings_stale(root: Path, ledger: Ledger) -> bool:
    """Whether a record is newer than the listings (say, a run killed before writing them)."""
    try:
        written = min((root / name).stat().st_mtime for name in LISTINGS)
    except OSError:
        return True
    return ledger.last_finished() >= written


def rewrite_summary(root: Path, ledger: Ledger, tasks: Callable[[], Iterable[Task]]) -> None:
    """:func:`fresh_summary` over the folder's summary.json, where it has one."""
    try:
        data: bytes | None = (root / SUMMARY_NAME).read_bytes()
    except OSError:
        data = None
    fresh = fresh_summary(data, tasks, ledger)
    if fresh is not None:
        with atomic_open(root / SUMMARY_NAME) as handle:
            handle.write(fresh)
