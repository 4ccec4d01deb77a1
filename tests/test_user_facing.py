"""What a user sees at the edges of each command (issue #13): why a run's tasks failed, exit
codes of status, the help of every option, and messages that name the right thing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import provider_block, run_cli, write_manifest

REFUSED_JOB = """\
  - name: refused
    type: image
    provider: test
    model: flux.1-schnell
    prompt: A size the server refuses
    seeds: 2
    params: {size: 999x999, response_format: b64_json}
"""
BROKEN_JOB = """\
  - name: broken
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    prompt: The server fails this every time
    seeds: 3
"""
FAILING_JOBS = "jobs:\n" + REFUSED_JOB + BROKEN_JOB


def _failure_lines(stderr: str) -> list[str]:
    """The lines after ``batcher: failed tasks by reason:``, to the end."""
    lines = stderr.splitlines()
    start = lines.index("batcher: failed tasks by reason:")
    return lines[start + 1:]


def test_run_ends_with_the_top_failure_reasons(tmp_path: Path, thread_server: Any) -> None:
    # fail_rate=1.0: every valid request answers 500; the bad size is refused with 400 first.
    server = thread_server(fail_rate=1.0)
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(server, extra="retries: 0") + FAILING_JOBS)

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    reasons = _failure_lines(done.stderr)
    assert len(reasons) == 2, done.stderr
    # Commonest first, each with its count and one example message.
    assert reasons[0].split()[:2] == ["3", "http_500:"], done.stderr
    assert "injected permanent failure" in reasons[0]
    assert reasons[1].split()[:2] == ["2", "http_400:"], done.stderr
    assert "999x999" in reasons[1]


def test_run_lists_only_this_runs_failures(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server(fail_rate=1.0)
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(server, extra="retries: 0") + FAILING_JOBS)
    assert run_cli("run", str(path), "--no-progress", "--only", "refused").returncode == 1

    # The failed tasks of the first run are left alone: nothing failed in this run.
    again = run_cli("run", str(path), "--no-progress", "--skip-failed", "--only", "refused")
    assert "failed tasks by reason" not in again.stderr, again.stderr

    # Retried, they fail again, and only they are listed (not the other job's).
    third = run_cli("run", str(path), "--no-progress", "--only", "refused")
    reasons = _failure_lines(third.stderr)
    assert [line.split()[:2] for line in reasons] == [["2", "http_400:"]], third.stderr


TWO_JOBS = """\
jobs:
  - name: posters
    type: image
    provider: test
    model: flux.1-schnell
    prompt: A poster
    seeds: 2
    params: {size: 256x256, response_format: b64_json}
  - name: captions
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    prompt: A caption
"""


def test_status_exits_0_only_when_every_task_is_ok(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: gate\noutput: out\n" + provider_block(thread_server())
                          + TWO_JOBS)
    assert run_cli("run", str(path), "--no-progress", "--only", "captions").returncode == 0

    pending = run_cli("status", str(path))
    assert pending.returncode == 1, pending.stdout + pending.stderr
    assert "1 ok, 0 failed, 2 pending of 3" in pending.stdout
    assert run_cli("status", str(path), "--json").returncode == 1

    assert run_cli("run", str(path), "--no-progress").returncode == 0
    for args in ((), ("--json",), ("--verify",)):
        done = run_cli("status", str(path), *args)
        assert done.returncode == 0, (args, done.stdout + done.stderr)
    assert run_cli("status", "out").returncode == 0

    # A file gone from the folder: --verify finds it; plain status reads only the ledger.
    next((tmp_path / "out" / "posters").rglob("*.png")).unlink()
    assert run_cli("status", str(path), "--verify").returncode == 1


def test_status_exits_1_when_a_task_failed(tmp_path: Path, thread_server: Any) -> None:
    path = write_manifest(tmp_path, "name: failing\noutput: out\n"
                          + provider_block(thread_server()) + "jobs:\n" + REFUSED_JOB)
    assert run_cli("run", str(path), "--no-progress").returncode == 1

    done = run_cli("status", str(path))

    assert done.returncode == 1
    assert "0 ok, 2 failed, 0 pending of 2" in done.stdout
