"""``batcher status``: what the ledger says, per job and model, with failures by reason.

Rendering only: the store hands over the ledger, the summary, the verify's problems and
whether a run is writing the output (:mod:`batcher.store.view`)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batcher.manifest import Manifest
from batcher.plan import Selection
from batcher.providers.prices import Cost, cost_text
from batcher.records import Record, RecordSource


def _totals(manifest: Manifest | None) -> tuple[dict[tuple[str, str], int] | None,
                                                           set[str] | None]:
    """Task counts per (job, model) and the manifest's ids, when a manifest is given."""
    if manifest is None:
        return None, None
    totals: Counter[tuple[str, str]] = Counter()
    ids: set[str] = set()
    for task in Selection().tasks(manifest):
        totals[(task.job, task.model)] += 1
        ids.add(task.id)
    return dict(totals), ids


def ledger_status(
    ledger: RecordSource, location: str, manifest: Manifest | None, *,
    problems: Mapping[str, list[dict[str, str]]] | None,
    summary: dict[str, Any] | None, running: bool = False,
) -> dict[str, Any]:
    """ok / failed / pending per job and model, failures by reason, and (with ``verify``)
    files that vanished or changed since they were recorded (``problems``, by task id: the
    store's verify). Without a manifest, the last
    ``summary`` gives the totals; ``running`` says a run is writing the output now."""
    totals, ids = _totals(manifest)
    groups: dict[tuple[str, str], Counter[str]] = {}
    costs: dict[tuple[str, str], Cost] = {}
    reasons: Counter[str] = Counter()
    changed: list[dict[str, str]] = []
    for record in ledger.records():
        if ids is not None and record.id not in ids:
            continue  # a task the manifest no longer has
        groups.setdefault((record.job, record.model), Counter())[record.status] += 1
        if record.status == "failed":
            reasons[f"{record.reason}: {record.error}"] += 1
        else:
            costs.setdefault((record.job, record.model), Cost()).add(record.cost_usd)
            if problems is not None:
                changed.extend(problems.get(record.id, ()))
    if totals is None:
        totals = _summary_totals(summary or {}, groups)
    rows = []
    for key in _in_order(totals, groups):
        counts = groups.get(key, Counter())
        total = max(totals.get(key, 0), counts["ok"] + counts["failed"])
        cost = costs.get(key, Cost())
        rows.append({"job": key[0], "model": key[1], "total": total, "ok": counts["ok"],
                     "failed": counts["failed"],
                     "pending": total - counts["ok"] - counts["failed"],
                     "cost_usd": cost.value, "cost_unknown": cost.unknown})
    report: dict[str, Any] = {
        "output": location,
        "running": running,
        **{k: sum(row[k] for row in rows) for k in ("total", "ok", "failed", "pending")},
        **_spend(costs.values()),
        "models": rows,
        "failures": [{"reason": reason, "count": count} for reason, count in reasons.most_common()],
    }
    if problems is not None:
        report["changed"] = changed
    return report


def _spend(costs: Iterable[Cost]) -> dict[str, Any]:
    """What the ok tasks cost when they ran: null when wholly unknown, never 0 for unknown."""
    total = Cost()
    for cost in costs:
        total.merge(cost)
    return {"cost_usd": total.value, "cost_unknown": total.unknown}


def _in_order(
    totals: dict[tuple[str, str], int], groups: dict[tuple[str, str], Counter[str]]
) -> list[tuple[str, str]]:
    """(job, model) keys in the order `plan` lists them: the manifest's order when there is
    one (``totals`` follows it), then the ledger's; each job's models together."""
    keys = list(totals) + [key for key in groups if key not in totals]
    first: dict[str, int] = {}
    for key in keys:
        first.setdefault(key[0], len(first))
    return sorted(keys, key=lambda key: first[key[0]])  # stable: models keep their order


def _summary_totals(
    summary: dict[str, Any], groups: dict[tuple[str, str], Counter[str]]
) -> dict[tuple[str, str], int]:
    """Without a manifest, the ledgers give the totals; the last summary adds the tasks it
    left pending, only for jobs where it still agrees with the ledgers: a job whose ledger rows
    are fewer than the ok and failed tasks the summary counted was pruned since (or dropped),
    and its old pending tasks no longer exist. Rows come in the manifest's order as the
    summary's ``models`` keeps it; a summary from before batcher kept them gives each job's
    pending tasks to its first model in the ledger's order."""
    jobs = summary.get("jobs")
    current = _jobs_agreeing(jobs if isinstance(jobs, dict) else {}, groups)
    totals: dict[tuple[str, str], int] = {}
    for item in summary.get("models") or ():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            key = (str(item["job"]), str(item["model"]))
            recorded = groups[key].total() if key in groups else 0
            if key[0] in current:
                totals[key] = max(int(item["total"]), recorded)
            elif recorded:
                totals[key] = recorded
    if not totals:
        for job, missing in current.items():
            keys = [key for key in groups if key[0] == job] or [(job, "?")]
            totals.update((key, groups[key].total()) for key in keys if key in groups)
            if missing:
                totals[keys[0]] = totals.get(keys[0], 0) + missing
    totals.update((key, counts.total()) for key, counts in groups.items() if key not in totals)
    return totals


def _jobs_agreeing(jobs: dict[str, Any], groups: dict[tuple[str, str], Counter[str]]
                   ) -> dict[str, int]:
    """The jobs of a summary whose ledger rows still hold at least the ok and failed tasks it
    counted, each with the tasks it counted that the ledgers lack (left pending)."""
    agreeing: dict[str, int] = {}
    for job, counts in jobs.items():
        if not isinstance(counts, dict):
            continue
        recorded = sum(group.total() for key, group in groups.items() if key[0] == job)
        if recorded >= _count(counts, "ok") + _count(counts, "failed"):
            agreeing[job] = max(_count(counts, "total") - recorded, 0)
    return agreeing


def _count(counts: dict[str, Any], name: str) -> int:
    value = counts.get(name, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True, slots=True)
class FailureReason:
    """One reason tasks failed for: how many, and the message of one of them."""

    reason: str
    count: int
    example: str


def run_failures(records: Iterable[Record], since: float, *,
                 top: int = 5) -> tuple[list[FailureReason], int]:
    """The ``top`` commonest reasons among tasks that failed from ``since`` on (a run's start),
    with one example message each, and how many further reasons there were."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for record in records:
        if record.status != "failed" or (record.started or 0.0) < since:
            continue
        reason = record.reason or "unknown"
        counts[reason] += 1
        examples.setdefault(reason, record.error or "(no message)")
    reasons = [FailureReason(reason, count, examples[reason])
               for reason, count in counts.most_common(top)]
    return reasons, max(len(counts) - top, 0)


def _spent(row: dict[str, Any]) -> str:
    if row["cost_usd"] is None and not row["cost_unknown"]:
        return "-"
    return cost_text(row["cost_usd"], row["cost_unknown"])


def print_status(report: dict[str, Any]) -> None:
    print(f"{report['output']}: {report['ok']} ok, {report['failed']} failed, "
          f"{report['pending']} pending of {report['total']}")
    if report["running"]:
        print("note: a batcher run is writing to this output now; these counts are changing")
    print(f"{'job':<24} {'model':<40} {'ok':>8} {'failed':>8} {'pending':>8}  spent")
    for row in report["models"]:
        print(f"{row['job']:<24} {row['model']:<40} {row['ok']:>8} {row['failed']:>8} "
              f"{row['pending']:>8}  {_spent(row)}")
    print(f"spent on the {report['ok']} ok tasks: {_spent(report)}")
    if report["failures"]:
        print("failures by reason:")
        for item in report["failures"]:
            print(f"  {item['count']:>6}  {item['reason']}")
    for problem in report.get("changed", []):
        print(f"verify: {problem['path']} is {problem['problem']} (task {problem['id']})")
    if "changed" in report and not report["changed"]:
        print("verify: every file matches its recorded sha256")
