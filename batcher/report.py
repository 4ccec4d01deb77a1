"""What a run leaves for people and tools: summary.json, results.jsonl and index.html.

All three are derived from the ledger (and, for the summary, the run's plan and counters), so
``batcher report`` and ``batcher merge`` can write them again at any time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from batcher.ledger import Ledger, Record
from batcher.plan import Plan
from batcher.progress import Counters
from batcher.sheet import render_index

SUMMARY_NAME = "summary.json"
RESULTS_NAME = "results.jsonl"
INDEX_NAME = "index.html"


def write_text_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Write text to a temporary name beside ``path``, flush, then rename."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with tmp.open("w", encoding="utf-8") as handle:
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
    os.replace(tmp, path)


def summarize(
    plan: Plan, counters: Counters, ran_by_job: dict[str, list[int]], *, elapsed: float
) -> dict[str, Any]:
    """The summary of the whole selection after a run: ok + failed + pending = total."""
    jobs: dict[str, Any] = {}
    for name, counts in plan.job_counts().items():
        ran, ran_ok, ran_failed, ran_failed_before = ran_by_job.get(name, [0, 0, 0, 0])
        ok = counts.done + ran_ok
        failed = counts.failed - ran_failed_before + ran_failed
        jobs[name] = {
            "total": counts.total, "ok": ok, "failed": failed,
            "pending": counts.total - ok - failed, "skipped": counts.done, "ran": ran,
        }
    totals = {key: sum(job[key] for job in jobs.values())
              for key in ("total", "ok", "failed", "pending", "skipped", "ran")}
    return {
        **totals,
        "requests": counters.requests, "retries": counters.retries,
        "rate_limited": counters.rate_limited, "elapsed_s": round(elapsed, 3),
        "exit_code": None, "jobs": jobs,
    }


def write_reports(root: Path, ledger: Ledger, summary: dict[str, Any]) -> None:
    """Write summary.json, and results.jsonl and index.html unless the ledger is unchanged
    since they were written (a re-run of a finished run reads no rows)."""
    write_text_atomic(root / SUMMARY_NAME, [json.dumps(summary, indent=2), "\n"])
    if summary["ran"] or not (root / RESULTS_NAME).exists() or not (root / INDEX_NAME).exists():
        write_listings(root, ledger)


def write_listings(root: Path, ledger: Ledger) -> None:
    """results.jsonl and index.html from the ledger alone."""
    write_text_atomic(root / RESULTS_NAME, _result_lines(ledger.records()))
    write_text_atomic(root / INDEX_NAME, render_index(root, ledger))


def result_line(record: Record) -> dict[str, Any]:
    """One task in the OpenAI Batch output shape, base64 stripped, saved files added."""
    if record.status == "ok":
        body = dict(record.response or {})
        body["files"] = [
            {"path": f.path, "size": f.size, "sha256": f.sha256} for f in record.files
        ]
        response: dict[str, Any] | None = {"status_code": 200, "request_id": None, "body": body}
        error = None
    else:
        response = None
        if record.http_status:
            response = {
                "status_code": record.http_status, "request_id": None,
                "body": {"error": {"message": record.error, "code": record.error_code}},
            }
        error = {"code": record.error_code or record.reason, "message": record.error}
    return {"id": f"batcher-{record.id[:16]}", "custom_id": record.id, "response": response,
            "error": error}


def _result_lines(records: Iterator[Record]) -> Iterator[str]:
    for record in records:
        yield json.dumps(result_line(record), ensure_ascii=False, separators=(",", ":")) + "\n"
