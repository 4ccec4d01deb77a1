"""``batcher status``: what the ledger says, per job and model, with failures by reason."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.ledger import LEDGER_NAME, FileRecord, Ledger, Record
from batcher.manifest import Manifest
from batcher.outputs import derived_files
from batcher.plan import Selection
from batcher.providers.prices import Cost, cost_text
from batcher.reports.summary import SUMMARY_NAME
from batcher.storage import LOCK_NAME


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


Verify = Callable[[Record], list[dict[str, str]]]


def run_in_progress(root: Path) -> bool:
    """Whether a run holds the folder's lock now (see ``storage.lock_folder``).

    The probe takes a shared lock for an instant and gives it back; a run starting in that
    instant would stop as if another run held the folder, a risk worth a true answer here.
    """
    try:
        handle = open(root / LOCK_NAME, "rb")  # noqa: SIM115 - closed below
    except OSError:  # no lock file: no run has held this folder, or it was cleaned up
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system without locks: nothing to tell
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def problem(record: Record, file: FileRecord, actual: str | None) -> list[dict[str, str]]:
    """What ``--verify`` says of a file whose sha256 is ``actual`` (``None``: missing)."""
    if actual is None:
        return [{"id": record.id, "path": file.path, "problem": "missing"}]
    if actual != file.sha256:
        return [{"id": record.id, "path": file.path, "problem": "changed"}]
    return []


def verify_folder(root: Path) -> Verify:
    """Re-hash each file of a record under ``root``."""
    def verify(record: Record) -> list[dict[str, str]]:
        return [p for file in [*record.files, *derived_files(record)]
                for p in problem(record, file, _sha256(root / file.path))]
    return verify


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
    ledger: Ledger, location: str, manifest: Manifest | None, *, verify: Verify | None,
    summary: dict[str, Any] | None, running: bool = False,
) -> dict[str, Any]:
    """ok / failed / pending per job and model, failures by reason, and (with ``verify``)
    files that vanished or changed since they were recorded. Without a manifest, the last
    ``summary`` gives the totals; ``running`` says a run is writing the output now."""
    totals, ids = _totals(manifest)
    groups: dict[tuple[str, str], Counter[str]] = {}
    costs: dict[tuple[str, str], Cost] = {}
    reasons: Counter[str] = Counter()
    problems: list[dict[str, str]] = []
    for record in ledger.records():
        if ids is not None and record.id not in ids:
            continue  # a task the manifest no longer has
        groups.setdefault((record.job, record.model), Counter())[record.status] += 1
        if record.status == "failed":
            reasons[f"{record.reason}: {record.error}"] += 1
        else:
            costs.setdefault((record.job, record.model), Cost()).add(record.cost_usd)
            if verify is not None:
                problems.extend(verify(record))
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
    if verify is not None:
        report["changed"] = problems
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


def read_summary(root: Path) -> dict[str, Any] | None:
    """The summary.json of an output folder, if it has a readable one."""
    try:
        summary = json.loads((root / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


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


def run_failures(root: Path, since: float, *, top: int = 5) -> tuple[list[FailureReason], int]:
    """The ``top`` commonest reasons among tasks that failed from ``since`` on (a run's start),
    with one example message each, and how many further reasons there were."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    with Ledger(root / LEDGER_NAME, readonly=True) as ledger:
        for record in ledger.records():
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
        print("note: a batcher run is writing to this folder now; these counts are changing")
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
