"""The running local server: its options and statistics, the per-body fault selection, the
rolling-window rate limit, and ``LocalServer`` with its two aiohttp listeners, middleware and
endpoint handlers; ``serve_forever`` runs it for ``batcher serve``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from batcher.imagegen import render_png
from batcher.server.replies import _chat_events, _chat_id, chat_choices, chat_usage
from batcher.server.requests import (
    CHAT_MODELS,
    EDIT_MODELS,
    IMAGE_MODELS,
    ApiError,
    ChatRequest,
    ImageRequest,
    _server_error,
    _too_many,
    canonical_hash,
    parse_chat_request,
    parse_image_request,
    parse_json_object,
)

log = logging.getLogger(__name__)

# fmt: off
FAULT_KINDS = (
    "500", "502", "503", "429", "reset", "truncated", "garbage", "empty_data", "bad_b64",
    "url_404", "not_image", "slow",
)
# fmt: on
SLOW_FAULT_SECONDS = 30.0
IMAGE_TOKENS_KEPT = 10_000
_MODELS_CREATED = 1_717_200_000  # a fixed date, so /models answers the same every time


@dataclass(slots=True)
class ServerOptions:
    """How the local server behaves; every field has a harmless default."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = ephemeral
    latency: float = 0.0  # seconds added before each generation answer
    rate_limit: tuple[float, float] | None = None  # (count, period_s) over accepted arrivals
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    fault_rate: float = 0.0  # fraction of distinct bodies that fault on their first arrival
    fault_kinds: tuple[str, ...] = ("500", "502", "503", "reset", "truncated")
    fail_rate: float = 0.0  # fraction of distinct bodies that always answer 500
    quota_exhausted: bool = False  # every generation answers 429 insufficient_quota
    max_image_side: int = 1024
    image_grain: bool = False  # photo-sized PNGs (~3 MB at 1024x1024), for benchmarks
    files_port: int = 0  # port of the files listener; 0 = ephemeral
    download_status: int | None = None  # when set, every image download answers this status
    max_records: int | None = 100_000  # stats.requests keeps at most this many, newest last
    log_requests: bool = False  # one log line per request (`batcher serve`; not inside a run)

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.fault_kinds if kind not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        for name in ("fault_rate", "fail_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it; ``status`` is 0 when no answer was sent."""

    t: float  # time.monotonic() at arrival
    listener: str  # "api" | "files"
    method: str
    path: str
    authorization: str | None
    status: int
    body_hash: str | None


@dataclass(slots=True)
class ServerStats:
    """What the server did, for tests and benchmarks to check the client against."""

    requests: list[RequestRecord] = field(default_factory=list)  # arrival order
    generations: collections.Counter[str] = field(default_factory=collections.Counter)
    rate_limited: int = 0  # every 429 sent: rate limit, quota, injected
    faults: collections.Counter[str] = field(default_factory=collections.Counter)  # by kind

    def starts(self, path_suffix: str) -> list[float]:
        """Arrival times of API requests whose path ends with ``path_suffix``."""
        return [r.t for r in self.matching(path_suffix)]

    def statuses(self, path_suffix: str) -> list[int]:
        """Statuses answered to API requests whose path ends with ``path_suffix``."""
        return [r.status for r in self.matching(path_suffix)]

    def matching(self, path_suffix: str, listener: str = "api") -> list[RequestRecord]:
        return [r for r in self.requests if r.listener == listener and r.path.endswith(path_suffix)]


def _hash_draws(body_hash: str) -> tuple[float, float, int]:
    """Two independent floats in [0, 1) and an integer, all taken from a body hash."""
    return (
        int(body_hash[:13], 16) / 16**13,
        int(body_hash[13:26], 16) / 16**13,
        int(body_hash[26:34], 16),
    )


def _fault_for_shape(kind: str, endpoint: str, response_format: str) -> str:
    """Map a fault onto one the answer can show: chat has no images, b64 answers no URLs."""
    if endpoint == "chat" and kind in ("bad_b64", "url_404", "not_image"):
        return "garbage"
    if response_format == "b64_json" and kind in ("url_404", "not_image"):
        return "bad_b64"
    if response_format == "url" and kind == "bad_b64":
        return "not_image"
    return kind


class _RollingWindow:
    """At most ``count`` accepted arrivals in any trailing ``period``; rejected ones don't count."""

    def __init__(self, count: float, period: float) -> None:
        self._count, self._period = count, period
        self._times: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> float | None:
        """Accept an arrival and return None, or return the seconds until there is room."""
        while self._times and self._times[0] <= now - self._period:
            self._times.popleft()
        if len(self._times) >= self._count:
            return self._times[0] + self._period - now
        self._times.append(now)
        return None


# --- the server --------------------------------------------------------------------------------

_NOT_IMAGE = None  # a files-listener token that serves text, for the "not_image" fault
_RenderSpec = tuple[str, int, int]  # (key, width, height)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = dict[str, Any] | bytes  # a JSON body, or a whole event stream
# What the recorder learnt about a request, for the handlers. Typed keys exist from aiohttp 3.13
# (and plain strings warn there); older versions take the plain strings.
_Key: Any = getattr(web, "RequestKey", None)
_ARRIVED: Any = _Key("batcher_arrived", float) if _Key else "batcher_arrived"
_BODY_HASH: Any = _Key("batcher_body_hash", str) if _Key else "batcher_body_hash"
_FAULT: Any = _Key("batcher_fault", str) if _Key else "batcher_fault"


class LocalServer:
    """The local OpenAI-compatible server: an API listener and a files listener on one host.

    Use ``async with LocalServer(options) as server`` inside a loop, or ``start_in_thread()`` /
    ``stop_thread()`` from synchronous code. ``api_url`` and ``files_url`` are valid once started.
    """

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.stats = ServerStats()
        self._window = _RollingWindow(*self.options.rate_limit) if self.options.rate_limit else None
        self._faulted: set[str] = set()  # body hashes whose one fault has been served
        self._images: collections.OrderedDict[str, _RenderSpec | None] = collections.OrderedDict()
        self._dropped_records = 0
        self._runners: list[web.AppRunner] = []
        self._api_url: str | None = None
        self._files_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    @property
    def api_url(self) -> str:
        """``http://HOST:PORT/v1``; valid after start."""
        if self._api_url is None:
            raise RuntimeError("the local server is not started")
        return self._api_url

    @property
    def files_url(self) -> str:
        """``http://HOST:PORT2``, where ``url`` images are served; valid after start."""
        if self._files_url is None:
            raise RuntimeError("the local server is not started")
        return self._files_url

    async def start(self) -> None:
        """Bind both listeners; returns once they accept connections."""
        try:
            api_port = await self._listen(self._api_app(), self.options.port)
            files_port = await self._listen(self._files_app(), self.options.files_port)
        except BaseException:
            await self.stop()  # release a listener that did bind
            raise
        host = self.options.host
        self._api_url = f"http://{host}:{api_port}/v1"
        self._files_url = f"http://{host}:{files_port}"

    async def stop(self) -> None:
        """Close both listeners; requests still running get a short grace period."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _listen(self, app: web.Application, port: int) -> int:
        # handler_cancellation: a client that gives up (a timeout on a "slow" fault) ends the
        # handler, so work the client never received is not counted as a generation.
        runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, self.options.host, port).start()
        return int(runner.addresses[0][1])

    def start_in_thread(self) -> None:
        """Run the server on its own event loop in a daemon thread; return once it listens."""
        if self._thread is not None:
            raise RuntimeError("the local server thread is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # handed to the caller below
                failure.append(exc)
            ready.set()
            if not failure:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        thread = threading.Thread(target=run, name="batcher-local-server", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with ``start_in_thread`` and wait for its thread to end."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._thread = None

    # -- applications and middleware --

    def _api_app(self) -> web.Application:
        # Edit requests carry images as data URIs, far over aiohttp's 1 MiB default.
        app = web.Application(
            client_max_size=64 * 1024 * 1024,
            middlewares=[self._recorder("api"), self._openai_errors],
        )
        app.on_response_prepare.append(_add_request_id)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/images/generations", self._images_endpoint)
        app.router.add_post("/v1/chat/completions", self._chat_endpoint)
        return app

    def _files_app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorder("files")])
        app.router.add_get("/images/{token:[0-9a-f]+}.png", self._file)
        return app

    def _recorder(self, listener: str) -> Any:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            request[_ARRIVED] = arrived = time.monotonic()
            authorization = request.headers.get("Authorization")
            entry = RequestRecord(
                arrived, listener, request.method, request.path, authorization, 0, None
            )
            index = self._arrive(entry)
            status = 0  # stays 0 if the handler is cancelled (the client went away)
            try:
                if request.method == "POST":
                    request[_BODY_HASH] = canonical_hash(await request.read())
                response = await handler(request)
                status = _status_sent(request, response)
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except Exception:
                status = 500
                raise
            finally:
                self._finish(index, status, request.get(_BODY_HASH))
                if self.options.log_requests:
                    _log_request(request, status)

        return record

    @web.middleware
    async def _openai_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._check_key(request)
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status not in (404, 405):
                raise
            message = f"Invalid URL ({request.method} {request.path})"
            return ApiError(exc.status, message, code="unknown_url").response()

    def _check_key(self, request: web.Request) -> None:
        if self.options.api_key is None or not request.path.startswith("/v1/"):
            return
        given = request.headers.get("Authorization")
        if given is None:
            raise ApiError(
                401,
                "You didn't provide an API key. Send it in an Authorization "
                "header: 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        if not secrets.compare_digest(given, f"Bearer {self.options.api_key}"):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _arrive(self, record: RequestRecord) -> int:
        requests, limit = self.stats.requests, self.options.max_records
        if limit is not None and len(requests) >= limit:
            # Drop the oldest half at once: a long `batcher serve` must not grow without end.
            dropped = len(requests) - limit // 2
            del requests[:dropped]
            self._dropped_records += dropped
        requests.append(record)
        return self._dropped_records + len(requests) - 1

    def _finish(self, index: int, status: int, body_hash: str | None) -> None:
        if status == 429:
            self.stats.rate_limited += 1
        position = index - self._dropped_records
        if position >= 0:
            record = self.stats.requests[position]
            self.stats.requests[position] = dataclasses.replace(
                record, status=status, body_hash=body_hash
            )

    # -- endpoints --

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "batcher-local"}
            for m in IMAGE_MODELS + CHAT_MODELS
        ]
        return web.json_response({"object": "list", "data": data})

    async def _images_endpoint(self, request: web.Request) -> web.StreamResponse:
        image_request = parse_image_request(await self._admit(request), self.options.max_image_side)
        fault = await self._fate(request, "images", image_request.response_format)
        if fault is not None:
            answer = partial(self._image_answer, image_request, fault)
            return await self._fault(request, fault, answer)
        response = web.json_response(await self._image_answer(image_request, None))
        self.stats.generations[request[_BODY_HASH]] += 1
        return response

    async def _chat_endpoint(self, request: web.Request) -> web.StreamResponse:
        chat_request = parse_chat_request(await self._admit(request))
        fault = await self._fate(request, "chat", "")
        if fault is not None:
            return await self._fault(request, fault, partial(_chat_answer, chat_request, fault))
        if chat_request.stream:
            response = await _stream_chat(request, chat_request)
        else:
            response = web.json_response(await _chat_answer(chat_request, None))
        self.stats.generations[request[_BODY_HASH]] += 1
        return response

    async def _file(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if self.options.download_status is not None:  # a host that refuses every download
            return web.Response(status=self.options.download_status, text="refused\n")
        if token not in self._images:
            raise web.HTTPNotFound(text="no such image (it may have expired)\n")
        self._images.move_to_end(token)
        spec = self._images[token]
        if spec is _NOT_IMAGE:
            return web.Response(text="this is not an image\n", content_type="text/plain")
        png = await asyncio.to_thread(render_png, *spec, grain=self.options.image_grain)
        return web.Response(body=png, content_type="image/png")

    # -- the generation pipeline --

    async def _admit(self, request: web.Request) -> dict[str, Any]:
        """Rate limit, quota and JSON checks shared by both generation endpoints."""
        if self._window is not None:
            wait = self._window.admit(request[_ARRIVED])
            if wait is not None:
                raise _too_many("Rate limit reached for requests.", max(1, math.ceil(wait * 1000)))
        if self.options.quota_exhausted:
            message = "You exceeded your current quota: the daily quota is spent; retry tomorrow."
            raise ApiError(429, message, type="insufficient_quota", code="insufficient_quota")
        return parse_json_object(await request.read())

    async def _fate(self, request: web.Request, endpoint: str, response_format: str) -> str | None:
        """Sleep the latency, then pick this valid request's fault; None means answer it."""
        if self.options.latency > 0:
            await asyncio.sleep(self.options.latency)
        body_hash = request[_BODY_HASH]
        fail_draw, fault_draw, pick = _hash_draws(body_hash)
        if fail_draw < self.options.fail_rate:
            request[_FAULT] = "permanent failure"
            raise _server_error(500, "injected permanent failure", "injected_failure")
        kinds = self.options.fault_kinds
        if fault_draw >= self.options.fault_rate or not kinds or body_hash in self._faulted:
            return None
        self._faulted.add(body_hash)
        kind = _fault_for_shape(kinds[pick % len(kinds)], endpoint, response_format)
        self.stats.faults[kind] += 1
        request[_FAULT] = kind
        if kind == "slow":
            await asyncio.sleep(SLOW_FAULT_SECONDS)
            return None
        return kind

    async def _fault(
        self, request: web.Request, kind: str, answer: Callable[[], Awaitable[Answer]]
    ) -> web.StreamResponse:
        """Answer with fault ``kind``; ``answer`` builds the (spoilt) body where one is sent."""
        if kind in ("500", "502", "503"):
            raise _server_error(int(kind), f"injected fault: upstream answered {kind}")
        if kind == "429":
            raise _too_many("Rate limit reached (injected fault).", 200)
        if kind == "reset":
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never sent: the connection is already closing
        body = await answer()
        if isinstance(body, bytes):
            raw, content_type = body, "text/event-stream"
        else:
            raw, content_type = json.dumps(body).encode("utf-8"), "application/json"
        if kind == "garbage":
            raw = b"<html><body>502 Bad Gateway</body></html>"
        elif kind == "truncated":
            return await _send_half(request, raw, content_type)
        return web.Response(body=raw, content_type=content_type)

    async def _image_answer(self, request: ImageRequest, fault: str | None) -> dict[str, Any]:
        """The generation's JSON; ``fault`` spoils it for the image-level faults."""
        items: list[dict[str, str]] = []
        for k in range(0 if fault == "empty_data" else request.n):
            spec = (request.key(k), request.width, request.height)
            if request.response_format == "url":
                items.append({"url": f"{self.files_url}/images/{self._token(spec, fault)}.png"})
            elif fault == "bad_b64":
                items.append({"b64_json": "this is *not* base64!"})
            else:
                png = await asyncio.to_thread(render_png, *spec, grain=self.options.image_grain)
                items.append({"b64_json": base64.b64encode(png).decode("ascii")})
        if request.model in EDIT_MODELS:
            return self._modelverse_shape(request, items, fault)
        return {"created": int(time.time()), "data": items}

    def _modelverse_shape(
        self, request: ImageRequest, items: list[dict[str, str]], fault: str | None
    ) -> dict[str, Any]:
        """Modelverse's documented answer: ``b64_json`` as a data URI next to a ``url``, and a
        ``usage`` with empty token details."""
        shaped: list[dict[str, str]] = []
        for k, item in enumerate(items):
            if "b64_json" in item and fault != "bad_b64":
                spec = (request.key(k), request.width, request.height)
                item = {"url": f"{self.files_url}/images/{self._token(spec, fault)}.png",
                        "b64_json": "data:image/png;base64," + item["b64_json"]}
            shaped.append(item)
        return {"created": int(time.time()), "data": shaped,
                "usage": {"input_tokens_details": {}}}

    def _token(self, spec: _RenderSpec, fault: str | None) -> str:
        """A files-listener token that serves ``spec``, remembered in a bounded LRU."""
        if fault == "url_404":
            return secrets.token_hex(16)  # never registered
        token = hashlib.sha256(f"{fault or 'image'}:{spec}".encode()).hexdigest()[:32]
        self._images[token] = _NOT_IMAGE if fault == "not_image" else spec
        self._images.move_to_end(token)
        while len(self._images) > IMAGE_TOKENS_KEPT:
            self._images.popitem(last=False)
        return token


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every API answer carries an ``x-request-id``, as OpenAI's do (streams and errors too)."""
    response.headers["x-request-id"] = "req_" + secrets.token_hex(12)


def _log_request(request: web.Request, status: int) -> None:
    """One line per request for `batcher serve`: what came, what went, what was injected."""
    answer = str(status) if status else "no answer (connection closed)"
    fault = request.get(_FAULT)
    injected = f" (injected fault: {fault})" if fault else ""
    log.info("%s %s -> %s%s", request.method, request.path, answer, injected)


def _status_sent(request: web.Request, response: web.StreamResponse) -> int:
    """The status the client saw: 0 when the connection closed before any header went out."""
    transport = request.transport
    if not response.prepared and (transport is None or transport.is_closing()):
        return 0
    return response.status


async def _send_half(request: web.Request, raw: bytes, content_type: str) -> web.StreamResponse:
    """Promise ``len(raw)`` bytes, send half of them, and close the connection."""
    response = web.StreamResponse(status=200)
    response.content_type = content_type
    response.content_length = len(raw)
    await response.prepare(request)
    await response.write(raw[: len(raw) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


async def _chat_answer(request: ChatRequest, fault: str | None) -> Answer:
    """The completion JSON, or the whole event stream as bytes when streaming."""
    if request.stream and fault != "empty_data":
        return b"".join(_chat_events(request))
    answers = chat_choices(request)
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
        for k, (content, finish_reason) in enumerate(answers)
    ]
    return {
        "id": _chat_id(request),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [] if fault == "empty_data" else choices,
        "usage": chat_usage(request, *(content for content, _ in answers)),
    }


async def _stream_chat(request: web.Request, chat_request: ChatRequest) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for chunk in _chat_events(chat_request):
        await response.write(chunk)
    await response.write_eof()
    return response


async def serve_forever(options: ServerOptions, *, announce: Callable[[str], None] = print) -> None:
    """Run the local server until cancelled (``batcher serve``), announcing where it listens."""
    server = LocalServer(options)
    await server.start()
    try:
        announce(f"batcher serve: API at {server.api_url} (images at {server.files_url})")
        await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        await server.stop()
