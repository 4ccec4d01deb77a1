"""What a run leaves for people and tools, rendered: summary.json's contents and the lines of
results.jsonl (index.html is :mod:`batcher.reports.sheet`'s).

All are derived from the ledger (and, for the summary, the run's plan and counters), so
``batcher report`` and ``batcher merge`` can write them again at any time; the store writes
them (:mod:`batcher.store.listings`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from batcher import fastjson
from batcher.manifest.tasks import Task
from batcher.outputs import entries
from batcher.plan import Plan
from batcher.providers.prices import Cost
from batcher.records import Record, RecordSource
from batcher.reports.progress import Counters


@dataclass(slots=True)
class JobTally:
    """What one run did to one job's tasks."""

    ran: int = 0
    ok: int = 0
    failed: int = 0
    failed_before: int = 0  # of those that ran, how many had failed in an earlier run
    cost: Cost = field(default_factory=Cost)  # what this run's requests cost, one per attempt


def summarize(
    plan: Plan, counters: Counters, tally: dict[str, JobTally], *, elapsed: float,
    budget: float | None = None, spent_by_job: dict[str, Cost] | None = None,
) -> dict[str, Any]:
    """The summary of the whole selection after a run: ok + failed + pending = total.

    Spend: ``cost_usd`` is what this run's requests cost (retries, re-generations and the
    attempts of tasks left pending included), ``cost_unknown_requests`` how many of them had
    no known cost, ``cost_total_usd`` what every ok task cost when it ran, ``cost_unknown`` how
    many ok tasks have no known cost; a cost that is wholly unknown is null, never 0. Per job,
    and over all jobs.
    """
    jobs: dict[str, Any] = {}
    run_cost, total_cost = Cost(), Cost()
    for name, counts in plan.job_counts().items():
        run = tally.get(name, JobTally())
        ok = counts.done + run.ok
        failed = counts.failed - run.failed_before + run.failed
        spent = (spent_by_job or {}).get(name, Cost())
        run_cost.merge(run.cost)
        total_cost.merge(spent)
        jobs[name] = {
            "total": counts.total, "ok": ok, "failed": failed,
            "pending": counts.total - ok - failed, "skipped": counts.done, "ran": run.ran,
            **_costs(run.cost, spent),
        }
    totals = {key: sum(job[key] for job in jobs.values())
              for key in ("total", "ok", "failed", "pending", "skipped", "ran")}
    return {
        **totals, **_costs(run_cost, total_cost),
        "budget_usd": budget,
        "requests": counters.requests, "retries": counters.retries,
        "rate_limited": counters.rate_limited, "elapsed_s": round(elapsed, 3),
        "exit_code": None, "jobs": jobs, "models": _models_in_order(plan),
    }


def ok_costs_by_job(
    tasks: Iterable[Task], ok_costs: Iterable[tuple[str, str, float | None]], jobs: Iterable[str]
) -> dict[str, Cost]:
    """What each job's ok tasks cost when they ran: only the ledger rows (``ok_costs``: id,
    job, cost) of ``tasks`` (the manifest's, streamed) count, not rows of tasks it no longer
    has. Holds one entry per ok row, as the run's set of done tasks does."""
    costs = {task_id: cost for task_id, _job, cost in ok_costs}
    spent: dict[str, Cost] = {job: Cost() for job in jobs}
    for task in tasks:
        if task.id in costs and task.job in spent:
            spent[task.job].add(costs.pop(task.id))
    return spent


def _models_in_order(plan: Plan) -> list[dict[str, Any]]:
    """Each job and model with its task count, in the manifest's order: ``status`` of the
    output lists its rows in this order, not in the order tasks happened to finish."""
    return [{"job": job, "model": model, "total": counts.total}
            for (job, model), counts in plan.by_model.items()]


def summary_for_manifest(
    summary: dict[str, Any], tasks: Callable[[], Iterable[Task]], ledger: RecordSource
) -> dict[str, Any]:
    """A summary brought in line with the manifest after a prune: jobs it no longer has are
    dropped, and each remaining job's total, ok, failed, pending and ``cost_total_usd`` come
    from the manifest's tasks (``tasks`` lists them, twice) and the ledger, so ``status
    OUTPUT`` reports no pending task that no longer exists. What the run spent stays."""
    counts: dict[str, Counter[str]] = {}
    by_model: Counter[tuple[str, str]] = Counter()  # in the manifest's order
    job_of: dict[str, str] = {}
    for task in tasks():
        counts.setdefault(task.job, Counter())["total"] += 1
        by_model[(task.job, task.model)] += 1
        job_of[task.id] = task.job
    for record in ledger.records():
        job = job_of.get(record.id)
        if job is not None and record.status in ("ok", "failed"):
            counts[job][record.status] += 1
    costs = ok_costs_by_job(tasks(), ledger.ok_costs(), counts)
    old_jobs = summary.get("jobs")
    jobs: dict[str, Any] = {}
    for name, old in (old_jobs.items() if isinstance(old_jobs, dict) else ()):
        if name not in counts:
            continue  # a job the manifest no longer has: its pending tasks do not exist
        count, cost = counts[name], costs[name]
        jobs[name] = {**(old if isinstance(old, dict) else {}), "total": count["total"],
                      "ok": count["ok"], "failed": count["failed"],
                      "pending": count["total"] - count["ok"] - count["failed"],
                      "cost_total_usd": cost.value, "cost_unknown": cost.unknown}
    total = Cost()
    for name in jobs:
        total.merge(costs[name])
    sums = {key: sum(job[key] for job in jobs.values())
            for key in ("total", "ok", "failed", "pending")}
    models = [{"job": job, "model": model, "total": count}
              for (job, model), count in by_model.items() if job in jobs]
    return {**summary, **sums, "cost_total_usd": total.value, "cost_unknown": total.unknown,
            "jobs": jobs, "models": models}


def _costs(run: Cost, total: Cost) -> dict[str, Any]:
    return {"cost_usd": run.value, "cost_unknown_requests": run.unknown,
            "cost_total_usd": total.value, "cost_unknown": total.unknown}


def result_line(record: Record) -> dict[str, Any]:
    """One task in the OpenAI Batch output shape, base64 stripped, plus batcher's metadata.

    ``response`` is set whenever the provider answered, whatever the status (its body as sent,
    or for an error whose body was not kept, ``{"error": {message, code}}``), and ``error`` is
    null; ``error`` is set only when no usable answer came (connection, timeout, a malformed
    body, a failed download).
    """
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if record.status == "ok":
        response = _response(200, record, record.response or {})
    elif record.http_status:
        body = record.response or {
            "error": {"message": record.error, "code": record.error_code}}
        response = _response(record.http_status, record, body)
    else:
        error = {"code": record.error_code or record.reason, "message": record.error}
    return {"id": f"batcher-{record.id[:16]}", "custom_id": record.id, "response": response,
            "error": error, "metadata": _metadata(record)}


def _response(status: int, record: Record, body: Any) -> dict[str, Any]:
    return {"status_code": status, "request_id": record.request_id, "body": body}


def _metadata(record: Record) -> dict[str, Any]:
    """What the task was, so a line can be read without the manifest."""
    return {
        "job": record.job, "model": record.model, "seed": record.seed, "prompt": record.prompt,
        "vars": dict(record.vars), "cost_usd": record.cost_usd,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in record.files],
        **({"derived": derived} if (derived := entries(record.derived)) else {}),
    }


def result_lines(records: Iterator[Record]) -> Iterator[bytes]:
    """Each record's line, and its newline apart: a line as large as an answer near
    ``max_response_bytes`` is held once, not copied to join them."""
    for record in records:
        yield fastjson.dumps_bytes(result_line(record))
        yield b"\n"
