"""`batcher run` end to end against the built-in server on 127.0.0.1: files, ledger, reports,
resume, pacing, keys, and the selection options (--limit, --only, --shard, merge)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest

from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.manifest.tasks import expand
from batcher.plan import Selection
from batcher.run.pool import Outcome, RunOptions, run
from batcher.server import ChatRequest, ImageRequest, canonical_hash, chat_reply, chat_usage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGES = "/images/generations"
CHAT = "/chat/completions"
EDIT_MODEL = "black-forest-labs/flux-kontext-max/multi"
KEY = "sk-test-0123456789abcdef"
SUMMARY_COUNTS = ("total", "ok", "failed", "pending", "skipped", "ran")


# --------------------------------------------------------------------------- helpers


async def run_manifest(path: Path, **options: Any) -> Outcome:
    """Run a manifest in this event loop, as `batcher run --no-progress` does."""
    manifest = load_manifest(path)
    return await run(manifest, RunOptions(progress=False, handle_signals=False, **options))



def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def generation_posts(server: Any) -> list[Any]:
    return [r for r in server.stats.requests
            if r.listener == "api" and r.method == "POST" and r.path.endswith((IMAGES, CHAT))]


def check_summary_adds_up(summary: dict[str, Any]) -> None:
    assert summary["ok"] + summary["failed"] + summary["pending"] == summary["total"]
    for key in SUMMARY_COUNTS:
        assert summary[key] == sum(job[key] for job in summary["jobs"].values()), key
    for name, job in summary["jobs"].items():
        assert job["ok"] + job["failed"] + job["pending"] == job["total"], name
    for key in ("requests", "retries", "rate_limited", "elapsed_s", "exit_code"):
        assert key in summary, key
    assert summary["elapsed_s"] >= 0


def task_sidecar(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    """The sidecar of a task: ``<stem>.json`` beside its files (``<stem>-k.png`` when n > 1)."""
    first = Path(row["files"][0][0])
    stem = first.stem.rsplit("-", 1)[0] if len(row["files"]) > 1 else first.stem
    return json.loads((out / first.parent / f"{stem}.json").read_text())


def check_files_match_ledger(out: Path, rows: list[dict[str, Any]]) -> None:
    """Every ok row's files exist, are whole (size and sha256), and its sidecar says what the
    row says."""
    for row in rows:
        if row["status"] != "ok":
            continue
        assert row["files"], row["id"]
        for rel, size, digest in row["files"]:
            path = out / rel
            data = path.read_bytes()
            assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, rel
            if row["kind"] == "image":
                assert data.startswith(PNG_MAGIC), rel
        sidecar = task_sidecar(out, row)
        assert sidecar["id"] == row["id"] and sidecar["status"] == "ok"
        assert [[f["path"], f["size"], f["sha256"]] for f in sidecar["files"]] == row["files"]


def image_grid(name: str, *, model: str = "flux.1-schnell", prompts: list[str],
               seeds: int | list[int] = 1, params: str = "{size: 256x256, response_format: "
               "b64_json}") -> str:
    return (f"  - name: {name}\n    type: image\n    provider: test\n    model: {model}\n"
            f"    prompts: {json.dumps(prompts)}\n    seeds: {json.dumps(seeds)}\n"
            f"    params: {params}\n")


def manifest_text(server: Any, jobs: str, *, name: str = "t", out: str = "out",
                  **provider: Any) -> str:
    return f"name: {name}\noutput: {out}\n" + provider_block(server, **provider) + "jobs:\n" + jobs


# --------------------------------------------------------------------------- images


async def test_b64_and_url_images_are_whole_pngs_and_only_the_api_sees_the_key(
    tmp_path: Path, server_factory: Any, monkeypatch: Any
) -> None:
    server = await server_factory(api_key=KEY)
    monkeypatch.setenv("TEST_KEY", KEY)
    jobs = image_grid("b64", prompts=["A red fox"], seeds=2) + image_grid(
        "urls", model="flux.1-dev", prompts=["A lighthouse"], seeds=[7],
        params="{size: 256x256, n: 2, response_format: url}",
    )
    path = write_manifest(tmp_path, manifest_text(server, jobs, key_env="TEST_KEY"))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    out = tmp_path / "out"
    rows = ledger_rows(out, decode=True)
    assert sorted((r["job"], r["seed"], r["status"]) for r in rows) == [
        ("b64", 0, "ok"), ("b64", 1, "ok"), ("urls", 7, "ok")]
    check_files_match_ledger(out, rows)

    # b64: the file is exactly the picture the server rendered for that prompt and seed.
    for row in (r for r in rows if r["job"] == "b64"):
        [(rel, _size, _sha)] = row["files"]
        expected = render_png(
            ImageRequest("flux.1-schnell", "A red fox", 1, 256, 256, "b64_json", row["seed"],
                         ()).key(0), 256, 256)
        assert (out / rel).read_bytes() == expected
    # url, n: 2: two files named -1 and -2, each the picture the server offered at its URL.
    [url_row] = [r for r in rows if r["job"] == "urls"]
    names = sorted(Path(rel).name for rel, _, _ in url_row["files"])
    assert len(names) == 2
    assert names[0].endswith("-1.png") and names[1].endswith("-2.png")
    assert names[0][: -len("-1.png")] == names[1][: -len("-2.png")]
    request = ImageRequest("flux.1-dev", "A lighthouse", 2, 256, 256, "url", 7, ())
    for k, (rel, _, _) in enumerate(sorted(url_row["files"])):
        assert (out / rel).read_bytes() == render_png(request.key(k), 256, 256)

    api = [r for r in server.stats.requests if r.listener == "api"]
    files = [r for r in server.stats.requests if r.listener == "files"]
    assert len(api) == 3 and all(r.authorization == f"Bearer {KEY}" for r in api)
    assert len(files) == 2 and all(r.status == 200 for r in files)
    assert all(r.authorization is None for r in files), "image downloads must not carry the key"
    # The key never lands in anything batcher writes.
    for file in out.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


async def test_kontext_edit_sends_both_local_images_and_names_them_by_hash(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    refs = tmp_path / "refs"
    refs.mkdir()
    pictures = {name: render_png(f"input {name}", 64, 48) for name in ("a", "b")}
    for name, data in pictures.items():
        (refs / f"{name}.png").write_bytes(data)
    digests = tuple(hashlib.sha256(data).hexdigest() for data in pictures.values())
    jobs = (
        "  - name: edits\n    type: image\n    provider: test\n"
        f"    model: {EDIT_MODEL}\n    prompt: Put the fox under the hat\n"
        "    images: [refs/a.png, refs/b.png]\n    seeds: 1\n"
        "    params: {size: 256x256, response_format: b64_json}\n"
    )
    path = write_manifest(tmp_path, manifest_text(server, jobs))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    assert server.stats.statuses(IMAGES) == [200]
    out = tmp_path / "out"
    [row] = ledger_rows(out, decode=True)
    assert row["status"] == "ok"
    check_files_match_ledger(out, [row])
    [(rel, _, _)] = row["files"]
    # The server renders from the sha256 of the images it decoded: equal bytes prove that both
    # inputs arrived whole and in order.
    request = ImageRequest(EDIT_MODEL, "Put the fox under the hat", 1, 256, 256, "b64_json",
                           0, digests)
    assert (out / rel).read_bytes() == render_png(request.key(0), 256, 256)
    sidecar_text = (out / rel).with_suffix(".json").read_text()
    sidecar = json.loads(sidecar_text)
    assert sidecar["request"]["images"] == [f"sha256:{d}" for d in digests]
    assert "base64" not in sidecar_text
    for data in pictures.values():
        assert base64.b64encode(data).decode()[:40] not in sidecar_text


# --------------------------------------------------------------------------- chat


CHAT_JOB = """\
  - name: captions
    type: chat
    provider: test
    model: llama-3.1-8b-instruct
    system: You write one-line captions about {city}.
    prompts: ["A caption for a poster of {city}"]
    vars: {city: [Amsterdam, Tokyo]}
    seeds: 2
    params: {max_tokens: 100, temperature: 0.7%s}
"""


def expected_chat(city: str, seed: int) -> tuple[str, dict[str, int]]:
    messages = (("system", f"You write one-line captions about {city}."),
                ("user", f"A caption for a poster of {city}"))
    request = ChatRequest("llama-3.1-8b-instruct", messages, 100, seed, False)
    text, _ = chat_reply(request)
    return text, chat_usage(request, text)


async def test_chat_with_system_vars_and_seeds_saves_the_servers_text_and_usage(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, CHAT_JOB % ""))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    out = tmp_path / "out"
    rows = ledger_rows(out, decode=True)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    check_files_match_ledger(out, rows)
    seen = set()
    for row in rows:
        city = row["vars"]["city"]
        seen.add((city, row["seed"]))
        text, usage = expected_chat(city, row["seed"])
        [(rel, _, _)] = row["files"]
        assert rel.endswith(".txt")
        assert (out / rel).read_text(encoding="utf-8") == text
        assert row["usage"] == usage
    assert seen == {("Amsterdam", 0), ("Amsterdam", 1), ("Tokyo", 0), ("Tokyo", 1)}
    assert len(generation_posts(server)) == 4


async def test_streamed_chat_saves_the_same_text_as_plain_chat(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    plain = write_manifest(tmp_path, manifest_text(server, CHAT_JOB % "", out="plain"),
                           "plain.yaml")
    streamed = write_manifest(
        tmp_path, manifest_text(server, CHAT_JOB % ", stream: true", out="streamed"),
        "streamed.yaml")

    assert (await run_manifest(plain)).exit_code == 0
    assert (await run_manifest(streamed)).exit_code == 0

    plain_rows = {r["id"]: r for r in ledger_rows(tmp_path / "plain", decode=True)}
    stream_rows = {r["id"]: r for r in ledger_rows(tmp_path / "streamed", decode=True)}
    assert plain_rows.keys() == stream_rows.keys()  # stream is transport: same task ids
    assert len(stream_rows) == 4
    for task_id, row in stream_rows.items():
        assert row["status"] == "ok"
        [(rel, _, _)] = row["files"]
        [(plain_rel, _, _)] = plain_rows[task_id]["files"]
        text = (tmp_path / "streamed" / rel).read_text(encoding="utf-8")
        assert text == (tmp_path / "plain" / plain_rel).read_text(encoding="utf-8")
        city = row["vars"]["city"]
        assert text == expected_chat(city, row["seed"])[0]
        assert row["usage"] == plain_rows[task_id]["usage"]
    # The second run really asked for a stream.
    for city in ("Amsterdam", "Tokyo"):
        for seed in (0, 1):
            body = {
                "model": "llama-3.1-8b-instruct", "max_tokens": 100, "temperature": 0.7,
                "stream": True, "seed": seed,
                "messages": [
                    {"role": "system", "content": f"You write one-line captions about {city}."},
                    {"role": "user", "content": f"A caption for a poster of {city}"}],
            }
            assert server.stats.generations[canonical_hash(json.dumps(body).encode())] == 1


# --------------------------------------------------------------------------- reports


async def test_summary_and_results_add_up_with_a_failing_job(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    jobs = image_grid("good", prompts=["A", "B"], seeds=2) + image_grid(
        "bad", prompts=["C"], seeds=3, params="{size: 999x999, response_format: b64_json}")
    path = write_manifest(tmp_path, manifest_text(server, jobs))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 1
    out = tmp_path / "out"
    summary = summary_of(out)
    assert summary == outcome.summary
    check_summary_adds_up(summary)
    assert {k: summary[k] for k in SUMMARY_COUNTS} == {
        "total": 7, "ok": 4, "failed": 3, "pending": 0, "skipped": 0, "ran": 7}
    # No prices: what the ok tasks cost is unknown, never 0; a refused request (a 400) cost
    # nothing, whatever the price.
    assert summary["jobs"]["good"] == {
        "total": 4, "ok": 4, "failed": 0, "pending": 0, "skipped": 0, "ran": 4,
        "cost_usd": None, "cost_unknown_requests": 4, "cost_total_usd": None,
        "cost_unknown": 4}
    assert summary["jobs"]["bad"] == {
        "total": 3, "ok": 0, "failed": 3, "pending": 0, "skipped": 0, "ran": 3,
        "cost_usd": 0.0, "cost_unknown_requests": 0, "cost_total_usd": 0.0,
        "cost_unknown": 0}
    assert summary["requests"] == len(generation_posts(server)) == 7  # a 400 is not retried
    assert summary["retries"] == 0 and summary["rate_limited"] == 0
    assert summary["exit_code"] == 1

    rows = {r["id"]: r for r in ledger_rows(out, decode=True)}
    for row in rows.values():
        if row["job"] == "bad":
            assert row["status"] == "failed" and row["http_status"] == 400
            assert "999x999" in row["error"] and "is not one of" in row["error"]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == 7
    assert {r["custom_id"] for r in results} == rows.keys()
    for result in results:
        if rows[result["custom_id"]]["status"] == "ok":
            assert result["error"] is None and result["response"]["status_code"] == 200
        else:  # the provider answered 400: its answer is the response, error stays null
            assert result["error"] is None and result["response"]["status_code"] == 400
            assert "999x999" in result["response"]["body"]["error"]["message"]
    assert (out / "index.html").is_file()


# --------------------------------------------------------------------------- resume


async def test_a_finished_run_run_again_sends_nothing(tmp_path: Path, server_factory: Any) -> None:
    server = await server_factory()
    jobs = image_grid("pics", prompts=["A", "B"], seeds=2) + CHAT_JOB % ""
    path = write_manifest(tmp_path, manifest_text(server, jobs))
    assert (await run_manifest(path)).exit_code == 0
    sent = len(server.stats.requests)
    assert sent == 8

    again = await run_manifest(path)

    assert again.exit_code == 0
    assert len(server.stats.requests) == sent
    summary = summary_of(tmp_path / "out")
    check_summary_adds_up(summary)
    assert (summary["total"], summary["ok"], summary["skipped"], summary["ran"]) == (8, 8, 8, 0)
    assert summary["requests"] == 0


async def test_adding_seeds_runs_only_the_new_seeds(tmp_path: Path, server_factory: Any) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A", "B"], seeds=2)))
    assert (await run_manifest(path)).exit_code == 0
    before = Counter(server.stats.generations)
    assert sum(before.values()) == 4

    write_manifest(tmp_path, manifest_text(server, image_grid("pics", prompts=["A", "B"],
                                                              seeds=4)))
    assert (await run_manifest(path)).exit_code == 0

    new = server.stats.generations - before
    assert sum(new.values()) == 4 and all(count == 1 for count in new.values())
    assert all(server.stats.generations[h] == 1 for h in before)  # no old seed paid twice
    rows = ledger_rows(tmp_path / "out", decode=True)
    assert sorted((r["prompt"], r["seed"]) for r in rows) == [
        (p, s) for p in "AB" for s in range(4)]
    summary = summary_of(tmp_path / "out")
    assert (summary["total"], summary["skipped"], summary["ran"], summary["ok"]) == (8, 4, 4, 8)


async def test_editing_one_prompt_reruns_only_its_tasks(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A cat", "A dog", "A cow"], seeds=2)))
    assert (await run_manifest(path)).exit_code == 0
    sent = len(generation_posts(server))
    assert sent == 6

    write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A cat", "A wolf", "A cow"], seeds=2)))
    assert (await run_manifest(path)).exit_code == 0

    posts = generation_posts(server)[sent:]
    assert len(posts) == 2
    summary = summary_of(tmp_path / "out")
    assert (summary["total"], summary["skipped"], summary["ran"], summary["ok"]) == (6, 4, 2, 6)
    wolf = [r for r in ledger_rows(tmp_path / "out", decode=True) if r["prompt"] == "A wolf"]
    assert sorted(r["seed"] for r in wolf) == [0, 1]
    assert all(r["status"] == "ok" for r in wolf)


async def test_bodies_are_sent_as_written_and_transport_changes_rerun_nothing(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    jobs = ("  - name: hats\n    type: image\n    provider: test\n    model: flux.1-schnell\n"
            "    prompt: A {{curly}} hat in {city}\n    vars: {city: [Oslo]}\n"
            "    params: {size: 256x256, response_format: %s, steps: 4}\n")
    path = write_manifest(tmp_path, manifest_text(server, jobs % "b64_json"))
    assert (await run_manifest(path)).exit_code == 0
    # No seeds: one task, no seed in the body; {{ }} are literal braces; params as given.
    body = {"model": "flux.1-schnell", "prompt": "A {curly} hat in Oslo", "size": "256x256",
            "response_format": "b64_json", "steps": 4}
    assert dict(server.stats.generations) == {canonical_hash(json.dumps(body).encode()): 1}
    [row] = ledger_rows(tmp_path / "out", decode=True)
    assert row["seed"] is None and row["prompt"] == "A {curly} hat in Oslo"
    sent = len(server.stats.requests)

    write_manifest(tmp_path, manifest_text(server, jobs % "url"))
    again = await run_manifest(path)

    assert again.exit_code == 0
    assert len(server.stats.requests) == sent, "response_format must not change a task's id"
    assert again.summary["skipped"] == 1 and again.summary["ran"] == 0


async def test_deleting_one_output_file_reruns_only_that_task(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A", "B", "C"], seeds=2)))
    assert (await run_manifest(path)).exit_code == 0
    out = tmp_path / "out"
    victim = ledger_rows(out, decode=True)[3]
    [(rel, _size, digest)] = victim["files"]
    (out / rel).unlink()
    sent = len(generation_posts(server))

    assert (await run_manifest(path)).exit_code == 0

    assert len(generation_posts(server)) == sent + 1
    assert sha256(out / rel) == digest
    rows = ledger_rows(out, decode=True)
    assert len(rows) == 6
    check_files_match_ledger(out, rows)
    summary = summary_of(out)
    assert (summary["skipped"], summary["ran"], summary["ok"]) == (5, 1, 6)


async def test_a_file_cut_short_under_its_final_name_is_run_again(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A", "B"], seeds=2)))
    assert (await run_manifest(path)).exit_code == 0
    out = tmp_path / "out"
    [(rel, size, digest)] = ledger_rows(out, decode=True)[1]["files"]
    (out / rel).write_bytes((out / rel).read_bytes()[: size // 2])
    sent = len(generation_posts(server))

    assert (await run_manifest(path)).exit_code == 0

    assert len(generation_posts(server)) == sent + 1
    assert sha256(out / rel) == digest
    assert summary_of(out)["ran"] == 1


async def test_retries_and_429s_are_counted_as_the_server_saw_them(
    tmp_path: Path, server_factory: Any
) -> None:
    kinds = ("500", "503", "429", "reset", "truncated", "garbage", "empty_data", "bad_b64",
             "url_404", "not_image")
    server = await server_factory(fault_rate=0.5, fault_kinds=kinds)
    jobs = image_grid("b64", prompts=["A", "B"], seeds=4) + image_grid(
        "urls", model="flux.1-dev", prompts=["C"], seeds=4,
        params="{size: 256x256, response_format: url}") + CHAT_JOB % ", stream: true"
    path = write_manifest(tmp_path, manifest_text(server, jobs))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    summary = summary_of(tmp_path / "out")
    check_summary_adds_up(summary)
    faults = sum(server.stats.faults.values())
    assert faults > 0  # the fault draw is fixed by the bodies: this manifest does hit some
    assert summary["ok"] == summary["total"] == 16
    assert summary["requests"] == len(generation_posts(server)) == 16 + faults
    assert summary["retries"] == faults
    assert summary["rate_limited"] == server.stats.rate_limited == server.stats.faults["429"]
    check_files_match_ledger(tmp_path / "out", ledger_rows(tmp_path / "out", decode=True))
    # Each task paid for once: faulted answers are not generations.
    assert sorted(server.stats.generations.values()) == [1] * 16


def test_a_jsonl_task_file_keeps_the_users_ids(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "hero-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "llama-3.1-8b-instruct", "max_tokens": 20,
                  "messages": [{"role": "user", "content": "Name a lighthouse"}]}},
        {"custom_id": "hero-2", "method": "POST", "url": "/v1/images/generations",
         "body": {"model": "flux.1-schnell", "prompt": "A cat", "size": "256x256",
                  "response_format": "b64_json", "seed": 3}},
        {"id": "own-1", "type": "image", "model": "flux.1-dev", "prompt": "A dog", "seed": 7,
         "params": {"size": "256x256"}},
    ]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    done = run_cli("run", "tasks.jsonl", "--provider", "local", "--no-progress", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    out = tmp_path / "output" / "tasks"
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["hero-1", "hero-2", "own-1"]
    assert all(r["error"] is None for r in results)
    rows = ledger_rows(out, decode=True)
    assert sorted(r["id"] for r in rows) == ["hero-1", "hero-2", "own-1"]
    check_files_match_ledger(out, rows)


# --------------------------------------------------------------------------- pacing and keys


async def test_strict_rate_limit_never_exceeds_the_window_and_draws_no_429(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory(rate_limit=(10, 1.0))
    jobs = ("  - name: lines\n    type: chat\n    provider: test\n"
            "    model: llama-3.1-8b-instruct\n    prompt: Say something\n    seeds: 30\n"
            "    params: {max_tokens: 5}\n")
    path = write_manifest(tmp_path, manifest_text(server, jobs, rate="10/s", concurrency=4))

    outcome = await run_manifest(path)

    assert outcome.exit_code == 0
    starts = sorted(server.stats.starts(CHAT))
    assert len(starts) == 30
    for i, t in enumerate(starts):
        in_window = sum(1 for u in starts[i:] if u < t + 1.0)
        assert in_window <= 10, f"{in_window} requests started within 1 s of start {i}"
    assert 429 not in server.stats.statuses(CHAT)
    assert server.stats.rate_limited == 0
    assert outcome.summary["rate_limited"] == 0 and outcome.summary["ok"] == 30


def test_a_wrong_key_stops_the_run_with_exit_3(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server(api_key="the-right-key")
    wrong = "sk-wrong-key-4815162342"
    path = write_manifest(tmp_path, manifest_text(
        server, image_grid("pics", prompts=["A", "B", "C", "D"], seeds=5),
        key_env="TEST_KEY", concurrency=3))

    done = run_cli("-v", "run", str(path), "--no-progress", env={"TEST_KEY": wrong})

    assert done.returncode == 3, done.stderr
    assert "provider test" in done.stderr
    assert "Traceback" not in done.stderr
    assert wrong not in done.stderr + done.stdout, "the key must not reach the (debug) logs"
    api = [r for r in server.stats.requests if r.listener == "api"]
    assert 1 <= len(api) <= 3, "at most `concurrency` requests after the first 401"
    assert all(r.status == 401 for r in api)
    for file in (tmp_path / "out").rglob("*"):
        if file.is_file():
            assert wrong.encode() not in file.read_bytes(), file


def test_a_missing_key_is_a_clear_error_and_nothing_is_sent(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server(api_key="the-right-key")
    path = write_manifest(tmp_path, manifest_text(
        server, image_grid("pics", prompts=["A"], seeds=2), key_env="TEST_KEY"))

    done = run_cli("run", str(path), "--no-progress")

    assert done.returncode == 2, done.stderr  # README: a missing key exits 2, nothing sent
    assert "TEST_KEY" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2
    assert server.stats.requests == []


# --------------------------------------------------------------------------- selection


def test_limit_runs_at_most_n_new_tasks(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A", "B"], seeds=5)))

    first = run_cli("run", str(path), "--limit", "3", "--no-progress")

    # README: a --limit run that did all it was allowed and saw no failure exits 0.
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert len(generation_posts(server)) == 3
    rows = ledger_rows(tmp_path / "out", decode=True)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    summary = summary_of(tmp_path / "out")
    assert (summary["ran"], summary["ok"], summary["failed"], summary["pending"]) == (3, 3, 0, 7)

    second = run_cli("run", str(path), "--limit", "3", "--no-progress")

    assert second.returncode == 0, second.stderr
    assert len(generation_posts(server)) == 6
    assert len({r["id"] for r in ledger_rows(tmp_path / "out", decode=True)}) == 6


def test_only_runs_one_job(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    jobs = image_grid("first", prompts=["A", "B"], seeds=2) + image_grid(
        "second", model="stable-diffusion-3.5-medium", prompts=["C"], seeds=3)
    path = write_manifest(tmp_path, manifest_text(server, jobs))

    done = run_cli("run", str(path), "--only", "second", "--no-progress")

    assert done.returncode == 0, done.stderr
    rows = ledger_rows(tmp_path / "out", decode=True)
    assert sorted((r["job"], r["seed"]) for r in rows) == [("second", s) for s in range(3)]
    assert len(generation_posts(server)) == 3
    summary = summary_of(tmp_path / "out")
    assert summary["ran"] == 3 and summary["failed"] == 0
    assert summary["jobs"]["second"]["ok"] == summary["jobs"]["second"]["ran"] == 3
    first = summary["jobs"].get("first", {"ran": 0, "ok": 0})
    assert first["ran"] == first["ok"] == 0


def test_shards_cover_every_task_once_and_merge_joins_them(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    jobs = image_grid("pics", prompts=["A", "B", "C", "D"], seeds=4) + CHAT_JOB % ""
    path = write_manifest(tmp_path, manifest_text(server, jobs))
    every_id = {task.id for task in expand(load_manifest(path))}
    assert len(every_id) == 20

    shard_ids = []
    for i in (1, 2, 3):
        done = run_cli("run", str(path), "--shard", f"{i}/3", "--output", f"shard{i}",
                       "--no-progress")
        assert done.returncode == 0, done.stderr
        rows = ledger_rows(tmp_path / f"shard{i}", decode=True)
        assert rows and all(r["status"] == "ok" for r in rows)
        check_files_match_ledger(tmp_path / f"shard{i}", rows)
        shard_ids.append({r["id"] for r in rows})
        assert summary_of(tmp_path / f"shard{i}")["ran"] == len(rows)
    assert sum(len(ids) for ids in shard_ids) == len(every_id)
    assert set().union(*shard_ids) == every_id
    assert len(generation_posts(server)) == 20

    merged = run_cli("merge", "shard1", "shard2", "shard3", "--output", "merged")

    assert merged.returncode == 0, merged.stderr
    rows = ledger_rows(tmp_path / "merged", decode=True)
    assert {r["id"] for r in rows} == every_id and all(r["status"] == "ok" for r in rows)
    check_files_match_ledger(tmp_path / "merged", rows)
    sent = len(server.stats.requests)

    again = run_cli("run", str(path), "--output", "merged", "--no-progress")

    assert again.returncode == 0, again.stderr
    assert len(server.stats.requests) == sent, "a merged output must need nothing more"
    summary = summary_of(tmp_path / "merged")
    assert (summary["total"], summary["ok"], summary["skipped"], summary["ran"]) == (20, 20, 20, 0)
    status = run_cli("status", str(path), "--output", "merged", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert (report["total"], report["ok"], report["failed"], report["pending"]) == (20, 20, 0, 0)
    status_dir = run_cli("status", "merged", "--json")
    assert status_dir.returncode == 0, status_dir.stderr
    report = json.loads(status_dir.stdout)
    assert (report["total"], report["ok"], report["failed"], report["pending"]) == (20, 20, 0, 0)


async def test_in_process_shard_selection_matches_the_cli_split(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    path = write_manifest(tmp_path, manifest_text(server, image_grid(
        "pics", prompts=["A", "B", "C"], seeds=3)))
    ids = []
    for i in (1, 2, 3):
        outcome = await run_manifest(path, output=tmp_path / f"s{i}",
                                     selection=Selection(shard=(i, 3)))
        assert outcome.exit_code == 0
        ids.append([r["id"] for r in ledger_rows(tmp_path / f"s{i}", decode=True)])
    flat = [task_id for shard in ids for task_id in shard]
    assert len(flat) == len(set(flat)) == 9
    assert set(flat) == {t.id for t in expand(load_manifest(path))}
    assert sum(server.stats.generations.values()) == 9
