"""Ctrl-C and SIGTERM on a real ``batcher run`` process, against a server on its own thread.

The contract: the first signal stops new tasks and lets those in flight finish, the ledger and
summary are written and the process exits 130; the same command then finishes the rest without
paying for anything twice. A second signal stops at once, still leaving no partial file.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest

from batcher.server import LocalServer

IMAGES = "/images/generations"
TASKS = 40
CONCURRENCY = 4
EXIT_WAIT = 10.0  # generous: the requests in flight take 0.3 s


def manifest_for(server: LocalServer, *, timeout: float = 10) -> Path:
    text = (
        "name: sig\n"
        + provider_block(server, rate="100/s", concurrency=CONCURRENCY,
                         extra=f"retries: 3\ntimeout: {timeout}")
        + "jobs:\n"
        + "  - name: pics\n"
        + "    type: image\n"
        + "    provider: test\n"
        + "    model: flux.1-schnell\n"
        + '    prompts: ["a harbour at dawn", "a harbour at dusk"]\n'
        + f"    seeds: {TASKS // 2}\n"
        + '    params: {size: 256x256, response_format: b64_json}\n'
    )
    return write_manifest(Path.cwd(), text)


def answered(server: LocalServer) -> int:
    """Generations the server answered with 200 so far (read from another thread)."""
    records = list(server.stats.requests)
    return sum(1 for r in records if r.path.endswith(IMAGES) and r.status == 200)


def in_flight(server: LocalServer) -> int:
    """Generations the server has received and not answered yet."""
    records = list(server.stats.requests)
    return sum(1 for r in records if r.path.endswith(IMAGES) and r.status == 0)


def wait_until(proc: subprocess.Popen[str], condition, what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"batcher ended (exit {proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for ``proc``; kill it (and fail) if it does not exit in time."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"batcher did not exit within {timeout} s of the signal")



def assert_output_consistent(root: Path) -> list[dict[str, Any]]:
    """Every ledger row's files are whole (size and sha256); no temporary file is left."""
    rows = ledger_rows(root)
    for row in rows:
        for rel, size, sha in json.loads(row["files"]):
            data = (root / rel).read_bytes()
            assert len(data) == size and hashlib.sha256(data).hexdigest() == sha, rel
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers, leftovers
    saved = {p.relative_to(root).as_posix() for p in root.rglob("*.png")}
    recorded = {rel for row in rows for rel, _, _ in json.loads(row["files"])}
    assert saved == recorded  # no image on disk that the ledger does not know
    return rows


def summary_of(root: Path) -> dict[str, Any]:
    return json.loads((root / "summary.json").read_text())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_gracefully_and_the_same_command_resumes(thread_server, signum) -> None:
    server = thread_server(latency=0.3)
    manifest = manifest_for(server)
    root = Path.cwd() / "output" / "sig"
    proc = start_cli("run", str(manifest), "--no-progress")
    # The signal comes while a request is in flight (answers arrive four at a time: right
    # after the eighth, every worker may be saving, with nothing sent yet).
    wait_until(proc, lambda: answered(server) >= 8 and in_flight(server) > 0,
               "some results and a request in flight")

    answered_before = answered(server)
    proc.send_signal(signum)
    _, stderr = finish(proc, EXIT_WAIT)

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = summary_of(root)
    assert summary["exit_code"] == 130
    assert summary["total"] == TASKS
    assert summary["ok"] + summary["failed"] + summary["pending"] == TASKS
    assert summary["failed"] == 0 and 8 <= summary["ok"] < TASKS
    rows = assert_output_consistent(root)
    assert len(rows) == summary["ok"] and all(row["status"] == "ok" for row in rows)
    # The requests in flight were let finish (none was dropped, some answered after the signal)
    # and recorded: every answer the server gave is saved.
    assert not [r for r in server.stats.matching(IMAGES) if r.status != 200]
    assert answered(server) > answered_before
    assert answered(server) == summary["ok"]

    resumed = run_cli("run", str(manifest), "--no-progress")

    assert resumed.returncode == 0, resumed.stderr
    summary2 = summary_of(root)
    assert (summary2["ok"], summary2["skipped"], summary2["ran"]) == (
        TASKS, summary["ok"], TASKS - summary["ok"])
    rows = assert_output_consistent(root)
    assert len(rows) == TASKS and all(row["status"] == "ok" for row in rows)
    generations = server.stats.generations
    assert len(generations) == TASKS
    assert sum(generations.values()) == TASKS, "a task was paid for twice"


def test_second_sigint_stops_at_once_and_safely(thread_server) -> None:
    server = thread_server(latency=0.05, fault_kinds=("slow",))
    manifest = manifest_for(server, timeout=60)
    root = Path.cwd() / "output" / "sig"
    proc = start_cli("run", str(manifest), "--no-progress", "--grace", "60")
    wait_until(proc, lambda: answered(server) >= 6, "some results")
    # From now on every new body hangs 30 s: without the second signal's cancel the process
    # would wait for them (or for the 60 s grace).
    server.options.fault_rate = 1.0
    wait_until(proc, lambda: server.stats.faults["slow"] >= CONCURRENCY, "every worker hanging")

    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None, "the first signal must wait for the hanging request"
    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc, 8.0)

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    rows = assert_output_consistent(root)
    assert rows and all(row["status"] == "ok" for row in rows)
    summary = summary_of(root)
    assert summary["exit_code"] == 130
    assert summary["ok"] == len(rows)
    assert summary["ok"] + summary["failed"] + summary["pending"] == TASKS

    server.options.fault_rate = 0.0  # the resumed run meets no new hang
    resumed = run_cli("run", str(manifest), "--no-progress")

    assert resumed.returncode == 0, resumed.stderr
    rows = assert_output_consistent(root)
    assert len(rows) == TASKS and all(row["status"] == "ok" for row in rows)
    paid_twice = sum(n - 1 for n in server.stats.generations.values())
    assert paid_twice <= CONCURRENCY  # at most the requests that were in flight


def test_sigint_during_a_rate_limit_pause_exits_promptly(thread_server) -> None:
    # The server takes 3 requests a minute: the 4th is answered 429 with a wait of about a
    # minute, and the whole provider pauses. Nothing is in flight then, so a Ctrl-C has nothing
    # to wait for: the grace period is for requests in flight, not for tasks waiting a turn.
    server = thread_server(rate_limit=(3, 60.0))
    manifest = manifest_for(server)
    root = Path.cwd() / "output" / "sig"
    proc = start_cli("run", str(manifest), "--no-progress", "--grace", "30")
    wait_until(proc, lambda: server.stats.rate_limited >= 1, "a 429")
    time.sleep(0.3)  # the 429 is read and the pause begins

    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc, 5.0)

    assert proc.returncode == 130, stderr
    summary = summary_of(root)
    assert summary["exit_code"] == 130
    assert summary["ok"] == 3 and summary["pending"] == TASKS - 3
    assert len(assert_output_consistent(root)) == 3
