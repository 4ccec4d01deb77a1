"""The lock lease of an object-store output (issue 17: 1, 2, 3, 4, 7, and status's live lock),
against moto's S3 server on 127.0.0.1, every request counted at the provider and, through a
recording proxy, every write counted at the store. A short BATCHER_LOCK_LEASE stands for the
60 s default; a fresh XDG_CACHE_HOME stands for a fresh machine."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, start_cli
from httpproxy import RecordingProxy
from s3server import FaultProxy, S3Server, fault_proxy, s3, store_env
from test_store import ledger_in_store, manifest, paid

__all__ = ["fault_proxy", "s3"]  # fixtures, used by name

LEASE = "2"  # seconds: the lease every run of these tests writes into its lock


def env(endpoint: str, cache: Path, lease: str = LEASE) -> dict[str, str]:
    return {**store_env(endpoint, str(cache)), "BATCHER_LOCK_LEASE": lease}


@pytest.fixture
def recorder(s3: S3Server) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(s3.url)
    yield proxy
    proxy.stop()


def wait_for(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def paid_twice(server: Any) -> int:
    """Requests whose body the provider saw more than once."""
    return sum(count - 1 for count in server.stats.generations.values() if count > 1)


class FakeHolder:
    """A run on another machine, as its lock shows it: heartbeating, or dead."""

    def __init__(self, s3: S3Server, bucket: str, key: str, *, clock_offset: float,
                 lease: float, alive: bool) -> None:
        self.s3, self.bucket, self.key = s3, bucket, key
        self.body = {"host": "ci-runner-7", "pid": 4242, "machine": "elsewhere",
                     "started": time.time() + clock_offset, "nonce": "f" * 24, "lease": lease,
                     "phase": "running", "beat": 0}
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._beat_forever, daemon=True)
        if alive:
            self._thread.start()

    def _beat(self) -> None:
        self.body["beat"] += 1
        self.s3.put(self.bucket, self.key, json.dumps(self.body).encode())

    def _beat_forever(self) -> None:
        while not self._stop.wait(0.3):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# ---------------------------------------------------------------- 1: overlapping layouts


@pytest.mark.parametrize("layouts", [(None, "1/2"), ("1/2", "1/3")],
                         ids=["unsharded-and-1of2", "1of2-and-1of3"])
def test_overlapping_layouts_started_together_never_both_send(
    tmp_path: Path, thread_server: Any, s3: S3Server, layouts: tuple[str | None, str | None]
) -> None:
    server = thread_server(latency=0.3)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/shared", images=20, chats=20)
    runs = []
    for i, shard in enumerate(layouts):
        extra = ["--shard", shard] if shard else []
        runs.append(start_cli("run", str(path), "--no-progress", *extra,
                              env=env(s3.url, tmp_path / f"machine-{i}")))
    results = [(run.returncode, run.pid, err) for run in runs
               for _out, err in [run.communicate(timeout=120)]]

    codes = sorted(code for code, _pid, _err in results)
    assert codes == [0, 2], results
    winner = next(pid for code, pid, _err in results if code == 0)
    loser_err = next(err for code, _pid, err in results if code == 2)
    assert f"pid {winner}" in loser_err and "Traceback" not in loser_err
    assert paid_twice(server) == 0
    won = layouts[next(i for i, (code, _p, _e) in enumerate(results) if code == 0)]
    name = ("summary.json" if won is None
            else f"ledgers/shard-{won.replace('/', '-of-')}.summary.json")
    assert paid(server) == json.loads(s3.get(bucket, f"shared/{name}"))["ran"], \
        "the run that stopped sent requests"


def test_three_layouts_started_together_let_exactly_one_send(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.3)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/three", images=20, chats=20)
    runs = [start_cli("run", str(path), "--no-progress", *extra,
                      env=env(s3.url, tmp_path / f"machine-{i}"))
            for i, extra in enumerate([[], ["--shard", "2/2"], ["--shard", "3/3"]])]
    for run in runs:
        run.communicate(timeout=120)
    codes = sorted(run.returncode for run in runs)

    assert codes == [0, 2, 2]
    assert paid_twice(server) == 0


def test_shards_of_one_count_still_run_side_by_side(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.1)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/split", images=10, chats=10)
    runs = [start_cli("run", str(path), "--no-progress", "--shard", f"{i}/3",
                      env=env(s3.url, tmp_path / f"m{i}")) for i in (1, 2, 3)]
    for run in runs:
        _out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "waiting" not in err
    assert paid(server) == 20 and paid_twice(server) == 0


# ---------------------------------------------------------------- 2: the lease


def test_a_live_holder_whose_clock_is_far_behind_is_never_taken_over(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    holder = FakeHolder(s3, bucket, "held/.batcher.lock", clock_offset=-700, lease=60,
                        alive=True)
    try:
        path = manifest(server, tmp_path, f"s3://{bucket}/held")
        second = run_cli("run", str(path), "--no-progress", env=env(s3.url, tmp_path / "c"))
    finally:
        holder.stop()

    assert second.returncode == 2, second.stderr
    assert "ci-runner-7" in second.stderr and "4242" in second.stderr
    assert "alive" in second.stderr and "Traceback" not in second.stderr
    assert paid(server) == 0
    assert json.loads(s3.get(bucket, "held/.batcher.lock"))["nonce"] == "f" * 24


def test_a_dead_holder_whose_clock_is_ahead_is_taken_over_after_its_lease(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    FakeHolder(s3, bucket, "ahead/.batcher.lock", clock_offset=+3600, lease=3.2, alive=False)
    path = manifest(server, tmp_path, f"s3://{bucket}/ahead")

    result = run_cli("run", str(path), "--no-progress", env=env(s3.url, tmp_path / "c"))

    assert result.returncode == 0, result.stderr
    # Whom, and how long at most: the holder's lease, not this run's own (2 s).
    assert "waiting up to 3 s" in result.stderr
    assert "taking over" in result.stderr and "ci-runner-7" in result.stderr
    assert paid(server) == 12
    assert ".batcher.lock" not in s3.keys(bucket, "ahead/")


def _kill_mid_run(tmp_path: Path, server: Any, s3: S3Server, bucket: str) -> Path:
    path = manifest(server, tmp_path, f"s3://{bucket}/killed", images=30, chats=30)
    first = start_cli("run", str(path), "--no-progress", env=env(s3.url, tmp_path / "dead"))
    wait_for(lambda: paid(server) >= 10)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    return path


def test_kill_9_then_a_fresh_machine_finishes_within_the_lease(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    path = _kill_mid_run(tmp_path, server, s3, bucket)
    # The killed runner's machine is gone: its lock names a machine that is not this one.
    lock = json.loads(s3.get(bucket, "killed/.batcher.lock"))
    lock["machine"] = "a-vanished-runner"
    s3.put(bucket, "killed/.batcher.lock", json.dumps(lock).encode())

    # The fresh machine's own lease is long: the dead holder's (2 s) is the one waited out.
    fresh = run_cli("run", str(path), "--no-progress",
                    env=env(s3.url, tmp_path / "fresh", lease="600"))

    assert fresh.returncode == 0, fresh.stderr
    assert f"pid {lock['pid']}" in fresh.stderr and "waiting up to 2 s" in fresh.stderr
    assert "taking over" in fresh.stderr
    assert len(ledger_in_store(s3, bucket, "killed/ledger.sqlite", tmp_path)) == 60
    assert paid(server) - 60 <= 2 * 4  # at most what was in flight (4) or waiting to upload


def test_kill_9_then_a_rerun_on_the_same_machine_takes_over_at_once(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server(latency=0.05)
    bucket = s3.bucket()
    path = _kill_mid_run(tmp_path, server, s3, bucket)

    rerun = run_cli("run", str(path), "--no-progress", env=env(s3.url, tmp_path / "again",
                                                                  lease="3600"))

    assert rerun.returncode == 0, rerun.stderr
    assert "taking over" in rerun.stderr and "gone" in rerun.stderr
    assert "waiting" not in rerun.stderr
    assert paid(server) - 60 <= 2 * 4


def test_unlock_stops_a_live_holder_which_overwrites_nothing(
    tmp_path: Path, thread_server: Any, s3: S3Server, recorder: RecordingProxy
) -> None:
    server = thread_server(latency=0.2)
    bucket = s3.bucket()
    url = f"s3://{bucket}/unlocked"
    path = manifest(server, tmp_path, url, images=40, chats=40)
    holder = start_cli("run", str(path), "--no-progress", "--sync-every", "0.3",
                       env=env(recorder.url, tmp_path / "holder"))
    wait_for(lambda: paid(server) >= 8)
    ours = env(s3.url, tmp_path / "admin")

    status = run_cli("status", url, "--json", env=ours)  # 8: the live lock is reported
    assert json.loads(status.stdout)["running"] is True, status.stderr
    assert [h["pid"] for h in json.loads(status.stdout)["holders"]] == [holder.pid]
    assert f"pid {holder.pid}" in run_cli("status", url, env=ours).stdout
    unlock = run_cli("unlock", url, env=ours)
    unlocked = time.monotonic()
    _out, err = holder.communicate(timeout=60)

    assert unlock.returncode == 0, unlock.stderr
    assert f"pid {holder.pid}" in unlock.stdout
    assert holder.returncode == 1, err
    assert "removed" in err and "Traceback" not in err
    # Until its next heartbeat it may still upload a new task's files, and finish a ledger
    # upload whose lock check came just before the unlock (its own ledger, over its own
    # version); it never writes the lock again, nor the summary or the listings.
    writes = recorder.writes()
    before = {seen.path for seen in writes if seen.at <= unlocked}
    late = [seen.path for seen in writes if seen.at > unlocked]
    task_files = (f"/{bucket}/unlocked/pics/", f"/{bucket}/unlocked/lines/")
    ledger = f"/{bucket}/unlocked/ledger.sqlite"
    assert late.count(ledger) <= 1, late
    assert not [path for path in late if path != ledger and (
        path in before or not path.startswith(task_files))], late
    assert ".batcher.lock" not in s3.keys(bucket, "unlocked/")
    again = run_cli("unlock", url, "--shard", "1/2", env=ours)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    after = run_cli("status", url, "--json", env=ours)
    assert json.loads(after.stdout)["running"] is False


def test_a_holder_paused_past_its_lease_writes_nothing_after_the_takeover(
    tmp_path: Path, thread_server: Any, s3: S3Server, recorder: RecordingProxy
) -> None:
    server = thread_server(latency=0.1)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/paused", images=30, chats=30)
    old = start_cli("run", str(path), "--no-progress", "--sync-every", "0.2",
                    env=env(recorder.url, tmp_path / "old"))
    wait_for(lambda: paid(server) >= 8)
    old.send_signal(signal.SIGSTOP)
    new = start_cli("run", str(path), "--no-progress", "--sync-every", "0.2",
                    env=env(s3.url, tmp_path / "new"))
    try:
        wait_for(lambda: json.loads(s3.get(bucket, "paused/.batcher.lock"))["pid"] == new.pid)
        resumed = time.monotonic()
        old.send_signal(signal.SIGCONT)  # the old holder wakes while the new one runs
        _out, old_err = old.communicate(timeout=60)
        _out, new_err = new.communicate(timeout=120)
    finally:
        for process in (old, new):
            if process.poll() is None:
                process.kill()
                process.communicate()

    assert new.returncode == 0, new_err
    assert "taking over" in new_err
    assert old.returncode == 1, old_err
    assert "took over" in old_err and "Traceback" not in old_err
    # Woken, it starts nothing: a write that had passed its lock check the instant before the
    # pause may still arrive, but only create-only (it can never replace the new holder's
    # object), and never a ledger.
    late = [seen for seen in recorder.writes() if seen.received >= resumed]
    assert all(seen.create_only and "ledger" not in seen.path for seen in late), late
    assert len(late) <= 4 * 2, late  # at most the in-flight tasks' files and sidecars
    rows = ledger_in_store(s3, bucket, "paused/ledger.sqlite", tmp_path)
    assert len(rows) == 60 and all(row["status"] == "ok" for row in rows)
    assert paid(server) - 60 <= 2 * 4


# ---------------------------------------------------------------- 4: lost replies


def _lock_put(kind: str) -> Any:
    """Drop the answer to the first PUT of that kind: the lock's create or a refresh, or the
    ledger's first conditional upload."""
    dropped: list[str] = []
    name = "/ledger.sqlite" if kind == "ledger" else "/.batcher.lock"

    def pick(method: str, target: str, headers: dict[str, str]) -> bool:
        conditional = "if-match" in {k.lower() for k in headers}
        if (method == "PUT" and target.split("?")[0].endswith(name) and not dropped
                and conditional == (kind != "create")):
            dropped.append(target)
            return True
        return False
    return pick


@pytest.mark.parametrize("kind", ["create", "refresh", "ledger"])
def test_a_lost_reply_to_the_locks_own_put_is_recognised(
    tmp_path: Path, thread_server: Any, s3: S3Server, recorder: RecordingProxy, kind: str
) -> None:
    server = thread_server(latency=0.1)
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/lost", images=10, chats=10)
    recorder.drop = _lock_put(kind)

    result = run_cli("run", str(path), "--no-progress", "--sync-every", "0.3",
                     env=env(recorder.url, tmp_path / "c", lease="1.2"))

    assert [seen.dropped for seen in recorder.seen].count(True) == 1
    assert result.returncode == 0, result.stderr
    assert "another" not in result.stderr and "took over" not in result.stderr
    assert paid(server) == 20
    assert ".batcher.lock" not in s3.keys(bucket, "lost/")  # released, not orphaned
    assert len(ledger_in_store(s3, bucket, "lost/ledger.sqlite", tmp_path)) == 20


# ---------------------------------------------------------------- 7: missing or silent stores


@pytest.mark.parametrize("command", ["run", "status", "plan", "report", "prune", "unlock"])
def test_a_missing_bucket_is_exit_2_at_once_for_every_command(
    tmp_path: Path, thread_server: Any, s3: S3Server, command: str
) -> None:
    server = thread_server()
    url = "s3://no-such-bucket-here/x"
    path = manifest(server, tmp_path, url)
    args = {"run": ["run", str(path), "--no-progress"], "status": ["status", str(path)],
            "plan": ["plan", str(path)], "report": ["report", url],
            "prune": ["prune", str(path)], "unlock": ["unlock", url]}[command]

    # The store timeout stays at its default (5 minutes): only a prompt answer passes.
    result = run_cli(*args, env=env(s3.url, tmp_path / "c"), timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "no-such-bucket-here" in result.stderr and "no such bucket" in result.stderr
    assert "Traceback" not in result.stderr
    assert paid(server) == 0


def test_a_silent_store_gets_one_line_saying_how_long_batcher_retries(
    tmp_path: Path, thread_server: Any, s3: S3Server, fault_proxy: FaultProxy
) -> None:
    server = thread_server()
    path = manifest(server, tmp_path, f"s3://{s3.bucket()}/silent")
    fault_proxy.set_mode("hang")

    result = run_cli("run", str(path), "--no-progress", "--store-timeout", "13",
                     env=env(fault_proxy.url, tmp_path / "c"))

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "has not answered" in line]
    assert len(lines) == 1, result.stderr
    assert "3 s more" in lines[0]  # 13 s of --store-timeout, 10 of them silent
    assert paid(server) == 0


def test_unlock_of_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("unlock", str(tmp_path / "out"))
    assert result.returncode == 2 and "store" in result.stderr


def test_status_of_a_store_with_no_run_says_not_running(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/done", images=1, chats=1)
    assert run_cli("run", str(path), "--no-progress",
                   env=env(s3.url, tmp_path / "a")).returncode == 0
    status = run_cli("status", f"s3://{bucket}/done", "--json", env=env(s3.url, tmp_path / "b"))
    report = json.loads(status.stdout)
    assert report["running"] is False and report["holders"] == []
