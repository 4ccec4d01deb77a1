"""Whatever a provider or an image host sends, only that task fails, with a named reason.

Each malformed answer below is sent byte for byte by a scripted server on 127.0.0.1, in one run
next to good tasks: the bad tasks end failed with the reason named here, the good ones ok, the
run exits 1 and prints no traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ledger_rows, run_cli, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import (
    GOOD_PNG,
    Reply,
    ScriptedServer,
    good_chat,
    good_image,
    good_stream,
    json_reply,
    stream_reply,
)

from batcher.manifest import load_manifest
from batcher.run import RunOptions, run

GOOD_B64 = base64.b64encode(GOOD_PNG).decode()
CHAT_OK = {"choices": [{"message": {"content": "hi"}}]}
HUGE_INT = b"1" + b"0" * 1000  # read by the standard library, refused by orjson
HUGER_INT = b"1" + b"0" * 5000  # beyond Python's 4300-digit limit: not readable at all


def raw(body: bytes) -> Reply:
    return Reply(body)


def image_url(url: object) -> Reply:
    return json_reply({"data": [{"url": url}]})


# (prompt, answer, expected reason) per JSON path the image client reads.
IMAGE_CASES: list[tuple[str, Reply, str]] = [
    ("body is a list", raw(b"[1, 2]"), "bad_response"),
    ("body is a number", raw(b"5"), "bad_response"),
    ("body is a string", raw(b'"hello"'), "bad_response"),
    ("body is null", raw(b"null"), "bad_response"),
    ("body is a huge integer", raw(HUGE_INT), "bad_response"),
    ("body is a huger integer", raw(HUGER_INT), "bad_json"),
    ("body is not json", raw(b"<html>"), "bad_json"),
    ("data is missing", json_reply({}), "empty_data"),
    ("data is a string", json_reply({"data": "x"}), "empty_data"),
    ("data is a number", json_reply({"data": 5}), "empty_data"),
    ("data is empty", json_reply({"data": []}), "empty_data"),
    ("item is a string", json_reply({"data": ["x"]}), "bad_item"),
    ("item is null", json_reply({"data": [None]}), "bad_item"),
    ("item is a list", json_reply({"data": [[1]]}), "bad_item"),
    ("url is a number", image_url(5), "bad_item"),
    ("url is an object", image_url({"href": "x"}), "bad_item"),
    ("b64_json is a number", json_reply({"data": [{"b64_json": 5}]}), "bad_item"),
    ("b64_json is not base64", json_reply({"data": [{"b64_json": "!!!"}]}), "bad_base64"),
    ("b64_json is not an image",
     json_reply({"data": [{"b64_json": base64.b64encode(b"hello").decode()}]}), "not_image"),
    ("b64_json has a lone surrogate", raw(b'{"data": [{"b64_json": "\\ud800"}]}'), "bad_base64"),
    ("usage is a string", json_reply({"data": [{"b64_json": GOOD_B64}], "usage": "x"}),
     "bad_response"),
    ("usage is a list", json_reply({"data": [{"b64_json": GOOD_B64}], "usage": [1]}),
     "bad_response"),
    ("usage holds NaN", raw(b'{"data": [{"b64_json": "%s"}], "usage": {"t": NaN}}'
                            % GOOD_B64.encode()), "bad_response"),
    # URLs: each one a parser below would raise on, or a scheme batcher must not fetch.
    ("url with a 70-character label", image_url(f"http://{'a' * 70}.example/x.png"), "bad_url"),
    ("url with an empty label", image_url("http://a..b/x.png"), "bad_url"),
    ("url with bad ipv6", image_url("http://[bad/x.png"), "bad_url"),
    ("url with no host", image_url("http:///x.png"), "bad_url"),
    ("url with a nul", image_url("http://127.0.0.1:1/a\x00b.png"), "bad_url"),
    ("url with a space", image_url("http://127.0.0.1:1/a b.png"), "bad_url"),
    ("url with a bad port", image_url("http://127.0.0.1:99999/x.png"), "bad_url"),
    ("url is a file", image_url("file:///etc/passwd"), "bad_url"),
    ("url is relative", image_url("/files/good.png"), "bad_url"),
    ("url with a lone surrogate", raw(b'{"data": [{"url": "http://h.example/\\ud800"}]}'),
     "bad_response"),
]

CHAT_CASES: list[tuple[str, Reply, str]] = [
    ("chat body is a list", raw(b"[]"), "bad_response"),
    ("chat body is a number", raw(b"5"), "bad_response"),
    ("chat body is a huge integer", raw(HUGE_INT), "bad_response"),
    ("chat body is a huger integer", raw(HUGER_INT), "bad_json"),
    ("choices is missing", json_reply({}), "bad_response"),
    ("choices is a number", json_reply({"choices": 5}), "bad_response"),
    ("choices is empty", json_reply({"choices": []}), "bad_response"),
    ("choice is a string", json_reply({"choices": ["x"]}), "bad_response"),
    ("message is missing", json_reply({"choices": [{}]}), "bad_response"),
    ("message is a string", json_reply({"choices": [{"message": "hi"}]}), "bad_response"),
    ("content is a number", json_reply({"choices": [{"message": {"content": 5}}]}),
     "bad_response"),
    ("content is null", json_reply({"choices": [{"message": {"content": None}}]}),
     "bad_response"),
    ("content has a lone surrogate",
     raw(b'{"choices": [{"message": {"content": "a\\ud800"}}]}'), "bad_response"),
    ("chat usage is a number", json_reply({**CHAT_OK, "usage": 5}), "bad_response"),
    ("chat usage is a list", json_reply({**CHAT_OK, "usage": [1]}), "bad_response"),
    ("chat usage holds a huge integer",
     raw(b'{"choices": [{"message": {"content": "hi"}}], "usage": {"t": %s}}' % HUGE_INT),
     "bad_response"),
]

STREAM_CASES: list[tuple[str, Reply, str]] = [
    ("chunk choices holds a string", stream_reply(b'{"choices": ["x"]}'), "bad_response"),
    ("chunk choices is a number", stream_reply(b'{"choices": 5}'), "bad_response"),
    ("chunk delta is a string", stream_reply(b'{"choices": [{"delta": "hello"}]}'),
     "bad_response"),
    ("chunk content is a number", stream_reply(b'{"choices": [{"delta": {"content": 5}}]}'),
     "bad_response"),
    ("chunk is a list", stream_reply(b"[1]"), "bad_response"),
    ("chunk is a number", stream_reply(b"5"), "bad_response"),
    ("chunk is not json", stream_reply(b"{"), "bad_json"),
    ("chunk usage is a number", stream_reply(b'{"choices": [], "usage": 5}'), "bad_response"),
    ("chunk content has a lone surrogate",
     stream_reply(b'{"choices": [{"delta": {"content": "\\ud800"}}]}'), "bad_response"),
]

GOOD = {"pics": good_image(), "chat": good_chat(), "stream": good_stream()}


def good_prompts(job: str) -> list[str]:
    return [f"good {job} one", f"good {job} two"]


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


def manifest_text(server: ScriptedServer, *, retries: int = 0, regenerations: int = 1) -> str:
    """Three jobs (images, chat, streamed chat), each with its bad prompts and two good ones."""
    def prompts(job: str, cases: list[tuple[str, Reply, str]]) -> str:
        return json.dumps([name for name, _, _ in cases] + good_prompts(job))

    return (
        "name: malformed\n"
        "output: out\n"
        "providers:\n"
        "  test:\n"
        f"    base_url: {server.api_url}\n"
        "    concurrency: 4\n"
        f"    retries: {retries}\n"
        f"    regenerations: {regenerations}\n"
        "    timeout: 10\n"
        "defaults: {provider: test}\n"
        "jobs:\n"
        f"  - {{name: pics, type: image, model: m, prompts: {prompts('pics', IMAGE_CASES)}}}\n"
        f"  - {{name: chat, type: chat, model: c, prompts: {prompts('chat', CHAT_CASES)}}}\n"
        f"  - {{name: stream, type: chat, model: c, params: {{stream: true}},\n"
        f"     prompts: {prompts('stream', STREAM_CASES)}}}\n"
    )


JOBS = {"pics": IMAGE_CASES, "chat": CHAT_CASES, "stream": STREAM_CASES}


def test_each_malformed_answer_fails_only_its_task_with_a_named_reason(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    for job, cases in JOBS.items():
        scripted.replies.update({name: reply for name, reply, _ in cases})
        scripted.replies.update({name: GOOD[job] for name in good_prompts(job)})
    path = write_manifest(tmp_path, manifest_text(scripted))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "stopped by an error" not in done.stderr, done.stderr
    rows = {(row["job"], row["prompt"]): row for row in ledger_rows(tmp_path / "out")}
    assert len(rows) == sum(len(cases) + 2 for cases in JOBS.values())
    for job, cases in JOBS.items():
        for name, _, reason in cases:
            row = rows[(job, name)]
            assert (row["status"], row["reason"]) == ("failed", reason), (job, name, row["error"])
            assert row["error"], (job, name)
        for name in good_prompts(job):
            assert rows[(job, name)]["status"] == "ok", (job, name, rows[(job, name)]["error"])
    # retries: 0, so each prompt is asked exactly once: nothing is sent twice.
    assert set(scripted.requests.values()) == {1}
    assert len(scripted.requests) == len(rows)


def test_a_bad_url_is_never_fetched_and_a_good_url_next_to_it_is(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    good_url = f"{scripted.url}/files/good.png"
    scripted.replies["good one"] = image_url(good_url)
    scripted.replies["good two"] = json_reply({"data": [{"url": good_url}, {"url": "http://[x"}]})
    path = write_manifest(tmp_path, (
        "name: urls\noutput: out\nproviders:\n  test:\n"
        f"    base_url: {scripted.api_url}\n    retries: 3\n"
        "jobs:\n  - {name: pics, type: image, provider: test, model: m,\n"
        "     prompts: [good one, good two]}\n"))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "out", decode=True)}
    assert rows["good one"]["status"] == "ok"
    # The good image of the answer is kept; the bad URL is left out, never fetched.
    assert rows["good two"]["status"] == "ok" and len(rows["good two"]["files"]) == 1
    # A bad URL is final: no retry of the generation, no second download of the good image.
    assert scripted.requests["good two"] == 1
    assert scripted.downloads["good.png"] == 2


# ---------------------------------------------------------------------------- the property

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**64, max_value=10**400)
    | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10,
)
# Arbitrary JSON reaches few of the paths the client reads; these put it under each of them.
SHAPED = st.one_of(
    JSON,
    st.fixed_dictionaries({"data": JSON}),
    st.fixed_dictionaries({"data": st.lists(JSON, max_size=2)}),
    st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries(
        {}, optional={"url": JSON, "b64_json": JSON}), max_size=2)}),
    st.fixed_dictionaries({"choices": JSON}),
    st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries(
        {"message": JSON, "delta": JSON}), max_size=2)}),
    st.fixed_dictionaries({"choices": st.lists(st.fixed_dictionaries({"message": (
        st.fixed_dictionaries({"content": JSON}))}), max_size=2), "usage": JSON}),
)


@pytest.fixture(scope="module")
def module_server() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=SHAPED)
def test_any_json_answer_fails_or_saves_its_task_and_never_stops_the_run(
    tmp_path: Path, module_server: ScriptedServer, answer: object
) -> None:
    body = json.dumps(answer).encode()
    module_server.default = Reply(body + b"\n")  # one answer, for every endpoint
    module_server.replies["streamed"] = stream_reply(body)
    path = tmp_path / f"{uuid.uuid4().hex}.yaml"
    path.write_text(
        "name: prop\nproviders:\n  test:\n"
        f"    base_url: {module_server.api_url}\n    retries: 0\n"
        "jobs:\n"
        "  - {name: pics, type: image, provider: test, model: m, prompt: any}\n"
        "  - {name: chat, type: chat, provider: test, model: c, prompt: any}\n"
        "  - {name: stream, type: chat, provider: test, model: c, prompt: streamed,\n"
        "     params: {stream: true}}\n")
    options = RunOptions(output=tmp_path / uuid.uuid4().hex, progress=False,
                         handle_signals=False)

    outcome = asyncio.run(run(load_manifest(path), options))

    assert outcome.message is None, outcome.message  # no crash, no stopped provider
    assert outcome.summary["pending"] == 0
    assert outcome.exit_code == (0 if outcome.summary["failed"] == 0 else 1)
    for row in ledger_rows(options.output):  # type: ignore[arg-type]
        assert row["reason"] != "internal", row["error"]


# ---------------------------------------------------------------------------- the task boundary


def boundary_manifest(tmp_path: Path, server: ScriptedServer) -> Path:
    server.replies.update({f"task {k}": good_chat() for k in range(6)})
    return write_manifest(tmp_path, (
        "name: boundary\noutput: out\nproviders:\n  test:\n"
        f"    base_url: {server.api_url}\n    retries: 3\n    concurrency: 2\n"
        "jobs:\n  - {name: chat, type: chat, provider: test, model: c,\n"
        f"     prompts: {json.dumps([f'task {k}' for k in range(6)])}}}\n"))


async def test_an_unexpected_exception_fails_only_its_task_as_internal(
    tmp_path: Path, scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug met on one answer (here: planted in the parser, for the body of task 3).
    from batcher.providers import openai_compat

    parse = openai_compat.parse_chat_answer

    def buggy(data: object) -> object:
        if isinstance(data, dict) and data.get("id") == "boom":
            raise KeyError("planted")
        return parse(data)

    monkeypatch.setattr(openai_compat, "parse_chat_answer", buggy)
    path = boundary_manifest(tmp_path, scripted)
    scripted.replies["task 3"] = json_reply({**CHAT_OK, "id": "boom"})

    outcome = await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))

    assert outcome.exit_code == 1 and outcome.message is None
    rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "out")}
    assert (rows["task 3"]["status"], rows["task 3"]["reason"]) == ("failed", "internal")
    assert "KeyError" in rows["task 3"]["error"]
    assert all(rows[f"task {k}"]["status"] == "ok" for k in (0, 1, 2, 4, 5))
    assert scripted.requests["task 3"] == 1, "an internal failure is not retried"
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None  # once, and no traceback


async def test_a_full_disk_still_stops_the_run(
    tmp_path: Path, scripted: ScriptedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from batcher.store.atomic import FileWriter

    async def full(self: object, path: Path, data: bytes) -> tuple[int, str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileWriter, "write", full)
    path = boundary_manifest(tmp_path, scripted)

    outcome = await run(load_manifest(path), RunOptions(progress=False, handle_signals=False))

    assert outcome.exit_code == 1
    assert outcome.message is not None and "stopped by an error" in outcome.message
    assert outcome.summary["pending"] >= 4  # stopped: not every task was tried
    assert all(row["status"] != "failed" for row in ledger_rows(tmp_path / "out"))


def test_a_redirecting_api_stops_its_provider_naming_the_base_url_once(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    moved = "https://api.moved.example/v2"
    scripted.default = Reply(b"", status=301,
                             headers=(("Location", f"{moved}/images/generations"),))
    path = write_manifest(tmp_path, (
        "name: moved\noutput: out\nproviders:\n  test:\n"
        f"    base_url: {scripted.api_url}\n    retries: 3\n    concurrency: 2\n"
        "jobs:\n  - {name: pics, type: image, provider: test, model: m, prompt: p, seeds: 8}\n"))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    said = [line for line in done.stderr.splitlines() if f"set base_url to {moved}" in line]
    assert said and len(said) <= 2, done.stderr  # when it stops, and in the closing line
    assert 1 <= scripted.requests["p"] <= 2  # the requests in flight; none retried
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["pending"]) == (0, 0, 8)
