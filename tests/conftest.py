"""Shared fixtures: hermetic environment, the built-in server on 127.0.0.1, manifests, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher.server import LocalServer, ServerOptions

REPO = Path(__file__).resolve().parent.parent
KEY_VARS = ("VULTR_API_KEY", "MODELVERSE_API_KEY", "OPENAI_API_KEY", "TEST_KEY")


@pytest.fixture(autouse=True)
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in its own folder with its own HOME, its own cache folder (a store's
    working copy goes there, never into the developer's ~/.cache) and no API keys set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
async def server_factory() -> AsyncIterator[Callable[..., object]]:
    """Start built-in servers in the test's event loop: ``await server_factory(latency=...)``."""
    servers: list[LocalServer] = []

    async def start(**options: object) -> LocalServer:
        server = LocalServer(ServerOptions(**options))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
def thread_server() -> Iterator[Callable[..., LocalServer]]:
    """Start built-in servers on their own thread, for tests that drive a batcher subprocess."""
    servers: list[LocalServer] = []

    def start(**options: object) -> LocalServer:
        server = LocalServer(ServerOptions(**options))  # type: ignore[arg-type]
        server.start_in_thread()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop_thread()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listen queue is full: a connection to it never opens (the SYN is dropped),
    so the client's connect timeout fires, as with a host that does not answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # a non-blocking connect under way
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


def silent_manifest(folder: Path, port: int, timeouts: str) -> Path:
    """Four image tasks at $0.10 each, budget $1, one retry, against ``silent_port``;
    ``timeouts`` are the provider's timeout settings (YAML lines)."""
    prompts = json.dumps([f"picture {i}" for i in range(4)])
    settings = textwrap.indent(textwrap.dedent(timeouts).strip(), "    ")
    return write_manifest(folder, f"""\
name: silent
output: out
budget: 1
providers:
  test:
    base_url: http://127.0.0.1:{port}/v1
    concurrency: 1
    retries: 1
{settings}
    prices:
      m: {{image: 0.1}}
jobs:
  - name: shots
    type: image
    provider: test
    model: m
    prompts: {prompts}
""")


def ledger_rows(root: Path, *, decode: bool = False) -> list[dict[str, Any]]:
    """Every ledger row, read straight from SQLite (not through batcher's Ledger class).

    With ``decode``, the JSON columns (files, usage, response, vars) come back parsed.
    """
    uri = f"file:{root / 'ledger.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(row) for row in db.execute("SELECT * FROM tasks")]
    if decode:
        for row in rows:
            for column in ("files", "usage", "response", "vars"):
                row[column] = json.loads(row[column]) if row[column] else None
    return rows


def write_manifest(folder: Path, text: str, name: str = "jobs.yaml") -> Path:
    """Write a YAML manifest (dedented) into ``folder``; returns its path."""
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def provider_block(server: LocalServer, *, rate: str | None = None, concurrency: int = 4,
                   key_env: str | None = None, extra: str = "") -> str:
    """A ``providers:`` section naming ``server`` as provider ``test``."""
    lines = ["providers:", "  test:", f"    base_url: {server.api_url}",
             f"    concurrency: {concurrency}"]
    if rate:
        lines.append(f"    rate_limit: {rate}")
    if key_env:
        lines.append(f"    api_key_env: {key_env}")
    lines.extend(f"    {line}" for line in textwrap.dedent(extra).splitlines() if line.strip())
    return "\n".join(lines) + "\n"


def paid(server: Any) -> int:
    """Generations the server made (each a paid request)."""
    return sum(server.stats.generations.values())


def pics_and_lines(noun: str, *, images: int, chats: int = 0, prompt: str | None = None) -> str:
    """A ``jobs:`` section on provider ``test``: job ``pics``, ``images`` image tasks of
    ``prompt`` (default "A <noun> number {n}"), and with ``chats`` job ``lines``, that many
    chat tasks "Describe <noun> {n}"."""
    pics = f"""\
        - name: pics
          type: image
          provider: test
          model: flux.1-schnell
          prompt: "{prompt or f'A {noun} number {{n}}'}"
          vars: {{n: {list(range(images))}}}
          params: {{size: 256x256, response_format: b64_json}}
        """
    lines = f"""\
        - name: lines
          type: chat
          provider: test
          model: llama-3.1-8b-instruct
          prompt: "Describe {noun} {{n}}"
          vars: {{n: {list(range(chats))}}}
          params: {{max_tokens: 20}}
        """
    jobs = [pics, lines] if chats else [pics]
    return "jobs:\n" + "".join(textwrap.indent(textwrap.dedent(job), "  ") for job in jobs)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m batcher ARGS`` as a user would; returns the finished process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "batcher", *args], cwd=cwd, env=full_env, capture_output=True,
        text=True, timeout=timeout,
    )


def start_cli(*args: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m batcher ARGS`` in the background (for kills and signals)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", *args], cwd=cwd, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
