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
from batcher.providers.config import builtin_providers
from batcher.runner import Outcome, RunOptions, run
from batcher.server import canonical_hash
from batcher.tasks import expand


async def run_manifest(path: Path, **options: Any) -> Outcome:
    manifest = load_manifest(path)
    return await run(manifest, RunOptions(progress=False, handle_signals=False, **options))


# --------------------------------------------------------------------------- seed_param


async def test_seed_param_none_makes_distinct_tasks_and_sends_no_seed(
    tmp_path: Path, server_factory: Any
) -> None:
    server = await server_factory()
    head = "name: t\n" + provider_block(server, extra="seed_param: none")
    path = write_manifest(tmp_path, head + dedent("""
        jobs:
          - name: art
            provider: test
            type: image
            model: flux.1-schnell
            prompt: a red fox
            seeds: 3
            params: {size: 256x256}
        """))
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
    text = "name: t\n" + provider_block(server) + dedent("""
        jobs:
          - name: art
            provider: test
            type: image
            model: flux.1-schnell
            prompt: a red fox
            seeds: [7]
            params: {size: 256x256}
        """)
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
