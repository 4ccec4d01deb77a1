"""The built-in OpenAI-compatible server: the ``local`` provider, ``batcher serve``, and tests.

Two listeners on 127.0.0.1 (two ports, so two origins, like a real provider and its object store):

* the API, under ``/v1``: ``GET /models``, ``POST /images/generations`` (deterministic PNGs,
  ``url`` or ``b64_json``) and ``POST /chat/completions`` (deterministic text, optional SSE
  stream), with the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``;
* the files listener, ``GET /images/<token>.png``, which needs no key, like an object store.

Each generation request goes through the same checks, in this order: record the arrival, API key
(401), rolling-window rate limit (429), spent quota (429), JSON body (400), validation (400),
latency, permanent failure (500), fault on first arrival, success. Faults are picked from the
sha256 of the canonical body, so a test can predict them and a retry of the same body succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from batcher.imagegen import image_kind, render_png

EDIT_MODELS = frozenset({"black-forest-labs/flux-kontext-max/multi"})
IMAGE_MODELS = (
    "flux.1-schnell",
    "flux.1-dev",
    "stable-diffusion-3.5-medium",
    "black-forest-labs/flux-kontext-max/multi",
    "local-image",
)
CHAT_MODELS = (
    "llama-3.1-8b-instruct",
    "llama-3.1-70b-instruct",
    "llama-3.1-405b-instruct",
    "mixtral-8x7b-32768",
    "qwen-2-72b-instruct",
    "local-chat",
)
IMAGE_SIZES = ("256x256", "512x512", "1024x1024")
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
    files_port: int = 0  # port of the files listener; 0 = ephemeral
    max_records: int | None = 100_000  # stats.requests keeps at most this many, newest last

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


class ApiError(Exception):
    """An answer in the OpenAI error shape; raised by checks, turned into a response once."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _too_many(message: str, retry_after_ms: int) -> ApiError:
    # Both headers, as the real APIs send them: clients honour retry-after-ms first.
    headers = {"Retry-After": f"{retry_after_ms / 1000:.3f}", "retry-after-ms": str(retry_after_ms)}
    return ApiError(429, message, type="requests", code="rate_limit_exceeded", headers=headers)


def _server_error(status: int, message: str, code: str = "injected_fault") -> ApiError:
    return ApiError(status, message, type="server_error", code=code)


# --- request validation (pure) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRequest:
    model: str
    prompt: str
    n: int
    width: int
    height: int
    response_format: str
    seed: int | None
    inputs: tuple[str, ...]  # sha256 of each input image, for edit models

    def key(self, k: int) -> str:
        """The render key of image ``k``: the same request always yields the same pictures."""
        parts = [self.model, self.prompt, self.seed, self.width, self.height, k, self.inputs]
        return json.dumps(parts)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text)
    max_tokens: int | None
    seed: int | None
    stream: bool


def canonical_hash(raw: bytes) -> str:
    """sha256 of a body's canonical JSON (sorted keys), or of its raw bytes if it is not JSON."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None, "invalid_json")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(body: dict[str, Any], name: str, lo: int, hi: int | None, default: int | None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _invalid(f"'{name}' must be an integer {bound}, got {value!r}.", name)
    return value


def _number_in(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _invalid(f"'{name}' must be a number between {lo:g} and {hi:g}.", name)


def _model(body: dict[str, Any], wanted: tuple[str, ...], kind: str) -> str:
    model = body.get("model")
    if model is None:
        raise _invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or model not in IMAGE_MODELS + CHAT_MODELS:
        raise _invalid(f"The model '{model}' does not exist.", "model", "model_not_found")
    if model not in wanted:
        raise _invalid(f"The model '{model}' is not a {kind} model.", "model")
    return model


def _size(value: Any, max_side: int) -> tuple[int, int]:
    if value not in IMAGE_SIZES:
        raise _invalid(f"'{value}' is not one of {', '.join(IMAGE_SIZES)}.", "size")
    width, height = (min(int(side), max_side) for side in value.split("x"))
    return width, height


def _aspect_size(value: Any, max_side: int) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,4}):(\d{1,4})", value) if isinstance(value, str) else None
    w, h = (int(match[1]), int(match[2])) if match else (0, 0)
    # Real edit models reject extreme ratios; 4:1 either way is a generous bound.
    if not (w and h and max(w, h) <= 4 * min(w, h)):
        raise _invalid(
            f"'aspect_ratio' must be 'W:H' no wider than 4:1, got {value!r}.", "aspect_ratio"
        )
    long_side = min(1024, max_side)
    short_side = max(1, round(long_side * min(w, h) / max(w, h)))
    return (long_side, short_side) if w >= h else (short_side, long_side)


_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)


def _input_images(value: Any) -> tuple[str, ...]:
    if value is None:
        raise _invalid(
            "'images' is required for this model.", "images", "missing_required_parameter"
        )
    if not isinstance(value, list) or not value:
        raise _invalid("'images' must be a non-empty list of strings.", "images")
    digests = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            digests.append(hashlib.sha256(item.encode("utf-8")).hexdigest())
            continue
        match = _DATA_URI.fullmatch(item) if isinstance(item, str) else None
        try:
            data = base64.b64decode(match[1], validate=True) if match else b""
        except binascii.Error:
            data = b""
        if image_kind(data) is None:
            raise _invalid(
                f"images[{i}] is neither an http(s) URL nor a base64 data URI of a "
                "PNG, JPEG, GIF or WebP image.",
                "images",
            )
        digests.append(hashlib.sha256(data).hexdigest())
    return tuple(digests)


def parse_image_request(body: dict[str, Any], max_side: int) -> ImageRequest:
    """Validate an image generation body like the real APIs do; raise a 400 ApiError if wrong."""
    model = _model(body, IMAGE_MODELS, "image")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("'prompt' must be a non-empty string.", "prompt")
    n = _int_in(body, "n", 1, 4, 1)
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise _invalid(f"'{response_format}' is not one of url, b64_json.", "response_format")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _invalid("'seed' must be an integer.", "seed")
    _int_in(body, "steps", 1, 50, None)
    _number_in(body, "guidance_scale", 1, 10)
    if model in EDIT_MODELS:
        inputs = _input_images(body.get("images"))
        if body.get("size") is not None:
            width, height = _size(body["size"], max_side)
        else:
            width, height = _aspect_size(body.get("aspect_ratio") or "1:1", max_side)
    else:
        inputs = ()
        width, height = _size(body.get("size") or "1024x1024", max_side)
    return ImageRequest(model, prompt, n, width, height, response_format, seed, inputs)


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return " ".join(p["text"] for p in content if isinstance(p.get("text"), str))
    return None


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat completion body; raise a 400 ApiError if wrong."""
    model = _model(body, CHAT_MODELS, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text = _message_text(message.get("content")) if isinstance(message, dict) else None
        if not isinstance(role, str) or text is None:
            raise _invalid(
                f"messages[{i}] must be an object with a 'role' and a 'content'.", "messages"
            )
        parsed.append((role, text))
    max_tokens = _int_in(body, "max_tokens", 1, None, None)
    _number_in(body, "temperature", 0, 2)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _invalid("'seed' must be an integer.", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    return ChatRequest(model, tuple(parsed), max_tokens, seed, stream)


# --- deterministic text (pure) -----------------------------------------------------------------

# fmt: off
_ADJECTIVES = (
    "amber", "bright", "calm", "distant", "gentle", "golden", "hidden", "quiet", "silver",
    "soft", "vivid", "warm", "wild", "early", "late", "small",
)
_NOUNS = (
    "harbour", "meadow", "river", "lantern", "window", "garden", "market", "street", "morning",
    "evening", "shadow", "light", "breeze", "journey", "moment", "story",
)
# fmt: on
_VERBS = ("glows", "drifts", "waits", "shines", "gathers", "settles", "rises", "turns")
_PREPOSITIONS = ("beside", "under", "beyond", "across", "near", "above", "through", "around")


def _draws(seed: bytes) -> Iterator[int]:
    """An endless stream of bytes derived from ``seed``, stable across Python versions."""
    for counter in range(1 << 62):
        yield from hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()


def chat_reply(request: ChatRequest) -> tuple[str, str]:
    """The completion text and finish_reason: fixed by model, messages and seed."""
    key = json.dumps([request.model, request.messages, request.seed]).encode("utf-8")
    draws = _draws(hashlib.sha256(key).digest())

    def pick(words: tuple[str, ...]) -> str:
        return words[next(draws) % len(words)]

    user_texts = [text for role, text in request.messages if role == "user" and text.strip()]
    topic = " ".join(user_texts[-1].split()[:5]) if user_texts else "your message"
    text = (
        f'On "{topic}": the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} '
        f"{pick(_PREPOSITIONS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)}."
    )
    if next(draws) % 2:
        text += (
            f" {pick(_ADJECTIVES).capitalize()} {pick(_NOUNS)} and {pick(_ADJECTIVES)} "
            f"{pick(_NOUNS)} {pick(_VERBS)} {pick(_PREPOSITIONS)} the {pick(_NOUNS)}."
        )
    words = text.split(" ")
    if request.max_tokens is not None and len(words) > request.max_tokens:
        return " ".join(words[: request.max_tokens]), "length"
    return text, "stop"


def chat_usage(request: ChatRequest, content: str) -> dict[str, int]:
    """Token counts, counted as whitespace-separated words."""
    prompt = sum(len(text.split()) for _, text in request.messages)
    completion = len(content.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


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
        if token not in self._images:
            raise web.HTTPNotFound(text="no such image (it may have expired)\n")
        self._images.move_to_end(token)
        spec = self._images[token]
        if spec is _NOT_IMAGE:
            return web.Response(text="this is not an image\n", content_type="text/plain")
        png = await asyncio.to_thread(render_png, *spec)
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
            raise _server_error(500, "injected permanent failure", "injected_failure")
        kinds = self.options.fault_kinds
        if fault_draw >= self.options.fault_rate or not kinds or body_hash in self._faulted:
            return None
        self._faulted.add(body_hash)
        kind = _fault_for_shape(kinds[pick % len(kinds)], endpoint, response_format)
        self.stats.faults[kind] += 1
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
                png = await asyncio.to_thread(render_png, *spec)
                items.append({"b64_json": base64.b64encode(png).decode("ascii")})
        return {"created": int(time.time()), "data": items}

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
    content, finish_reason = chat_reply(request)
    choices = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
    ]
    return {
        "id": _chat_id(request),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [] if fault == "empty_data" else choices,
        "usage": chat_usage(request, content),
    }


def _chat_id(request: ChatRequest) -> str:
    key = json.dumps([request.model, request.messages, request.seed]).encode("utf-8")
    return "chatcmpl-" + hashlib.sha256(key).hexdigest()[:24]


def _chat_events(request: ChatRequest) -> Iterator[bytes]:
    """Server-sent events: a role chunk, content pieces, a final chunk with usage, [DONE]."""
    content, finish_reason = chat_reply(request)
    words = content.split(" ")
    pieces = [" ".join(words[i : i + 3]) for i in range(0, len(words), 3)]
    base = {
        "id": _chat_id(request),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.model,
    }

    def event(delta: dict[str, str], finish: str | None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice], **extra})}\n\n".encode()

    yield event({"role": "assistant", "content": ""}, None)
    for i, piece in enumerate(pieces):
        yield event({"content": piece if i == 0 else " " + piece}, None)
    yield event({}, finish_reason, usage=chat_usage(request, content))
    yield b"data: [DONE]\n\n"


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
