"""Lost ledgers and meeting ledgers: every reader adopts finished tasks from their sidecars, in
folders as in stores, and wherever ledgers meet an ok row wins over a failed one.

Requests are counted at the provider (the built-in server on its own thread); stores are moto's
S3 server on 127.0.0.1. A fresh XDG_CACHE_HOME stands for a fresh machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from conftest import (
    ledger_rows,
    paid,
    pics_and_lines,
    provider_block,
    run_cli,
    start_cli,
    write_manifest,
)
from s3server import S3Server, s3, store_env

__all__ = ["s3"]  # fixtures, used by name

IMAGES, CHATS = 6, 4
TASKS = IMAGES + CHATS


def manifest(server: Any, folder: Path, output: str, *, extra: str = "",
             name: str = "jobs.yaml") -> Path:
    text = f"name: adopt\noutput: {output}\n" + provider_block(
        server, concurrency=4, extra=extra) + pics_and_lines("kite", images=IMAGES, chats=CHATS)
    return write_manifest(folder, text, name)


def ok_rows(root: Path) -> list[dict[str, Any]]:
    return [row for row in ledger_rows(root, decode=True) if row["status"] == "ok"]


# ---------------------------------------------------------------------- a folder's lost ledger


def test_a_folder_whose_ledger_was_deleted_pays_nothing_again(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, "out")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    assert paid(server) == TASKS
    (tmp_path / "out" / "ledger.sqlite").unlink()

    again = run_cli("run", str(path), "--no-progress")

    assert again.returncode == 0, again.stderr
    assert paid(server) == TASKS, "tasks whose sidecars say they finished were paid again"
    assert len(ok_rows(tmp_path / "out")) == TASKS
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["ok"], summary["ran"], summary["pending"]) == (TASKS, 0, 0)


def test_a_folder_with_its_ledger_and_one_image_deleted_sends_exactly_that_one_request(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, "out")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    image = next(row for row in ok_rows(tmp_path / "out") if row["kind"] == "image")
    (tmp_path / "out" / "ledger.sqlite").unlink()
    (tmp_path / "out" / image["files"][0][0]).unlink()

    again = run_cli("run", str(path), "--no-progress")

    assert again.returncode == 0, again.stderr
    assert paid(server) == TASKS + 1
    assert max(server.stats.generations.values()) == 2  # the one image, and nothing else
    assert len(ok_rows(tmp_path / "out")) == TASKS
    assert (tmp_path / "out" / image["files"][0][0]).is_file()


def test_status_report_and_plan_of_a_folder_without_its_ledger_read_the_sidecars(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, "out")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    for name in ("ledger.sqlite", "results.jsonl", "index.html"):
        (tmp_path / "out" / name).unlink()

    status = run_cli("status", str(path), "--json")
    plan = run_cli("plan", str(path))
    report = run_cli("report", "out")

    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["ok"], counts["pending"], counts["failed"]) == (TASKS, 0, 0)
    assert plan.returncode == 0, plan.stderr
    total = next(line for line in plan.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:5] == [str(TASKS), str(TASKS), "0", "0"], total
    assert report.returncode == 0, report.stderr
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == TASKS
    assert not (tmp_path / "out" / "ledger.sqlite").exists(), "a reader wrote a ledger"
    assert paid(server) == TASKS


# ---------------------------------------------------------------------- a store's lost ledger


def test_a_store_with_its_ledger_and_one_image_deleted_sends_exactly_that_one_request(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/set")
    first = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "a")))
    assert first.returncode == 0, first.stderr
    image = next(key for key in s3.keys(bucket, "set/pics/") if key.endswith(".png"))
    s3.client.delete_object(Bucket=bucket, Key="set/ledger.sqlite")
    s3.client.delete_object(Bucket=bucket, Key=image)

    again = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "b")))

    assert again.returncode == 0, again.stderr
    assert paid(server) == TASKS + 1
    assert max(server.stats.generations.values()) == 2
    assert image in s3.keys(bucket, "set/pics/")


def test_status_report_and_plan_before_a_stores_first_publish_read_the_sidecars(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    """As after a kill -9 within the first --sync-every: files and sidecars, no ledger."""
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/early"
    path = manifest(server, tmp_path, url)
    env = store_env(s3.url, str(tmp_path / "a"))
    assert run_cli("run", str(path), "--no-progress", env=env).returncode == 0
    for name in ("ledger.sqlite", "results.jsonl", "index.html", "summary.json"):
        s3.client.delete_object(Bucket=bucket, Key=f"early/{name}")
    env = store_env(s3.url, str(tmp_path / "b"))

    status = run_cli("status", url, "--json", env=env)
    status_manifest = run_cli("status", str(path), "--json", env=env)
    plan = run_cli("plan", str(path), env=env)
    report = run_cli("report", url, env=env)

    for done in (status, status_manifest):
        assert done.returncode == 0, done.stderr
        counts = json.loads(done.stdout)
        assert (counts["ok"], counts["pending"], counts["failed"]) == (TASKS, 0, 0)
    assert plan.returncode == 0, plan.stderr
    total = next(line for line in plan.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:5] == [str(TASKS), str(TASKS), "0", "0"], total
    assert report.returncode == 0, report.stderr
    assert len(s3.get(bucket, "early/results.jsonl").decode().splitlines()) == TASKS
    assert "early/ledger.sqlite" not in s3.keys(bucket, "early/"), "a reader wrote a ledger"
    assert paid(server) == TASKS


# ---------------------------------------------------------------------- merge: ok wins


def test_merging_a_shard_that_failed_into_an_output_where_its_tasks_are_ok_keeps_them_ok(
    tmp_path: Path, thread_server: Any
) -> None:
    good = thread_server()
    path = manifest(good, tmp_path, "all")
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    broken = thread_server(fail_rate=1.0)
    shard = manifest(broken, tmp_path, "shard", extra="retries: 0", name="broken.yaml")
    failed = run_cli("run", str(shard), "--shard", "1/2", "--no-progress")
    assert failed.returncode == 1, failed.stderr
    shard_rows = ledger_rows(tmp_path / "shard")
    assert shard_rows and all(row["status"] == "failed" for row in shard_rows)

    merged = run_cli("merge", "shard", "--output", "all")

    assert merged.returncode == 0, merged.stderr
    rows = ledger_rows(tmp_path / "all")
    assert len(rows) == TASKS and all(row["status"] == "ok" for row in rows)
    before = paid(good)
    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert paid(good) == before


def test_merge_takes_the_ok_row_of_a_shard_over_a_failed_one_in_the_output(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, "all", extra="retries: 0")
    assert run_cli("run", str(path), "--no-progress", "--output", "good").returncode == 0
    shutil.copytree(tmp_path / "good", tmp_path / "copy")
    # The output "all" holds the same tasks, failed (later than the shard's ok rows).
    shutil.copytree(tmp_path / "good", tmp_path / "all")
    db = sqlite3.connect(tmp_path / "all" / "ledger.sqlite")
    with db:
        db.execute("UPDATE tasks SET status = 'failed', reason = 'server', finished = "
                   "finished + 1000")
    db.close()

    merged = run_cli("merge", "copy", "--output", "all")

    assert merged.returncode == 0, merged.stderr
    rows = ledger_rows(tmp_path / "all")
    assert len(rows) == TASKS and all(row["status"] == "ok" for row in rows)


def test_status_and_plan_right_after_a_kill_9_before_the_first_publish_count_what_finished(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.1)
    bucket = s3.bucket()
    url = f"s3://{bucket}/killed"
    path = manifest(server, tmp_path, url)
    proc = start_cli("run", str(path), "--no-progress", "--sync-every", "300",
                     env=store_env(s3.url, str(tmp_path / "a")))
    deadline = time.monotonic() + 60
    while len(sidecars_in(s3, bucket)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert "killed/ledger.sqlite" not in s3.keys(bucket), "published before the kill"
    finished = len(sidecars_in(s3, bucket))
    env = store_env(s3.url, str(tmp_path / "b"))

    status = run_cli("status", url, "--json", env=env)
    plan = run_cli("plan", str(path), env=env)

    assert status.returncode in (0, 1), status.stderr
    assert json.loads(status.stdout)["ok"] == finished
    total = next(line for line in plan.stdout.splitlines() if line.startswith("total"))
    assert int(total.split()[2]) == finished, total


def sidecars_in(s3: S3Server, bucket: str) -> list[str]:
    return [key for key in s3.keys(bucket) if key.endswith(".json") and key.count("/") == 3]
