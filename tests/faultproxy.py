"""An HTTP proxy on 127.0.0.1 that makes chosen requests to a store hang or go slowly.

Unlike :class:`s3server.FaultProxy` (which fails whole connections), this one reads each request
and decides by what it asks: a listing, the upload of some key, anything a predicate matches.
Each request goes upstream on its own connection with ``Connection: close``, and the answer comes
back with ``Connection: close`` too, so a client never reuses a connection the proxy is about
to drop.

    proxy = StoreProxy(s3.url)
    proxy.hang(is_listing)              # listings never answer (until the client gives up)
    proxy.delay(is_upload("pics/"), 1.5)  # uploads under pics/ take 1.5 s more
    proxy.clear()                       # everything passes again
    proxy.seen(is_listing)              # how many such requests arrived
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True, slots=True)
class Request:
    """What the proxy knows of a request: its method, the key (path without the bucket) and
    its query string."""

    method: str
    key: str
    query: str


Predicate = Callable[[Request], bool]


def is_listing(request: Request) -> bool:
    return request.method == "GET" and "list-type" in request.query


def is_upload(under: str = "") -> Predicate:
    """Puts (and multipart parts) of keys containing ``under``."""
    def match(request: Request) -> bool:
        return request.method in {"PUT", "POST"} and under in request.key
    return match


@dataclass(slots=True)
class _Rule:
    matches: Predicate
    hang: bool
    seconds: float = 0.0


class ThreadedProxy:
    """A server on 127.0.0.1 in front of ``target`` (``http://host:port``), with its own event
    loop on a daemon thread; a subclass sets its state, then calls this ``__init__``, and
    answers each connection in ``_client``."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self._port}"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0))
        self._port = server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class StoreProxy(ThreadedProxy):
    """A proxy in front of ``target`` (``http://host:port``), on its own thread."""

    def __init__(self, target: str) -> None:
        self._rules: list[_Rule] = []
        self._seen: list[Request] = []
        super().__init__(target)

    # ------------------------------------------------------------------ for tests

    def hang(self, matches: Predicate) -> None:
        """Requests that match get no answer while the rule holds."""
        self._loop.call_soon_threadsafe(self._rules.append, _Rule(matches, hang=True))

    def delay(self, matches: Predicate, seconds: float) -> None:
        """Requests that match are held ``seconds`` before they go upstream."""
        self._loop.call_soon_threadsafe(self._rules.append,
                                        _Rule(matches, hang=False, seconds=seconds))

    def clear(self) -> None:
        self._loop.call_soon_threadsafe(self._rules.clear)

    def seen(self, matches: Predicate) -> int:
        """How many requests that match have arrived so far."""
        return sum(1 for request in list(self._seen) if matches(request))

    def stop(self) -> None:
        """Drop every connection (held ones included) and stop the thread."""
        async def shutdown() -> None:
            held = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)

    # ------------------------------------------------------------------ serving

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:  # one request per connection: the answer says "Connection: close"
            head = await reader.readuntil(b"\r\n\r\n")
            request, body = _parse(head), await _read_body(reader, head)
            self._seen.append(request)
            if await self._pass(request, reader):
                await self._forward(head, body, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _pass(self, request: Request, reader: asyncio.StreamReader) -> bool:
        """Apply the rules; False when the client went away while held."""
        for rule in list(self._rules):
            if not rule.matches(request):
                continue
            if rule.hang:
                while rule in self._rules:
                    gone = asyncio.ensure_future(reader.read(1))
                    done, _ = await asyncio.wait({gone}, timeout=0.05)
                    if done:
                        return False  # the client gave up (or sent more, which we drop)
                    gone.cancel()
            else:
                await asyncio.sleep(rule.seconds)
        return True

    async def _forward(self, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        """One request upstream on a new connection, its answer back."""
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        try:
            up_writer.write(_with_header(head, b"Connection: close") + body)
            await up_writer.drain()
            answer = await up_reader.readuntil(b"\r\n\r\n")
            writer.write(_with_header(answer, b"Connection: close"))
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            await writer.drain()
        finally:
            up_writer.close()


def _parse(head: bytes) -> Request:
    method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    parts = urlsplit(target)
    path = unquote(parts.path).lstrip("/")
    key = path.split("/", 1)[1] if "/" in path else ""
    return Request(method, key, parts.query)


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return await reader.readexactly(length) if length else b""


def _with_header(head: bytes, header: bytes) -> bytes:
    """``head`` with any Connection header replaced by ``header``."""
    lines = [line for line in head.rstrip(b"\r\n").split(b"\r\n")
             if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, header]) + b"\r\n\r\n"
