"""Issue 18, the answers' side: Modelverse's documented answer shape, every choice of an
``n`` > 1 chat answer kept, unknown usage held by the budget, connect timeouts free, ``"*"``
prices per kind, totals from the manifest's rows, and answers bounded by
``max_response_bytes``. Requests are counted at servers on 127.0.0.1."""

from __future__ import annotations

import base64
import collections
import json
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import REPO, ledger_rows, provider_block, run_cli, silent_manifest, write_manifest
from s3server import S3Server, s3, store_env
from scripted import GOOD_PNG, Reply, ScriptedServer, ThreadedApp, json_reply

from batcher.errors import UsageError
from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.run import Outcome, RunOptions, run

__all__ = ["s3"]  # a fixture, used by name

IMAGES = "/images/generations"
CHAT = "/chat/completions"
KONTEXT = "black-forest-labs/flux-kontext-max/multi"


async def run_manifest(path: Path, **options: Any) -> Outcome:
    return await run(load_manifest(path), RunOptions(progress=False, handle_signals=False,
                                                     **options))


def scripted_manifest(tmp_path: Path, server: ScriptedServer, jobs: str, *, extra: str = "",
                      top: str = "") -> Path:
    provider = (f"providers:\n  test:\n    base_url: {server.api_url}\n    concurrency: 1\n"
                f"    retries: 2\n{extra}")
    return write_manifest(tmp_path, f"name: answers\noutput: out\n{top}{provider}jobs:\n{jobs}")


def results(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- 0. Modelverse


def modelverse_answer(data: bytes) -> Reply:
    """The answer shape of Modelverse's API page for flux-kontext-max/multi."""
    return json_reply({"created": 1, "data": [{
        "url": "https://modelverse.example/never-fetched.png",
        "b64_json": "data:image/png;base64," + base64.b64encode(data).decode()}],
        "usage": {"input_tokens_details": {}}})


IMAGE_JOB = """\
  - name: edits
    type: image
    provider: test
    model: m
    prompt: {prompt}
    params: {{response_format: b64_json}}
"""


async def test_a_modelverse_answer_in_its_documented_shape_is_kept_on_the_first_request(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.replies["good"] = modelverse_answer(GOOD_PNG)
    scripted.replies["not a picture"] = modelverse_answer(b"just some text, not an image")
    jobs = IMAGE_JOB.format(prompt="good") + IMAGE_JOB.replace("edits", "bad").format(
        prompt="not a picture")
    path = scripted_manifest(tmp_path, scripted, jobs,
                             extra="    prices:\n      m: {image: 0.01}\n")

    outcome = await run_manifest(path)

    assert scripted.requests["good"] == 1  # kept on the first request, never paid again
    rows = {row["job"]: row for row in ledger_rows(tmp_path / "out", decode=True)}
    assert rows["edits"]["status"] == "ok" and rows["edits"]["cost_usd"] == 0.01
    kept = tmp_path / "out" / rows["edits"]["files"][0][0]
    assert kept.suffix == ".png" and kept.read_bytes() == GOOD_PNG
    assert scripted.downloads.total() == 0  # the bytes came with the answer
    # The bytes behind the prefix are still checked to be an image.
    assert rows["bad"]["status"] == "failed" and rows["bad"]["reason"] == "not_image"
    assert outcome.exit_code == 1


async def test_the_built_in_server_answers_its_kontext_model_in_modelverse_shape(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    (tmp_path / "ref.png").write_bytes(render_png("ref", 16, 16))
    path = write_manifest(tmp_path, "name: kontext\noutput: out\n" + provider_block(server) + f"""
jobs:
  - name: edits
    type: image
    provider: test
    model: {KONTEXT}
    prompt: make it blue
    images: [ref.png]
    params: {{response_format: b64_json, aspect_ratio: "1:1"}}
""")

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert len(server.stats.matching(IMAGES)) == 1
    body = results(tmp_path / "out")[0]["response"]["body"]
    assert body["usage"] == {"input_tokens_details": {}} and body["data"][0]["url"]
    (row,) = ledger_rows(tmp_path / "out", decode=True)
    assert (tmp_path / "out" / row["files"][0][0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_modelverse_error_gives_its_request_id_from_error_param(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    def error(param: str) -> Reply:
        return Reply(json.dumps({"error": {"message": "model busy", "type": "invalid_request",
                                           "param": param, "code": "bad"}}).encode(), status=400)

    scripted.replies["from modelverse"] = error("a1b2c3d4-0000-4e5f-9a8b-77c6d5e4f3a2")
    scripted.replies["a field"] = error("prompt")  # OpenAI's meaning of param: not an id
    jobs = IMAGE_JOB.format(prompt="from modelverse") + IMAGE_JOB.replace(
        "edits", "other").format(prompt="a field")
    path = scripted_manifest(tmp_path, scripted, jobs)

    await run_manifest(path)

    ids = {line["metadata"]["job"]: line["response"]["request_id"]
           for line in results(tmp_path / "out")}
    assert ids == {"edits": "a1b2c3d4-0000-4e5f-9a8b-77c6d5e4f3a2", "other": None}
    assert scripted.requests["from modelverse"] == 1  # a 400 is never retried


# --------------------------------------------------------------------------- 2. n > 1 choices


def chat_jobs(*, n: int, stream: bool, name: str = "talk") -> str:
    return f"""\
  - name: {name}
    type: chat
    provider: test
    model: local-chat
    prompts: ["tell me about the sea", "and the mountains"]
    params: {{n: {n}, stream: {json.dumps(stream)}, max_tokens: 60}}
"""


@pytest.mark.parametrize("stream", [False, True])
async def test_every_choice_of_an_n_2_chat_answer_is_its_own_file(
    tmp_path: Path, server_factory: Any, stream: bool
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, "name: choices\noutput: out\n" + provider_block(server)
                          + "jobs:\n" + chat_jobs(n=2, stream=stream))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert len(server.stats.matching(CHAT)) == 2  # one request per task
    root = tmp_path / "out"
    lines = {line["custom_id"]: line for line in results(root)}
    for row in ledger_rows(root, decode=True):
        stem = row_stem(root, row)
        paths = [path for path, _size, _sha in row["files"]]  # the ledger: [path, size, sha256]
        assert paths == [f"{stem}-1.txt", f"{stem}-2.txt"]
        texts = [(root / path).read_text() for path in paths]
        assert texts[0] and texts[1] and texts[0] != texts[1]  # both paid, both kept
        choices = lines[row["id"]]["response"]["body"]["choices"]
        assert [c["message"]["content"] for c in choices] == texts
        assert [f["path"] for f in lines[row["id"]]["metadata"]["files"]] == paths
        sidecar = json.loads((root / f"{stem}.json").read_text())
        assert [f["path"] for f in sidecar["files"]] == paths


def row_stem(root: Path, row: dict[str, Any]) -> str:
    """The task's file stem: its sidecar's name without ``.json``."""
    (sidecar,) = [p for p in root.rglob("*.json")
                  if json.loads(p.read_text()).get("id") == row["id"]]
    return sidecar.relative_to(root).as_posix().removesuffix(".json")


async def test_streamed_choices_are_the_same_texts_as_unstreamed_ones_and_n_1_keeps_its_name(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    jobs = (chat_jobs(n=3, stream=True, name="streamed") + chat_jobs(n=3, stream=False,
                                                                       name="whole")
            + chat_jobs(n=1, stream=True, name="single"))
    path = write_manifest(tmp_path, "name: choices\noutput: out\n" + provider_block(server)
                          + "jobs:\n" + jobs)

    assert (await run_manifest(path)).exit_code == 0
    root = tmp_path / "out"
    texts: dict[tuple[str, str], list[str]] = {}
    for row in ledger_rows(root, decode=True):
        texts[(row["job"], row["prompt"])] = [(root / f[0]).read_text() for f in row["files"]]
        if row["job"] == "single":  # the name older versions wrote, so their outputs resume
            assert [f[0] for f in row["files"]] == [f"{row_stem(root, row)}.txt"]
    for prompt in ("tell me about the sea", "and the mountains"):
        assert len(texts[("streamed", prompt)]) == 3
        assert texts[("streamed", prompt)] == texts[("whole", prompt)]


# --------------------------------------------------------------------------- 5. unknown usage


CHAT_JOB = """\
  - name: talk
    type: chat
    provider: test
    model: m
    prompts: {prompts}
    params: {{max_tokens: 1000}}
"""


@pytest.mark.parametrize("usage", [{"prompt_tokens": 5},
                                   {"prompt_tokens": 5, "completion_tokens": "12"},
                                   None])
async def test_answers_without_a_completion_count_are_held_at_their_estimate_by_the_budget(
    tmp_path: Path, scripted: ScriptedServer, usage: dict[str, Any] | None
) -> None:
    answer: dict[str, Any] = {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    if usage is not None:
        answer["usage"] = usage
    scripted.default = json_reply(answer)
    prompts = json.dumps([f"question {i}" for i in range(20)])
    # $100 per 1M output tokens x max_tokens 1000: $0.10 estimated per request.
    path = scripted_manifest(tmp_path, scripted, CHAT_JOB.format(prompts=prompts),
                             top="budget: 0.5\n", extra="    prices:\n      m: {output: 100}\n")

    outcome = await run_manifest(path)

    assert scripted.requests.total() == 5  # 5 x $0.10 held: the budget is reached
    assert outcome.exit_code == 1 and outcome.message and "budget" in outcome.message
    summary = outcome.summary
    assert summary["ok"] == 5 and summary["pending"] == 15
    assert summary["cost_unknown_requests"] == 5 and summary["cost_unknown"] == 5
    assert summary["cost_usd"] is None and summary["cost_total_usd"] is None  # never $0
    assert all(row["cost_usd"] is None for row in ledger_rows(tmp_path / "out"))


# --------------------------------------------------------------------------- 6. connect timeout


async def test_a_connect_timeout_is_free_and_counts_toward_unreachable(
    tmp_path: Path, silent_port: int
) -> None:
    path = silent_manifest(tmp_path, silent_port, "connect_timeout: 0.3")

    outcome = await run_manifest(path)

    summary = outcome.summary
    assert summary["cost_usd"] == 0  # no connection opened: nothing sent, nothing paid
    assert summary["failed"] == 0 and summary["pending"] == 4  # pending, not failed
    assert outcome.exit_code == 1 and outcome.message and "unreachable" in outcome.message
    assert summary["requests"] == 2  # stopped after one task's attempts (concurrency 1)


# --------------------------------------------------------------------------- 7. "*" by kind


def mixed_manifest(tmp_path: Path, server: Any, *, budget: str = "") -> Path:
    return write_manifest(tmp_path, f"name: mixed\noutput: out\n{budget}" + provider_block(
        server, extra='prices:\n  "*": {image: 0.01}\n') + """\
jobs:
  - name: shots
    type: image
    provider: test
    model: flux.1-schnell
    prompt: a lighthouse
    params: {size: 256x256, response_format: b64_json}
  - name: talk
    type: chat
    provider: test
    model: local-chat
    prompt: hello
""")


async def test_a_star_image_price_leaves_chat_models_unknown(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    with pytest.raises(UsageError, match="local-chat") as caught:
        await run_manifest(mixed_manifest(tmp_path, server, budget="budget: 5\n"))
    assert "flux.1-schnell" not in str(caught.value)  # "*" prices the image model
    assert len(server.stats.requests) == 0  # exit 2: nothing sent

    outcome = await run_manifest(mixed_manifest(tmp_path, server))  # no budget: it runs
    jobs = outcome.summary["jobs"]
    assert jobs["shots"]["cost_usd"] == 0.01 and jobs["shots"]["cost_unknown_requests"] == 0
    assert jobs["talk"]["cost_usd"] is None and jobs["talk"]["cost_unknown_requests"] == 1


def test_a_star_image_price_makes_run_exit_2_naming_the_chat_model(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    done = run_cli("run", str(mixed_manifest(tmp_path, server, budget="budget: 5\n")),
                   cwd=tmp_path)
    assert done.returncode == 2 and "local-chat" in done.stderr
    assert len(server.stats.requests) == 0


# --------------------------------------------------------------------------- 8. totals


def shots(prompts: list[str]) -> str:
    return ("jobs:\n  - name: shots\n    type: image\n    provider: test\n"
            "    model: flux.1-schnell\n    params: {size: 256x256, response_format: b64_json}\n"
            f"    prompts: {json.dumps(prompts)}\n")


def test_totals_count_only_the_manifests_rows_in_three_significant_digits(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    head = "name: totals\noutput: out\n" + provider_block(
        server, extra="prices:\n  flux.1-schnell: {image: 0.006}\n")
    path = write_manifest(tmp_path, head + shots([f"shot {i}" for i in range(6)]))
    first = run_cli("run", str(path), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "$0.0360 for the 6 ok tasks" in first.stderr  # not rounded to cents ($0.04)

    path = write_manifest(tmp_path, head + shots([f"shot {i}" for i in range(3)]))
    second = run_cli("run", str(path), "--no-progress", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cost_total_usd"] == pytest.approx(0.018)  # 3 tasks still in the manifest
    assert summary["jobs"]["shots"]["cost_total_usd"] == pytest.approx(0.018)
    assert "$0.0180 for the 3 ok tasks" in second.stderr
    assert len(server.stats.matching(IMAGES)) == 6  # nothing paid again


def test_an_unsharded_run_over_shard_ledgers_reports_what_their_tasks_cost(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, f"name: totals\noutput: s3://{s3.bucket()}/t\n"
                          + provider_block(server, extra="prices:\n  flux.1-schnell: "
                                           "{image: 0.006}\n")
                          + shots([f"shot {i}" for i in range(6)]))
    for shard in ("1/2", "2/2"):
        done = run_cli("run", str(path), "--no-progress", "--shard", shard,
                       env=store_env(s3.url, str(tmp_path / f"cache{shard[0]}")))
        assert done.returncode == 0, done.stderr

    whole = run_cli("run", str(path), "--no-progress",
                    env=store_env(s3.url, str(tmp_path / "cache-whole")))

    assert whole.returncode == 0, whole.stderr
    assert len(server.stats.matching(IMAGES)) == 6  # the shards' tasks are done for it
    assert "$0.0360 for the 6 ok tasks" in whole.stderr  # known, not $0.00


def test_status_of_an_output_after_a_prune_takes_its_totals_from_the_ledger(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    head = "name: totals\noutput: out\n" + provider_block(
        server, extra="prices:\n  flux.1-schnell: {image: 0.006}\n")
    path = write_manifest(tmp_path, head + shots([f"shot {i}" for i in range(4)]))
    assert run_cli("run", str(path), "--no-progress", cwd=tmp_path).returncode == 0
    path = write_manifest(tmp_path, head + shots(["shot 0"]))
    pruned = run_cli("prune", str(path), cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr

    done = run_cli("status", "out", "--json", cwd=tmp_path)

    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (1, 1, 0)
    assert report["cost_usd"] == pytest.approx(0.006)
    assert done.returncode == 0, done.stdout


def test_status_trusts_no_summary_an_older_prune_left_behind(
    tmp_path: Path, thread_server: Any
) -> None:
    # An output pruned by a batcher that did not rewrite summary.json: the summary still
    # counts the removed tasks, and status must not report them as pending.
    server = thread_server()
    head = "name: totals\noutput: out\n" + provider_block(server)
    path = write_manifest(tmp_path, head + shots([f"shot {i}" for i in range(4)]))
    assert run_cli("run", str(path), "--no-progress", cwd=tmp_path).returncode == 0
    written = (tmp_path / "out" / "summary.json").read_bytes()
    path = write_manifest(tmp_path, head + shots(["shot 0"]))
    assert run_cli("prune", str(path), cwd=tmp_path).returncode == 0
    (tmp_path / "out" / "summary.json").write_bytes(written)  # as the older prune left it

    done = run_cli("status", "out", "--json", cwd=tmp_path)

    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (1, 1, 0)
    assert done.returncode == 0, done.stdout


def test_status_of_an_output_keeps_the_pending_tasks_of_a_budget_stop(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, "name: totals\noutput: out\nbudget: 0.012\n" + provider_block(
        server, concurrency=1, extra="prices:\n  flux.1-schnell: {image: 0.006}\n")
        + shots([f"shot {i}" for i in range(4)]))
    assert run_cli("run", str(path), "--no-progress", cwd=tmp_path).returncode == 1

    done = run_cli("status", "out", "--json", cwd=tmp_path)

    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["pending"]) == (4, 2, 2)
    assert done.returncode == 1


# --------------------------------------------------------------------------- 9. bounded


class BombServer(ThreadedApp):
    """Answers every POST with a gzip body inflating to ``size`` bytes (zeros), or with
    ``reply`` when set; counts the requests. ``url`` ends in ``/v1``."""

    def __init__(self) -> None:
        self.requests = 0
        self.downloads = 0
        self.size = 0
        self.reply: Callable[[], web.Response] | None = None
        self._bombs: dict[tuple[int, bytes], bytes] = {}
        super().__init__()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/{tail:.*}", self._answer)
        app.router.add_get("/files/bomb.png", self._picture_bomb)

    async def _start(self) -> None:
        await super()._start()
        self.url += "/v1"

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        if self.reply is not None:
            return self.reply()
        return web.Response(body=self.bomb(self.size), content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    async def _picture_bomb(self, request: web.Request) -> web.Response:
        """A "PNG" (its signature, then zeros) that inflates to ``size`` bytes."""
        self.downloads += 1
        return web.Response(body=self.bomb(self.size, GOOD_PNG[:64]), content_type="image/png",
                            headers={"Content-Encoding": "gzip"})

    def bomb(self, size: int, head: bytes = b"") -> bytes:
        if (size, head) not in self._bombs:
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip wrapper
            block = b"\0" * (1 << 20)
            parts = [packer.compress(head)] + [packer.compress(block) for _ in range(size >> 20)]
            self._bombs[(size, head)] = b"".join(parts) + packer.flush()
        return self._bombs[(size, head)]


@pytest.fixture
def bomb_server() -> Iterator[BombServer]:
    server = BombServer().start()
    yield server
    server.stop()


# The batcher command's own peak RSS: a child started by subprocess (vfork + exec) starts its
# ru_maxrss at this test process's peak, so a small launcher forks it from itself and reports
# what os.wait4 says of it alone.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "batcher", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
print("PEAK", usage.ru_maxrss, "EXIT", os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def run_measured(tmp_path: Path, manifest: Path) -> tuple[int, int, str]:
    """Run ``batcher run MANIFEST``: its exit code, its own peak RSS (KiB) and stderr."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "run", str(manifest), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home"),
                               "PATH": "/usr/bin:/bin"})
    words = done.stderr.split("PEAK")[-1].split()
    return int(words[2]), int(words[0]), done.stderr


def bomb_manifest(tmp_path: Path, server: BombServer, name: str, *, cap: int) -> Path:
    return write_manifest(tmp_path, f"""\
name: {name}
output: {name}
providers:
  test:
    base_url: {server.url}
    concurrency: 1
    max_response_bytes: {cap}
jobs:
  - name: talk
    type: chat
    provider: test
    model: m
    prompt: hello
""", name=f"{name}.yaml")


def test_a_gzip_bomb_fails_its_task_as_too_large_and_memory_stays_at_the_cap(
    tmp_path: Path, bomb_server: BombServer
) -> None:
    cap = 4 << 20
    peaks = {}
    for size in (16 << 20, 320 << 20):
        bomb_server.size = size
        before = bomb_server.requests
        code, peaks[size], stderr = run_measured(
            tmp_path, bomb_manifest(tmp_path, bomb_server, f"bomb{size >> 20}", cap=cap))
        assert code == 1, stderr
        (row,) = ledger_rows(tmp_path / f"bomb{size >> 20}")
        assert row["status"] == "failed" and row["reason"] == "too_large"
        assert bomb_server.requests - before == 1  # never asked (and paid) again
    # Twenty times the inflated size, the same peak (within 64 MiB): the read stops at the cap.
    print("peak RSS KiB by inflated size", peaks)
    assert peaks[320 << 20] - peaks[16 << 20] < 64 * 1024, peaks


async def test_a_json_answer_to_a_streamed_request_is_kept_when_it_is_a_whole_completion(
    tmp_path: Path, scripted: ScriptedServer
) -> None:
    scripted.default = json_reply({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "whole"},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    path = scripted_manifest(tmp_path, scripted, """\
  - name: talk
    type: chat
    provider: test
    model: m
    prompt: hello
    params: {stream: true}
""")

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0, outcome.message
    assert scripted.requests.total() == 1 and scripted.bodies[0]["stream"] is True
    (row,) = ledger_rows(tmp_path / "out", decode=True)
    assert (tmp_path / "out" / row["files"][0][0]).read_text() == "whole"


async def test_an_answer_over_the_cap_fails_without_a_retry_and_a_smaller_one_is_kept(
    tmp_path: Path, bomb_server: BombServer
) -> None:
    words = collections.deque(["small", "x" * 5000])

    def reply() -> web.Response:
        content = words.popleft()
        return web.json_response({"choices": [{"index": 0, "message": {
            "role": "assistant", "content": content}}]})

    bomb_server.reply = reply
    path = write_manifest(tmp_path, f"""\
name: capped
output: out
providers:
  test:
    base_url: {bomb_server.url}
    concurrency: 1
    max_response_bytes: 2000
jobs:
  - name: talk
    type: chat
    provider: test
    model: m
    prompts: [first, second]
""")

    outcome = await run_manifest(path)

    rows = {row["prompt"]: row for row in ledger_rows(tmp_path / "out")}
    assert rows["first"]["status"] == "ok"
    assert rows["second"]["status"] == "failed" and rows["second"]["reason"] == "too_large"
    assert bomb_server.requests == 2 and outcome.exit_code == 1


async def test_an_image_download_that_inflates_past_its_cap_fails_and_is_not_paid_again(
    tmp_path: Path, bomb_server: BombServer
) -> None:
    bomb_server.size = 64 << 20
    bomb_server.reply = lambda: web.json_response(
        {"data": [{"url": bomb_server.url.removesuffix("/v1") + "/files/bomb.png"}]})
    path = write_manifest(tmp_path, f"""\
name: downloads
output: out
providers:
  test:
    base_url: {bomb_server.url}
    concurrency: 1
    download_cap: 1000000
jobs:
  - name: shots
    type: image
    provider: test
    model: m
    prompt: a lighthouse
""")

    outcome = await run_manifest(path)

    (row,) = ledger_rows(tmp_path / "out")
    assert row["status"] == "failed" and row["reason"] == "download_too_large"
    assert bomb_server.requests == 1 and bomb_server.downloads == 1  # over the cap: final
    assert outcome.exit_code == 1
