"""What batcher must never do, whatever the manifest or the provider says.

No prompt, id or var places a file outside the output folder; the API key appears in no file
and no log; image URLs are fetched without the key; a redirect from the API is not followed
with the key; YAML tags that would run code are refused before anything runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ledger_rows, provider_block, run_cli, write_manifest

from batcher.imagegen import render_png
from batcher.manifest import load_manifest
from batcher.run import RunOptions, run
from batcher.server import LocalServer

KEY = "sk-test-SECRET-123"
KEY_ENV = {"TEST_KEY": KEY}
IMAGES = "/images/generations"
RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


def all_files(folder: Path) -> set[Path]:
    return {Path(d, name) for d, _dirs, names in os.walk(folder) for name in names}



def assert_key_nowhere(folder: Path, *texts: str) -> None:
    """The key is in no file under ``folder`` (every byte, sqlite and its WAL included)."""
    secret = KEY.encode()
    files = all_files(folder)
    assert files
    for path in files:
        assert secret not in path.read_bytes(), f"the API key is written in {path}"
    for text in texts:
        assert KEY not in text, "the API key is printed"


# ---------------------------------------------------------------------------- hostile names


def test_hostile_prompts_ids_and_vars_stay_inside_the_output(
    thread_server, tmp_path: Path
) -> None:
    marker = f"evil-{uuid.uuid4().hex[:12]}"
    absolute = Path("/tmp") / marker
    hostile = [
        f"../../../../../../{marker}",
        f"../../etc/{marker}",
        str(absolute),
        f"..\\..\\..\\windows\\{marker}",
        "CON",
        "aux.txt",
        "é" * 300,
        "画" * 300,
        f"nul\u0000byte {marker}",
        ".",
        "..",
    ]
    server = thread_server()
    lines = [{"id": text, "model": "flux.1-schnell", "prompt": text,
              "params": {"size": "256x256", "response_format": "b64_json"}} for text in hostile]
    lines.append({"custom_id": f"../../{marker}-batch", "method": "POST",
                  "url": "/v1/images/generations",
                  "body": {"model": "flux.1-schnell", "prompt": f"/{marker}/batch",
                           "size": "256x256", "response_format": "b64_json"}})
    (tmp_path / "tasks.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines)  # json.dumps writes NUL as \\u0000
    )
    assert "\\u0000" in (tmp_path / "tasks.jsonl").read_text()
    prompts = [text for text in hostile if "\u0000" not in text]
    manifest = write_manifest(tmp_path, (
        "name: hostile\n"
        + provider_block(server, rate="200/s", extra="retries: 2\ntimeout: 5")
        + "defaults: {provider: test}\n"
        + "jobs:\n"
        + "  - name: grid\n"
        + "    type: image\n"
        + "    model: flux.1-schnell\n"
        + f"    prompts: {json.dumps([p + ' in {place}' for p in prompts])}\n"
        + f"    vars: {{place: {json.dumps(['../../' + marker, '/' + marker])}}}\n"
        + "    params: {size: 256x256, response_format: b64_json}\n"
        + "  - name: listed\n"
        + "    file: tasks.jsonl\n"
    ))
    tasks = len(lines) + 2 * len(prompts)
    assert not absolute.exists()
    before = all_files(tmp_path)
    outside_before = {p for p in tmp_path.parent.rglob(f"*{marker}*")}

    result = run_cli("run", str(manifest), "--no-progress")

    assert result.returncode == 0, result.stderr
    root = (tmp_path / "output" / "hostile").resolve()
    new = all_files(tmp_path) - before
    escaped = [p for p in new if root not in p.resolve().parents]
    assert not escaped, escaped
    assert not absolute.exists() and not list(Path("/tmp").glob(f"{marker}*"))
    stray = {p for p in tmp_path.parent.rglob(f"*{marker}*")} - outside_before
    assert all(root in p.resolve().parents for p in stray), stray
    images = [p for p in new if p.suffix == ".png"]
    assert len(images) == tasks  # every task ok, each in a file of its own
    for path in new:
        rel = path.relative_to(root)
        for part in rel.parts:
            assert part not in {".", ".."} and len(part.encode()) <= 100, rel
            assert "\\" not in part and "\x00" not in part and ":" not in part, rel
            assert part.split(".")[0].lower() not in RESERVED, rel
    rows = ledger_rows(root)
    assert len(rows) == tasks and all(row["status"] == "ok" for row in rows)


# ---------------------------------------------------------------------------- the API key


def key_manifest(
    server: LocalServer, folder: Path, params: dict[str, Any], retries: int = 3
) -> Path:
    return write_manifest(folder, (
        "name: keyed\n"
        + provider_block(server, rate="200/s", key_env="TEST_KEY",
                         extra=f"retries: {retries}\ntimeout: 2")
        + "jobs:\n"
        + "  - name: pics\n"
        + "    type: image\n"
        + "    provider: test\n"
        + "    model: flux.1-schnell\n"
        + '    prompts: ["a kite over a beach", "a kite over a hill"]\n'
        + "    seeds: 3\n"
        + f"    params: {json.dumps({'size': '256x256', **params})}\n"
        + "  - name: notes\n"
        + "    type: chat\n"
        + "    provider: test\n"
        + "    model: local-chat\n"
        + '    prompts: ["one line about kites", "one line about beaches"]\n'
    ))


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_key_is_in_no_file_and_no_log_through_faults(
    thread_server, tmp_path: Path, response_format: str
) -> None:
    kinds = ("500", "502", "reset", "truncated", "garbage", "empty_data")
    # The url run leaves out an injected 429: after one, the pacer slows a small run to ~1/s.
    kinds += ("bad_b64", "429") if response_format == "b64_json" else ("url_404", "not_image")
    server = thread_server(api_key=KEY, fault_rate=1.0, fault_kinds=kinds)
    manifest = key_manifest(server, tmp_path, {"response_format": response_format})

    result = run_cli("-v", "run", str(manifest), "--no-progress", env=KEY_ENV)

    assert result.returncode == 0, result.stderr
    assert sum(server.stats.faults.values()) == 8  # every task met a fault, and got past it
    assert "DEBUG" in result.stderr  # -v did show the debug logs that were checked
    assert_key_nowhere(tmp_path, result.stdout, result.stderr)
    api = server.stats.matching(IMAGES) + server.stats.matching("/chat/completions")
    assert api and all(r.authorization == f"Bearer {KEY}" for r in api)
    downloads = server.stats.matching(".png", listener="files")
    if response_format == "url":
        # Image URLs are fetched with a plain GET that carries no API key.
        assert len(downloads) >= 6
        assert all(r.authorization is None for r in downloads), downloads
    else:
        assert not downloads


def test_refused_key_is_not_echoed_anywhere(thread_server, tmp_path: Path) -> None:
    server = thread_server(api_key="sk-the-right-one")
    manifest = key_manifest(server, tmp_path, {"response_format": "b64_json"})

    result = run_cli("-v", "run", str(manifest), "--no-progress", env=KEY_ENV)

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "TEST_KEY" in result.stderr  # names where the key came from, not the key
    assert_key_nowhere(tmp_path, result.stdout, result.stderr)


def test_permanent_failures_do_not_record_the_key(thread_server, tmp_path: Path) -> None:
    server = thread_server(api_key=KEY, fail_rate=1.0)
    manifest = key_manifest(server, tmp_path, {"response_format": "b64_json"}, retries=1)

    result = run_cli("-v", "run", str(manifest), "--no-progress", env=KEY_ENV)

    assert result.returncode == 1, result.stderr
    rows = ledger_rows(tmp_path / "output" / "keyed")
    assert rows and all(row["status"] == "failed" for row in rows)
    assert_key_nowhere(tmp_path, result.stdout, result.stderr)


# ---------------------------------------------------------------------------- redirects


@pytest.fixture
async def redirect_pair() -> AsyncIterator[tuple[str, list[dict[str, Any]], list[Any]]]:
    """An API on 127.0.0.1 that answers every request with a 307 to a second port, and that
    second listener, which would answer a valid image. Yields (api_url, caught, redirected)."""
    caught: list[dict[str, Any]] = []
    redirected: list[Any] = []
    png = base64.b64encode(render_png("redirected", 256, 256)).decode()

    async def catcher(request: web.Request) -> web.Response:
        caught.append({"path": request.path, "authorization": request.headers.get("Authorization")})
        return web.json_response({"created": 0, "data": [{"b64_json": png}]})

    catch_app = web.Application()
    catch_app.router.add_route("*", "/{tail:.*}", catcher)
    catch_runner = web.AppRunner(catch_app)
    await catch_runner.setup()
    await web.TCPSite(catch_runner, "127.0.0.1", 0).start()
    catch_port = catch_runner.addresses[0][1]

    async def redirect(request: web.Request) -> web.Response:
        redirected.append(request.headers.get("Authorization"))
        location = f"http://127.0.0.1:{catch_port}{request.path}"
        return web.Response(status=307, headers={"Location": location})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1", caught, redirected
    finally:
        await runner.cleanup()
        await catch_runner.cleanup()


async def test_api_redirect_is_not_followed_with_the_key(
    redirect_pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_url, caught, redirected = redirect_pair
    monkeypatch.setenv("TEST_KEY", KEY)
    manifest = write_manifest(tmp_path, f"""
        name: redirected
        providers:
          test: {{base_url: "{api_url}", api_key_env: TEST_KEY, rate_limit: 100/s,
                  retries: 3, timeout: 2, concurrency: 2}}
        jobs:
          - name: pics
            type: image
            provider: test
            model: flux.1-schnell
            prompt: a door that leads elsewhere
            seeds: 6
            params: {{size: 256x256, response_format: b64_json}}
    """)

    outcome = await run(load_manifest(manifest), RunOptions(progress=False, handle_signals=False))

    assert caught == [], "a request followed the API's redirect to another origin"
    assert redirected and all(auth == f"Bearer {KEY}" for auth in redirected)
    # Every request would be redirected alike: the provider stops, its tasks stay pending,
    # and the message names where the API points (the same path on the other port).
    assert outcome.exit_code == 1
    assert 1 <= len(redirected) <= 2  # the requests in flight, none retried
    assert (outcome.summary["failed"], outcome.summary["pending"]) == (0, 6)
    assert ledger_rows(tmp_path / "output" / "redirected") == []
    api_port = api_url.split(":")[2].split("/")[0]
    assert outcome.message is not None
    suggested = re.search(r"set base_url to http://127\.0\.0\.1:(\d+)/v1$", outcome.message)
    assert suggested and suggested.group(1) != api_port, outcome.message
    assert_key_nowhere(tmp_path / "output")


# ---------------------------------------------------------------------------- unsafe YAML


@pytest.mark.parametrize("command", ["run", "validate", "plan"])
@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system",
        "!!python/object/apply:subprocess.check_call",
        "!!python/object/apply:subprocess.run",
    ],
)
def test_python_tags_are_refused_before_anything_runs(
    tmp_path: Path, command: str, tag: str
) -> None:
    marker = tmp_path / "pwned"
    argument = f'"touch {marker}"' if tag.endswith("os.system") else f'["touch", "{marker}"]'
    manifest = write_manifest(tmp_path, f"""
        name: unsafe
        jobs:
          - name: pics
            type: image
            provider: local
            model: flux.1-schnell
            prompt: {tag} [{argument}]
    """)

    result = run_cli(command, str(manifest))

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "jobs.yaml:7" in result.stderr  # the file and the line of the tag
    assert not marker.exists()
    assert not (tmp_path / "output").exists()


def test_distinct_tasks_never_share_a_file(thread_server, tmp_path: Path) -> None:
    # Numeric ids (database keys, timestamps) share long prefixes; so do prompts and seeds
    # across tasks that differ only in their params or input images. A user's id may also look
    # like one of batcher's own (32 hex characters) and still share a prefix with another.
    server = thread_server()
    own_like = "0" * 31
    ids = ["1700000001", "1700000002", "1700000003", "deadbeef00", "deadbeef01",
           own_like + "a", own_like + "b"]
    sizes = ["256x256", "512x512", "1024x1024", "256x256", "512x512", "256x256", "512x512"]
    (tmp_path / "tasks.jsonl").write_text("".join(
        json.dumps({"id": task_id, "model": "flux.1-schnell", "prompt": "a product shot",
                    "seed": 1, "params": {"size": size, "response_format": "b64_json"}}) + "\n"
        for task_id, size in zip(ids, sizes, strict=True)
    ))
    manifest = write_manifest(tmp_path, (
        "name: ids\n"
        + provider_block(server, rate="200/s", extra="retries: 2\ntimeout: 10")
        + "jobs:\n  - {name: listed, provider: test, file: tasks.jsonl}\n"
    ))

    result = run_cli("run", str(manifest), "--no-progress")

    assert result.returncode == 0, result.stderr
    root = tmp_path / "output" / "ids"
    rows = ledger_rows(root)
    paths = [rel for row in rows for rel, _size, _sha in json.loads(row["files"])]
    assert len(rows) == len(ids) and len(paths) == len(ids)
    assert len(set(paths)) == len(paths), f"tasks share files: {sorted(paths)}"
    for row in rows:
        for rel, size, sha in json.loads(row["files"]):
            data = (root / rel).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), row["id"]
