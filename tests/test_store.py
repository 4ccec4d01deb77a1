"""Durable stores: runs into s3:// against moto's S3 server on 127.0.0.1, the CLI as a user runs
it, every request counted at the provider. A fresh XDG_CACHE_HOME stands for a fresh machine."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    ledger_rows,
    paid,
    pics_and_lines,
    provider_block,
    run_cli,
    start_cli,
    write_manifest,
)
from s3server import FaultProxy, S3Server, fault_proxy, s3, store_env
from test_sheet import CHROMIUM, LOAD_EVERY_IMAGE, chromium_page

__all__ = ["fault_proxy", "s3"]  # fixtures, used by name

CONCURRENCY = 4


def manifest(server: Any, folder: Path, output: str, *, images: int = 6, chats: int = 6,
             prompt: str = "A lantern number {n}") -> Path:
    text = f"name: durable\noutput: {output}\n" + provider_block(
        server, concurrency=CONCURRENCY) + pics_and_lines(
        "lantern", images=images, chats=chats, prompt=prompt)
    return write_manifest(folder, text)


def ledger_in_store(s3: S3Server, bucket: str, key: str, folder: Path) -> list[dict[str, Any]]:
    path = folder / f"{key.replace('/', '-')}.copy"
    path.write_bytes(s3.get(bucket, key))
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(row) for row in db.execute("SELECT * FROM tasks")]
    for row in rows:
        row["files"] = json.loads(row["files"])
    return rows


def age_lock(s3: S3Server, bucket: str, key: str) -> None:
    """Make a dead run's lock look an hour old, as it would be by the next CI push: the next
    run takes it over instead of waiting out the ten minutes."""
    if key in s3.keys(bucket, key):
        holder = json.loads(s3.get(bucket, key))
        holder["refreshed"] = time.time() - 3600
        s3.put(bucket, key, json.dumps(holder).encode())


def check_store_matches(s3: S3Server, bucket: str, prefix: str,
                        rows: list[dict[str, Any]]) -> None:
    """Every ok row's objects are in the bucket, whole, with a sidecar that says the same."""
    for row in rows:
        assert row["status"] == "ok", row
        for rel, size, digest in row["files"]:
            data = s3.get(bucket, f"{prefix}/{rel}")
            assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, rel


def test_run_into_s3_then_a_fresh_machine_sends_nothing(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/assets/v1"
    path = manifest(server, tmp_path, url)
    env = store_env(s3.url, str(tmp_path / "cache-a"))

    first = run_cli("run", str(path), "--no-progress", env=env)

    assert first.returncode == 0, first.stderr
    assert paid(server) == 12
    rows = ledger_in_store(s3, bucket, "assets/v1/ledger.sqlite", tmp_path)
    assert len(rows) == 12
    check_store_matches(s3, bucket, "assets/v1", rows)
    summary = json.loads(s3.get(bucket, "assets/v1/summary.json"))
    assert (summary["total"], summary["ok"], summary["pending"]) == (12, 12, 0)
    results = s3.get(bucket, "assets/v1/results.jsonl").decode().splitlines()
    assert len(results) == 12
    assert b"<img" in s3.get(bucket, "assets/v1/index.html")
    for row in rows:  # every task, chat included, has a sidecar carrying its record
        name = Path(row["files"][0][0]).with_suffix(".json")
        sidecar = json.loads(s3.get(bucket, f"assets/v1/{name}"))
        assert sidecar["id"] == row["id"] and sidecar["status"] == "ok"
    assert "testing" not in s3.get(bucket, "assets/v1/results.jsonl").decode()

    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-b")))

    assert again.returncode == 0, again.stderr
    assert paid(server) == 12, "a fresh machine paid again for finished tasks"
    assert "12 already done" in again.stderr

    # Without the published ledger only the sidecars tell what finished: a fresh machine
    # adopts them and pays for exactly the one image that is gone.
    lost = next(row["files"][0][0] for row in rows if row["job"] == "pics")
    s3.client.delete_object(Bucket=bucket, Key="assets/v1/ledger.sqlite")
    s3.client.delete_object(Bucket=bucket, Key=f"assets/v1/{lost}")
    third = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-c")))

    assert third.returncode == 0, third.stderr
    assert paid(server) == 13
    rows = ledger_in_store(s3, bucket, "assets/v1/ledger.sqlite", tmp_path)
    assert len(rows) == 12
    check_store_matches(s3, bucket, "assets/v1", rows)


def test_an_edited_prompt_on_a_fresh_machine_requests_only_its_tasks(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    url = f"s3://{s3.bucket()}/set"
    path = manifest(server, tmp_path, url)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    before = paid(server)

    path = manifest(server, tmp_path, url, prompt="A paper lantern number {n}")
    edited = run_cli("run", str(path), "--no-progress",
                     env=store_env(s3.url, str(tmp_path / "c2")))

    assert edited.returncode == 0, edited.stderr
    assert paid(server) - before == 6  # the image prompt's 6 tasks; the 6 chats were done


def test_kill_9_at_random_points_then_fresh_machines_pay_at_most_what_was_in_flight(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    url = f"s3://{bucket}/killed"
    path = manifest(server, tmp_path, url, images=30, chats=30)
    kills = 0
    for attempt in range(4):
        env = store_env(s3.url, str(tmp_path / f"cache-{attempt}"))
        process = start_cli("run", str(path), "--no-progress", "--sync-every", "0.5", env=env)
        target = paid(server) + rng.randint(3, 10)
        deadline = time.monotonic() + 60
        while paid(server) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=30)
        age_lock(s3, bucket, "killed/.batcher.lock")

    final = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-final")))

    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    rows = ledger_in_store(s3, bucket, "killed/ledger.sqlite", tmp_path)
    assert len(rows) == 60
    check_store_matches(s3, bucket, "killed", rows)
    # A request is in flight until its files are in the store: requests under way, plus
    # finished ones whose uploads were under way (at most one upload slot per request slot).
    repaid = paid(server) - 60
    assert repaid <= kills * 2 * CONCURRENCY, f"seed {seed}: {repaid} paid twice, {kills} kills"

    # Those limits would let adoption from sidecars fail unnoticed: without the published
    # ledger, a fresh machine pays for exactly the one image that is gone.
    lost = next(row["files"][0][0] for row in rows if row["job"] == "pics")
    s3.client.delete_object(Bucket=bucket, Key="killed/ledger.sqlite")
    s3.client.delete_object(Bucket=bucket, Key=f"killed/{lost}")
    before = paid(server)
    adopted = run_cli("run", str(path), "--no-progress",
                      env=store_env(s3.url, str(tmp_path / "cache-adopt")))

    assert adopted.returncode == 0, adopted.stderr
    assert paid(server) - before == 1, f"seed {seed}"
    rows = ledger_in_store(s3, bucket, "killed/ledger.sqlite", tmp_path)
    assert len(rows) == 60
    check_store_matches(s3, bucket, "killed", rows)


def test_a_store_down_for_a_while_is_waited_out(
    tmp_path: Path, thread_server: Any, s3: S3Server, fault_proxy: FaultProxy
) -> None:
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/flaky", images=20, chats=20)
    process = start_cli("run", str(path), "--no-progress", "--store-timeout", "60",
                        env=store_env(fault_proxy.url, str(tmp_path / "cache")))
    while paid(server) < 8 and process.poll() is None:
        time.sleep(0.01)
    for mode in ("503", "reset", "500"):
        fault_proxy.set_mode(mode)
        time.sleep(0.7)
    fault_proxy.set_mode("pass")
    _out, err = process.communicate(timeout=120)

    assert process.returncode == 0, err
    rows = ledger_in_store(s3, bucket, "flaky/ledger.sqlite", tmp_path)
    assert len(rows) == 40
    check_store_matches(s3, bucket, "flaky", rows)
    assert paid(server) == 40  # a store fault never re-sends a generation


def test_a_store_down_for_good_stops_the_run_with_tasks_pending(
    tmp_path: Path, thread_server: Any, s3: S3Server, fault_proxy: FaultProxy
) -> None:
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/outage", images=20, chats=20)
    env = store_env(fault_proxy.url, str(tmp_path / "cache"))
    process = start_cli("run", str(path), "--no-progress", "--store-timeout", "2", env=env)
    while not any(key.endswith(".json") for key in s3.keys(bucket, "outage/pics/")) \
            and process.poll() is None:
        time.sleep(0.01)  # until a task has finished whole: at least one sidecar to check
    fault_proxy.set_mode("reset")
    _out, err = process.communicate(timeout=120)

    assert process.returncode == 1, err
    assert "Traceback" not in err
    # Names the store and says it is down (the prefix is named so that no word of it says so).
    assert f"s3://{bucket}/outage" in err and "down" in err, err
    fault_proxy.set_mode("pass")
    # Nothing counts as ok without its objects: every sidecar that arrived has all its files,
    # and so has every ok row of the run's ledger (its working copy: the store was down).
    keys = s3.keys(bucket, "outage/")
    sidecars = [key for key in keys if key.endswith(".json")
                and key.startswith(("outage/pics/", "outage/lines/"))]
    assert sidecars
    for key in sidecars:
        sidecar = json.loads(s3.get(bucket, key))
        for item in sidecar["files"]:
            assert keys.get(f"outage/{item['path']}") == item["size"], key
    working = next((tmp_path / "cache").rglob("all/ledger.sqlite")).parent
    rows = ledger_rows(working, decode=True)
    assert rows and all(row["status"] == "ok" for row in rows)  # a store fault fails no task
    for row in rows:
        for rel, size, _digest in row["files"]:
            assert keys.get(f"outage/{rel}") == size, rel
    summary = json.loads((working / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["pending"] > 0 and summary["exit_code"] == 1

    age_lock(s3, bucket, "outage/.batcher.lock")  # the stopped run could not remove it
    again = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "c2")))

    assert again.returncode == 0, again.stderr
    rows = ledger_in_store(s3, bucket, "outage/ledger.sqlite", tmp_path)
    assert len(rows) == 40
    check_store_matches(s3, bucket, "outage", rows)
    # Paid twice at most: the requests in flight and the results waiting for an upload slot.
    assert paid(server) <= 40 + 2 * CONCURRENCY


def test_a_second_run_on_a_held_store_exits_2_naming_the_holder(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.2)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/held", images=30, chats=30)
    env = {**store_env(s3.url, str(tmp_path / "a")), "BATCHER_LOCK_LEASE": "2"}
    first = start_cli("run", str(path), "--no-progress", env=env)
    while paid(server) < 2 and first.poll() is None:
        time.sleep(0.01)

    second = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "c")))
    first.communicate(timeout=60)

    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr and "alive" in second.stderr
    assert "Traceback" not in second.stderr
    assert paid(server) == 60  # the second run sent nothing


def test_a_dead_runs_lock_is_taken_over_with_a_warning_after_its_lease(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    dead = {"host": "vanished-runner", "pid": 1, "started": time.time() - 7200, "lease": 1,
            "nonce": "0" * 24}
    s3.put(bucket, "p/.batcher.lock", json.dumps(dead).encode())
    path = manifest(server, tmp_path, f"s3://{bucket}/p")

    result = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "c")))

    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "taking over" in line]
    assert len(warning) == 1 and "vanished-runner" in warning[0], result.stderr
    assert "unchanged for its whole lease" in warning[0]
    assert paid(server) == 12


def test_two_shards_in_parallel_need_no_merge(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.02)
    bucket = s3.bucket()
    url = f"s3://{bucket}/sharded"
    path = manifest(server, tmp_path, url, images=10, chats=10)
    shards = [start_cli("run", str(path), "--no-progress", "--shard", f"{i}/2",
                        env=store_env(s3.url, str(tmp_path / f"machine-{i}"))) for i in (1, 2)]
    for shard in shards:
        _out, err = shard.communicate(timeout=120)
        assert shard.returncode == 0, err

    status = run_cli("status", str(path), "--json",
                     env=store_env(s3.url, str(tmp_path / "third")))

    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (20, 20, 0)
    assert paid(server) == 20
    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "fourth")))
    assert again.returncode == 0 and paid(server) == 20, again.stderr
    for i in (1, 2):
        assert ledger_in_store(s3, bucket, f"sharded/ledgers/shard-{i}-of-2.sqlite", tmp_path)


def test_status_verify_rehashes_against_the_store(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/checked"
    path = manifest(server, tmp_path, url, images=2, chats=2)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    env = store_env(s3.url, str(tmp_path / "c2"))
    clean = run_cli("status", url, "--verify", env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "every file matches" in clean.stdout

    rows = ledger_in_store(s3, bucket, "checked/ledger.sqlite", tmp_path)
    victim = rows[0]["files"][0][0]
    s3.put(bucket, f"checked/{victim}", b"tampered")
    changed = run_cli("status", url, "--verify", env=env)

    assert changed.returncode == 1
    assert f"{victim} is changed" in changed.stdout


def test_report_rewrites_the_listings_in_the_store(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/rep"
    path = manifest(server, tmp_path, url, images=1, chats=1)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    s3.put(bucket, "rep/results.jsonl", b"")

    result = run_cli("report", url, env=store_env(s3.url, str(tmp_path / "c2")))

    assert result.returncode == 0, result.stderr
    assert len(s3.get(bucket, "rep/results.jsonl").decode().splitlines()) == 2


def test_a_missing_bucket_is_a_usage_error_before_anything_is_sent(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, "s3://no-such-bucket-here/x")

    result = run_cli("run", str(path), "--no-progress", env=store_env(s3.url, str(tmp_path / "c")))

    assert result.returncode == 2, result.stderr
    assert "no-such-bucket-here" in result.stderr and "Traceback" not in result.stderr
    assert paid(server) == 0


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_contact_sheet_opens_from_the_bucket_with_every_image_decoded(
    tmp_path: Path, s3: S3Server
) -> None:
    assert CHROMIUM is not None, "CI must install chromium for this test"
    bucket = s3.bucket()
    # How a team publishes a sheet: the bucket lets anyone read its objects.
    s3.client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    for name in ("demo.yaml", "ref-a.png", "ref-b.png"):
        shutil.copy(REPO / "jobs" / name, tmp_path / name)
    result = run_cli("run", "demo.yaml", "--no-progress", "--output", f"s3://{bucket}/demo",
                     cwd=tmp_path, env=store_env(s3.url, str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr

    with chromium_page() as page:
        page.goto(f"{s3.url}/{bucket}/demo/index.html")
        state = page.evaluate(LOAD_EVERY_IMAGE)
    # The demo's 13 images and the edit's 2 input thumbnails, each by a relative link into the
    # bucket.
    assert state["count"] == 15
    assert state["loaded"] == 15, state
    assert "demo" in state["title"]


def test_a_run_whose_lock_was_taken_over_stops_and_leaves_the_new_holder_alone(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/taken", images=30, chats=30)
    process = start_cli("run", str(path), "--no-progress", "--sync-every", "0.5",
                        env=store_env(s3.url, str(tmp_path / "cache")))
    while paid(server) < 4 and process.poll() is None:
        time.sleep(0.01)
    usurper = {"host": "other-runner", "pid": 7, "started": time.time(),
               "refreshed": time.time()}
    s3.put(bucket, "taken/.batcher.lock", json.dumps(usurper).encode())
    _out, err = process.communicate(timeout=60)

    assert process.returncode == 1, err
    assert "took over" in err and "Traceback" not in err
    assert json.loads(s3.get(bucket, "taken/.batcher.lock"))["host"] == "other-runner"
    assert paid(server) < 60  # it stopped instead of finishing the set under another's lock
