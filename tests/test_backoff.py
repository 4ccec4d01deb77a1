"""A task waiting out a retry backoff holds no worker: the provider's other tasks go on.

The backoff's sleep (``batcher.run.course.wait_out``) is replaced by a gate that opens on what
the server has seen, so nothing here depends on timing: with one worker, the task whose first
attempt failed must wait while every other task is answered, then be sent once more.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import ledger_rows, write_manifest

from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, course, run

PROMPTS = [f"p{i}" for i in range(6)]


class FirstTryFails:
    """Chat completions that fail a prompt's first request with ``status``; counts every
    request per prompt, in arrival order."""

    def __init__(self, failing: dict[str, int]) -> None:
        self.failing = failing  # prompt -> the status of its first answer
        self.order: list[str] = []
        self.requests: collections.Counter[str] = collections.Counter()
        self.others_answered = asyncio.Event()  # every prompt not in `failing` answered ok
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        prompt = (await request.json())["messages"][-1]["content"]
        self.order.append(prompt)
        self.requests[prompt] += 1
        if self.requests[prompt] == 1 and prompt in self.failing:
            status = self.failing[prompt]
            return web.json_response({"error": {"message": f"scripted {status}"}},
                                     status=status)
        if all(self.requests[p] for p in PROMPTS if p not in self.failing):
            self.others_answered.set()
        return web.json_response({"id": "c", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "fine"},
             "finish_reason": "stop"}], "usage": {"total_tokens": 2}})


@pytest.fixture
async def serve() -> AsyncIterator[list[FirstTryFails]]:
    servers: list[FirstTryFails] = []
    yield servers
    for server in servers:
        await server.stop()


async def start(servers: list[FirstTryFails], failing: dict[str, int]) -> FirstTryFails:
    server = FirstTryFails(failing)
    await server.start()
    servers.append(server)
    return server


def manifest(folder: Path, server: FirstTryFails, *, concurrency: int = 1) -> Path:
    return write_manifest(folder, f"""
        name: backoff
        providers:
          test: {{base_url: "{server.url}", concurrency: {concurrency}, rate_limit: null,
                  retries: 3}}
        jobs:
          - name: talk
            type: chat
            provider: test
            model: m
            prompts: {json.dumps(PROMPTS)}
    """)


async def run_it(path: Path) -> Outcome:
    return await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))


async def test_other_tasks_are_sent_while_one_waits_out_its_backoff(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await start(serve, {"p0": 500})
    waits: list[float] = []

    async def gate(seconds: float) -> None:
        waits.append(seconds)
        # One worker: only if the waiting task gave it back can the others be answered.
        await asyncio.wait_for(server.others_answered.wait(), timeout=20)

    monkeypatch.setattr(course, "wait_out", gate)
    outcome = await run_it(manifest(tmp_path, server, concurrency=1))

    assert outcome.exit_code == 0, outcome.message
    assert len(waits) == 1
    assert server.order == ["p0", *PROMPTS[1:], "p0"]  # the retry after every other task
    assert server.requests == {"p0": 2, **{p: 1 for p in PROMPTS[1:]}}
    rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "output" / "backoff")}
    assert all(row["status"] == "ok" for row in rows.values()) and len(rows) == len(PROMPTS)
    assert rows["p0"]["attempts"] == 2
    assert {rows[p]["attempts"] for p in PROMPTS[1:]} == {1}
    assert outcome.summary["retries"] == 1 and outcome.summary["requests"] == len(PROMPTS) + 1


async def test_a_stop_leaves_a_task_in_backoff_pending_and_unsent(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # p0 fails and waits (for ever, unless cancelled); p1's 401 stops the run.
    server = await start(serve, {"p0": 500, "p1": 401})
    waiting = asyncio.Event()

    async def forever(_seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(course, "wait_out", forever)
    outcome = await asyncio.wait_for(run_it(manifest(tmp_path, server, concurrency=1)), 60)

    assert waiting.is_set()
    assert outcome.exit_code == 3
    assert server.requests["p0"] == 1  # never sent again once the run stopped
    ids = {row["prompt"] for row in ledger_rows(tmp_path / "output" / "backoff")}
    assert "p0" not in ids  # pending: the next run sends it
    assert outcome.summary["pending"] >= 1


async def test_a_429_still_pauses_in_its_worker_and_is_sent_once_more(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 429 pauses the whole provider (the pacer); it is no backoff of the task's own.
    server = await start(serve, {"p0": 429})
    waits: list[float] = []

    async def spy(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(course, "wait_out", spy)
    outcome = await run_it(manifest(tmp_path, server, concurrency=2))

    assert outcome.exit_code == 0, outcome.message
    assert waits == []
    assert server.requests == {"p0": 2, **{p: 1 for p in PROMPTS[1:]}}
    assert outcome.summary["rate_limited"] == 1


async def test_past_the_cap_of_tasks_in_backoff_a_worker_waits_itself(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One task may wait away from the worker: p0 does; p1, failing next, waits in the worker,
    # so p2 is sent only after p1's retry.
    server = await start(serve, {"p0": 500, "p1": 500})
    waits: list[float] = []

    async def gate(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 1:  # p0's backoff, away from the worker
            await asyncio.wait_for(server.others_answered.wait(), timeout=20)

    monkeypatch.setattr(course, "MAX_BACKING_OFF", 1)
    monkeypatch.setattr(course, "wait_out", gate)
    outcome = await run_it(manifest(tmp_path, server, concurrency=1))

    assert outcome.exit_code == 0, outcome.message
    assert server.order == ["p0", "p1", "p1", *PROMPTS[2:], "p0"]
    assert server.requests == {"p0": 2, "p1": 2, **{p: 1 for p in PROMPTS[2:]}}
