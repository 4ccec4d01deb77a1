"""A small OpenAI-compatible server on 127.0.0.1 that answers each prompt with exact bytes.

The built-in server only ever sends well-formed answers or its named faults; this one sends
whatever a test scripts, byte for byte, so a test can put a malformed answer at any JSON path
the client reads and run it next to good tasks in one run.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import threading
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web

from batcher.imagegen import render_png

GOOD_PNG = render_png("scripted", 32, 32)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer: a status, raw bytes and their content type."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(value: Any) -> Reply:
    return Reply(json.dumps(value).encode())


def stream_reply(*chunks: bytes) -> Reply:
    """Server-sent events: each chunk as a ``data:`` line, then ``[DONE]``."""
    events = b"".join(b"data: " + chunk + b"\n\n" for chunk in chunks)
    return Reply(events + b"data: [DONE]\n\n", content_type="text/event-stream")


def good_image() -> Reply:
    return json_reply({"created": 1, "data": [{"b64_json": base64.b64encode(GOOD_PNG).decode()}]})


def good_chat() -> Reply:
    return json_reply({"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def good_stream() -> Reply:
    return stream_reply(json.dumps({"choices": [{"index": 0, "delta": {"content": "fine"}}]})
                        .encode())


class ThreadedApp:
    """An aiohttp app on 127.0.0.1 with its own event loop on a daemon thread; a subclass
    adds its routes in ``_routes``. ``url`` is ``http://127.0.0.1:PORT`` once started."""

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"


class ScriptedServer(ThreadedApp):
    """Answers by the request's prompt (images) or last message (chat), from ``replies``.

    A prompt with no script gets ``default`` (settable between runs, for property tests).
    ``requests`` counts the generation requests per prompt, ``downloads`` the file requests;
    ``/files/good.png`` serves a PNG, ``/files/chunked.png`` the same PNG chunked with no
    Content-Length, and any other name answers 403.
    """

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.default: Reply | None = None
        self.requests: collections.Counter[str] = collections.Counter()
        self.downloads: collections.Counter[str] = collections.Counter()
        self.bodies: list[dict[str, Any]] = []  # every generation request's body, in order
        self.encodings: list[str] = []  # every generation request's Accept-Encoding, in order
        super().__init__()

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/files/{name}", self._file)

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.encodings.append(request.headers.get("Accept-Encoding", ""))
        key = body.get("prompt") or body["messages"][-1]["content"]
        self.requests[key] += 1
        reply = self.replies.get(key, self.default)
        if reply is None:
            return web.json_response({"error": {"message": f"no script for {key!r}"}}, status=400)
        return web.Response(body=reply.body, status=reply.status, headers=dict(reply.headers),
                            content_type=reply.content_type)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.downloads[name] += 1
        if name == "good.png":
            return web.Response(body=GOOD_PNG, content_type="image/png")
        if name == "chunked.png":  # no Content-Length: only the bytes read can tell the size
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(GOOD_PNG), 64):
                await response.write(GOOD_PNG[start:start + 64])
            await response.write_eof()
            return response
        return web.Response(status=403, text="forbidden")
