"""Issue #13 "What a user sees": seed_param, request ids and results.jsonl, an unreachable
endpoint, validate's parameter checks. Every test runs against the built-in server (or a closed
port) on 127.0.0.1."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from textwrap import dedent
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest

from batcher.manifest import load_manifest
from batcher.manifest.tasks import expand
from batcher.providers.config import builtin_providers
from batcher.run.pool import Outcome, RunOptions, run
from batcher.server import canonical_hash


async def run_manifest(path: Path, **options: Any) -> Outcome:
    manifest = load_manifest(path)
    return await run(manifest, RunOptions(progress=False, handle_signals=False, **options))


# --------------------------------------------------------------------------- seed_param


async def test_seed_param_none_makes_distinct_tasks_and_sends_no_seed(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    head = "name: t\n" + provider_block(server, extra="seed_param: none")
    path = write_manifest(tmp_path, head + fox_job("3"))
    outcome = await run_manifest(path, output=tmp_path / "out")
    assert outcome.exit_code == 0
    rows = ledger_rows(tmp_path / "out")
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]  # the seed still tells tasks apart
    assert len({r["id"] for r in rows}) == 3
    # At the server: three requests, every one the same body, with no seed in it.
    body = {"model": "flux.1-schnell", "prompt": "a red fox", "size": "256x256"}
    assert dict(server.stats.generations) == {canonical_hash(json.dumps(body).encode()): 3}


async def test_seed_param_names_the_field_the_seed_travels_in(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    text = "name: t\n" + provider_block(server) + fox_job("[7]")
    default_ids = {t.id for t in _tasks(write_manifest(tmp_path, text, "a.yaml"))}
    renamed = text.replace("concurrency: 4", "concurrency: 4\n    seed_param: seed")
    assert {t.id for t in _tasks(write_manifest(tmp_path, renamed, "b.yaml"))} == default_ids
    outcome = await run_manifest(tmp_path / "b.yaml", output=tmp_path / "out")
    assert outcome.exit_code == 0
    body = {"model": "flux.1-schnell", "prompt": "a red fox", "size": "256x256", "seed": 7}
    assert dict(server.stats.generations) == {canonical_hash(json.dumps(body).encode()): 1}


def test_vultr_sends_no_seed_and_the_others_do() -> None:
    providers = builtin_providers()
    assert providers["vultr"].seed_param is None
    assert providers["modelverse"].seed_param == "seed"
    assert providers["local"].seed_param == "seed"


def fox_job(seeds: str) -> str:
    """One image job of provider ``test``: "a red fox" at 256x256 over ``seeds``."""
    return dedent("""
        jobs:
          - name: art
            provider: test
            type: image
            model: flux.1-schnell
            prompt: a red fox
            params: {size: 256x256}
        """) + f"    seeds: {seeds}\n"


def _tasks(path: Path) -> list[Any]:
    return list(expand(load_manifest(path)))


# --------------------------------------------------------------------------- unreachable


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_endpoint_refusing_every_connection_is_stopped_after_concurrency_tasks(
    tmp_path: Path,
) -> None:
    base_url = f"http://127.0.0.1:{_closed_port()}/v1"
    path = write_manifest(tmp_path, f"""
        name: t
        providers:
          down:
            base_url: {base_url}
            concurrency: 2
            retries: 1
        jobs:
          - name: art
            type: image
            provider: down
            model: flux.1-schnell
            prompt: a red fox
            seeds: 20
        """)
    done = run_cli("run", str(path), "--output", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 1, done.stderr
    assert base_url in done.stderr and "unreachable" in done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["total"], summary["pending"], summary["failed"]) == (20, 20, 0)
    # Two tasks (the concurrency) used up their two attempts each; a worker that finished
    # first may have begun one more task. Without the stop it would be 20 x 2.
    assert 4 <= summary["requests"] <= 6
    assert ledger_rows(tmp_path / "out") == []


# --------------------------------------------------------------------------- results.jsonl

BATCH_LINE_KEYS = {"id", "custom_id", "response", "error", "metadata"}


async def test_results_jsonl_lines_have_the_openai_batch_output_shape(
    tmp_path: Path, server_factory: Any
) -> None:
    good = await server_factory()
    resetting = await server_factory(fault_rate=1.0, fault_kinds=("reset",))
    path = write_manifest(tmp_path, f"""
        name: t
        providers:
          good: {{base_url: "{good.api_url}", retries: 0}}
          resetting: {{base_url: "{resetting.api_url}", retries: 0}}
        jobs:
          - name: ok
            type: image
            provider: good
            model: flux.1-schnell
            prompt: a poster of {{city}}
            vars: {{city: [Paris]}}
            seeds: [3]
            params: {{size: 256x256}}
          - name: refused
            type: image
            provider: good
            model: flux.1-schnell
            prompt: a fox
            params: {{size: 13x13}}
          - name: cut
            type: image
            provider: resetting
            model: flux.1-schnell
            prompt: a fox
        """)
    outcome = await run_manifest(path, output=tmp_path / "out")
    assert outcome.exit_code == 1
    lines = [json.loads(line)
             for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    by_job = {line["metadata"]["job"]: line for line in lines}
    assert len(lines) == 3 and set(by_job) == {"ok", "refused", "cut"}
    rows = {row["id"]: row for row in ledger_rows(tmp_path / "out")}
    for line in lines:
        assert set(line) == BATCH_LINE_KEYS
        assert line["custom_id"] in rows
        assert line["id"] == "batcher-" + line["custom_id"][:16]

    ok = by_job["ok"]
    assert ok["error"] is None
    assert set(ok["response"]) == {"status_code", "request_id", "body"}
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["request_id"].startswith("req_")
    assert rows[ok["custom_id"]]["request_id"] == ok["response"]["request_id"]
    body = ok["response"]["body"]
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    assert "b64_json" not in body["data"][0] and "files" not in body
    [saved] = ok["metadata"]["files"]
    assert (tmp_path / "out" / saved["path"]).stat().st_size == saved["size"]
    assert ok["metadata"] == {
        "job": "ok", "model": "flux.1-schnell", "seed": 3, "prompt": "a poster of Paris",
        "vars": {"city": "Paris"}, "files": [saved], "cost_usd": None,  # no prices: unknown
    }

    refused = by_job["refused"]
    assert refused["error"] is None  # the provider answered: its answer is the response
    assert refused["response"]["status_code"] == 400
    assert refused["response"]["request_id"].startswith("req_")
    assert refused["response"]["body"]["error"]["param"] == "size"  # the server's own body
    assert refused["metadata"]["files"] == [] and refused["metadata"]["seed"] is None

    cut = by_job["cut"]
    assert cut["response"] is None
    assert cut["error"]["code"] == "connection" and cut["error"]["message"]
    assert rows[cut["custom_id"]]["request_id"] is None
