"""Robustness of a run: batcher's own errors, providers that hold each other back, keys that
leak or cannot travel, stops that must leave tasks pending, one-line errors for bad folders,
ledgers and options, the output-folder lock, identical requests in two jobs, mixed JSONL sheets,
stale listings, and the pacer's rolling window (also after a final 429).

Everything runs against real servers on 127.0.0.1: the built-in one, or a few lines of
aiohttp.web where a test needs a provider that misbehaves in one precise way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web
from conftest import ledger_rows, provider_block, run_cli, start_cli, write_manifest

from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.providers.rates import Rate
from batcher.run.limits import Pacer
from batcher.run.pool import Outcome, RunOptions, run

IMAGES = "/images/generations"
CHAT = "/chat/completions"
MODEL = "flux.1-schnell"
CHAT_MODEL = "llama-3.1-8b-instruct"
PARAMS = '{size: 256x256, response_format: b64_json}'
# A subprocess that outlives this is hung: the tests fail instead of waiting forever.
CLI_TIMEOUT = 60


# --------------------------------------------------------------------------- helpers


def image_job(name: str, *, provider: str = "test", seeds: int = 3,
              prompt: str = "a lighthouse in a storm", model: str = MODEL) -> str:
    return (f"  - name: {name}\n    type: image\n    provider: {provider}\n    model: {model}\n"
            f"    prompt: {json.dumps(prompt)}\n    seeds: {seeds}\n    params: {PARAMS}\n")


def manifest_for(server: Any, jobs: str, *, name: str = "robust", **provider: Any) -> Path:
    """A manifest writing to ./out with provider ``test`` at ``server``."""
    text = f"name: {name}\noutput: out\n" + provider_block(server, **provider) + "jobs:\n" + jobs
    return write_manifest(Path.cwd(), text)


async def run_in_process(path: Path) -> Outcome:
    """``batcher run --no-progress`` in the test's own event loop."""
    return await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))



def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def result_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def generation_posts(server: Any) -> list[Any]:
    return server.stats.matching(IMAGES) + server.stats.matching(CHAT)


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def status_json(target: Path, *, exit_code: int) -> dict[str, Any]:
    """``status --json`` of ``target``, which must exit with ``exit_code`` (README: 0 only
    when every task is ok); the caller says which, never the report under test."""
    result = run_cli("status", str(target), "--json", timeout=CLI_TIMEOUT)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == exit_code, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@contextlib.asynccontextmanager
async def tiny_provider(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A provider of our own on 127.0.0.1, answering every path with ``handler``; yields its
    base URL (``.../v1``)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()


def own_provider_manifest(base_url: str, jobs: str, *, extra: str = "") -> Path:
    text = (f"name: robust\noutput: out\nproviders:\n  test:\n    base_url: {base_url}\n"
            f"{extra}jobs:\n{jobs}")
    return write_manifest(Path.cwd(), text)


async def cli_in_loop(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m batcher ARGS`` while this loop keeps serving a provider of our own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batcher", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"batcher {' '.join(args)} hung") from None
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


# --------------------------------------------------------------------------- 1. own errors


def test_an_error_of_batchers_own_in_a_worker_stops_the_run_with_one_line(thread_server) -> None:
    server = thread_server()
    manifest = manifest_for(server, image_job("pics", seeds=4), concurrency=2)
    # The job's sub-folder is taken by a regular file: saving any answer fails with an OSError
    # that is neither the provider's fault nor retryable.
    Path("out").mkdir()
    Path("out/pics").write_text("not a folder\n")

    result = run_cli("run", str(manifest), "--no-progress", timeout=CLI_TIMEOUT)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("  File ")]
    stopped = [line for line in result.stderr.splitlines() if "stopped by an error" in line]
    assert len(stopped) == 1, result.stderr
    assert generation_posts(server), "the error must have come from saving an answer"
    rows = ledger_rows(Path("out"), decode=True)
    assert not [row for row in rows if row["status"] == "ok"], rows
    summary = summary_of(Path("out"))
    assert summary["ok"] == 0 and summary["exit_code"] == 1
    assert summary["ok"] + summary["failed"] + summary["pending"] == summary["total"] == 4
    assert Path("out/pics").read_text() == "not a folder\n"


# --------------------------------------------------------------------------- 2. two providers


async def test_a_slow_provider_does_not_hold_back_a_fast_one(server_factory) -> None:
    slow_server = await server_factory()
    fast_server = await server_factory()
    slow_tasks, fast_tasks = 5, 10
    text = (
        "name: two\noutput: out\nproviders:\n"
        f"  slow:\n    base_url: {slow_server.api_url}\n    rate_limit: 1/s\n    concurrency: 1\n"
        f"  fast:\n    base_url: {fast_server.api_url}\n    rate_limit: 100/s\n"
        "    concurrency: 4\n"
        # The slow job comes first: one producer for both would queue the fast tasks behind it.
        "jobs:\n" + image_job("crawl", provider="slow", seeds=slow_tasks)
        + image_job("sprint", provider="fast", seeds=fast_tasks, prompt="a fast hare")
    )
    manifest = write_manifest(Path.cwd(), text)

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 0, outcome.message
    slow = sorted(slow_server.stats.starts(IMAGES))
    fast = sorted(fast_server.stats.starts(IMAGES))
    assert len(slow) == slow_tasks and len(fast) == fast_tasks
    assert slow[1] - slow[0] >= 0.9  # the premise: the slow provider really is paced at 1/s
    # Every fast task reached its server before the slow provider's second request, let alone
    # its last: a producer shared by both would still be blocked on the slow queue.
    assert fast[-1] < slow[1], (fast[-1] - slow[0], slow[1] - slow[0])
    assert fast[-1] < slow[-1]
    summary = summary_of(Path("out"))
    assert summary["jobs"]["crawl"]["ok"] == slow_tasks
    assert summary["jobs"]["sprint"]["ok"] == fast_tasks


# --------------------------------------------------------------------------- 3. keys

ECHOED_KEY = "sk-echo-9f8e7d6c5b4a39281706"


@pytest.mark.parametrize("status", [401, 400])
async def test_a_key_echoed_in_an_error_reaches_no_file_and_no_output(status: int) -> None:
    seen: list[str | None] = []

    async def echo(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization")
        seen.append(given)
        await request.read()
        return web.json_response({"error": {"message": f"bad key {given}"}}, status=status)

    async with tiny_provider(echo) as base_url:
        manifest = own_provider_manifest(
            base_url, image_job("pics", seeds=3),
            extra="    api_key_env: TEST_KEY\n    concurrency: 2\n    retries: 0\n")
        code, stdout, stderr = await cli_in_loop("-v", "run", str(manifest), "--no-progress",
                                                 env={"TEST_KEY": ECHOED_KEY})

    assert code == (3 if status == 401 else 1), stderr
    assert "Traceback" not in stderr
    assert seen and all(given == f"Bearer {ECHOED_KEY}" for given in seen)  # it was echoed
    assert "DEBUG" in stderr  # -v: the debug logs were checked too
    assert ECHOED_KEY not in stdout and ECHOED_KEY not in stderr
    out = Path("out")
    files = files_under(out)
    assert out / "ledger.sqlite" in files and out / "summary.json" in files
    for path in files:
        assert ECHOED_KEY.encode() not in path.read_bytes(), path
    if status == 401:
        assert "bad key" in stderr  # the provider's message was shown, with the key taken out
        assert "TEST_KEY" in stderr
    else:
        rows = ledger_rows(out, decode=True)
        assert len(rows) == 3 and all(row["status"] == "failed" for row in rows)
        assert all("bad key" in row["error"] for row in rows)  # the message was recorded


@pytest.mark.parametrize("key", ["ab cd", "ab\x07cd", "ab\tcd"], ids=["space", "bell", "tab"])
def test_a_key_with_spaces_or_control_characters_is_refused_before_any_request(
    thread_server, key: str
) -> None:
    server = thread_server()
    manifest = manifest_for(server, image_job("pics", seeds=2), key_env="TEST_KEY")

    result = run_cli("run", str(manifest), "--no-progress", env={"TEST_KEY": key},
                     timeout=CLI_TIMEOUT)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "TEST_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert key not in result.stderr and key not in result.stdout
    assert not server.stats.requests


# --------------------------------------------------------------------------- 4. pending stops


def test_a_refused_key_leaves_tasks_pending_so_skip_failed_runs_them_later(
    thread_server,
) -> None:
    server = thread_server(api_key="sk-the-right-key")
    manifest = manifest_for(server, image_job("pics", seeds=3), concurrency=1,
                            key_env="TEST_KEY")

    refused = run_cli("run", str(manifest), "--no-progress", env={"TEST_KEY": "sk-a-wrong-key"},
                      timeout=CLI_TIMEOUT)

    assert refused.returncode == 3, refused.stderr
    assert [r.status for r in generation_posts(server)] and all(
        r.status == 401 for r in generation_posts(server))
    assert not [row for row in ledger_rows(Path("out"), decode=True) if row["status"] == "failed"]
    status = status_json(manifest, exit_code=1)
    assert (status["failed"], status["pending"], status["ok"]) == (0, 3, 0)

    fixed = run_cli("run", str(manifest), "--no-progress", "--skip-failed",
                    env={"TEST_KEY": "sk-the-right-key"}, timeout=CLI_TIMEOUT)

    assert fixed.returncode == 0, fixed.stderr
    assert sum(r.status == 200 for r in generation_posts(server)) == 3
    summary = summary_of(Path("out"))
    assert (summary["ok"], summary["failed"], summary["pending"], summary["ran"]) == (3, 0, 0, 3)


def test_a_spent_quota_leaves_tasks_pending_and_exits_1(thread_server) -> None:
    server = thread_server(quota_exhausted=True)
    manifest = manifest_for(server, image_job("pics", seeds=5), concurrency=2)

    spent = run_cli("run", str(manifest), "--no-progress", timeout=CLI_TIMEOUT)

    assert spent.returncode == 1, spent.stderr
    assert "Traceback" not in spent.stderr
    assert "quota" in spent.stderr.lower()
    assert generation_posts(server) and all(r.status == 429 for r in generation_posts(server))
    assert not [row for row in ledger_rows(Path("out"), decode=True) if row["status"] == "failed"]
    summary = summary_of(Path("out"))
    assert (summary["ok"], summary["failed"], summary["pending"]) == (0, 0, 5)
    assert summary["exit_code"] == 1
    status = status_json(manifest, exit_code=1)
    assert (status["failed"], status["pending"]) == (0, 5)

    server.options.quota_exhausted = False  # the quota is topped up
    refilled = run_cli("run", str(manifest), "--no-progress", "--skip-failed",
                       timeout=CLI_TIMEOUT)

    assert refilled.returncode == 0, refilled.stderr
    assert summary_of(Path("out"))["ok"] == 5


# --------------------------------------------------------------------------- 5. one-line errors

GARBAGE = b"this is not a database, just bytes \x00\xff\x13" * 128


def _file_as_output() -> list[str]:
    Path("taken").write_text("mine\n")
    return ["run", "jobs.yaml", "--output", "taken", "--no-progress"]


def _garbage_ledger(command: str) -> Callable[[], list[str]]:
    def setup() -> list[str]:
        Path("out").mkdir()
        Path("out/ledger.sqlite").write_bytes(GARBAGE)
        return {"run": ["run", "jobs.yaml", "--no-progress"], "plan": ["plan", "jobs.yaml"],
                "status": ["status", "out"]}[command]
    return setup


ONE_LINE_CASES: dict[str, tuple[Callable[[], list[str]], tuple[str, ...]]] = {
    "output-is-a-file": (_file_as_output, ("taken",)),
    "garbage-ledger-run": (_garbage_ledger("run"), ("ledger.sqlite", "not a batcher ledger")),
    "garbage-ledger-status": (_garbage_ledger("status"),
                              ("ledger.sqlite", "not a batcher ledger")),
    "garbage-ledger-plan": (_garbage_ledger("plan"), ("ledger.sqlite", "not a batcher ledger")),
    "serve-port": (lambda: ["serve", "--port", "99999"], ("--port",)),
    "log-every-0": (lambda: ["run", "jobs.yaml", "--log-every", "0"], ("--log-every",)),
    "grace-negative": (lambda: ["run", "jobs.yaml", "--grace", "-1"], ("--grace",)),
    "run-only-nosuch": (lambda: ["run", "jobs.yaml", "--only", "NOSUCH", "--no-progress"],
                        ("NOSUCH", "alpha", "beta")),
    "plan-only-nosuch": (lambda: ["plan", "jobs.yaml", "--only", "NOSUCH"],
                         ("NOSUCH", "alpha", "beta")),
}


@pytest.mark.parametrize("case", list(ONE_LINE_CASES))
def test_fixable_errors_are_one_line_with_exit_2(thread_server, case: str) -> None:
    server = thread_server()
    manifest_for(server, image_job("alpha", seeds=1) + image_job("beta", seeds=1))
    setup, expected = ONE_LINE_CASES[case]
    args = setup()

    result = run_cli(*args, timeout=CLI_TIMEOUT)

    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    if lines and lines[0].startswith("usage:"):  # argparse: the usage, then one error line
        message = lines[-1]
        assert message.startswith("batcher") and "error: argument" in message, result.stderr
    else:
        assert 1 <= len(lines) <= 2, result.stderr
        message = result.stderr
    for text in expected:
        assert text in message, (text, result.stderr)
    assert not server.stats.requests  # nothing was sent
    if case.startswith("garbage-ledger"):
        assert Path("out/ledger.sqlite").read_bytes() == GARBAGE  # the user's file is intact
    if case == "output-is-a-file":
        assert Path("taken").read_text() == "mine\n"


# --------------------------------------------------------------------------- 6. the lock


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_finishes(
    thread_server,
) -> None:
    tasks = 10
    server = thread_server(latency=0.5)
    manifest = manifest_for(server, image_job("pics", seeds=tasks), concurrency=2)
    first = start_cli("run", str(manifest), "--no-progress")
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while not server.stats.requests:  # the first run holds the folder once it sends
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never got going"
            time.sleep(0.02)

        second = run_cli("run", str(manifest), "--no-progress", timeout=CLI_TIMEOUT)
        first_still_running = first.poll() is None

        _, first_stderr = first.communicate(timeout=CLI_TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    assert second.returncode == 2, second.stderr
    assert "another batcher run" in second.stderr
    assert "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) <= 2, second.stderr
    assert first_still_running
    assert first.returncode == 0, first_stderr
    posts = generation_posts(server)
    assert len(posts) == tasks and all(r.status == 200 for r in posts)  # each sent once
    rows = ledger_rows(Path("out"), decode=True)
    assert len(rows) == tasks and all(row["status"] == "ok" for row in rows)
    assert summary_of(Path("out"))["ok"] == tasks


# --------------------------------------------------------------------------- 7. same request


async def test_the_same_request_in_two_jobs_is_two_tasks_with_two_files(server_factory) -> None:
    server = await server_factory()
    manifest = manifest_for(server, image_job("first", seeds=1, prompt="a twin")
                            + image_job("second", seeds=1, prompt="a twin"))

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 0, outcome.message
    out = Path("out")
    rows = ledger_rows(out, decode=True)
    assert sorted(row["job"] for row in rows) == ["first", "second"]
    assert len({row["id"] for row in rows}) == 2
    paths = [rel for row in rows for rel, _, _ in row["files"]]
    assert len(paths) == 2 and len(set(paths)) == 2
    assert all((out / rel).is_file() for rel in paths)
    assert sorted(Path(rel).parts[0] for rel in paths) == ["first", "second"]
    # The server was asked the very same thing twice.
    posts = server.stats.matching(IMAGES)
    assert len(posts) == 2 and posts[0].body_hash == posts[1].body_hash
    summary = summary_of(out)
    assert summary["total"] == summary["ok"] == 2
    for job in ("first", "second"):
        assert (summary["jobs"][job]["total"], summary["jobs"][job]["ok"]) == (1, 1), summary
    assert sorted(line["custom_id"] for line in result_lines(out)) == sorted(
        row["id"] for row in rows)


# --------------------------------------------------------------------------- 8. mixed JSONL


class _Sheet(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.pres: list[str] = []
        self._in_pre = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag == "pre":
            self._in_pre = True
            self.pres.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pres[-1] += data


def _jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


async def test_a_jsonl_job_mixing_chat_and_images_shows_both_on_the_sheet(
    server_factory,
) -> None:
    server = await server_factory()
    image_params = {"size": "256x256", "response_format": "b64_json"}
    # One file starts with an image line, the other with a chat line.
    _jsonl(Path("a.jsonl"), [
        {"id": "a-img", "type": "image", "model": MODEL, "prompt": "a red kite", "seed": 1,
         "params": image_params},
        {"id": "a-chat", "type": "chat", "model": CHAT_MODEL, "prompt": "Name the red kite"},
        {"custom_id": "a-img2", "method": "POST", "url": "/v1/images/generations",
         "body": {"model": MODEL, "prompt": "a blue kite", "seed": 2, **image_params}},
    ])
    _jsonl(Path("b.jsonl"), [
        {"custom_id": "b-chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi there"}]}},
        {"id": "b-img", "type": "image", "model": MODEL, "prompt": "a green kite", "seed": 3,
         "params": image_params},
    ])
    jobs = ("  - name: mix-a\n    provider: test\n    file: a.jsonl\n"
            "  - name: mix-b\n    provider: test\n    file: b.jsonl\n")
    manifest = manifest_for(server, jobs)

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 0, outcome.message
    out = Path("out")
    rows = {row["id"]: row for row in ledger_rows(out, decode=True)}
    assert set(rows) == {"a-img", "a-chat", "a-img2", "b-chat", "b-img"}
    image_files = sorted(quote(rel) for row in rows.values() if row["kind"] == "image"
                         for rel, _, _ in row["files"])
    texts = sorted((out / row["files"][0][0]).read_text() for row in rows.values()
                   if row["kind"] == "chat")
    assert len(image_files) == 3 and len(texts) == 2 and all(texts)

    sheet = _Sheet()
    sheet.feed((out / "index.html").read_text())

    assert sorted(sheet.images) == image_files  # every image as an <img>, nothing else
    assert sorted(sheet.pres) == texts  # every completion's text, and only those, in a <pre>
    assert not [pre for pre in sheet.pres if "PNG" in pre or "IHDR" in pre]


# --------------------------------------------------------------------------- 9. stale listings


@pytest.mark.parametrize("listing", ["results.jsonl", "index.html"])
async def test_a_deleted_listing_is_written_again_by_a_run_with_nothing_to_do(
    server_factory, listing: str
) -> None:
    server = await server_factory()
    manifest = manifest_for(server, image_job("pics", seeds=3))
    assert (await run_in_process(manifest)).exit_code == 0
    out = Path("out")
    before = result_lines(out)
    sent = len(server.stats.requests)
    (out / listing).unlink()

    outcome = await run_in_process(manifest)

    assert outcome.exit_code == 0, outcome.message
    assert len(server.stats.requests) == sent  # nothing to run, nothing sent
    summary = summary_of(out)
    assert (summary["ran"], summary["skipped"], summary["ok"]) == (0, 3, 3)
    assert (out / "results.jsonl").is_file() and (out / "index.html").is_file()
    lines = result_lines(out)
    assert len(lines) == 3
    assert sorted(line["custom_id"] for line in lines) == sorted(
        row["id"] for row in ledger_rows(out, decode=True))
    assert sorted(json.dumps(line, sort_keys=True) for line in lines) == sorted(
        json.dumps(line, sort_keys=True) for line in before)
    sheet = _Sheet()
    sheet.feed((out / "index.html").read_text())
    assert len(sheet.images) == 3


# --------------------------------------------------------------------------- 10. pacer window


async def _paced_starts(pacer: Pacer, count: int, *, hold: float = 0.01) -> list[float]:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def request() -> None:
        async with pacer.slot():
            starts.append(loop.time())  # the moment the request may go
            await asyncio.sleep(hold)

    await asyncio.gather(*(request() for _ in range(count)))
    return sorted(starts)


async def test_pacer_keeps_a_small_count_to_its_rolling_window() -> None:
    starts = await _paced_starts(Pacer(Rate(1, 0.3), 4), 4)

    assert len(starts) == 4
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 0.3 for gap in gaps), gaps


async def test_pacer_keeps_the_window_when_the_loop_wakes_several_turns_late() -> None:
    pacer = Pacer(Rate(1, 0.3), 4)

    async def busy_loop() -> None:
        await asyncio.sleep(0.05)
        time.sleep(0.75)  # noqa: ASYNC251 - the point: the loop is late for the next two turns

    starts, _ = await asyncio.gather(_paced_starts(pacer, 4), busy_loop())

    assert len(starts) == 4
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 0.3 for gap in gaps), gaps


# --------------------------------------------------------------------------- 11. final 429


async def test_a_429_on_the_last_attempt_still_pauses_the_whole_provider() -> None:
    retry_after = 1.0
    png = base64.b64encode(render_png("robust", 8, 8)).decode()
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, int]] = []

    async def once_429(request: web.Request) -> web.Response:
        await request.read()
        if not arrivals:
            arrivals.append((loop.time(), 429))
            return web.json_response(
                {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                status=429, headers={"Retry-After": f"{retry_after:g}"})
        arrivals.append((loop.time(), 200))
        return web.json_response({"created": 0, "data": [{"b64_json": png}]})

    async with tiny_provider(once_429) as base_url:
        # retries: 0, so the 429 is the task's last attempt; the pace (10/s) leaves 100 ms
        # between starts for the client to read the 429 before the next one would go.
        manifest = own_provider_manifest(
            base_url, image_job("pics", seeds=5),
            extra="    rate_limit: 10/s\n    concurrency: 4\n    retries: 0\n")
        outcome = await run_in_process(manifest)

    assert outcome.exit_code == 1, outcome.message  # the rate-limited task failed
    assert [status for _, status in arrivals].count(429) == 1 and len(arrivals) == 5
    t429 = arrivals[0][0]
    early = [t - t429 for t, _ in arrivals[1:] if t < t429 + retry_after * 0.9]
    assert not early, f"requests {early} s after a 429 that asked for {retry_after} s"
    rows = ledger_rows(Path("out"), decode=True)
    assert sorted(row["status"] for row in rows) == ["failed"] + ["ok"] * 4
    [failed] = [row for row in rows if row["status"] == "failed"]
    assert failed["http_status"] == 429 and failed["attempts"] == 1
    summary = summary_of(Path("out"))
    assert summary["rate_limited"] == 1 and summary["retries"] == 0


def test_a_ledger_from_an_older_batcher_with_nan_params_still_reads(tmp_path: Path) -> None:
    # Before params were checked, a `temperature: .nan` was kept in the ledger as NaN, which
    # is not JSON. status, report and a re-run must still read such a folder.
    import sqlite3

    manifest = write_manifest(tmp_path, """
        name: old
        output: out
        jobs:
          - {name: notes, type: chat, provider: local, model: llama-3.1-8b-instruct,
             prompt: "a note {n}",
             vars: {n: [1, 2]}, params: {max_tokens: 5}}
    """)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "out" / "ledger.sqlite")) as db, db:
        db.execute("""UPDATE tasks SET params = '{"max_tokens":5,"temperature":NaN}'""")
    status = run_cli("status", str(tmp_path / "out"), "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ok"] == 2
    report = run_cli("report", str(tmp_path / "out"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["error"] is None for line in lines)
    again = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 ran" in again.stderr
