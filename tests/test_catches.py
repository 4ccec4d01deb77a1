"""Issue 21: tests that catch what they claim. Each test here was checked by making the one-line
break named in its comment (the code edited, the test run and seen to fail, the file restored).

Stores run against moto's S3 server on 127.0.0.1, providers are the built-in server or a
scripted one, and every request that could be paid twice is counted at the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, write_manifest
from s3server import S3Server, s3, store_env
from scripted import Reply, ScriptedServer, good_image, json_reply
from test_store import ledger_in_store, manifest, paid

from batcher.location import parse_store_url
from batcher.manifest import load_manifest
from batcher.records import FileRecord, Record
from batcher.run import RunOptions, run
from batcher.store.mirror import open_store_output
from batcher.store.working import cache_root

__all__ = ["s3"]  # a fixture, used by name


def results_ids(data: bytes) -> set[str]:
    return {json.loads(line)["custom_id"] for line in data.decode().splitlines()}


def use_store(monkeypatch: pytest.MonkeyPatch, s3: S3Server, cache: Path) -> None:
    for name, value in store_env(s3.url, str(cache)).items():
        monkeypatch.setenv(name, value)


def stored_file(root: Path, name: str, data: bytes) -> FileRecord:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileRecord(name, len(data), hashlib.sha256(data).hexdigest())


def ok_record(files: list[FileRecord]) -> Record:
    return Record(id="a" * 64, job="pics", provider="test", kind="image", model="m",
                  prompt="p", seed=1, status="ok", attempts=1, files=files)


# --------------------------------------------------------------------------- the cache folder


def test_every_test_has_its_own_cache_folder(tmp_path: Path) -> None:
    # issue 19 item 5: a store's working copy of a test never lands in the developer's cache.
    cache = Path(os.environ["XDG_CACHE_HOME"])
    assert cache.is_relative_to(tmp_path)
    url = parse_store_url("s3://bucket/prefix")
    assert url is not None
    assert cache_root(url, "all").is_relative_to(cache)


# --------------------------------------------------------------------------- store: keep order


async def test_a_store_task_counts_as_ok_only_once_its_files_and_sidecar_are_in_the_store(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Break: store.uploads.Uploads._upload calls kept(record) before the uploads.
    bucket = s3.bucket()
    use_store(monkeypatch, s3, tmp_path / "cache")
    url = parse_store_url(f"s3://{bucket}/keep")
    assert url is not None
    seen: list[dict[str, int]] = []
    failures: list[BaseException] = []
    async with open_store_output(url, shard=None, sync_every=60, store_timeout=5,
                                 slots=2) as output:
        image = stored_file(output.root, "pics/a.png", b"png bytes")
        stored_file(output.root, "pics/a.json", b'{"sidecar": true}')
        await output.keep(ok_record([image]), "pics/a.json",
                          lambda _record: seen.append(s3.keys(bucket, "keep/pics/")),
                          failures.append)
        await output.drain()
    assert failures == []
    assert seen == [{"keep/pics/a.png": 9, "keep/pics/a.json": 17}]


async def test_a_task_whose_file_cannot_be_uploaded_has_no_sidecar_and_is_not_kept(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Breaks: the sidecar put before the task's files; kept(record) before the uploads.
    bucket = s3.bucket()
    use_store(monkeypatch, s3, tmp_path / "cache")
    url = parse_store_url(f"s3://{bucket}/lost")
    assert url is not None
    kept: list[Record] = []
    failures: list[BaseException] = []
    async with open_store_output(url, shard=None, sync_every=60, store_timeout=5,
                                 slots=2) as output:
        first = stored_file(output.root, "pics/a-1.png", b"first image")
        second = stored_file(output.root, "pics/a-2.png", b"second image")
        (output.root / second.path).unlink()  # the working copy lost it before the upload
        stored_file(output.root, "pics/a.json", b'{"sidecar": true}')
        await output.keep(ok_record([first, second]), "pics/a.json", kept.append,
                          failures.append)
        await output.drain()
    assert kept == [] and len(failures) == 1
    assert "lost/pics/a.json" not in s3.keys(bucket, "lost/")


# --------------------------------------------------------------------------- store: adoption


def test_adopting_after_the_ledger_is_lost_reads_sidecars_of_whole_files_only(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Breaks: _adopt adopts nothing; _read_sidecar's size check dropped (or only presence
    # checked). A machine died after uploading files and sidecars but before publishing its
    # ledger; one image never arrived, another arrived cut short.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/lost")
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    images = sorted(row["files"][0][0] for row in
                    ledger_in_store(s3, bucket, "lost/ledger.sqlite", tmp_path)
                    if row["job"] == "pics")
    s3.client.delete_object(Bucket=bucket, Key="lost/ledger.sqlite")
    s3.client.delete_object(Bucket=bucket, Key=f"lost/{images[0]}")
    s3.put(bucket, f"lost/{images[1]}", s3.get(bucket, f"lost/{images[1]}")[:-10])
    before = paid(server)

    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "c2")))

    assert again.returncode == 0, again.stderr
    assert paid(server) - before == 2  # exactly the missing and the cut-short image
    rows = ledger_in_store(s3, bucket, "lost/ledger.sqlite", tmp_path)
    assert len(rows) == 12 and all(row["status"] == "ok" for row in rows)


def test_a_truncated_object_in_the_store_is_not_done(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: store.restore.earlier checks only that a file is listed, not its size.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/cut", images=2, chats=1)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    rows = ledger_in_store(s3, bucket, "cut/ledger.sqlite", tmp_path)
    image = next(row["files"][0][0] for row in rows if row["job"] == "pics")
    s3.put(bucket, f"cut/{image}", s3.get(bucket, f"cut/{image}")[:-10])
    before = paid(server)

    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "c2")))

    assert again.returncode == 0, again.stderr
    assert paid(server) - before == 1
    row = next(r for r in ledger_in_store(s3, bucket, "cut/ledger.sqlite", tmp_path)
               if r["files"][0][0] == image)
    assert len(s3.get(bucket, f"cut/{image}")) == row["files"][0][1]


# --------------------------------------------------------------------------- store: listings


def test_a_store_run_with_nothing_to_do_writes_missing_listings_again(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: StoreOutput.finish without its `not self._had_listings` condition.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/gone", images=2, chats=2)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    for name in ("results.jsonl", "index.html"):
        s3.client.delete_object(Bucket=bucket, Key=f"gone/{name}")

    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "c2")))

    assert again.returncode == 0, again.stderr
    assert paid(server) == 4
    assert len(results_ids(s3.get(bucket, "gone/results.jsonl"))) == 4
    assert b"<img" in s3.get(bucket, "gone/index.html")


def test_listings_are_written_again_after_adopting(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: StoreOutput.finish without its `self._adopted` condition. The machine that died
    # had uploaded the tasks' files and sidecars; the listings in the store are older.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/adopt", images=2, chats=2)
    assert run_cli("run", str(path), "--no-progress",
                   env=store_env(s3.url, str(tmp_path / "c1"))).returncode == 0
    s3.client.delete_object(Bucket=bucket, Key="adopt/ledger.sqlite")
    s3.put(bucket, "adopt/results.jsonl", b"")

    again = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "c2")))

    assert again.returncode == 0, again.stderr
    assert paid(server) == 4  # all four adopted
    assert len(results_ids(s3.get(bucket, "adopt/results.jsonl"))) == 4


def test_a_stores_listings_cover_every_shards_ledger(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: write_store_listings does not read the other ledgers.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/shards", images=4, chats=4)
    for i in (1, 2):  # one after the other: the second writes the listings last
        done = run_cli("run", str(path), "--no-progress", "--shard", f"{i}/2",
                       env=store_env(s3.url, str(tmp_path / f"m{i}")))
        assert done.returncode == 0, done.stderr
    ids: set[str] = set()
    for i in (1, 2):
        shard = ledger_in_store(s3, bucket, f"shards/ledgers/shard-{i}-of-2.sqlite", tmp_path)
        assert shard  # each shard had tasks
        ids |= {row["id"] for row in shard}

    assert len(ids) == 8
    assert results_ids(s3.get(bucket, "shards/results.jsonl")) == ids
    page = s3.get(bucket, "shards/index.html").decode()
    assert page.count("<img") >= 4  # every shard's images


def test_folder_listings_older_than_the_ledger_are_written_again(
    tmp_path: Path, thread_server: Any
) -> None:
    # Break: store.listings._listings_stale returns False. A run killed after its ledger
    # rows and before its listings leaves listings older than the ledger.
    server = thread_server()
    path = manifest(server, tmp_path, "out", images=2, chats=2)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    hour_ago = time.time() - 3600
    (tmp_path / "out" / "results.jsonl").write_text("")
    for name in ("results.jsonl", "index.html"):
        os.utime(tmp_path / "out" / name, (hour_ago, hour_ago))

    again = run_cli("run", str(path), "--no-progress")

    assert again.returncode == 0, again.stderr
    assert paid(server) == 4
    assert len(results_ids((tmp_path / "out" / "results.jsonl").read_bytes())) == 4


# --------------------------------------------------------------------------- prune, status


def test_prune_dry_run_on_a_store_changes_nothing_there(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: store.prune.prune without its `if dry_run: return found` before _remove.
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/dry"
    path = manifest(server, tmp_path, url, images=2, chats=1)
    env = store_env(s3.url, str(tmp_path / "c"))
    assert run_cli("run", str(path), "--no-progress", env=env).returncode == 0
    path = manifest(server, tmp_path, url, images=2, chats=1, prompt="A paper lantern {n}")
    before = {key: s3.get(bucket, key) for key in s3.keys(bucket, "dry/")}

    dry = run_cli("prune", str(path), "--dry-run", "--force", env=env)

    assert dry.returncode == 0, dry.stderr
    assert "would remove 2 tasks" in dry.stdout, dry.stdout
    assert {key: s3.get(bucket, key) for key in s3.keys(bucket, "dry/")} == before


def test_status_of_an_edited_manifest_counts_only_its_tasks(
    tmp_path: Path, thread_server: Any
) -> None:
    # Break: ledger_status counts rows the manifest no longer has.
    server = thread_server()
    path = manifest(server, tmp_path, "out", images=3, chats=1)
    assert run_cli("run", str(path), "--no-progress").returncode == 0
    path = manifest(server, tmp_path, "out", images=3, chats=1, prompt="A paper lantern {n}")

    status = run_cli("status", str(path), "--json")

    report = json.loads(status.stdout)
    assert status.returncode == 1
    assert (report["total"], report["ok"], report["pending"]) == (4, 1, 3)
    pics = next(row for row in report["models"] if row["job"] == "pics")
    assert (pics["total"], pics["ok"], pics["pending"]) == (3, 0, 3)


def test_status_verify_on_a_store_reports_a_missing_object(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: store.verify counts a missing object as matching.
    server = thread_server()
    bucket = s3.bucket()
    url = f"s3://{bucket}/verify"
    path = manifest(server, tmp_path, url, images=1, chats=1)
    env = store_env(s3.url, str(tmp_path / "c"))
    assert run_cli("run", str(path), "--no-progress", env=env).returncode == 0
    rows = ledger_in_store(s3, bucket, "verify/ledger.sqlite", tmp_path)
    victim = next(row["files"][0][0] for row in rows if row["job"] == "pics")
    s3.client.delete_object(Bucket=bucket, Key=f"verify/{victim}")

    checked = run_cli("status", url, "--verify", "--json", env=env)

    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    assert [(item["path"], item["problem"]) for item in report["changed"]] == [
        (victim, "missing")]


# --------------------------------------------------------------------------- spend


def chat_manifest(folder: Path, server: Any, prompts: int, *, budget: float) -> Path:
    prices = "prices:\n  chatty: {input: 1000, output: 1000}\n"
    return write_manifest(folder, f"name: held\noutput: out\nbudget: {budget}\n"
                          + provider_block(server, concurrency=1, extra=prices)
                          + "jobs:\n  - name: talk\n    type: chat\n    provider: test\n"
                          + "    model: chatty\n"
                          + f"    prompts: {json.dumps([f'q{i}' for i in range(prompts)])}\n"
                          + "    params: {max_tokens: 100}\n")


async def test_an_answer_of_unknown_cost_stays_held_against_the_budget(tmp_path: Path) -> None:
    # Break: Spend.settle does not hold an unknown cost at its estimate. The answers carry
    # no usage, so their token-priced cost is unknown; each estimate is ~$0.10, the budget
    # has room for two and a half.
    server = ScriptedServer().start()
    try:
        server.default = json_reply({"id": "c", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "fine"},
             "finish_reason": "stop"}]})
        path = chat_manifest(tmp_path, server, 5, budget=0.25)
        outcome = await run(load_manifest(path), RunOptions(progress=False,
                                                            handle_signals=False))
    finally:
        server.stop()
    assert sum(server.requests.values()) == 2
    assert outcome.exit_code == 1 and outcome.summary["ok"] == 2
    assert outcome.summary["pending"] == 3
    assert outcome.summary["cost_unknown_requests"] == 2


async def test_an_attempt_that_never_reached_the_provider_costs_nothing(
    tmp_path: Path,
) -> None:
    # Break: failed_attempt_cost charges an unreached attempt its estimate.
    with socket.socket() as probe:  # a port where nothing listens: every connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = write_manifest(tmp_path, f"""\
        name: nowhere
        output: out
        budget: 0.025
        providers:
          test:
            base_url: http://127.0.0.1:{port}/v1
            concurrency: 2
            retries: 2
            prices: {{flux.1-schnell: {{image: 0.01}}}}
        jobs:
          - name: shots
            type: image
            provider: test
            model: flux.1-schnell
            prompts: [one, two, three]
        """)

    outcome = await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))

    summary = outcome.summary
    assert summary["cost_usd"] == 0.0 and summary["cost_unknown_requests"] == 0
    assert summary["pending"] == 3 and summary["requests"] >= 2
    assert outcome.message is not None and "unreachable" in outcome.message
    assert "budget" not in outcome.message



# --------------------------------------------------------------------------- resume, merge


def scripted_images(folder: Path, server: ScriptedServer, prompts: list[str]) -> Path:
    return write_manifest(folder, "name: again\noutput: out\n"
                          + provider_block(server, concurrency=1, extra="retries: 0")
                          + "jobs:\n  - name: pics\n    type: image\n    provider: test\n"
                          + f"    model: m\n    prompts: {json.dumps(prompts)}\n"
                          + "    params: {response_format: b64_json}\n")


def test_skip_failed_sends_no_failed_task_again(tmp_path: Path) -> None:
    # Break: Selection.walk ignores --skip-failed.
    server = ScriptedServer().start()
    try:
        server.replies["good"] = good_image()
        server.replies["refused"] = Reply(b'{"error": {"message": "no"}}', status=400)
        path = scripted_images(tmp_path, server, ["good", "refused"])
        first = run_cli("run", str(path), "--no-progress")
        assert first.returncode == 1, first.stderr
        assert dict(server.requests) == {"good": 1, "refused": 1}

        skipped = run_cli("run", str(path), "--no-progress", "--skip-failed")
        assert skipped.returncode == 1, skipped.stderr  # a failed task is left, not ok
        assert dict(server.requests) == {"good": 1, "refused": 1}

        retried = run_cli("run", str(path), "--no-progress")
        assert dict(server.requests) == {"good": 1, "refused": 2}, retried.stderr
    finally:
        server.stop()


def test_merge_keeps_the_ok_result_of_a_task_whatever_the_order(tmp_path: Path) -> None:
    # Break: merge_outputs takes the first folder's row even when it failed and another
    # folder has the task ok.
    server = ScriptedServer().start()
    try:
        path = scripted_images(tmp_path, server, ["one", "two"])
        server.default = Reply(b'{"error": {"message": "no"}}', status=400)
        assert run_cli("run", str(path), "--no-progress", "--output", "failed").returncode == 1
        server.default = good_image()
        assert run_cli("run", str(path), "--no-progress", "--output", "ok").returncode == 0
    finally:
        server.stop()

    for order in (["failed", "ok"], ["ok", "failed"]):
        target = tmp_path / f"merged-{order[0]}"
        done = run_cli("merge", *order, "--output", str(target))
        assert done.returncode == 0, done.stderr
        rows = ledger_rows(target, decode=True)
        assert sorted(row["status"] for row in rows) == ["ok", "ok"], order
        for row in rows:
            for rel, size, _digest in row["files"]:
                assert (target / rel).stat().st_size == size


def test_a_finished_store_run_again_adopts_nothing_and_keeps_the_attempt_counts(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    # Break: store.restore.adopt reads the sidecars of every selected task, done ones too (its
    # `if sends` dropped): each re-run adds their attempts again.
    server = thread_server()
    bucket = s3.bucket()
    path = manifest(server, tmp_path, f"s3://{bucket}/twice", images=2, chats=2)
    for machine in ("c1", "c2", "c3"):
        done = run_cli("run", str(path), "--no-progress",
                       env=store_env(s3.url, str(tmp_path / machine)))
        assert done.returncode == 0, done.stderr
    assert paid(server) == 4
    rows = ledger_in_store(s3, bucket, "twice/ledger.sqlite", tmp_path)
    assert [row["attempts"] for row in rows] == [1, 1, 1, 1]
