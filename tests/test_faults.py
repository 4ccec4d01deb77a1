"""Failure paths of a run, against the built-in server on 127.0.0.1 with injected faults.

Each test checks what a user relies on: every task ends ok after retries, or fails with the
provider's own message and is not retried when retrying cannot help; files match the ledger;
429s pause the whole provider; a spent quota or a refused key stops the run early.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest
from scripted import GOOD_PNG, ScriptedServer, json_reply

from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, run
from batcher.server import FAULT_KINDS, LocalServer, canonical_hash

IMAGES = "/images/generations"
MODEL = "flux.1-schnell"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
URL_ONLY_FAULTS = {"url_404", "not_image"}
# A request started just before the client read a 429 may still reach the server after it.
IN_FLIGHT_ALLOWANCE = 0.1


# ---------------------------------------------------------------------------- helpers


def image_manifest(
    server: LocalServer,
    *,
    name: str = "faults",
    seeds: int = 4,
    prompts: tuple[str, ...] = ("a lighthouse in a storm",),
    params: dict[str, Any] | None = None,
    rate: str = "100/s",
    concurrency: int = 4,
    provider: str = "retries: 5\ntimeout: 2",
    key_env: str | None = None,
) -> Path:
    """A manifest of ``len(prompts) * seeds`` image tasks for provider ``test`` at ``server``."""
    params = {"size": "256x256", "response_format": "b64_json", **(params or {})}
    text = (
        f"name: {name}\n"
        + provider_block(server, rate=rate, concurrency=concurrency, key_env=key_env,
                         extra=provider)
        + "jobs:\n"
        + "  - name: pics\n"
        + "    type: image\n"
        + "    provider: test\n"
        + f"    model: {MODEL}\n"
        + f"    prompts: {json.dumps(list(prompts))}\n"
        + f"    seeds: {seeds}\n"
        + f"    params: {json.dumps(params)}\n"
    )
    return write_manifest(Path.cwd(), text)


async def run_in_process(manifest: Path) -> Outcome:
    """``batcher run`` in the test's loop (no signal handlers, no progress output)."""
    options = RunOptions(progress=False, handle_signals=False)
    return await run(load_manifest(manifest), options)


def output_of(name: str) -> Path:
    return Path.cwd() / "output" / name



def summary_of(root: Path) -> dict[str, Any]:
    return json.loads((root / "summary.json").read_text())


def assert_files_valid(root: Path, rows: list[dict[str, Any]]) -> None:
    """Each ok row's files exist with the recorded size and sha256 and are 256x256 PNGs."""
    for row in rows:
        if row["status"] != "ok":
            continue
        files = json.loads(row["files"])
        assert files, f"ok row {row['id']} names no file"
        for rel, size, sha in files:
            data = (root / rel).read_bytes()
            assert len(data) == size, rel
            assert hashlib.sha256(data).hexdigest() == sha, rel
            assert data.startswith(PNG_SIGNATURE), rel
            assert struct.unpack(">II", data[16:24]) == (256, 256), rel


def expected_bodies(prompts: tuple[str, ...], seeds: int, params: dict[str, Any]) -> list[dict]:
    """The request bodies the contract implies: model, prompt, params as given, seed."""
    return [
        {"model": MODEL, "prompt": prompt, **params, "seed": seed}
        for prompt in prompts
        for seed in range(seeds)
    ]


def body_hash(body: dict[str, Any]) -> str:
    return canonical_hash(json.dumps(body).encode())


def hash_draws(digest: str) -> tuple[float, float]:
    """(fail draw, fault draw) exactly as the built-in server documents them."""
    return int(digest[:13], 16) / 16**13, int(digest[13:26], 16) / 16**13


def generation_records(server: LocalServer) -> list[Any]:
    return server.stats.matching(IMAGES)


def requests_per_body(server: LocalServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in generation_records(server):
        counts[record.body_hash] = counts.get(record.body_hash, 0) + 1
    return counts


# ---------------------------------------------------------------------------- one fault kind


@pytest.mark.parametrize("kind", FAULT_KINDS)
async def test_each_fault_kind_is_retried_until_ok(server_factory, kind: str) -> None:
    response_format = "url" if kind in URL_ONLY_FAULTS else "b64_json"
    # "slow" answers after 30 s: the client's 1 s timeout must end the attempt and retry.
    timeout = 1 if kind == "slow" else 2
    server = await server_factory(fault_rate=1.0, fault_kinds=(kind,))
    manifest = image_manifest(
        server, seeds=4, params={"response_format": response_format},
        provider=f"retries: 5\ntimeout: {timeout}",
    )

    outcome = await run_in_process(manifest)

    root = output_of("faults")
    rows = ledger_rows(root)
    assert outcome.exit_code == 0, outcome.message
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows)
    # Every distinct body faults exactly once, so every task needed exactly one retry.
    assert server.stats.faults[kind] == 4, server.stats.faults
    assert all(row["attempts"] == 2 for row in rows), [row["attempts"] for row in rows]
    summary = summary_of(root)
    assert summary["retries"] == 4
    assert summary["ok"] == 4 and summary["failed"] == 0 and summary["pending"] == 0
    assert summary["exit_code"] == 0
    if kind == "429":
        assert summary["rate_limited"] >= 4
    # Each body was generated (answered in full) exactly once: nothing was paid twice.
    assert sorted(server.stats.generations.values()) == [1, 1, 1, 1]
    assert_files_valid(root, rows)
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------- permanent errors


def test_permanent_500_fails_every_task_with_the_providers_message(thread_server) -> None:
    server = thread_server(fail_rate=1.0)
    manifest = image_manifest(server, seeds=3, provider="retries: 2\ntimeout: 2")

    result = run_cli("run", str(manifest), "--no-progress")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = ledger_rows(output_of("faults"))
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "failed"
        assert row["reason"] == "http_500"
        assert row["http_status"] == 500
        assert "injected permanent failure" in row["error"]
        assert row["attempts"] == 3  # retries + 1
        assert json.loads(row["files"]) == []
    assert sorted(requests_per_body(server).values()) == [3, 3, 3]
    summary = summary_of(output_of("faults"))
    assert (summary["ok"], summary["failed"], summary["pending"]) == (0, 3, 0)
    assert summary["exit_code"] == 1
    results = [json.loads(line) for line in
               (output_of("faults") / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3
    # The provider answered: its 500 is the response (OpenAI's Batch shape), not an error.
    assert all(r["error"] is None and r["response"]["status_code"] == 500 for r in results)
    assert all("injected permanent failure" in r["response"]["body"]["error"]["message"]
               for r in results)


async def test_400_is_not_retried_and_its_message_is_recorded(server_factory) -> None:
    server = await server_factory()
    manifest = image_manifest(server, seeds=3, params={"size": "300x300"})

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 1
    rows = ledger_rows(output_of("faults"))
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "failed"
        assert row["reason"] == "http_400"
        assert row["attempts"] == 1
        assert "'300x300' is not one of" in row["error"]
    assert sorted(requests_per_body(server).values()) == [1, 1, 1]
    assert summary_of(output_of("faults"))["retries"] == 0


async def test_mixed_faults_fail_exactly_the_always_failing_tasks(server_factory) -> None:
    prompts = tuple(f"a street market in city number {i}" for i in range(10))
    seeds = 4
    server = await server_factory(fault_rate=0.4, fail_rate=0.1)
    manifest = image_manifest(server, prompts=prompts, seeds=seeds,
                              provider="retries: 2\ntimeout: 2", concurrency=8, rate="200/s")
    params = {"size": "256x256", "response_format": "b64_json"}
    bodies = expected_bodies(prompts, seeds, params)
    doomed = {(b["prompt"], b["seed"]) for b in bodies if hash_draws(body_hash(b))[0] < 0.1}
    faulty = {(b["prompt"], b["seed"]) for b in bodies if hash_draws(body_hash(b))[1] < 0.4}
    # The manifest is chosen so that the run holds both kinds of trouble and plain successes.
    assert 0 < len(doomed) < len(bodies) and faulty - doomed

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 1
    rows = ledger_rows(output_of("faults"))
    assert len(rows) == len(bodies)
    failed = {(row["prompt"], row["seed"]) for row in rows if row["status"] == "failed"}
    assert failed == doomed
    assert {body_hash(b) for b in bodies} == set(requests_per_body(server))
    for row in rows:
        if row["status"] == "failed":
            assert row["error"] == "injected permanent failure" and row["attempts"] == 3
    assert_files_valid(output_of("faults"), rows)
    summary = summary_of(output_of("faults"))
    assert summary["failed"] == len(doomed)
    assert summary["ok"] == len(bodies) - len(doomed)
    assert summary["retries"] >= len(faulty - doomed)


# ---------------------------------------------------------------------------- 429 and quota


def announced_waits(server: LocalServer, count: int, period: float) -> list[tuple[float, float]]:
    """(arrival, announced wait) of each rate-limit 429, replaying the server's rolling window.

    The replay must agree with every status the server sent, or the reconstruction is wrong.
    """
    window: list[float] = []
    result = []
    for record in generation_records(server):
        window = [t for t in window if t > record.t - period]
        if len(window) >= count:
            assert record.status == 429, record
            result.append((record.t, window[0] + period - record.t))
        else:
            assert record.status == 200, record
            window.append(record.t)
    return result


async def test_429_pauses_the_whole_provider_for_the_announced_wait(server_factory) -> None:
    count, period, tasks, concurrency = 5, 1.0, 20, 8
    server = await server_factory(rate_limit=(count, period))
    manifest = image_manifest(server, seeds=tasks, rate="50/s", concurrency=concurrency,
                              provider="retries: 8\ntimeout: 5")

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 0, outcome.message
    rows = ledger_rows(output_of("faults"))
    assert len(rows) == tasks and all(row["status"] == "ok" for row in rows)
    assert_files_valid(output_of("faults"), rows)
    limited = announced_waits(server, count, period)
    assert limited, "the manifest's rate is 10x the server's: some 429 must have come"
    assert len(limited) < tasks
    summary = summary_of(output_of("faults"))
    assert summary["rate_limited"] == len(limited) == server.stats.rate_limited
    arrivals = [r.t for r in generation_records(server)]
    for t429, wait in limited:
        # Within the announced wait only requests already in flight may arrive (at most one
        # per other worker, and only just after the 429): the 429 paused the whole provider.
        # A pause per worker would let the other workers go on at the manifest's 50/s.
        inside = [t - t429 for t in arrivals if t429 < t < t429 + wait - 0.005]
        assert len(inside) <= concurrency - 1, (t429, wait, inside)
        assert all(delay < IN_FLIGHT_ALLOWANCE for delay in inside), (t429, wait, inside)
    # 429s come in storms of at most one per worker, and not every window has one.
    windows = math.ceil((arrivals[-1] - arrivals[0]) / period) + 1
    storms = 0
    storm_end = -math.inf
    for t429, wait in limited:
        if t429 >= storm_end:
            storms += 1
            storm_end = t429 + wait
    assert storms <= windows, (storms, windows, limited)


def test_spent_quota_stops_the_provider_with_a_clear_message(thread_server) -> None:
    concurrency = 4
    server = thread_server(quota_exhausted=True)
    manifest = image_manifest(server, seeds=20, concurrency=concurrency)

    result = run_cli("run", str(manifest), "--no-progress")

    # README: a quota stop leaves the affected tasks pending, not failed; exit 1.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "quota" in result.stderr.lower()
    assert 1 <= len(generation_records(server)) <= concurrency + 1
    summary = summary_of(output_of("faults"))
    assert (summary["total"], summary["ok"], summary["failed"], summary["pending"]) == (
        20, 0, 0, 20)
    assert summary["exit_code"] == 1
    assert ledger_rows(output_of("faults")) == []


def test_a_wait_over_max_wait_stops_the_provider_and_leaves_its_tasks_pending(
    thread_server,
) -> None:
    concurrency, tasks = 2, 12
    # The server takes one request a minute; everything after the first is told to wait ~60 s.
    server = thread_server(rate_limit=(1, 60.0))
    manifest = image_manifest(server, seeds=tasks, concurrency=concurrency,
                              provider="retries: 5\ntimeout: 5\nmax_wait: 5")

    result = run_cli("run", str(manifest), "--no-progress")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "max_wait" in result.stderr
    statuses = [r.status for r in generation_records(server)]
    assert statuses.count(200) == 1
    assert 1 <= statuses.count(429) <= concurrency  # no request after the stop but in flight
    summary = summary_of(output_of("faults"))
    assert (summary["ok"], summary["failed"], summary["pending"]) == (1, 0, tasks - 1)
    assert summary["rate_limited"] == statuses.count(429)


# ---------------------------------------------------------------------------- downloads


async def test_download_over_the_cap_fails_once_and_is_not_retried(server_factory) -> None:
    server = await server_factory()
    manifest = image_manifest(server, seeds=3, params={"response_format": "url"},
                              provider="retries: 5\ntimeout: 2\ndownload_cap: 100")

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 1
    root = output_of("faults")
    rows = ledger_rows(root)
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "failed"
        assert row["reason"] == "download_too_large"
        assert row["attempts"] == 1
    assert sorted(requests_per_body(server).values()) == [1, 1, 1]
    assert len(server.stats.matching(".png", listener="files")) == 3
    assert not [p for p in root.rglob("*.png")]
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_download_cap_counts_the_bytes_read_when_no_length_is_sent(tmp_path: Path) -> None:
    server = ScriptedServer().start()
    try:
        url = f"{server.url}/files/chunked.png"
        server.replies.update({"capped": json_reply({"data": [{"url": url}]})})
        cap = len(GOOD_PNG) - 1
        manifest = write_manifest(tmp_path, (
            "name: faults\nproviders:\n  test:\n"
            f"    base_url: {server.api_url}\n    retries: 5\n    download_cap: {cap}\n"
            "jobs:\n  - {name: pics, type: image, provider: test, model: m, prompt: capped}\n"))

        done = run_cli("run", str(manifest), "--no-progress")

        assert done.returncode == 1, done.stderr
        rows = ledger_rows(output_of("faults"))
        assert [(r["status"], r["reason"]) for r in rows] == [("failed", "download_too_large")]
        assert server.requests["capped"] == 1 and server.downloads["chunked.png"] == 1
        assert not [p for p in output_of("faults").rglob("*.png")]
    finally:
        server.stop()


@pytest.mark.parametrize("regenerations", [1, 0])
async def test_a_refusing_image_host_costs_at_most_one_regeneration(
    server_factory, regenerations: int
) -> None:
    tasks, downloads_per_generation = 8, 3
    server = await server_factory(download_status=403)
    manifest = image_manifest(
        server, seeds=tasks, params={"response_format": "url"},
        provider=f"retries: 5\ntimeout: 2\nregenerations: {regenerations}")

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 1
    generations = regenerations + 1
    # Counted at the server: each task paid for its generation at most twice ...
    assert sorted(requests_per_body(server).values()) == [generations] * tasks
    assert sum(server.stats.generations.values()) == generations * tasks
    # ... while each generation's download was tried three times, for free.
    downloads = server.stats.matching(".png", listener="files")
    assert len(downloads) == downloads_per_generation * generations * tasks
    assert {r.status for r in downloads} == {403}
    rows = ledger_rows(output_of("faults"))
    assert len(rows) == tasks
    for row in rows:
        assert (row["status"], row["reason"], row["attempts"]) == ("failed", "download",
                                                                   generations)
        assert "403" in row["error"]
    assert outcome.summary["retries"] == regenerations * tasks


# ---------------------------------------------------------------------------- refused key


def test_401_mid_run_stops_with_exit_3(thread_server) -> None:
    concurrency = 4
    server = thread_server(api_key="sk-good-key", latency=0.1)
    manifest = image_manifest(server, seeds=40, concurrency=concurrency, key_env="TEST_KEY")
    proc = start_cli("run", str(manifest), "--no-progress", env={"TEST_KEY": "sk-good-key"})
    try:
        deadline = time.monotonic() + 30
        while sum(r.status == 200 for r in list(server.stats.requests)) < 6:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.02)
        server.options.api_key = "sk-rotated-key"  # the key is revoked mid-run
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert "TEST_KEY" in stderr  # the message names where the key comes from
    refused = [r for r in generation_records(server) if r.status == 401]
    assert 1 <= len(refused) <= concurrency  # at most the requests in flight
    root = output_of("faults")
    rows = ledger_rows(root)
    summary = summary_of(root)
    assert summary["exit_code"] == 3
    assert summary["ok"] >= 6 and summary["pending"] > 0
    assert summary["ok"] + summary["failed"] + summary["pending"] == 40
    assert_files_valid(root, rows)
