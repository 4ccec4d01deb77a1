"""The review of issue 18's answer fixes (break18a): a paid answer's good parts are kept and
charged by the usage it carries, and a request is never paid again for something batcher could
have read. Odd choice indices, a filtered choice, data URIs of every RFC 2397 shape, a JSON
answer to a streamed request whatever its Content-Type, multi-line SSE data, an ``n`` batcher
would not count, chat prices without an output part, connect timeouts under a short
``timeout``, a prune that drops a pending job, and the amounts printed. Requests are counted at
servers on 127.0.0.1."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ledger_rows, provider_block, run_cli, silent_manifest, write_manifest
from s3server import S3Server, s3, store_env
from scripted import GOOD_PNG, Reply, ScriptedServer, json_reply

from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, run
from batcher.wording import usd

B64 = base64.b64encode(GOOD_PNG).decode()
__all__ = ["s3"]  # a fixture, used by name


async def run_manifest(path: Path, **options: Any) -> Outcome:
    return await run(load_manifest(path), RunOptions(progress=False, handle_signals=False,
                                                     **options))


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


def manifest(tmp_path: Path, server: ScriptedServer, jobs: str, *, prices: str = "",
             top: str = "", retries: int = 2) -> Path:
    provider = (f"providers:\n  test:\n    base_url: {server.api_url}\n    concurrency: 1\n"
                f"    retries: {retries}\n")
    if prices:
        provider += f"    prices:\n      {prices}\n"
    return write_manifest(tmp_path, f"name: review\noutput: out\n{top}{provider}jobs:\n{jobs}")


def chat_job(prompts: list[str], params: str = "{n: 2, max_tokens: 10}") -> str:
    return (f"  - name: talk\n    type: chat\n    provider: test\n    model: m\n"
            f"    prompts: {json.dumps(prompts)}\n    params: {params}\n")


def image_job(prompts: list[str], params: str = "{response_format: b64_json}") -> str:
    return (f"  - name: shots\n    type: image\n    provider: test\n    model: m\n"
            f"    prompts: {json.dumps(prompts)}\n    params: {params}\n")


def completion(*texts: str | None, indices: list[Any] | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = []
    for position, text in enumerate(texts):
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop" if text is not None
                                  else "content_filter"}
        index = position if indices is None else indices[position]
        if index is not None:
            choice["index"] = index
        choices.append(choice)
    return {"id": "c", "object": "chat.completion", "model": "m", "choices": choices,
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 10}}


def texts_by_prompt(root: Path) -> dict[str, list[str]]:
    return {row["prompt"]: [(root / path).read_text() for path, _size, _sha in row["files"]]
            for row in ledger_rows(root, decode=True) if row["status"] == "ok"}


# --------------------------------------------------------------------------- 1. choices


CHOICE_ANSWERS = {
    "all index 0": (completion("A", "B", indices=[0, 0]), ["A", "B"]),
    "duplicate index": (completion("A", "B", indices=[1, 1]), ["A", "B"]),
    "string indices": (completion("B", "A", indices=["1", "0"]), ["A", "B"]),
    "index 500": (completion("A", "B", indices=[0, 500]), ["A", "B"]),
    "one index missing": (completion("A", "B", indices=[None, 0]), ["A", "B"]),
    "one choice filtered": (completion("A", None), ["A"]),
    "indices 0 and 5": (completion("A", "B", indices=[0, 5]), ["A", "B"]),
    "reversed": (completion("B", "A", indices=[1, 0]), ["A", "B"]),
}


async def test_every_paid_choice_is_kept_whatever_its_index_after_one_request(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    for prompt, (answer, _texts) in CHOICE_ANSWERS.items():
        scripted.replies[prompt] = json_reply(answer)
    path = manifest(tmp_path, scripted, chat_job(list(CHOICE_ANSWERS)))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert all(scripted.requests[prompt] == 1 for prompt in CHOICE_ANSWERS)  # never paid twice
    kept = texts_by_prompt(tmp_path / "out")
    assert {prompt: kept[prompt] for prompt in CHOICE_ANSWERS} == {
        prompt: texts for prompt, (_answer, texts) in CHOICE_ANSWERS.items()}
    names = {row["prompt"]: [f[0] for f in row["files"]]
             for row in ledger_rows(tmp_path / "out", decode=True)}
    assert [name[-6:] for name in names["indices 0 and 5"]] == ["-1.txt", "-2.txt"]  # dense


async def test_a_chat_answer_with_no_usable_choice_is_charged_by_its_usage(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    # Every choice filtered: nothing to keep, but each answer says it used 100 output tokens.
    scripted.default = json_reply(completion(None, None, usage={"prompt_tokens": 0,
                                                                "completion_tokens": 100}))
    # $1000 per 1M output tokens: each answer $0.10 by its usage; its estimate is $0.02.
    path = manifest(tmp_path, scripted, chat_job(["filtered"]), prices="m: {output: 1000}")

    outcome = await run_manifest(path)

    assert scripted.requests["filtered"] == 3  # retries 2: it may come right
    summary = outcome.summary
    assert summary["failed"] == 1
    assert summary["cost_usd"] == pytest.approx(0.3)  # 3 x $0.10, not 3 x the estimate
    assert summary["cost_unknown_requests"] == 0
    (row,) = ledger_rows(tmp_path / "out")
    assert row["cost_usd"] == pytest.approx(0.3)


# --------------------------------------------------------------------------- 2. data URIs


def wrapped(text: str) -> str:
    return "\n".join(text[i:i + 76] for i in range(0, len(text), 76))


DATA_URIS = {
    "wrapped at 76": "data:image/png;base64,\n" + wrapped(B64),
    "bare wrapped": wrapped(B64) + "\n",
    "leading space": " data:image/png;base64," + B64,
    "trailing newline": "data:image/png;base64," + B64 + "\n",
    "a parameter": "data:image/png;charset=binary;base64," + B64,
    "octet stream": "data:application/octet-stream;base64," + B64,
    "no media type": "data:;base64," + B64,
    "jpeg named": "data:image/jpeg;base64," + B64,
}


async def test_an_image_in_any_data_uri_shape_is_kept_on_the_first_request(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    for prompt, value in DATA_URIS.items():
        scripted.replies[prompt] = json_reply({"created": 1, "data": [{"b64_json": value}]})
    scripted.replies["in url"] = json_reply(
        {"created": 1, "data": [{"url": "data:image/png;base64," + B64}]})
    prompts = [*DATA_URIS, "in url"]
    path = manifest(tmp_path, scripted, image_job(prompts))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert {prompt: scripted.requests[prompt] for prompt in prompts} == dict.fromkeys(prompts, 1)
    assert scripted.downloads.total() == 0  # a data URI in url is decoded, not fetched
    root = tmp_path / "out"
    for row in ledger_rows(root, decode=True):
        ((name, _size, _sha),) = row["files"]
        assert (root / name).read_bytes() == GOOD_PNG
    assert B64[:40] not in (root / "results.jsonl").read_text()  # no image bytes in listings


async def test_the_good_image_of_a_partly_bad_answer_is_kept_and_not_paid_again(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.replies["one bad"] = json_reply(
        {"created": 1, "data": [{"b64_json": B64}, {"b64_json": "!!not base64"}]})
    scripted.replies["bad first"] = json_reply(
        {"created": 1, "data": [{"b64_json": "aGVsbG8="}, {"b64_json": B64}]})
    path = manifest(tmp_path, scripted, image_job(["one bad", "bad first"],
                                                  "{n: 2, response_format: b64_json}"),
                    prices="m: {image: 0.01}")

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert scripted.requests["one bad"] == 1 and scripted.requests["bad first"] == 1
    root = tmp_path / "out"
    for row in ledger_rows(root, decode=True):
        ((name, _size, _sha),) = row["files"]
        assert (root / name).read_bytes() == GOOD_PNG
    assert outcome.summary["cost_usd"] == pytest.approx(0.04)  # 2 images returned per answer


# --------------------------------------------------------------------------- 3. n as written


@pytest.mark.parametrize("n", ["4.0", '"4"', "0", "true"])
def test_an_n_batcher_would_not_count_is_a_manifest_error(
    tmp_path: Path, scripted: ScriptedServer, n: str
) -> None:
    path = manifest(tmp_path, scripted, image_job(["a", "b"], f"{{n: {n}}}"),
                    prices="m: {image: 0.01}", top="budget: 0.05\n")

    done = run_cli("run", str(path), "--no-progress", cwd=tmp_path)
    plan = run_cli("plan", str(path), cwd=tmp_path)

    assert done.returncode == 2 and plan.returncode == 2
    assert "jobs.yaml:" in done.stderr and "params" in done.stderr and "n" in done.stderr
    assert "Traceback" not in done.stderr
    assert scripted.requests.total() == 0


def test_a_jsonl_line_with_a_float_n_is_refused_on_its_line(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    lines = [{"prompt": "a", "model": "m", "type": "image"},
             {"prompt": "b", "model": "m", "type": "image", "params": {"n": 4.0}}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    path = write_manifest(tmp_path, f"name: review\noutput: out\nproviders:\n  test:\n"
                          f"    base_url: {scripted.api_url}\njobs:\n  - name: lines\n"
                          "    file: tasks.jsonl\n    provider: test\n")

    done = run_cli("run", str(path), "--no-progress", cwd=tmp_path)

    assert done.returncode == 2 and "tasks.jsonl:2" in done.stderr, done.stderr
    assert scripted.requests.total() == 0


# --------------------------------------------------------------------------- 4. connect timeout


async def test_a_connect_timeout_longer_than_the_timeout_is_still_free_and_pending(
    tmp_path: Path, silent_port: int
) -> None:
    path = silent_manifest(tmp_path, silent_port, "timeout: 0.2\nconnect_timeout: 0.5")

    outcome = await run_manifest(path)

    summary = outcome.summary
    assert summary["cost_usd"] == 0  # no connection opened: nothing paid
    assert summary["failed"] == 0 and summary["pending"] == 4
    assert outcome.exit_code == 1 and outcome.message and "unreachable" in outcome.message


async def test_an_answer_slower_than_the_timeout_is_still_a_paid_timeout(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory(latency=2.0)
    path = write_manifest(tmp_path, "name: slow\noutput: out\n" + provider_block(
        server, concurrency=1, extra="retries: 0\ntimeout: 0.3\nconnect_timeout: 5\n"
        "prices:\n  flux.1-schnell: {image: 0.1}\n") + "jobs:\n"
        + image_job(["slow"]).replace("model: m", "model: flux.1-schnell"))

    outcome = await run_manifest(path)

    assert outcome.summary["failed"] == 1
    (row,) = ledger_rows(tmp_path / "out")
    assert row["reason"] == "timeout" and row["cost_usd"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- 5. chat prices


@pytest.mark.parametrize("price", ["m: {image: 0.04}", "m: {input: 1}",
                                   '"*": {image: 0.04, input: 1}'])
def test_a_chat_model_priced_without_output_or_request_is_unknown_under_a_budget(
    tmp_path: Path, scripted: ScriptedServer, price: str
) -> None:
    path = manifest(tmp_path, scripted, chat_job(["p1", "p2"], "{max_tokens: 100}"),
                    prices=price, top="budget: 0.05\n")

    done = run_cli("run", str(path), "--no-progress", cwd=tmp_path)

    assert done.returncode == 2, done.stderr
    assert "m" in done.stderr and "price" in done.stderr
    assert scripted.requests.total() == 0


async def test_a_chat_model_priced_per_request_runs_under_a_budget(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.default = json_reply(completion("fine"))
    path = manifest(tmp_path, scripted, chat_job(["p1", "p2", "p3"], "{max_tokens: 100}"),
                    prices="m: {request: 0.02}", top="budget: 0.05\n")

    outcome = await run_manifest(path)

    assert scripted.requests.total() == 2  # the third would pass $0.05
    assert outcome.summary["cost_usd"] == pytest.approx(0.04)


# --------------------------------------------------------------------------- 6. prune, status


def test_status_of_an_output_after_a_prune_that_dropped_a_pending_job_has_nothing_pending(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.default = json_reply({"created": 1, "data": [{"b64_json": B64}]})
    second = image_job(["k1", "k2", "k3"]).replace("name: shots", "name: later")
    path = manifest(tmp_path, scripted, image_job(["a", "b", "c"]) + second,
                    prices="m: {image: 0.006}", top="budget: 0.02\n")
    first = run_cli("run", str(path), "--no-progress", cwd=tmp_path)
    assert first.returncode == 1, first.stderr  # the budget left job "later" pending
    assert scripted.requests.total() == 3
    path = manifest(tmp_path, scripted, image_job(["a"]), prices="m: {image: 0.006}")
    pruned = run_cli("prune", str(path), cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr

    done = run_cli("status", "out", "--json", cwd=tmp_path)

    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (1, 1, 0)
    assert done.returncode == 0, done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["total"], summary["pending"]) == (1, 0)
    assert summary["cost_total_usd"] == pytest.approx(0.006)
    assert scripted.requests.total() == 3


def test_status_of_a_store_after_a_prune_that_dropped_a_pending_job_has_nothing_pending(
    tmp_path: Path, scripted: ScriptedServer, s3: S3Server
) -> None:
    scripted.default = json_reply({"created": 1, "data": [{"b64_json": B64}]})
    second = image_job(["k1", "k2", "k3"]).replace("name: shots", "name: later")
    url = f"s3://{s3.bucket()}/p"
    path = manifest(tmp_path, scripted, image_job(["a", "b", "c"]) + second,
                    prices="m: {image: 0.006}", top="budget: 0.02\n")
    path.write_text(path.read_text().replace("output: out", f"output: {url}"))
    env = store_env(s3.url, str(tmp_path / "cache"))
    first = run_cli("run", str(path), "--no-progress", env=env)
    assert first.returncode == 1, first.stderr  # the budget left job "later" pending
    smaller = manifest(tmp_path, scripted, image_job(["a"]), prices="m: {image: 0.006}")
    smaller.write_text(smaller.read_text().replace("output: out", f"output: {url}"))
    pruned = run_cli("prune", str(smaller), env=env)
    assert pruned.returncode == 0, pruned.stderr

    done = run_cli("status", url, "--json", env=env)

    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (1, 1, 0)
    assert done.returncode == 0, done.stdout
    assert scripted.requests.total() == 3


# --------------------------------------------------------------------------- 8. streams


def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "s", "model": "m",
            "choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}]}


def events(*payloads: bytes, done: bool = True) -> bytes:
    text = b"".join(payload + b"\n\n" for payload in payloads)
    return text + (b"data: [DONE]\n\n" if done else b"")


STREAM_ANSWERS = {
    "json as text/plain": (Reply(json.dumps(completion("A", "B")).encode(),
                                 content_type="text/plain"), ["A", "B"]),
    "json untyped": (Reply(b"\n " + json.dumps(completion("A", "B")).encode(),
                           content_type=""), ["A", "B"]),
    "json as event stream": (Reply(json.dumps(completion("A", "B")).encode(),
                                   content_type="text/event-stream"), ["A", "B"]),
    "multi-line data": (Reply(events(*(
        b"\n".join(b"data: " + line for line in json.dumps(chunk(i, t), indent=1).encode()
                   .split(b"\n")) for i, t in ((0, "A0 "), (1, "B0 "), (0, "A1"), (1, "B1")))),
        content_type="text/event-stream"), ["A0 A1", "B0 B1"]),
    "no blank lines": (Reply(b"".join(b"data: " + json.dumps(chunk(i, t)).encode() + b"\n"
                                      for i, t in ((0, "A"), (1, "B"))) + b"data: [DONE]\n",
                             content_type="text/event-stream"), ["A", "B"]),
    "finished without done": (Reply(events(
        b"data: " + json.dumps(chunk(0, "A", "stop")).encode(),
        b"data: " + json.dumps(chunk(1, "B", "stop")).encode(), done=False),
        content_type="text/event-stream"), ["A", "B"]),
    "usage chunk without done": (Reply(events(
        b"data: " + json.dumps(chunk(0, "A")).encode(),
        b"data: " + json.dumps(chunk(1, "B")).encode(),
        b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 1,
                                                         "completion_tokens": 2}}).encode(),
        done=False), content_type="text/event-stream"), ["A", "B"]),
}


async def test_a_streamed_request_keeps_what_its_answer_holds_on_the_first_request(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    for prompt, (reply, _texts) in STREAM_ANSWERS.items():
        scripted.replies[prompt] = reply
    path = manifest(tmp_path, scripted, chat_job(list(STREAM_ANSWERS),
                                                 "{n: 2, max_tokens: 10, stream: true}"))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert {p: scripted.requests[p] for p in STREAM_ANSWERS} == dict.fromkeys(STREAM_ANSWERS, 1)
    kept = texts_by_prompt(tmp_path / "out")
    assert {p: kept[p] for p in STREAM_ANSWERS} == {
        prompt: texts for prompt, (_reply, texts) in STREAM_ANSWERS.items()}


def with_usage(value: dict[str, Any]) -> dict[str, Any]:
    return {**value, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


@pytest.mark.parametrize("usage_in_chunks", [False, True])
async def test_a_stream_cut_before_every_choice_finished_is_still_truncated(
    tmp_path: Path, scripted: ScriptedServer, usage_in_chunks: bool
) -> None:
    pieces = [chunk(0, "A", "stop"), chunk(1, "B")]
    if usage_in_chunks:  # some servers send usage in every chunk: it does not end a stream
        pieces = [with_usage(piece) for piece in pieces]
    scripted.default = Reply(events(*(b"data: " + json.dumps(p).encode() for p in pieces),
                                    done=False), content_type="text/event-stream")
    path = manifest(tmp_path, scripted, chat_job(["cut"], "{n: 2, max_tokens: 10, "
                                                          "stream: true}"), retries=1)

    outcome = await run_manifest(path)

    assert scripted.requests["cut"] == 2 and outcome.summary["failed"] == 1
    (row,) = ledger_rows(tmp_path / "out")
    assert row["reason"] == "truncated"


# --------------------------------------------------------------------------- 9. small ones


def test_amounts_below_a_dollar_have_three_significant_digits_after_rounding() -> None:
    assert usd(0.0999996) == "$0.100"
    assert usd(0.018) == "$0.0180"
    assert usd(0.9996) == "$1.00"
    assert usd(0.0012345) == "$0.00123"


async def test_a_budget_stop_with_unknown_costs_says_unknown_never_0(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    answer = completion("hi")
    del answer["usage"]
    scripted.default = json_reply(answer)
    prompts = [f"question {i}" for i in range(8)]
    path = manifest(tmp_path, scripted, chat_job(prompts, "{max_tokens: 1000}"),
                    prices="m: {output: 100}", top="budget: 0.25\n")

    outcome = await run_manifest(path)

    assert scripted.requests.total() == 2  # 2 x $0.10 held at their estimates
    assert outcome.message is not None and "budget" in outcome.message
    assert "$0.00" not in outcome.message
    assert "unknown" in outcome.message


async def test_an_answer_in_an_encoding_batcher_cannot_decode_fails_without_a_retry(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.default = Reply(b"\x1b\x00\x00", headers=(("Content-Encoding", "br"),))
    path = manifest(tmp_path, scripted, chat_job(["brotli"], "{max_tokens: 10}"))

    outcome = await run_manifest(path)

    assert scripted.requests["brotli"] == 1 and outcome.summary["failed"] == 1
    (row,) = ledger_rows(tmp_path / "out")
    assert row["reason"] == "bad_encoding"


async def test_batcher_asks_only_for_encodings_it_can_decode(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.default = json_reply(completion("fine"))
    path = manifest(tmp_path, scripted, chat_job(["which"], "{max_tokens: 10}"))

    assert (await run_manifest(path)).exit_code == 0

    (accepted,) = scripted.encodings
    assert "br" not in accepted and "gzip" in accepted
